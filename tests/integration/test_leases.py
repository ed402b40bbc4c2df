"""Account leases on a real PostgreSQL: one writer per account among daemons sharing it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select, update

from mailsyncd.errors import AccountBusy, LeaseLost
from mailsyncd.state import db
from mailsyncd.state.leases import Leases
from mailsyncd.state.models import LEASES, SYNC_RUNS
from mailsyncd.state.repo import StateRepo


@pytest.fixture
def engines(postgres_url: str) -> Iterator[tuple[Engine, Engine]]:
    """Two daemons' engines on one database, migrated."""
    first, second = db.create(postgres_url), db.create(postgres_url)
    db.upgrade(first)
    yield first, second
    first.dispose()
    second.dispose()


def _runs(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(SYNC_RUNS)).scalar_one())


def _expire(engine: Engine, account_id: int) -> None:
    """What a stall past the lease looks like to the others: ``until`` has passed."""
    with engine.begin() as connection:
        connection.execute(update(LEASES).where(LEASES.c.account_id == account_id)
                           .values(until=func.now() - func.make_interval(0, 0, 0, 0, 0, 0, 5)))


def test_a_held_account_is_busy_for_another_daemon(engines: tuple[Engine, Engine]) -> None:
    first, second = engines
    account_id = StateRepo(first).account_id("acct", "imap")
    a, b = Leases(first, "host:a", 60), Leases(second, "host:b", 60)
    with a.held("acct", account_id, 60) as lease:
        with pytest.raises(AccountBusy, match="held by host:a"):
            b.claim("acct", account_id)
        assert a.holders()["acct"].owner == "host:a"
    taken = b.claim("acct", account_id)  # released at the end of the run: free at once
    assert taken.epoch == lease.epoch + 1


def test_a_stalled_daemon_cannot_write_after_a_takeover(engines: tuple[Engine, Engine]) -> None:
    """The fence: a daemon whose lease expired and was claimed by another has every later
    state transaction refused, and the refused transaction leaves nothing behind."""
    first, second = engines
    repo_a = StateRepo(first)
    account_id = repo_a.account_id("acct", "imap")
    a, b = Leases(first, "host:a", 60), Leases(second, "host:b", 60)
    with a.held("acct", account_id, 60):
        repo_a.start_run(account_id)  # holding the lease, A writes
        _expire(second, account_id)  # A stalls past its lease...
        b.claim("acct", account_id)  # ...and B takes the account over
        with pytest.raises(LeaseLost, match="acct: another mailsyncd took the account over"):
            repo_a.start_run(account_id)  # A wakes up and goes on: refused
    assert _runs(second) == 1
    assert b.holders()["acct"].owner == "host:b"  # A's release did not free B's lease
