"""The scale test: three `mailsyncd run` processes on one PostgreSQL share 60 accounts of
the test Dovecot. Every account is synced, each message stored exactly once, every daemon
takes part, and no account is ever synced by two daemons at once, as the database's run
records and, independently of mailsyncd, the server's own login log show."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from mailsyncd.state import db
from mailsyncd.state.models import ACCOUNTS, SYNC_RUNS
from tests.helpers import maildir_contents, wait_for
from tests.integration.test_service import Daemon, clean_env
from tests.integration.test_shared_state import (
    assert_exactly_once,
    assert_runs_one_at_a_time,
    make_users,
    shared_config,
)
from tests.server_helpers import DevServer

ACCOUNTS_COUNT = 60
MESSAGES = 200  # per account: 12,000 in all, synced in well under a minute on two cores

# Dovecot logs every IMAP login and every end of session, in the order they happen.
_LOGIN = re.compile(r"imap-login: Info: Login: user=<([^>]+)>.*session=<([^>]+)>")
_END = re.compile(r"imap\(([^)]+)\)<\d+><([^>]+)>: Info: Disconnected")


def server_sessions(log: str, users: set[str]) -> Counter[str]:
    """Check from the server's log that no user ever had two IMAP sessions open at once (one
    sync holds one connection; IDLE is off); returns each user's number of sessions."""
    open_sessions: dict[str, str] = {}
    seen: set[str] = set()
    logins: Counter[str] = Counter()
    for line in log.splitlines():
        if (login := _LOGIN.search(line)) and login[1] in users:
            assert login[1] not in open_sessions, f"two sessions of {login[1]} at once: {line}"
            open_sessions[login[1]] = login[2]
            seen.add(login[2])
            logins[login[1]] += 1
        elif (end := _END.search(line)) and end[1] in users and end[2] in seen:  # else: begun before
            assert open_sessions.pop(end[1]) == end[2], line
    assert not open_sessions, open_sessions  # every daemon logged out before it stopped
    return logins


def test_three_daemons_sync_sixty_accounts_each_message_once_one_daemon_at_a_time(
        tmp_path: Path, dovecot_server: DevServer, postgres_url: str) -> None:
    started = time.monotonic()
    users = make_users(dovecot_server, ACCOUNTS_COUNT, MESSAGES)
    names = {user for user, _ in users}
    log_from = dovecot_server.log_file.stat().st_size
    configs = [shared_config(tmp_path, postgres_url, dovecot_server, users, node, 'interval = "10s"')
               for node in ("a", "b", "c")]
    engine = db.create(postgres_url)
    running = [Daemon(config, clean_env(), name=f"daemon-{node}") for node, config in zip("abc", configs, strict=True)]
    stores = tmp_path / "stores"
    try:
        def all_synced() -> bool:
            return all(sum(maildir_contents(stores / user).get("", Counter()).values()) == MESSAGES
                       for user in names)

        assert wait_for(all_synced, 75), [daemon.log() for daemon in running]
        synced_at = time.monotonic()
        # A further round of no-op runs, so that accounts pass from daemon to daemon.
        with engine.connect() as connection:
            def rounds() -> int:
                return min(Counter(connection.execute(
                    select(ACCOUNTS.c.name).join(SYNC_RUNS, SYNC_RUNS.c.account_id == ACCOUNTS.c.id)).scalars()
                ).get(user, 0) for user in names)

            assert wait_for(lambda: rounds() >= 2, 20), rounds()
        for daemon in running:
            assert daemon.stop(20) == 0, daemon.log()
    finally:
        for daemon in running:
            daemon.kill()
    logs = [daemon.log() for daemon in running]
    assert all("Traceback" not in log for log in logs), logs
    with dovecot_server.log_file.open(errors="replace") as log:  # before the checks below log in
        log.seek(log_from)
        logins = server_sessions(log.read(), names)
    assert_exactly_once(engine, dovecot_server, stores, users)
    runs = assert_runs_one_at_a_time(engine)
    with engine.connect() as connection:
        ids = {row.id: row.name for row in connection.execute(select(ACCOUNTS.c.id, ACCOUNTS.c.name))}
    # Each run is one login to the server and no login happens outside a run.
    assert logins == Counter(ids[run.account_id] for run in runs)
    # The daemons' own logs: each run recorded is one daemon's, each account's first sync was
    # done by exactly one daemon, and every daemon did runs.
    done = [Counter(match for match in re.findall(r"(\w+): \d+ folders, (\d+) new \(", log) if match[0] in names)
            for log in logs]
    assert sum(done, Counter()).total() == len(runs), done
    first = Counter(user for runs_of_one in done for user, fetched in runs_of_one if fetched == str(MESSAGES))
    assert first == Counter(dict.fromkeys(names, 1)), done
    assert all(done), [runs_of_one.total() for runs_of_one in done]
    engine.dispose()
    print(f"\n{ACCOUNTS_COUNT} accounts x {MESSAGES} messages: synced by 3 daemons in "
          f"{synced_at - started:.1f} s (users made included); runs per daemon: "
          f"{[runs_of_one.total() for runs_of_one in done]}")
