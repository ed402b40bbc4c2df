"""The fleet's rules against a real PostgreSQL and the test Dovecot: the per-host login
cap among several daemons, and sticky accounts left to the node that synced them last."""

from __future__ import annotations

import itertools
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.errors import AccountReserved
from mailsyncd.state import db
from mailsyncd.state.models import LEASES, SYNC_RUNS
from tests.helpers import corpus_messages, maildir_contents, run_cli, wait_for
from tests.integration.test_service import Daemon, clean_env
from tests.integration.test_shared_state import LEASE, assert_exactly_once, make_users, shared_config
from tests.proxy import CutProxy
from tests.server_helpers import DevServer

REFUSED = "this run's late writes were refused"  # the fence's line


def with_general(config: Path, keys: str) -> Path:
    """``config`` with more [general] keys."""
    config.write_text(config.read_text().replace("[general]\n", f"[general]\n{keys}\n", 1))
    return config


def test_host_logins_caps_the_syncs_on_one_host_across_daemons(
        tmp_path: Path, dovecot_server: DevServer, postgres_url: str) -> None:
    """host_logins = 1: two daemons, five accounts on the one Dovecot host; every account
    synced once, and no two runs on that host ever overlap, whichever daemon ran them."""
    users = make_users(dovecot_server, 5, 60)
    configs = [with_general(shared_config(tmp_path, postgres_url, dovecot_server, users, node, 'interval = "10s"'),
                            "host_logins = 1") for node in ("a", "b")]
    engine = db.create(postgres_url)
    running = [Daemon(config, clean_env(), name=f"daemon-{index}") for index, config in enumerate(configs)]
    try:
        def all_synced() -> bool:
            return all(sum(maildir_contents(tmp_path / "stores" / user).get("", {}).values()) == 60
                       for user, _ in users)

        assert wait_for(all_synced, 60), [daemon.log() for daemon in running]
        for daemon in running:
            assert daemon.stop(20) == 0, daemon.log()
    finally:
        for daemon in running:
            daemon.kill()
    assert_exactly_once(engine, dovecot_server, tmp_path / "stores", users)
    with engine.connect() as connection:
        runs = connection.execute(select(SYNC_RUNS.c.account_id, SYNC_RUNS.c.started, SYNC_RUNS.c.finished)
                                  .order_by(SYNC_RUNS.c.started)).all()
    assert len({run.account_id for run in runs}) == len(users)
    for before, after in itertools.pairwise(runs):
        assert before.finished is not None and before.finished <= after.started, (before, after)
    logs = [daemon.log() for daemon in running]
    assert any("(host_logins = 1); skipped" in log for log in logs), logs  # the cap did turn runs away
    assert all("Traceback" not in log for log in logs), logs
    engine.dispose()


def test_a_sticky_account_stays_with_its_node_until_that_node_is_overdue(
        tmp_path: Path, dovecot_server: DevServer, postgres_url: str) -> None:
    """sticky = true: node a syncs the account; node b's scheduled runs leave it to a
    (AccountReserved, not recorded as a run) while a keeps syncing it in time; once a
    is overdue (its sticky_until passed), b takes the account over."""
    users = make_users(dovecot_server, 1, 10)
    extra = 'interval = "10s"\nsticky = true'
    node_a = load_config(shared_config(tmp_path, postgres_url, dovecot_server, users, "a", extra))
    node_b = load_config(shared_config(tmp_path, postgres_url, dovecot_server, users, "b", extra))
    account = node_a.accounts[0]
    assert account.sticky and node_b.accounts[0].sticky
    half = account.interval / 2  # a scheduled run is due again half an interval after the last claim
    with App.open(node_a) as a, App.open(node_b) as b:
        assert a.sync_account(account, scheduled=True).fetched == 10
        time.sleep(half + 0.5)
        with pytest.raises(AccountReserved, match=r"sticky, left to .*:a unless it is overdue"):
            b.sync_account(node_b.accounts[0], scheduled=True)
        assert a.sync_account(account, scheduled=True).fetched == 0  # a lives: its run renews the claim
        time.sleep(half + 0.5)
        with pytest.raises(AccountReserved):
            b.sync_account(node_b.accounts[0], scheduled=True)
        with a.engine.connect() as connection:
            sticky_until, last_owner = connection.execute(select(LEASES.c.sticky_until, LEASES.c.last_owner)).one()
        assert last_owner.endswith(":a")
        # a is gone now: once its sticky_until has passed, b's next scheduled run takes it.
        assert wait_for(lambda: datetime.now(UTC) > sticky_until, account.interval + LEASE + 5)
        dovecot_server.append_many(users[0][0], "INBOX", [path.read_bytes() for path in corpus_messages(11)[-1:]])
        assert b.sync_account(node_b.accounts[0], scheduled=True).fetched == 1
        with b.engine.connect() as connection:
            assert connection.execute(select(LEASES.c.last_owner)).scalar_one().endswith(":b")
            results = connection.execute(select(SYNC_RUNS.c.result)).scalars().all()
        assert results == ["ok"] * 3  # the skipped runs are not runs, nor failures
        assert_exactly_once(b.engine, dovecot_server, tmp_path / "stores", users)


def test_a_daemon_stopped_past_its_lease_has_its_late_writes_refused(
        tmp_path: Path, dovecot_server: DevServer, postgres_url: str) -> None:
    """``mailsyncd run`` SIGSTOPped while it fetches (the server trickles): once its lease
    ran out another takes the account over and finishes it; SIGCONT: the stopped
    daemon's late writes are refused in one line, and each message is stored once."""
    users = make_users(dovecot_server, 1, 40)
    total = sum(len(message) for message in dovecot_server.fetch_all(users[0][0], "INBOX").values())
    with CutProxy(dovecot_server.host, dovecot_server.imaps_port) as proxy:
        stalled = shared_config(tmp_path, postgres_url, dovecot_server, users, "a")
        stalled.write_text(stalled.read_text().replace(f"port = {dovecot_server.imaps_port}",
                                                       f"port = {proxy.port}"))
        other = shared_config(tmp_path, postgres_url, dovecot_server, users, "b")
        proxy.trickle_after_bytes(20_000, max(2_000, total // 8))  # the bodies take about 8 s
        engine = db.create(postgres_url)
        daemon = Daemon(stalled, clean_env(), name="stalled")
        try:
            def held() -> bool:
                with engine.connect() as connection:  # the daemon migrates the new database first
                    return inspect(connection).has_table(LEASES.name) and \
                        connection.execute(select(LEASES.c.owner)).scalar() is not None

            assert wait_for(held, 20), daemon.log()
            time.sleep(1)
            daemon.send(signal.SIGSTOP)
            assert not list((tmp_path / "stores").rglob("new/*")), "stopped after its writes, not mid-sync"
            time.sleep(LEASE + 1)
            takeover = run_cli(other, "sync")
            assert takeover.returncode == 0, takeover.stderr
            assert "held by" not in takeover.stderr
            daemon.send(signal.SIGCONT)
            # It goes on fetching, then comes to its first store write: refused, or (wrongly) done.
            assert wait_for(lambda: REFUSED in daemon.log() or " new (" in daemon.log(), 30), daemon.log()
            assert daemon.stop(20) == 0, daemon.log()
        finally:
            if daemon.process.poll() is None:
                daemon.send(signal.SIGCONT)
            daemon.kill()
    assert_exactly_once(engine, dovecot_server, tmp_path / "stores", users)
    assert REFUSED in daemon.log() and "Traceback" not in daemon.log(), daemon.log()
    engine.dispose()
