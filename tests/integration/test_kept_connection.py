"""The daemon stays logged in between runs of an account, against the real Dovecot: the
server's own log counts the logins; a session the server ends is replaced without a failed
run; stopping, removing or changing the account logs out."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from tests.conftest import DovecotUser
from tests.helpers import wait_for
from tests.integration.test_scale import server_sessions
from tests.integration.test_service import Daemon, account_toml, daemons, message, start, stored, write_accounts

__all__ = ["daemons"]  # the fixture, used by name

RARE = 'interval = "20m"'  # runs only when asked (SIGUSR1), so the test says when


def _deliver(dovecot: DovecotUser, subject: str) -> None:
    dovecot.server.deliver(dovecot.user, "INBOX", message(subject))


def _dovecot_log(dovecot: DovecotUser) -> str:
    return dovecot.server.log_file.read_text(errors="replace")


def _logins(dovecot: DovecotUser, since: int) -> int:
    return len(re.findall(rf"imap-login: Info: Login: user=<{re.escape(dovecot.user)}>",
                          _dovecot_log(dovecot)[since:]))


def _sessions_open(dovecot: DovecotUser) -> bool:
    return dovecot.user in dovecot.server.doveadm("who", "-1")


def _runs_to(daemon: Daemon, store: Path, count: int) -> None:
    """Ask for a run of every account and wait until ``count`` messages are stored."""
    daemon.send(signal.SIGUSR1)
    assert wait_for(lambda: stored(store) == count, timeout=10), daemon.log()


def test_runs_share_one_login_until_the_server_ends_it_and_stopping_logs_out(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon]) -> None:
    server = dovecot.server
    store = tmp_path / "store"
    config = write_accounts(tmp_path, account_toml(server, dovecot.user, dovecot.password, "acct", store, RARE),
                            general='log_level = "debug"')
    since = len(_dovecot_log(dovecot))
    _deliver(dovecot, "before the start")
    daemon = start(daemons, config)
    assert wait_for(lambda: stored(store) == 1, timeout=10), daemon.log()
    for count in (2, 3, 4):
        _deliver(dovecot, f"run {count}")
        _runs_to(daemon, store, count)
    assert daemon.log().count("on the connection kept from the last run") == 3, daemon.log()
    assert _logins(dovecot, since) == 1
    assert _sessions_open(dovecot)  # waiting between runs

    # The server ends the session between runs: the next run logs in again and succeeds.
    server.doveadm("kick", dovecot.user)
    assert wait_for(lambda: not _sessions_open(dovecot), timeout=5)
    _deliver(dovecot, "after the kick")
    _runs_to(daemon, store, 5)
    assert _logins(dovecot, since) == 2
    assert "failed" not in daemon.log(), daemon.log()

    assert daemon.stop() == 0
    assert not _sessions_open(dovecot)
    # Never two sessions at once, and every one ended before the daemon did.
    assert server_sessions(_dovecot_log(dovecot)[since:], {dovecot.user}) == {dovecot.user: 2}
    assert "Traceback" not in daemon.log()


def test_keep_connection_false_logs_in_for_every_run(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon]) -> None:
    server = dovecot.server
    store = tmp_path / "store"
    config = write_accounts(tmp_path, account_toml(server, dovecot.user, dovecot.password, "acct", store,
                                                   RARE + "\nkeep_connection = false"))
    since = len(_dovecot_log(dovecot))
    _deliver(dovecot, "first")
    daemon = start(daemons, config)
    assert wait_for(lambda: stored(store) == 1, timeout=10), daemon.log()
    _deliver(dovecot, "second")
    _runs_to(daemon, store, 2)
    assert wait_for(lambda: not _sessions_open(dovecot), timeout=5)
    assert _logins(dovecot, since) == 2
    assert daemon.stop() == 0


def test_a_removed_account_logs_out_at_the_reload(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon]) -> None:
    server = dovecot.server
    store = tmp_path / "store"
    config = write_accounts(tmp_path, account_toml(server, dovecot.user, dovecot.password, "acct", store, RARE))
    _deliver(dovecot, "first")
    daemon = start(daemons, config)
    assert wait_for(lambda: stored(store) == 1, timeout=10), daemon.log()
    assert _sessions_open(dovecot)
    write_accounts(tmp_path)  # no account left
    daemon.send(signal.SIGHUP)
    daemon.wait_log("removed: acct")
    assert wait_for(lambda: not _sessions_open(dovecot), timeout=5), server.doveadm("who")
    assert daemon.stop() == 0


def test_two_way_runs_share_the_login_and_leaving_a_writable_folder_expunges_nothing(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon]) -> None:
    """mode = "sync": the daemon's passes (one started by a change in the Maildir) select
    folders writable; the connection kept between them must leave each folder without
    CLOSE, which would expunge every message marked \\Deleted, someone else's too."""
    server = dovecot.server
    store = tmp_path / "store"
    config = write_accounts(tmp_path, account_toml(server, dovecot.user, dovecot.password, "acct", store,
                                                   RARE + '\nmode = "sync"\nfolders = ["INBOX"]'))
    mine, theirs = (server.append(dovecot.user, "INBOX", message(subject)) for subject in ("mine", "theirs"))
    server.add_flags(dovecot.user, "INBOX", [theirs], ["\\Deleted"])  # another client's, not expunged yet
    since = len(_dovecot_log(dovecot))  # from here on, the server is read with doveadm: no IMAP login

    def flags() -> dict[int, str]:
        listed = server.doveadm("-f", "flow", "fetch", "-u", dovecot.user, "uid flags", "mailbox", "INBOX")
        return {int(match[1]): match[2] for match in re.finditer(r"uid=(\d+) flags=(.*)", listed)}

    daemon = start(daemons, config)
    assert wait_for(lambda: stored(store) == 2, timeout=10), daemon.log()
    (path,) = [path for sub in ("new", "cur") for path in (store / sub).iterdir()
               if b"Subject: mine" in path.read_bytes()]
    path.rename(store / "cur" / (path.name.split(":2,")[0] + ":2,FS"))  # the user flags it, as an MUA does
    assert wait_for(lambda: "\\Flagged" in flags()[mine], timeout=10), daemon.log()
    _deliver(dovecot, "new")
    _runs_to(daemon, store, 3)
    assert daemon.stop() == 0
    assert theirs in flags()  # marked by another client, still there
    assert server_sessions(_dovecot_log(dovecot)[since:], {dovecot.user}) == {dovecot.user: 1}, daemon.log()
    assert "Traceback" not in daemon.log()
