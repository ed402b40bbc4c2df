"""Several mailsyncd processes sharing one real PostgreSQL state against the test Dovecot:
every account synced, never by two at once, each message stored exactly once, and a
killed daemon's accounts finished by another once its lease expires."""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import signal
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, Row, select

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.errors import LeaseLost
from mailsyncd.state import db
from mailsyncd.state.models import ACCOUNTS, FOLDERS, MESSAGES, SYNC_RUNS
from tests.helpers import corpus_messages, expected, maildir_contents, run_cli, wait_for
from tests.integration.test_service import Daemon, account_toml, clean_env
from tests.postgres import PostgresCluster
from tests.server_helpers import DevServer

LEASE = 3  # seconds: short, so that a takeover is quick to see


def shared_config(directory: Path, url: str, server: DevServer, users: list[tuple[str, str]], node: str,
                  extra: str = "") -> Path:
    """One daemon's config: the same accounts and state as the others, its own node name."""
    accounts = "".join(account_toml(server, user, password, user, directory / "stores" / "{account}", extra)
                       for user, password in users)
    path = directory / f"config-{node}.toml"
    path.write_text(f'[general]\nstate = "{url}"\nnode = "{node}"\nlease_time = {LEASE}\n' + accounts)
    path.chmod(0o600)
    return path


def make_users(server: DevServer, count: int, messages: int) -> list[tuple[str, str]]:
    """``count`` new users with ``messages`` corpus messages each, none twice in one mailbox:
    user ``index`` gets every ``count``-th message from ``index`` on, round the corpus again
    when more are needed (a stride prime to the corpus size revisits none before all are used)."""
    corpus = [path.read_bytes() for path in corpus_messages()]
    assert messages <= len(corpus), (messages, len(corpus))
    assert messages * count <= len(corpus) or math.gcd(count, len(corpus)) == 1, (count, len(corpus))
    users = []
    for index in range(count):
        user, password = f"shared{secrets.token_hex(4)}", secrets.token_urlsafe(12)
        server.add_user(user, password)
        server.append_many(user, "INBOX", [corpus[(index + step * count) % len(corpus)] for step in range(messages)])
        users.append((user, password))
    return users


def assert_exactly_once(engine: Engine, server: DevServer, stores: Path, users: list[tuple[str, str]]) -> None:
    for user, _ in users:
        wanted = expected(server.fetch_all(user, "INBOX").values(), "maildir")
        assert maildir_contents(stores / user).get("") == wanted, user  # maildir++: INBOX is the root
        with engine.connect() as connection:
            states = Counter(connection.execute(
                select(MESSAGES.c.state).join(FOLDERS, FOLDERS.c.id == MESSAGES.c.folder_id)
                .join(ACCOUNTS, ACCOUNTS.c.id == FOLDERS.c.account_id)
                .where(ACCOUNTS.c.name == user, FOLDERS.c.name == "INBOX")).scalars())
        assert states == Counter({"stored": sum(wanted.values())}), user


def assert_runs_one_at_a_time(engine: Engine) -> Sequence[Row[int, datetime, datetime | None]]:
    """Never two daemons on one account at once: each account's recorded runs follow one
    another. Returns the runs, by account and start."""
    with engine.connect() as connection:
        runs = connection.execute(select(SYNC_RUNS.c.account_id, SYNC_RUNS.c.started, SYNC_RUNS.c.finished)
                                  .order_by(SYNC_RUNS.c.account_id, SYNC_RUNS.c.started)).all()
    for before, after in itertools.pairwise(runs):
        if before.account_id == after.account_id:
            assert before.finished is not None and before.finished <= after.started, (before, after)
    return runs


def test_three_daemons_share_the_accounts_one_writer_each(
        tmp_path: Path, dovecot_server: DevServer, postgres_url: str) -> None:
    users = make_users(dovecot_server, 12, 40)
    configs = [shared_config(tmp_path, postgres_url, dovecot_server, users, node, 'interval = "10s"')
               for node in ("a", "b", "c")]
    engine = db.create(postgres_url)  # a new database: the daemons migrate it, one at a time
    running = [Daemon(config, clean_env(), name=f"daemon-{index}") for index, config in enumerate(configs)]
    try:
        def all_synced(count: int) -> bool:
            return all(sum(bag.values()) == count for user, _ in users
                       for bag in [maildir_contents(tmp_path / "stores" / user).get("", Counter())])

        assert wait_for(lambda: all_synced(40), 90), [daemon.log() for daemon in running]
        # Whichever daemons did the first round, one of them dies now: the others finish the
        # second round, its leases included.
        busiest = max(running, key=lambda daemon: daemon.log().count(" new ("))
        busiest.kill()
        for user, _ in users:
            dovecot_server.append_many(user, "INBOX", [path.read_bytes() for path in corpus_messages(600)[-1:]])
        assert wait_for(lambda: all_synced(41), 60), [daemon.log() for daemon in running]
        for daemon in running:
            if daemon is not busiest:
                assert daemon.stop(20) == 0, daemon.log()
    finally:
        for daemon in running:
            daemon.kill()
    assert_exactly_once(engine, dovecot_server, tmp_path / "stores", users)
    runs = assert_runs_one_at_a_time(engine)
    assert len(runs) >= len(users)
    logs = [daemon.log() for daemon in running]
    assert sum(" 1 new (" in daemon.log() for daemon in running if daemon is not busiest) >= 1, logs
    # Each account about once per half interval (the due time), not once per daemon and interval.
    assert len(runs) <= len(users) * 6, len(runs)
    assert all("Traceback" not in log for log in logs), logs
    engine.dispose()


