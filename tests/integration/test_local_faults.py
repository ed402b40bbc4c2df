"""Local faults end in one line for the account they spoil, the run recorded failed, and
the other accounts synced: a full disk under the store or under the state database, a
read-only store, a store path that is a file, a damaged or locked state database.

The full and read-only disks are real: small tmpfs mounts made for the test (root only).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DovecotUser
from tests.helpers import corpus_messages, run_cli, write_config

needs_mount = pytest.mark.skipif(os.geteuid() != 0, reason="a small real filesystem needs root to mount")


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def two_accounts(tmp_path: Path, dovecot: DovecotUser, broken_store: Path, state: Path | None = None) -> Path:
    """Account "broken" stores into ``broken_store``, account "fine" beside the config."""
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password, name="fine")
    text = config.read_text()
    account = text[text.index("[[account]]"):]
    broken = account.replace('name = "fine"', 'name = "broken"').replace(
        str(tmp_path / "store-fine"), str(broken_store))
    if state is not None:
        text = text.replace(str(tmp_path / "state.db"), str(state))
    config.write_text(text.replace(account, broken + "\n" + account))
    return config


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if " ERROR " in line]


def fill(dovecot: DovecotUser, count: int = 6) -> None:
    dovecot.server.append_many(dovecot.user, "INBOX", [p.read_bytes() for p in corpus_messages(count)])


def assert_fine_synced(tmp_path: Path, count: int) -> None:
    stored = [name for sub in ("new", "cur") for name in os.listdir(tmp_path / "store-fine" / sub)]
    assert len(stored) == count


def last_results(config: Path) -> dict[str, str | None]:
    status = json.loads(run_cli(config, "status", "--json").stdout)
    return {entry["account"]: entry["last_run"] and entry["last_run"]["result"] for entry in status}


@needs_mount
def test_a_full_store_disk_fails_its_account_only(tmp_path: Path, dovecot: DovecotUser) -> None:
    fill(dovecot)
    with small_disk(tmp_path / "small", "24k") as disk:
        config = two_accounts(tmp_path, dovecot, disk / "mail")
        result = run_cli(config, "sync")
        assert result.returncode == 1, result.stderr
        (line,) = error_lines(result)
        assert "broken" in line and "no space left" in line.lower(), line
        assert_fine_synced(tmp_path, 6)
        assert last_results(config) == {"broken": "failed", "fine": "ok"}


@needs_mount
def test_a_read_only_store_fails_its_account_only(tmp_path: Path, dovecot: DovecotUser) -> None:
    fill(dovecot, 2)
    with small_disk(tmp_path / "ro", "1m") as disk:
        (disk / "mail").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        config = two_accounts(tmp_path, dovecot, disk / "mail")
        result = run_cli(config, "sync")
        assert result.returncode == 1, result.stderr
        (line,) = error_lines(result)
        assert "broken" in line and "read-only" in line.lower(), line
        assert_fine_synced(tmp_path, 2)
        check = run_cli(config, "check")
        assert check.returncode == 1 and "broken" in check.stdout and "read-only" in check.stdout.lower(), check


def test_a_store_path_that_is_a_file_fails_its_account_only(tmp_path: Path, dovecot: DovecotUser) -> None:
    fill(dovecot, 2)
    (tmp_path / "in-the-way").write_text("not a directory\n")
    config = two_accounts(tmp_path, dovecot, tmp_path / "in-the-way" / "mail")
    result = run_cli(config, "sync")
    assert result.returncode == 1, result.stderr
    (line,) = error_lines(result)
    assert "broken" in line and str(tmp_path / "in-the-way") in line, line
    assert_fine_synced(tmp_path, 2)
    assert last_results(config) == {"broken": "failed", "fine": "ok"}
    check = run_cli(config, "check")
    assert check.returncode == 1 and "broken: FAILED" in check.stdout, check


@needs_mount
def test_a_full_state_disk_is_one_line(tmp_path: Path, dovecot: DovecotUser) -> None:
    fill(dovecot, 20)
    with small_disk(tmp_path / "state", "2m") as disk:
        config = two_accounts(tmp_path, dovecot, tmp_path / "store-broken", state=disk / "state.db")
        assert run_cli(config, "status").returncode == 0  # a database, made while there was room
        ballast = disk / "ballast"
        with contextlib.suppress(OSError), ballast.open("wb") as out:
            while True:
                out.write(b"x" * 4096)
                out.flush()
        result = run_cli(config, "sync")
        assert result.returncode == 1, result.stderr
        lines = error_lines(result)
        assert lines and all("state database" in line and str(disk / "state.db") in line for line in lines), lines
        ballast.unlink()
        assert run_cli(config, "sync").returncode == 0  # room again: everything is fetched, once
        assert_fine_synced(tmp_path, 20)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_state_database_is_one_line_naming_it(tmp_path: Path, dovecot: DovecotUser, damage: str) -> None:
    fill(dovecot, 2)
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    assert run_cli(config, "sync").returncode == 0
    state = tmp_path / "state.db"
    with sqlite3.connect(state) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if damage == "garbage":
        state.write_bytes(os.urandom(3 * 4096))
    else:
        with state.open("r+b") as out:
            out.truncate(state.stat().st_size // 3)
    for command in ("sync", "status"):
        result = run_cli(config, command)
        assert result.returncode == 1, result.stderr
        (line,) = error_lines(result)
        assert str(state) in line and "damaged" in line and "move it aside" in line, line


def test_a_state_database_locked_by_another_program_is_one_quick_line(tmp_path: Path,
                                                                       dovecot: DovecotUser) -> None:
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    assert run_cli(config, "status").returncode == 0
    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        result = run_cli(config, "sync")
        took = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
    assert result.returncode == 1, result.stderr
    (line,) = error_lines(result)
    assert str(tmp_path / "state.db") in line and "locked" in line, line
    assert took < 9, took  # not the 10-second wait meant for mailsyncd's own short readers


def test_an_unexpected_error_is_one_line_recorded_and_the_other_accounts_sync(
        tmp_path: Path, dovecot: DovecotUser, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An error no code foresaw (a bug) stops only its account, as a disk fault does."""
    from mailsyncd import cli, log
    from mailsyncd.app import App

    fill(dovecot, 2)
    config = two_accounts(tmp_path, dovecot, tmp_path / "store-broken")
    real = App._sync

    def broken(self: App, account: Any, *args: Any) -> None:
        if account.name == "broken":
            raise RuntimeError("something nobody expected")
        real(self, account, *args)

    monkeypatch.setattr(App, "_sync", broken)
    log.setup(stream=sys.stderr)
    assert cli.main(["--config", str(config), "sync"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "broken: sync failed unexpectedly: RuntimeError: something nobody expected" in errors[0]
    monkeypatch.undo()
    assert_fine_synced(tmp_path, 2)
    assert last_results(config) == {"broken": "failed", "fine": "ok"}
