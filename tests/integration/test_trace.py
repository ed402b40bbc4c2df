"""``-vv``: a protocol trace of both protocols, with credentials and message contents
left out, and nothing of it at ``-v``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import DovecotUser
from tests.helpers import run_cli, write_config

BODY = "a line of the body that no trace may show"


def deliver(dovecot: DovecotUser) -> None:
    dovecot.server.append_many(dovecot.user, "INBOX", [
        f"From: a@example.org\r\nSubject: trace {n}\r\nMessage-ID: <trace{n}@test>\r\n\r\n{BODY} {n}\r\n".encode()
        for n in range(3)])


@pytest.mark.parametrize(("protocol", "expected"), [
    ("imap", [r"> \S+ LOGIN <\d+ bytes left out>", r"> \S+ UID FETCH ", r"< <literal of \d+ bytes left out>"]),
    ("pop3", [r"> USER ", r"> PASS <\d+ bytes left out>", r"> RETR 1", r"< \+OK"]),
])
def test_the_trace_shows_the_protocol_and_leaves_secrets_and_bodies_out(
        tmp_path: Path, dovecot: DovecotUser, protocol: str, expected: list[str]) -> None:
    deliver(dovecot)
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password, protocol=protocol)
    traced = run_cli(config, "sync", "-vv")
    assert traced.returncode == 0, traced.stderr
    for pattern in expected:
        assert re.search(pattern, traced.stderr), (pattern, traced.stderr[-3000:])
    assert dovecot.password not in traced.stderr + traced.stdout
    assert BODY not in traced.stderr and "Subject: trace" not in traced.stderr


def test_one_v_has_no_trace(tmp_path: Path, dovecot: DovecotUser) -> None:
    deliver(dovecot)
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    verbose = run_cli(config, "sync", "-v")
    assert verbose.returncode == 0, verbose.stderr
    assert "INFO" in verbose.stderr and " UID FETCH " not in verbose.stderr and " LOGIN " not in verbose.stderr
