"""The fleet's rules against a real PostgreSQL and the test Dovecot: the per-host login
cap among several daemons, and sticky accounts left to the node that synced them last."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.errors import AccountReserved
from mailsyncd.state import db
from mailsyncd.state.models import LEASES, SYNC_RUNS
from tests.helpers import corpus_messages, maildir_contents, wait_for
from tests.integration.test_service import Daemon, clean_env
from tests.integration.test_shared_state import LEASE, assert_exactly_once, make_users, shared_config
from tests.server_helpers import DevServer


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
