"""OAuth2 end to end: a local authorization server, and the real Dovecot checking every token.

Dovecot's oauth2 passdb asks the test authorization server (``tests/oauth_server.py``) to
introspect each token mailsyncd sends, so a login succeeds only with a token that server
issued and still holds active: nothing here trusts the client's own account of itself.
"""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import pytest

from mailsyncd import cli
from tests.helpers import every_log_record, wait_for
from tests.integration.test_service import Daemon
from tests.oauth_server import OAuthServer
from tests.server_helpers import DevServer

MESSAGE = b"Subject: hello\r\nMessage-ID: <oauth-1@example.org>\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def provider() -> Iterator[OAuthServer]:
    with OAuthServer() as server:
        yield server


@pytest.fixture(scope="module")
def oauth_dovecot(tmp_path_factory: pytest.TempPathFactory, provider: OAuthServer) -> Iterator[DevServer]:
    with DevServer(tmp_path_factory.mktemp("oauth-dovecot"), users=(),
                   oauth2_introspection_url=f"{provider.url}/introspect") as server:
        yield server


_users = iter(range(1, 10_000))


@pytest.fixture
def user(oauth_dovecot: DevServer, provider: OAuthServer) -> str:
    """A fresh mailbox holding one message; its password is never used."""
    name = f"oauth{next(_users)}"
    oauth_dovecot.add_user(name, "unused-password")
    oauth_dovecot.append(name, "INBOX", MESSAGE)
    provider.user = name
    return name


def account_toml(directory: Path, server: DevServer, provider: OAuthServer, user: str, name: str = "acct",
                 protocol: str = "imap", mechanism: str = "auto") -> str:
    port = server.imaps_port if protocol == "imap" else server.pop3s_port
    return f"""
[[account]]
name = "{name}"
protocol = "{protocol}"
host = "{server.host}"
port = {port}
tls_ca_file = "{server.ca_file}"
username = "{user}"
auth = "oauth2"

[account.oauth2]
provider = "custom"
client_id = "{provider.client_id}"
authorize_url = "{provider.url}/authorize"
token_url = "{provider.url}/token"
device_url = "{provider.url}/device"
scopes = ["mail"]
mechanism = "{mechanism}"

[account.store]
format = "maildir"
path = "{directory / f'store-{name}'}"
"""


def write_config(directory: Path, *accounts: str) -> Path:
    path = directory / "config.toml"
    path.write_text(f'[general]\nstate = "{directory / "state.db"}"\n' + "".join(accounts))
    path.chmod(0o600)
    return path


def seed_token(directory: Path, provider: OAuthServer, user: str, name: str = "acct") -> Path:
    """A refresh token in the default token file, as ``mailsyncd auth`` leaves it."""
    path = directory / "oauth2" / f"{name}.json"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(json.dumps({"refresh_token": provider.grant(user), "issued_at": time.time()}))
    path.chmod(0o600)
    return path


def stored(directory: Path, name: str = "acct") -> list[bytes]:
    return [path.read_bytes() for path in sorted((directory / f"store-{name}").rglob("*"))
            if path.parent.name in ("cur", "new")]


def sync(config: Path) -> int:
    return cli.main(["--config", str(config), "-q", "sync"])


@pytest.mark.parametrize(("protocol", "mechanism"), [
    ("imap", "auto"), ("imap", "oauthbearer"), ("pop3", "auto"), ("pop3", "oauthbearer")])
def test_sync_logs_in_with_a_token_dovecot_checks(tmp_path: Path, oauth_dovecot: DevServer, provider: OAuthServer,
                                                    user: str, protocol: str, mechanism: str) -> None:
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user, protocol=protocol,
                                                 mechanism=mechanism))
    seed_token(tmp_path, provider, user)
    checked = provider.count("introspect-active")
    assert sync(config) == 0
    assert stored(tmp_path) == [MESSAGE.replace(b"\r\n", b"\n")]
    assert provider.count("introspect-active") > checked, "Dovecot did not check the token"
    wanted = "XOAUTH2" if mechanism == "auto" else "OAUTHBEARER"
    assert re.search(rf"Login: user=<{user}>, method={wanted}", oauth_dovecot.log_file.read_text())
    # The stored access token is used again while it is fresh: no second refresh.
    refreshes = provider.count("/token")
    assert sync(config) == 0
    assert provider.count("/token") == refreshes


