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

The same claim transaction applies the fleet's rules (``Rules``): a sticky account is
left to the node that last synced it (its store on that node's disk) until it is
overdue, and a server host gets at most ``host_logins`` live leases at once. The host
is recorded in the lease row; claims of one host are serialised by a transaction-level
advisory lock, since two claims of two accounts lock two different rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from mailsyncd.errors import AccountBusy, AccountNotDue, AccountReserved, HostCapped, LeaseLost
from mailsyncd.state.models import ACCOUNTS, LEASES

log = logging.getLogger(__name__)

HOST_LOCKS = 0x6D73  # "ms": the first key of mailsyncd's advisory locks, the second is the host's hash


@dataclass(frozen=True)
class Rules:
    """What a claim checks besides the lease itself, from the account's config."""

    host: str | None = None  # the account's server host, recorded with the lease
    host_logins: int | None = None  # at most this many live leases on ``host``; None: no cap
    sticky_for: timedelta | None = None  # a sticky account: how long after a release others leave it to us


@dataclass
class Lease:
    account: str
    account_id: int
    owner: str
    epoch: int
    # time.monotonic() at which the lease runs out unless renewed; the heartbeat moves it.
    deadline: float = field(default=0.0, compare=False)
    # Runs the database fence on this thread: raises LeaseLost if another daemon took over.
    probe: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def check(self) -> None:
        """Before a write to the store, which no database fence guards: a daemon that
        stalled past its lease must not write another file the new holder may store too.
        Past the deadline the fence is asked first, so that a takeover is refused (and
        said) as the epoch's; the run stops either way, as a stall may have cost more."""
        if time.monotonic() <= self.deadline:
            return
        if self.probe is not None:
            with contextlib.suppress(SQLAlchemyError):  # the database is away: the deadline alone decides
                self.probe()
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

    def claim(self, account: str, account_id: int, scheduled: bool = False, rules: Rules = Rules()) -> Lease:
        """Take the account's lease, or raise AccountBusy naming the holder; a
        ``scheduled`` claim also raises AccountNotDue before the account's next due time,
        any claim AccountReserved while a sticky account is another node's, and HostCapped
        when its host has ``rules.host_logins`` live leases already."""
        self._ensure_row(account_id)
        now, started = _now(), time.monotonic()
        with self.engine.begin() as connection:
            row = connection.execute(select(LEASES).where(LEASES.c.account_id == account_id)
                                     .with_for_update(skip_locked=True)).first()
            if row is None:  # another daemon is claiming or fencing it at this instant
                raise AccountBusy(f"{account}: being synced by another mailsyncd; skipped")
            until = _aware(row.until)
            if row.owner is not None and until is not None and until > now:
                raise AccountBusy(f"{account}: held by {row.owner} until {until:%H:%M:%S}; skipped")
            due = _aware(row.due)
            if scheduled and due is not None and due > now:
                raise AccountNotDue(f"{account}: synced recently; next due {due:%H:%M:%S}; skipped")
            sticky = _aware(row.sticky_until)
            if row.last_owner not in (None, self.owner) and sticky is not None and sticky > now:
                raise AccountReserved(f"{account}: sticky, left to {row.last_owner} unless it is overdue at "
                                      f"{sticky:%H:%M:%S}; skipped")
            if rules.host is not None and rules.host_logins is not None:
                self._cap(connection, account, account_id, rules.host, rules.host_logins, now)
            epoch = int(row.epoch) + 1
            connection.execute(update(LEASES).where(LEASES.c.account_id == account_id).values(
                owner=self.owner, epoch=epoch, since=now, until=now + timedelta(seconds=self.lease_time),
                host=rules.host))
        return Lease(account, account_id, self.owner, epoch, started + self.lease_time, self._probe)

    def _cap(self, connection: Connection, account: str, account_id: int, host: str, limit: int,
             now: datetime) -> None:
        """Raise HostCapped when ``host`` has ``limit`` live leases of other accounts. The
        advisory lock, held to the end of the claim, keeps two claims on one host from
        both counting the same free place; a hash collision only serialises two hosts."""
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(HOST_LOCKS, _signed32(zlib.crc32(host.encode())))))
        running = int(connection.execute(select(func.count()).select_from(LEASES).where(
            LEASES.c.host == host, LEASES.c.owner.is_not(None), LEASES.c.until > now,
            LEASES.c.account_id != account_id)).scalar_one())
        if running >= limit:
            raise HostCapped(capped(account, host, running, limit))

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

    def release(self, lease: Lease, due: datetime, sticky_for: timedelta | None = None) -> None:
        """Give the account back at once, if it is still ours (epoch kept: it only grows),
        with the time before which scheduled runs skip it; we are its last owner now, and
        a sticky account stays ours for ``sticky_for`` unless we sync it again."""
        sticky_until = None if sticky_for is None else _now() + sticky_for
        with self.engine.begin() as connection:
            connection.execute(update(LEASES).where(
                LEASES.c.account_id == lease.account_id, LEASES.c.owner == lease.owner,
                LEASES.c.epoch == lease.epoch).values(owner=None, until=None, due=due, last_owner=lease.owner,
                                                      sticky_until=sticky_until))

    def holders(self) -> dict[str, Holder]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(ACCOUNTS.c.name, LEASES.c.owner, LEASES.c.since, LEASES.c.until)
                                      .join(LEASES, LEASES.c.account_id == ACCOUNTS.c.id))
            return {row.name: Holder(row.name, row.owner, row.since, row.until) for row in rows}

    # -- the fence --------------------------------------------------------------------------

    @contextlib.contextmanager
    def held(self, account: str, account_id: int, spacing: float, scheduled: bool = False,
             rules: Rules = Rules()) -> Iterator[Lease]:
        """Claim, keep renewed by a heartbeat, fence this thread's transactions, release
        with the next due time ``spacing`` seconds after the claim."""
        claimed = _now()
        lease = self.claim(account, account_id, scheduled, rules)
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
                self.release(lease, claimed + timedelta(seconds=spacing), rules.sticky_for)

    def _heartbeat(self, lease: Lease, stop: threading.Event) -> None:
        while not stop.wait(self.lease_time / 3):
            try:
                if not self.renew(lease):
                    log.warning("%s: the lease was taken over by another mailsyncd", lease.account)
                    return
            except Exception as error:  # the database is away; the fence guards the writes
                log.warning("%s: cannot renew the lease: %s", lease.account, type(error).__name__)

    def _probe(self) -> None:
        """An empty transaction on this thread: its ``begin`` runs the fence."""
        with self.engine.begin():
            pass

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


