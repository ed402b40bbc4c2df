"""The command line's rough edges: options after the command, a reader that goes away,
one time convention with the zone shown, and log lines journald can grade."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from mailsyncd import cli
from mailsyncd import log as log_setup


@pytest.fixture
def india(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local zone with a half-hour offset, which no default could fake."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("argv", [
    ["-v", "--config", "c.toml", "status"],
    ["status", "-v", "--config", "c.toml"],
    ["--config", "c.toml", "status", "-v"],
])
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    assert (args.command, args.verbose, str(args.config), args.quiet) == ("status", 1, "c.toml", False)


def test_options_not_given_after_the_command_keep_what_came_before() -> None:
    args = cli.build_parser().parse_args(["-vv", "-q", "sync", "--dry-run"])
    assert (args.verbose, args.quiet, args.config) == (2, True, None)


def test_a_reader_that_goes_away_ends_quietly() -> None:
    process = subprocess.Popen([sys.executable, "-m", "mailsyncd", "example-config"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # as `| head` does, before anything was read
    with process.stderr:
        error = process.stderr.read().decode()
    assert process.wait(30) == 1
    assert "Traceback" not in error and "BrokenPipe" not in error, error


def test_status_times_are_local_with_their_offset(india: None) -> None:
    assert cli._when(datetime(2026, 3, 1, 12, 0, tzinfo=UTC)) == "2026-03-01T17:30:00+05:30"


def _one_line(record_level: int, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    if not environ:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    log_setup.setup(stream=stream)
    try:
        logging.getLogger("mailsyncd.test").log(record_level, "work: folder INBOX failed")
    finally:
        logging.getLogger().handlers.clear()
    return stream.getvalue()


@pytest.mark.parametrize(("level", "prefix"), [(logging.ERROR, "<3>"), (logging.WARNING, "<4>"),
                                               (logging.INFO, "<6>")])
def test_under_journald_lines_carry_their_priority(level: int, prefix: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    line = _one_line(level, {"JOURNAL_STREAM": "8:1234"}, monkeypatch)
    assert line.startswith(prefix) and line.endswith("work: folder INBOX failed\n"), line


def test_elsewhere_lines_carry_local_time_and_zone(india: None, monkeypatch: pytest.MonkeyPatch) -> None:
    line = _one_line(logging.ERROR, {}, monkeypatch)
    assert line.split(" ")[1].endswith("+0530") and not line.startswith("<"), line