def test_an_expired_access_token_is_refreshed_before_the_login(
        tmp_path: Path, oauth_dovecot: DevServer, provider: OAuthServer, user: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provider, "lifetime", 2.0)
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user))
    seed_token(tmp_path, provider, user)
    assert sync(config) == 0
    refreshes, refused = provider.count("/token"), provider.count("introspect-inactive")
    time.sleep(2.1)
    oauth_dovecot.append(user, "INBOX", MESSAGE.replace(b"oauth-1", b"oauth-2"))
    assert sync(config) == 0
    assert len(stored(tmp_path)) == 2
    assert provider.count("/token") == refreshes + 1
    assert provider.count("introspect-inactive") == refused, "a stale token was sent"


@pytest.mark.parametrize(("protocol", "mechanism"), [
    ("imap", "xoauth2"), ("imap", "oauthbearer"), ("pop3", "xoauth2"), ("pop3", "oauthbearer")])
def test_a_token_the_server_refuses_is_refreshed_once_and_the_login_retried(
        tmp_path: Path, oauth_dovecot: DevServer, provider: OAuthServer, user: str, protocol: str,
        mechanism: str) -> None:
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user, protocol=protocol,
                                                 mechanism=mechanism))
    seed_token(tmp_path, provider, user)
    assert sync(config) == 0
    provider.expire_access_tokens()  # revoked early: the client still thinks it fresh
    refreshes, refused = provider.count("/token"), provider.count("introspect-inactive")
    oauth_dovecot.append(user, "INBOX", MESSAGE.replace(b"oauth-1", b"oauth-2"))
    done = subprocess.run([sys.executable, "-m", "mailsyncd", "--config", str(config), "sync"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert len(stored(tmp_path)) == 2
    assert provider.count("introspect-inactive") == refused + 1
    assert provider.count("/token") == refreshes + 1
    # The server's own reason comes through, after its error challenge was answered. (Dovecot
    # takes any answer there; the answer itself is pinned in tests/unit/test_oauth2.py.)
    assert re.search(r"refused the access token \(acct: login refused by 127\.0\.0\.1: "
                     r"(\[AUTHENTICATIONFAILED\] |\[AUTH\] )?Authentication failed\.\); refreshing it once",
                     done.stderr), done.stderr


def test_a_revoked_refresh_token_fails_that_account_in_one_line_and_the_others_sync(
        tmp_path: Path, oauth_dovecot: DevServer, provider: OAuthServer, user: str) -> None:
    other = f"{user}b"
    oauth_dovecot.add_user(other, "unused-password")
    oauth_dovecot.append(other, "INBOX", MESSAGE)
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user, name="revoked"),
                          account_toml(tmp_path, oauth_dovecot, provider, other, name="fine"))
    seed_token(tmp_path, provider, user, "revoked")
    seed_token(tmp_path, provider, other, "fine")
    provider.revoke(user)
    done = subprocess.run([sys.executable, "-m", "mailsyncd", "--config", str(config), "sync"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr
    assert "revoked:" in errors[0] and "run `mailsyncd auth revoked` again" in errors[0]
    assert "Traceback" not in done.stderr
    assert len(stored(tmp_path, "fine")) == 1
    assert not (tmp_path / "store-revoked").exists() or not stored(tmp_path, "revoked")


def _auth_process(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mailsyncd", "--config", str(config), "-v", "auth", "acct",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_private(token_file: Path) -> None:
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700


def test_auth_code_flow_through_the_loopback_redirect(tmp_path: Path, oauth_dovecot: DevServer,
                                                      provider: OAuthServer, user: str) -> None:
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user))
    process = _auth_process(config, "--no-browser")
    assert process.stdout is not None
    url = next(line.strip() for line in process.stdout if line.startswith(provider.url))
    # The test is the browser: the provider redirects it to the loopback port, which answers.
    with urllib.request.urlopen(url, timeout=30) as page:  # noqa: S310  # our own loopback URL
        assert b"the login is done" in page.read()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    token_file = tmp_path / "oauth2" / "acct.json"
    assert f"refresh token is in {token_file}" in out
    _check_private(token_file)
    assert not any(token in out + err for token in provider.issued), "a token was printed"
    assert sync(config) == 0
    assert stored(tmp_path) == [MESSAGE.replace(b"\r\n", b"\n")]


def test_auth_device_flow(tmp_path: Path, oauth_dovecot: DevServer, provider: OAuthServer, user: str) -> None:
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user))
    process = _auth_process(config, "--device")
    assert process.stdout is not None
    line = next(line for line in process.stdout if "enter the code" in line)
    code = re.search(r"enter the code (\w+)", line)
    assert code is not None
    time.sleep(1.5)  # a poll or two that finds the login pending
    provider.approve(code[1])
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    _check_private(tmp_path / "oauth2" / "acct.json")
    assert not any(token in out + err for token in provider.issued), "a token was printed"
    assert sync(config) == 0


