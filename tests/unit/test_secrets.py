"""Password sources: each one works, and no failure or repr shows the password."""

from __future__ import annotations

import copy
import logging
import pickle
import sys
import time
from pathlib import Path

import keyring
import keyring.errors
import pytest

from mailsyncd import secrets
from mailsyncd.config import PasswordSource, parse_config
from mailsyncd.errors import SecretError
from mailsyncd.log import RedactingFilter
from mailsyncd.secrets import Secret, keyring_service, resolve_password

SECRET = "hunter2-s3cret"


def resolve(kind: str, value: str) -> str:
    return resolve_password(PasswordSource(kind, value), "work", "me@example.org").reveal()  # type: ignore[arg-type]


def failure(kind: str, value: str) -> str:
    """The message of the SecretError that resolving raises, checked to hold no secret."""
    with pytest.raises(SecretError) as caught:
        resolve(kind, value)
    message = str(caught.value)
    assert SECRET not in message
    assert message.startswith('account "work": ')
    return message


# --- Secret ----------------------------------------------------------------------------------


def test_secret_hides_itself() -> None:
    secret = Secret(SECRET)
    assert secret.reveal() == SECRET
    assert repr(secret) == str(secret) == f"{secret}" == "Secret('***')"
    assert SECRET not in repr([secret, {"password": secret}])


def test_secret_cannot_be_pickled_or_copied() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(SECRET))
    with pytest.raises(TypeError):
        copy.copy(Secret(SECRET))


# --- password_command ----------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "password"), [
    (f"echo {SECRET}", SECRET),
    (f"printf '{SECRET}'", SECRET),
    (f"printf '{SECRET}\\r\\n'", SECRET),
    (f"printf '{SECRET}\\nsecond line\\n'", SECRET),
    ("printf '  spaced out  \\n'", "  spaced out  "),
    ("printf 'p\\303\\244ss\\n'", "päss"),
    ("echo pw; echo noise >&2", "pw"),
])
def test_command_gives_its_first_line(command: str, password: str) -> None:
    assert resolve("command", command) == password


def test_failing_command_shows_status_and_stderr_but_never_stdout() -> None:
    message = failure("command", f"echo {SECRET}; echo 'gpg: decryption failed' >&2; echo more >&2; exit 1")
    assert message == 'account "work": password_command exited with status 1: gpg: decryption failed'


def test_failing_command_shows_no_token_it_printed_on_stderr() -> None:
    token = "ya29.a0AfH6SMBx7Qk2"
    message = failure("command", f"echo 'oauth: refresh failed for token {token}' >&2; "
                                 "echo 'second line: aGVsbG8gd29ybGQgdG9rZW4=' >&2; exit 4")
    assert message == 'account "work": password_command exited with status 4: oauth: refresh failed for token ***'


def test_failing_command_without_stderr() -> None:
    assert failure("command", f"echo {SECRET}; exit 3").endswith("password_command exited with status 3")


def test_killed_command() -> None:
    assert "killed by signal 9" in failure("command", f"echo {SECRET}; kill -9 $$")


@pytest.mark.parametrize(("command", "problem"), [
    ("true", "empty first line"),
    (f"printf '\\n{SECRET}\\n'", "empty first line"),
    ("printf 'hunter2-s3cret\\377\\n'", "not UTF-8"),
])
def test_command_output_that_is_no_password(command: str, problem: str) -> None:
    assert problem in failure("command", command)


def test_slow_command_is_killed_with_its_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "COMMAND_TIMEOUT", 0.5)
    started = time.monotonic()
    # The background sleep holds stdout open; only killing the group ends the wait.
    message = failure("command", f"echo {SECRET}; sleep 60 & sleep 60")
    assert "did not finish within 0.5 s" in message
    assert time.monotonic() - started < 10


def test_command_gets_no_stdin() -> None:
    assert resolve("command", "cat; echo pw") == "pw"


# --- password_env --------------------------------------------------------------------------------


def test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILSYNCD_TEST_PW", SECRET)
    assert resolve("env", "MAILSYNCD_TEST_PW") == SECRET


