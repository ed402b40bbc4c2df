"""The command line as users meet it: exit codes, one-line errors, no tracebacks, TLS
refusals, the single-instance lock, status and check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mailsyncd.state import db
from tests.conftest import DovecotUser
from tests.helpers import corpus_messages, run_cli, write_config


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(("edit", "key"), [
    (("[general]", "[general]\ncolour = 'blue'"), "general.colour"),
    (("port = ", "port = 'imaps'  # "), 'account "acct".port'),
    (('password = "', 'passwd = "'), 'account "acct".passwd'),
    (("tls_ca_file", 'security = "plain"\ntls_ca_file'), 'account "acct".security'),
])
def test_config_errors_exit_2_with_one_line_naming_the_key(
        tmp_path: Path, dovecot: DovecotUser, edit: tuple[str, str], key: str) -> None:
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    config.write_text(config.read_text().replace(*edit, 1))
    result = run_cli(config, "sync")
    assert result.returncode == 2
    line = one_error_line(result)
    assert str(config) in line and key in line
    assert dovecot.password not in result.stderr


def test_missing_password_source_names_the_allowed_keys(tmp_path: Path, dovecot: DovecotUser) -> None:
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    config.write_text(config.read_text().replace(f'password = "{dovecot.password}"', ""))
    result = run_cli(config, "check")
    assert result.returncode == 2
    assert "password_command" in one_error_line(result)


def test_untrusted_certificate_is_refused_with_one_line(tmp_path: Path, dovecot: DovecotUser) -> None:
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    config.write_text(config.read_text().replace("tls_ca_file", "# tls_ca_file"))
    result = run_cli(config, "sync")
    assert result.returncode == 1
    assert "not trusted" in one_error_line(result)
    assert not list((tmp_path / "store-acct").rglob("*/cur/*"))


def test_wrong_password_fails_the_account_not_the_run_and_is_recorded(tmp_path: Path, dovecot: DovecotUser) -> None:
    config = write_config(tmp_path, dovecot.server, dovecot.user, "wrong-password")
    result = run_cli(config, "sync")
    assert result.returncode == 1
    assert "login refused" in one_error_line(result)
    assert "wrong-password" not in result.stderr
    status = json.loads(run_cli(config, "status", "--json").stdout)
    assert status[0]["last_run"]["result"] == "failed"
    assert "wrong-password" not in json.dumps(status)


@pytest.mark.parametrize("security", ["starttls", "plain"])
def test_starttls_and_explicitly_allowed_plaintext(tmp_path: Path, dovecot: DovecotUser, security: str) -> None:
    dovecot.server.append_many(dovecot.user, "INBOX", [p.read_bytes() for p in corpus_messages(3)])
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    allow = "allow_plaintext = true\n" if security == "plain" else ""
    plain_port = f'port = {dovecot.server.imap_port}\nsecurity = "{security}"\n{allow}'
    config.write_text(config.read_text().replace(f"port = {dovecot.server.imaps_port}", plain_port))
    result = run_cli(config, "sync")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "store-acct" / "new").iterdir())) == 3


def test_a_second_instance_refuses_at_once(tmp_path: Path, dovecot: DovecotUser) -> None:
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    with db.instance_lock(str(tmp_path / "state.db")):
        result = run_cli(config, "sync", timeout=30)
    assert result.returncode == 2
    assert "another mailsyncd" in one_error_line(result)


def test_status_check_and_db_upgrade(tmp_path: Path, dovecot: DovecotUser) -> None:
    dovecot.server.append_many(dovecot.user, "Archive/2024", [p.read_bytes() for p in corpus_messages(4)])
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    check = run_cli(config, "check")
    assert check.returncode == 0 and "Archive/2024" in check.stdout
    assert not (tmp_path / "store-acct").exists(), "check must change nothing"
    assert run_cli(config, "db", "upgrade").returncode == 0
    assert run_cli(config, "sync").returncode == 0
    status = json.loads(run_cli(config, "status", "--json").stdout)
    folders = {folder["name"]: folder for folder in status[0]["folders"]}
    assert folders["Archive/2024"]["messages"] == {"stored": 4}
    assert status[0]["last_run"]["result"] == "ok" and status[0]["last_run"]["fetched"] == 4
    text = run_cli(config, "status").stdout
    assert "Archive/2024: 4 stored" in text
    state_mode = (tmp_path / "state.db").stat().st_mode & 0o777
    assert state_mode == 0o600


def test_help_and_usage_errors() -> None:
    result = subprocess.run([sys.executable, "-m", "mailsyncd", "--help"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0
    for command in ("sync", "status", "check", "db", "demo"):
        assert command in result.stdout
    bad = subprocess.run([sys.executable, "-m", "mailsyncd", "frobnicate"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_no_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "nope.toml", "sync")
    assert result.returncode == 2
    assert "no such file" in one_error_line(result)


def test_the_password_never_reaches_logs_or_the_state(tmp_path: Path, dovecot: DovecotUser) -> None:
    dovecot.server.append_many(dovecot.user, "INBOX", [p.read_bytes() for p in corpus_messages(3)])
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password)
    verbose = subprocess.run([sys.executable, "-m", "mailsyncd", "--config", str(config), "-v", "sync"],
                             capture_output=True, text=True, check=False)
    assert verbose.returncode == 0, verbose.stderr
    assert "DEBUG" in verbose.stderr or "INFO" in verbose.stderr
    assert dovecot.password not in verbose.stderr + verbose.stdout
    for path in tmp_path.glob("state.db*"):
        assert dovecot.password.encode() not in path.read_bytes()