def test_check_reports_the_token_without_showing_it(tmp_path: Path, oauth_dovecot: DevServer,
                                                    provider: OAuthServer, user: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user))
    assert cli.main(["--config", str(config), "check"]) == 1
    assert "run `mailsyncd auth acct`" in capsys.readouterr().out
    seed_token(tmp_path, provider, user)
    assert cli.main(["--config", str(config), "check"]) == 0
    out = capsys.readouterr().out
    assert "acct: OAuth2 login of" in out and "the refresh works" in out
    assert not any(token in out for token in provider.issued)


def test_no_token_reaches_any_log_record_or_the_state_database(
        tmp_path: Path, oauth_dovecot: DevServer, provider: OAuthServer, user: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As the password test in test_invariant_guards: every logger at debug level, records
    read before any filter, through a good login, a refused access token and a revoked grant."""
    records = every_log_record(monkeypatch)
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user))
    seed_token(tmp_path, provider, user)
    assert cli.main(["--config", str(config), "-v", "sync"]) == 0
    provider.expire_access_tokens()
    assert cli.main(["--config", str(config), "-v", "sync"]) == 0
    provider.revoke(user)
    provider.expire_access_tokens()
    assert cli.main(["--config", str(config), "-v", "sync"]) == 1
    assert any("AUTHENTICATE" in text for text in records), "the login was not logged at all: nothing was tested"
    tokens = list(provider.issued)
    assert len(tokens) >= 4
    leaked = [text for text in records if any(token in text for token in tokens)]
    assert not leaked, leaked[:3]
    database = b"".join(path.read_bytes() for path in tmp_path.glob("state.db*"))
    assert database and not any(token.encode() in database for token in tokens)


def test_the_daemon_outlives_many_short_lived_tokens(tmp_path: Path, oauth_dovecot: DevServer,
                                                     provider: OAuthServer, user: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Access tokens good for 3 s, a daemon with an IDLE watch and a 10 s poll over 25 s,
    and a server restart that makes the watch log in again: every message arrives once,
    and no stale token is ever sent."""
    monkeypatch.setattr(provider, "lifetime", 3.0)
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user)
                          .replace('auth = "oauth2"', 'auth = "oauth2"\ninterval = "10s"\nidle = ["INBOX"]'))
    seed_token(tmp_path, provider, user)
    refused = provider.count("introspect-inactive")
    daemon = Daemon(config)
    try:
        daemon.wait_log("acct/INBOX: watching with IDLE")
        daemon.wait_log("acct: 5 folders, 1 new")
        time.sleep(4)  # every token handed out so far has expired
        oauth_dovecot.append(user, "INBOX", MESSAGE.replace(b"oauth-1", b"pushed"))
        assert wait_for(lambda: len(stored(tmp_path)) == 2, timeout=5), daemon.log()
        oauth_dovecot.restart()  # the watch logs in again, with a token refreshed for it
        daemon.wait_log("acct/INBOX: watching with IDLE", count=2, timeout=20)
        time.sleep(4)
        oauth_dovecot.append(user, "Polled", MESSAGE.replace(b"oauth-1", b"polled"))
        assert wait_for(lambda: len(stored(tmp_path)) == 3, timeout=15), daemon.log()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    log = daemon.log()
    # The restart's cut connection is a warning; a refused login would be an error.
    assert "refused" not in log and " ERROR " not in log and "Traceback" not in log, log
    assert len(set(stored(tmp_path))) == 3  # nothing fetched twice
    assert provider.count("introspect-inactive") == refused, "a stale token was sent"
    assert provider.count("/token") >= 3