def test_env_missing_or_empty_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILSYNCD_TEST_PW", raising=False)
    assert failure("env", "MAILSYNCD_TEST_PW").endswith("the variable MAILSYNCD_TEST_PW is not set")
    monkeypatch.setenv("MAILSYNCD_TEST_PW", "")
    assert failure("env", "MAILSYNCD_TEST_PW").endswith("the variable MAILSYNCD_TEST_PW is empty")


# --- password_file -------------------------------------------------------------------------------


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_file_gives_its_first_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "pw", f"{SECRET}\r\nsecond\n".encode())
    with caplog.at_level(logging.WARNING, logger="mailsyncd.secrets"):
        assert resolve("file", str(path)) == SECRET
    assert caplog.records == []


def test_file_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "pw", SECRET.encode())
    assert resolve("file", "~/pw") == SECRET


def test_readable_file_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "pw", f"{SECRET}\n".encode(), 0o644)
    with caplog.at_level(logging.WARNING, logger="mailsyncd.secrets"):
        assert resolve("file", str(path)) == SECRET
    (record,) = caplog.records
    assert str(path) in record.getMessage()
    assert "chmod 600" in record.getMessage()
    assert SECRET not in caplog.text


def test_missing_file(tmp_path: Path) -> None:
    message = failure("file", str(tmp_path / "nope"))
    assert message.endswith(f"cannot read password_file {tmp_path / 'nope'}: No such file or directory")


@pytest.mark.parametrize(("data", "problem"), [
    (b"", "empty first line"),
    (b"\n" + SECRET.encode(), "empty first line"),
    (SECRET.encode() + b"\xff\n", "not UTF-8"),
])
def test_file_that_holds_no_password(tmp_path: Path, data: bytes, problem: str) -> None:
    path = write(tmp_path / "pw", data)
    assert problem in failure("file", str(path))


# --- keyring -------------------------------------------------------------------------------------


def test_keyring_asks_for_service_and_username(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, str]] = []

    def get_password(service: str, username: str) -> str:
        asked.append((service, username))
        return SECRET

    monkeypatch.setattr(keyring, "get_password", get_password)
    assert resolve("keyring", "") == SECRET
    assert asked == [("mailsyncd:work", "me@example.org")]
    assert keyring_service("work") == "mailsyncd:work"


def test_keyring_without_the_password_says_how_to_store_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyring, "get_password", lambda service, username: None)
    assert failure("keyring", "").endswith("store it with: keyring set mailsyncd:work me@example.org")


def test_keyring_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def get_password(service: str, username: str) -> str:
        raise keyring.errors.NoKeyringError("No recommended backend was available")

    monkeypatch.setattr(keyring, "get_password", get_password)
    assert "the keyring failed: No recommended backend" in failure("keyring", "")


def test_keyring_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keyring", None)
    assert "keyring package is not installed" in failure("keyring", "")


# --- inline --------------------------------------------------------------------------------------


def test_inline() -> None:
    assert resolve("inline", SECRET) == SECRET


# --- password_for: resolved and registered for redaction in one call ---------------------------


def test_password_for_registers_the_password_for_redaction(tmp_path: Path) -> None:
    password = "only-for-this-test-" + str(time.monotonic_ns())
    config = parse_config(f"""
[general]
state = "{tmp_path / 'state.db'}"

[[account]]
name = "work"
protocol = "imap"
host = "imap.example.org"
username = "me"
password = "{password}"

[account.store]
format = "maildir"
path = "{tmp_path / 'store'}"
""", tmp_path / "config.toml")
    record = logging.LogRecord("mailsyncd", logging.ERROR, __file__, 1, "login as %s with %s failed", ("me", password),
                               None)
    RedactingFilter().filter(record)
    assert password in record.getMessage()  # not resolved yet: nothing to hide
    assert secrets.password_for(config.accounts[0]).reveal() == password
    RedactingFilter().filter(record)
    assert record.getMessage() == "login as me with *** failed"
