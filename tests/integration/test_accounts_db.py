"""Accounts kept in the state database, against running daemons and the real Dovecot: an
import reaches two daemons sharing a PostgreSQL at once (LISTEN/NOTIFY) and each account
is synced once; a removed account is synced no more and its store is left alone; `wake`
syncs now what a long interval would leave for an hour; on SQLite the poll and SIGUSR1
do the same for the one daemon."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from mailsyncd.state import db
from mailsyncd.state.models import ACCOUNTS, SYNC_RUNS
from tests.helpers import corpus_messages, maildir_contents, run_cli, wait_for
from tests.integration.test_service import Daemon, clean_env
from tests.integration.test_shared_state import assert_exactly_once, make_users
from tests.server_helpers import DevServer

MESSAGES = 20


def account_file(directory: Path, server: DevServer, users: list[tuple[str, str]], interval: str) -> Path:
    """A file to import: one account per user, its password in a 0600 file (never inline)."""
    tables = []
    for user, password in users:
        secret = directory / "secrets" / user
        secret.parent.mkdir(exist_ok=True, mode=0o700)
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        tables.append(server.account_toml(user, f"{directory / 'stores'}/{{account}}", password="",
                                          extra=f'password_file = "{secret}"\ninterval = "{interval}"'))
    path = directory / f"accounts-{len(list(directory.glob('accounts-*')))}.toml"
    path.write_text("".join(tables))
    return path


def daemon_config(directory: Path, state: str, node: str) -> Path:
    """A config with no account of its own: they all come from the state database."""
    path = directory / f"config-{node}.toml"
    path.write_text(f'[general]\nstate = "{state}"\nnode = "{node}"\nlease_time = 3\n')
    return path


def stored(directory: Path, user: str) -> int:
    return sum(maildir_contents(directory / "stores" / user).get("", Counter()).values())


def store_files(directory: Path, user: str) -> set[str]:
    return {str(path.relative_to(directory)) for path in (directory / "stores" / user).rglob("*") if path.is_file()}


def runs_of(state: str) -> dict[str, int]:
    engine = db.create(state)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(ACCOUNTS.c.name, func.count(SYNC_RUNS.c.id))
                                      .join(SYNC_RUNS, SYNC_RUNS.c.account_id == ACCOUNTS.c.id)
                                      .where(SYNC_RUNS.c.fetched > 0).group_by(ACCOUNTS.c.name))
            return {row[0]: row[1] for row in rows}
    finally:
        engine.dispose()


def test_two_daemons_take_up_imported_accounts_at_once_and_drop_removed_ones(
        tmp_path: Path, dovecot_server: DevServer, postgres_url: str) -> None:
    configs = [daemon_config(tmp_path, postgres_url, node) for node in ("a", "b")]
    assert run_cli(configs[0], "db", "upgrade").returncode == 0
    running = [Daemon(config, clean_env(), name=f"daemon-{index}") for index, config in enumerate(configs)]
    try:
        for daemon in running:
            daemon.wait_log("running: 0 accounts")
        users = make_users(dovecot_server, 3, MESSAGES)
        imported = run_cli(configs[0], "accounts", "import", str(account_file(tmp_path, dovecot_server, users,
                                                                               "10m")))
        assert imported.returncode == 0, imported.stderr
        started = time.monotonic()
        assert wait_for(lambda: all(stored(tmp_path, user) == MESSAGES for user, _ in users), 15), \
            [daemon.log() for daemon in running]
        took = time.monotonic() - started
        for daemon in running:
            daemon.wait_log("added: " + ", ".join(sorted(user for user, _ in users)))
        assert took < 5, took  # LISTEN: not a poll interval, nor the accounts' 10 minutes
        engine = db.create(postgres_url)
        assert_exactly_once(engine, dovecot_server, tmp_path / "stores", users)
        assert runs_of(postgres_url) == {user: 1 for user, _ in users}  # one daemon each, once

        gone, _ = users[0]
        before = store_files(tmp_path, gone)
        removed = run_cli(configs[1], "accounts", "remove", gone)
        assert removed.returncode == 0, removed.stderr
        assert "its state rows are kept" in removed.stdout
        for daemon in running:
            daemon.wait_log(f"removed: {gone}", timeout=5)
        more = [path.read_bytes() for path in corpus_messages(MESSAGES * 3 + 1)[-1:]]
        for user, _ in users:
            dovecot_server.append_many(user, "INBOX", more)
        woken = run_cli(configs[0], "wake")
        assert woken.returncode == 0, woken.stderr
        assert "asked the 2 daemons listening" in woken.stdout, woken.stdout
        assert wait_for(lambda: all(stored(tmp_path, user) == MESSAGES + 1 for user, _ in users[1:]), 15), \
            [daemon.log() for daemon in running]
        time.sleep(1)  # what a late run of the removed account would need to show
        assert stored(tmp_path, gone) == MESSAGES  # the new mail stays on the server
        assert store_files(tmp_path, gone) == before  # and the store is untouched
        assert run_cli(configs[0], "status").stdout.count(gone) == 1  # its state rows are kept
        for daemon in running:
            assert daemon.stop(20) == 0, daemon.log()
            assert "Traceback" not in daemon.log()
        assert_exactly_once(engine, dovecot_server, tmp_path / "stores", users[1:])
        engine.dispose()
    finally:
        for daemon in running:
            daemon.kill()


def test_wake_syncs_now_what_a_long_interval_would_leave(
        tmp_path: Path, dovecot_server: DevServer, postgres_url: str) -> None:
    config = daemon_config(tmp_path, postgres_url, "a")
    users = make_users(dovecot_server, 2, MESSAGES)
    assert run_cli(config, "accounts", "import", str(account_file(tmp_path, dovecot_server, users, "1h"))
                   ).returncode == 0
    daemon = Daemon(config, clean_env())
    try:
        assert wait_for(lambda: all(stored(tmp_path, user) == MESSAGES for user, _ in users), 15), daemon.log()
        more = [path.read_bytes() for path in corpus_messages(MESSAGES * 2 + 1)[-1:]]
        for user, _ in users:
            dovecot_server.append_many(user, "INBOX", more)
        first, second = (user for user, _ in users)
        woken = run_cli(config, "wake", first)
        assert woken.returncode == 0, woken.stderr
        assert wait_for(lambda: stored(tmp_path, first) == MESSAGES + 1, 10), daemon.log()
        assert stored(tmp_path, second) == MESSAGES  # only the account asked for
        unknown = run_cli(config, "wake", "nobody")
        assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
        assert daemon.stop(20) == 0, daemon.log()
        nobody_listens = run_cli(config, "wake")
        assert nobody_listens.returncode == 1
        assert "no mailsyncd run listens on" in nobody_listens.stderr
    finally:
        daemon.kill()


def test_on_sqlite_the_daemon_polls_for_accounts_and_wake_signals_it(
        tmp_path: Path, dovecot_server: DevServer) -> None:
    config = daemon_config(tmp_path, str(tmp_path / "state.db"), "a")
    daemon = Daemon(config, clean_env())
    try:
        daemon.wait_log("running: 0 accounts")
        users = make_users(dovecot_server, 1, MESSAGES)
        (user, _), = users
        imported = run_cli(config, "accounts", "import", str(account_file(tmp_path, dovecot_server, users, "1h")))
        assert imported.returncode == 0, imported.stderr  # beside the running daemon: a short transaction
        assert wait_for(lambda: stored(tmp_path, user) == MESSAGES, 15), daemon.log()
        dovecot_server.append_many(user, "INBOX", [corpus_messages(MESSAGES + 1)[-1].read_bytes()])
        woken = run_cli(config, "wake", user)
        assert woken.returncode == 0, woken.stderr
        assert f"pid {daemon.process.pid}" in woken.stdout and "SIGUSR1" in woken.stdout
        assert wait_for(lambda: stored(tmp_path, user) == MESSAGES + 1, 10), daemon.log()
        assert run_cli(config, "accounts", "remove", user).returncode == 0
        daemon.wait_log(f"removed: {user}", timeout=10)
        assert daemon.stop(20) == 0, daemon.log()
    finally:
        daemon.kill()
    assert os.listdir(tmp_path / "stores" / user)