def test_the_daemon_keeps_its_login_only_while_the_token_is_fresh(
        tmp_path: Path, oauth_dovecot: DevServer, provider: OAuthServer, user: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens good for 3 s (renewed after 2.4): runs right after each other share the
    login; a run after the token is due logs in again, with a fresh token, and succeeds."""
    monkeypatch.setattr(provider, "lifetime", 3.0)
    config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user)
                          .replace('auth = "oauth2"', 'auth = "oauth2"\ninterval = "20m"'))
    seed_token(tmp_path, provider, user)
    logins = re.compile(rf"imap-login: Info: Login: user=<{user}>")
    since = oauth_dovecot.log_file.stat().st_size

    def count_logins() -> int:
        with oauth_dovecot.log_file.open(errors="replace") as log:
            log.seek(since)
            return len(logins.findall(log.read()))

    daemon = Daemon(config)
    try:
        assert wait_for(lambda: len(stored(tmp_path)) == 1, timeout=10), daemon.log()
        oauth_dovecot.deliver(user, "INBOX", MESSAGE.replace(b"oauth-1", b"soon"))
        daemon.send(signal.SIGUSR1)
        assert wait_for(lambda: len(stored(tmp_path)) == 2, timeout=5), daemon.log()
        assert count_logins() == 1
        time.sleep(3)  # the token of that login is due
        oauth_dovecot.deliver(user, "INBOX", MESSAGE.replace(b"oauth-1", b"later"))
        daemon.send(signal.SIGUSR1)
        assert wait_for(lambda: len(stored(tmp_path)) == 3, timeout=5), daemon.log()
        assert count_logins() == 2
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert " ERROR " not in daemon.log() and "Traceback" not in daemon.log(), daemon.log()


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A keyring in this process's memory, standing in for the desktop's."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.entries.pop((service, username), None)


def test_tokens_in_the_keyring_are_refreshed_and_rotated_there(
        tmp_path: Path, oauth_dovecot: DevServer, provider: OAuthServer, user: str) -> None:
    memory = MemoryKeyring()
    previous = keyring.get_keyring()
    keyring.set_keyring(memory)
    try:
        config = write_config(tmp_path, account_toml(tmp_path, oauth_dovecot, provider, user).replace(
            'mechanism = "auto"', 'mechanism = "auto"\nstorage = "keyring"'))
        first = provider.grant(user)
        key = ("mailsyncd-oauth2:acct", user)
        memory.entries[key] = json.dumps({"refresh_token": first, "issued_at": time.time()})
        assert sync(config) == 0
        assert len(stored(tmp_path)) == 1
        kept = json.loads(memory.entries[key])
        assert kept["refresh_token"] != first and kept["refresh_token"] in provider.refresh  # rotated, saved
        assert not (tmp_path / "oauth2" / "acct.json").exists()
    finally:
        keyring.set_keyring(previous)