def own_identity(node: str | None) -> str:
    """This process's identity: the host name and ``general.node``, else the process id."""
    return node_identity(socket.gethostname(), node or str(os.getpid()))


def capped(account: str, host: str, running: int, limit: int) -> str:
    """The one line of a run skipped by the host cap."""
    syncs = "1 sync" if running == 1 else f"{running} syncs"
    return f"{account}: {syncs} already on {host} (host_logins = {limit}); skipped, tried again at its next run"


class LocalHostCap:
    """The per-host login cap within one daemon, where no lease rows are shared (SQLite)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()

    @contextlib.contextmanager
    def slot(self, account: str, host: str, limit: int | None) -> Iterator[None]:
        """Hold one of ``host``'s ``limit`` places while the body runs; HostCapped if none is free."""
        with self._lock:
            if limit is not None and self._running[host] >= limit:
                raise HostCapped(capped(account, host, self._running[host], limit))
            self._running[host] += 1
        try:
            yield
        finally:
            with self._lock:
                self._running[host] -= 1


def _aware(moment: datetime | None) -> datetime | None:
    """A timestamp read back as UTC (SQLite returns it without its zone)."""
    return moment if moment is None or moment.tzinfo else moment.replace(tzinfo=UTC)


def _signed32(number: int) -> int:
    """An unsigned 32-bit hash as PostgreSQL's (signed) integer."""
    return number - (1 << 32) if number >= 1 << 31 else number
