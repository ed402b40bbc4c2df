"""Account leases: several daemons share one state database, one writer per account.

A daemon claims an account in one short transaction (``SELECT ... FOR UPDATE SKIP
LOCKED`` on the account's lease row, as APScheduler 4's SQLAlchemy store does): the claim
succeeds when nobody holds the lease or its ``until`` has passed, and increments
``epoch``, the fencing token. While the sync runs, a heartbeat thread pushes ``until``
forward; at the end the lease is released.

Time alone cannot keep a stalled daemon (SIGSTOP, a frozen VM) from writing after its
lease was taken over: it does not know it stalled. So the lease is also a fence: every
transaction the syncing thread begins first reads the lease row ``FOR UPDATE`` and
raises LeaseLost unless it still holds the epoch it claimed. The row lock lasts to the
transaction's end, so no claim can slip in between the check and the commit; raised
in the ``begin`` event, LeaseLost ends the transaction before any write, and the pool
rolls it back. On SQLite (one daemon, BEGIN IMMEDIATE already serialises writers) the
same code runs, with FOR UPDATE ignored.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event, insert, select, update
from sqlalchemy.exc import IntegrityError

from mailsyncd.errors import AccountBusy, AccountNotDue, LeaseLost
from mailsyncd.state.models import ACCOUNTS, LEASES

log = logging.getLogger(__name__)


@dataclass
class Lease:
    account: str
    account_id: int
    owner: str
    epoch: int
    # time.monotonic() at which the lease runs out unless renewed; the heartbeat moves it.
    deadline: float = field(default=0.0, compare=False)

    def check(self) -> None:
        """Before a write to the store, which no database fence guards: a daemon that
        stalled past its lease must not write another file the new holder may store too."""
        if time.monotonic() > self.deadline:
            raise LeaseLost(f"{self.account}: the lease ran out while syncing (a stall?); stopped before "
                            "writing more")


@dataclass(frozen=True)
class Holder:
    """Who holds an account, for ``status``."""

    account: str
    owner: str | None
    since: datetime | None
    until: datetime | None


def _now() -> datetime:
    return datetime.now(UTC)


class Leases:
    """Claims, renewals and the fence, for one engine and one daemon identity (``owner``)."""

    def __init__(self, engine: Engine, owner: str, lease_time: float) -> None:
        self.engine = engine
        self.owner = owner
        self.lease_time = lease_time
        self._local = threading.local()  # the lease the current thread's transactions are fenced by
        event.listen(engine, "begin", self._fence)

    def claim(self, account: str, account_id: int, scheduled: bool = False) -> Lease:
        """Take the account's lease, or raise AccountBusy naming the holder; a
        ``scheduled`` claim also raises AccountNotDue before the account's next due time."""
        self._ensure_row(account_id)
        now, started = _now(), time.monotonic()
        with self.engine.begin() as connection:
            row = connection.execute(select(LEASES).where(LEASES.c.account_id == account_id)
                                     .with_for_update(skip_locked=True)).first()
            if row is None:  # another daemon is claiming or fencing it at this instant
                raise AccountBusy(f"{account}: being synced by another mailsyncd; skipped")
            until = row.until if row.until is None or row.until.tzinfo else row.until.replace(tzinfo=UTC)
            if row.owner is not None and until is not None and until > now:
                raise AccountBusy(f"{account}: held by {row.owner} until {until:%H:%M:%S}; skipped")
            due = row.due if row.due is None or row.due.tzinfo else row.due.replace(tzinfo=UTC)
            if scheduled and due is not None and due > now:
                raise AccountNotDue(f"{account}: synced recently; next due {due:%H:%M:%S}; skipped")
            epoch = int(row.epoch) + 1
            connection.execute(update(LEASES).where(LEASES.c.account_id == account_id).values(
                owner=self.owner, epoch=epoch, since=now, until=now + timedelta(seconds=self.lease_time)))
        return Lease(account, account_id, self.owner, epoch, started + self.lease_time)

    def _ensure_row(self, account_id: int) -> None:
        with self.engine.connect() as connection:
            if connection.execute(select(LEASES.c.epoch).where(LEASES.c.account_id == account_id)).first():
                return
        with contextlib.suppress(IntegrityError), self.engine.begin() as connection:  # another daemon raced us
            connection.execute(insert(LEASES).values(account_id=account_id, epoch=0))

    def renew(self, lease: Lease) -> bool:
        """Push ``until`` forward; False when the lease is no longer ours."""
        started = time.monotonic()
        with self.engine.begin() as connection:
            done = connection.execute(update(LEASES).where(
                LEASES.c.account_id == lease.account_id, LEASES.c.owner == lease.owner,
                LEASES.c.epoch == lease.epoch).values(until=_now() + timedelta(seconds=self.lease_time)))
        if done.rowcount:
            lease.deadline = started + self.lease_time
        return bool(done.rowcount)

    def release(self, lease: Lease, due: datetime) -> None:
        """Give the account back at once, if it is still ours (epoch kept: it only grows),
        with the time before which scheduled runs skip it."""
        with self.engine.begin() as connection:
            connection.execute(update(LEASES).where(
                LEASES.c.account_id == lease.account_id, LEASES.c.owner == lease.owner,
                LEASES.c.epoch == lease.epoch).values(owner=None, until=None, due=due))

    def holders(self) -> dict[str, Holder]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(ACCOUNTS.c.name, LEASES.c.owner, LEASES.c.since, LEASES.c.until)
                                      .join(LEASES, LEASES.c.account_id == ACCOUNTS.c.id))
            return {row.name: Holder(row.name, row.owner, row.since, row.until) for row in rows}

    # -- the fence --------------------------------------------------------------------------

    @contextlib.contextmanager
    def held(self, account: str, account_id: int, spacing: float, scheduled: bool = False) -> Iterator[Lease]:
        """Claim, keep renewed by a heartbeat, fence this thread's transactions, release
        with the next due time ``spacing`` seconds after the claim."""
        claimed = _now()
        lease = self.claim(account, account_id, scheduled)
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(lease, stop), daemon=True,
                                     name=f"lease {account}")
        heartbeat.start()
        self._local.lease = lease
        try:
            yield lease
        finally:
            self._local.lease = None
            stop.set()
            heartbeat.join()
            with contextlib.suppress(Exception):  # a lost lease or database: it expires on its own
                self.release(lease, claimed + timedelta(seconds=spacing))

    def _heartbeat(self, lease: Lease, stop: threading.Event) -> None:
        while not stop.wait(self.lease_time / 3):
            try:
                if not self.renew(lease):
                    log.warning("%s: the lease was taken over by another mailsyncd", lease.account)
                    return
            except Exception as error:  # the database is away; the fence guards the writes
                log.warning("%s: cannot renew the lease: %s", lease.account, type(error).__name__)

    def _fence(self, connection: Any) -> None:
        lease: Lease | None = getattr(self._local, "lease", None)
        if lease is None:
            return
        row = connection.execute(select(LEASES.c.owner, LEASES.c.epoch).where(
            LEASES.c.account_id == lease.account_id).with_for_update()).first()
        if row is None or row.owner != lease.owner or row.epoch != lease.epoch:
            raise LeaseLost(f"{lease.account}: another mailsyncd took the account over (lease expired); "
                            "this run's late writes were refused")


def node_identity(host: str, node: str) -> str:
    """How a daemon names itself in lease rows and ``status``."""
    return f"{host}:{node}"