def _sync_and_die(config: Path, at_step: int) -> None:
    """Fork a sync that SIGKILLs itself at effect step ``at_step``: mid-sync, lease held."""
    pid = os.fork()
    if pid == 0:  # child
        count = 0

        def checkpoint(_step: str) -> None:
            nonlocal count
            count += 1
            if count == at_step:
                os.kill(os.getpid(), signal.SIGKILL)

        try:
            loaded = load_config(config)
            app = App.open(loaded)
            app.sync_account(loaded.accounts[0], checkpoint=checkpoint)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def test_a_killed_daemons_account_is_finished_by_another_after_its_lease(
        tmp_path: Path, dovecot_server: DevServer, postgres_url: str) -> None:
    users = make_users(dovecot_server, 1, 300)
    first = shared_config(tmp_path, postgres_url, dovecot_server, users, "a")
    second = shared_config(tmp_path, postgres_url, dovecot_server, users, "b")
    _sync_and_die(first, at_step=150)  # half-way through writing the first batch
    killed_at = time.monotonic()
    engine = db.create(postgres_url)
    with engine.connect() as connection:
        states = Counter(connection.execute(select(MESSAGES.c.state)).scalars())
    assert states["pending"] > 0, states  # killed mid-sync: intents recorded, not finished
    busy = run_cli(second, "sync")
    assert busy.returncode == 0, busy.stderr
    assert f"held by {os.uname().nodename}:a until" in busy.stderr  # the dead daemon's lease still runs
    assert wait_for(lambda: time.monotonic() - killed_at > LEASE + 0.5, LEASE + 5)
    done = run_cli(second, "sync")
    assert done.returncode == 0, done.stderr
    assert "held by" not in done.stderr
    assert_exactly_once(engine, dovecot_server, tmp_path / "stores", users)
    status = run_cli(second, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert [entry["lease"] for entry in json.loads(status.stdout)] == [None]  # released at the end
    dovecot_server.append_many(users[0][0], "INBOX", [corpus_messages(301)[-1].read_bytes()])
    _sync_and_die(first, at_step=1)  # at its intent: the lease is held, the holder gone
    shown = run_cli(second, "status")
    assert f"held by {os.uname().nodename}:a since" in shown.stdout, shown.stdout
    engine.dispose()


def test_postgresql_restarted_under_a_running_app(
        tmp_path: Path, dovecot_server: DevServer, postgres_cluster: PostgresCluster) -> None:
    """The pool's connections die with the server; the next sync reconnects and goes on."""
    url = postgres_cluster.new_database()
    users = make_users(dovecot_server, 1, 20)
    config = load_config(shared_config(tmp_path, url, dovecot_server, users, "a"))
    with App.open(config) as app:
        assert app.sync_account(config.accounts[0]).fetched == 20
        postgres_cluster.stop()
        postgres_cluster.start()
        dovecot_server.append_many(users[0][0], "INBOX", [path.read_bytes() for path in corpus_messages(25)[-5:]])
        assert app.sync_account(config.accounts[0]).fetched == 5
        assert_exactly_once(app.engine, dovecot_server, tmp_path / "stores", users)


def test_a_run_whose_lease_ran_out_stops_before_its_next_store_write(
        tmp_path: Path, dovecot_server: DevServer, postgres_url: str) -> None:
    """A stall longer than the lease (the heartbeat could not renew it either): the run
    stops at its next write step, and nothing of that batch is published in the store,
    as after a kill: another daemon may have taken the account over and fetch the same
    messages. The next run stores every message once."""
    users = make_users(dovecot_server, 1, 30)
    config = load_config(shared_config(tmp_path, postgres_url, dovecot_server, users, "a"))
    steps: list[str] = []

    def stall_once(step: str) -> None:
        steps.append(step)
        if steps.count("write") == 5 and step == "write":
            time.sleep(LEASE + 0.5)  # the heartbeat renews meanwhile: only a real stall stops it

    with App.open(config) as app:
        assert app.leases is not None
        app.leases.renew = lambda lease: False  # type: ignore[method-assign]  # the stalled heartbeat
        with pytest.raises(LeaseLost, match="the lease ran out while syncing"):
            app.sync_account(config.accounts[0], checkpoint=stall_once)
        assert steps.count("write") == 5
        del app.leases.renew
        assert not [f for sub in ("new", "cur") for f in (tmp_path / "stores").rglob(f"{sub}/*")]  # rolled back
        assert app.sync_account(config.accounts[0]).fetched == 30
        assert_exactly_once(app.engine, dovecot_server, tmp_path / "stores", users)
