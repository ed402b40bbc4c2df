"""Accounts kept in the state database, their change counter, and the ``mailsyncd`` channel.

``mailsyncd accounts import`` stores each account's TOML table (as JSON) with the
directory its relative paths are anchored at; the config module checks it with the very
validator of ``[[account]]`` tables, at import and at every load. Every import and removal
increments the one-row generation counter in its own transaction: a daemon that reads a
number other than the one it loaded knows the accounts changed, on any backend.

On PostgreSQL the same transaction sends ``NOTIFY mailsyncd, 'accounts'`` (delivered at
commit), so listening daemons reload at once instead of at their next poll; ``mailsyncd
wake`` sends ``'sync NAME'`` (``'sync *'``: every account) on the same channel. A
notification sent while no daemon listens is lost, like a signal sent to no process: the
poll and the schedule still run.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, insert, select, text, update
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.pool import NullPool

from mailsyncd.state import db
from mailsyncd.state.models import ACCOUNT_DEFINITIONS, ACCOUNT_GENERATION

CHANNEL = "mailsyncd"
CHANGED = "accounts"  # the payload: account definitions were imported or removed
WAKE = "sync "  # the payload's prefix: "sync NAME" asks for a run of NAME now
EVERY = "*"  # "sync *": of every account
_LISTENER = "mailsyncd listener"  # application_name of a daemon's listening connection


@dataclass(frozen=True)
class Definition:
    """One account as stored: its TOML table and where its relative paths start."""

    name: str
    table: Mapping[str, Any]
    base: Path


@dataclass(frozen=True)
class Stored:
    generation: int
    definitions: tuple[Definition, ...]


def _missing(error: Exception) -> bool:
    """A database not yet migrated this far: SQLite and PostgreSQL say it differently."""
    return "no such table" in str(error) or "does not exist" in str(error)


def read(engine: Engine) -> Stored:
    """Every stored account and the counter they were read at, in one transaction; none
    on a database that has not been migrated to hold them."""
    try:
        with engine.connect() as connection:
            generation = connection.execute(select(ACCOUNT_GENERATION.c.generation)).scalar() or 0
            rows = connection.execute(select(ACCOUNT_DEFINITIONS).order_by(ACCOUNT_DEFINITIONS.c.name)).all()
    except (OperationalError, ProgrammingError) as error:
        if not _missing(error):
            raise
        return Stored(0, ())
    return Stored(int(generation), tuple(Definition(row.name, json.loads(row.definition), Path(row.base))
                                         for row in rows))


def read_state(state: str) -> Stored:
    """``read`` for a ``general.state`` value, on a connection of its own, for a command
    about to start. A SQLite file that does not exist yet holds nothing and is not created
    (``check`` changes nothing)."""
    url = db.database_url(state)
    path = db.sqlite_path(url)
    if path is None:
        engine = create_engine(url)
        try:
            with db.state_errors(state):
                return read(engine)
        finally:
            engine.dispose()
    if not path.exists():
        return Stored(0, ())
    # The stdlib driver, not an engine: every command reads this at start, and an
    # engine's first connection costs some 25 ms where this costs one. A deferred read,
    # which a writer elsewhere (WAL) never holds up, where BEGIN IMMEDIATE would wait.
    with db.state_errors(state), contextlib.closing(sqlite3.connect(path)) as connection:
        try:
            generation = connection.execute("SELECT generation FROM account_generation").fetchone()
            rows = connection.execute("SELECT name, definition, base FROM account_definitions ORDER BY name")
            stored = tuple(Definition(name, json.loads(table), Path(base)) for name, table, base in rows)
            return Stored(int(generation[0]) if generation else 0, stored)
        except sqlite3.OperationalError as error:
            if not _missing(error):
                raise
            return Stored(0, ())


def generation(engine: Engine) -> int:
    """The change counter alone: what a daemon polls."""
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(ACCOUNT_GENERATION.c.generation)).scalar() or 0)
    except (OperationalError, ProgrammingError) as error:
        if not _missing(error):
            raise
        return 0


def save(engine: Engine, definitions: Sequence[Definition], dry_run: bool = False) -> dict[str, str]:
    """Insert or replace every definition, all or none, in one transaction; what became of
    each name: "added", "updated" or "unchanged" (then nothing is written for it).
    ``dry_run`` only works out what would become of each."""
    outcome: dict[str, str] = {}
    now = datetime.now(UTC)
    with engine.begin() as connection:
        known = {row.name: row.definition for row in connection.execute(
            select(ACCOUNT_DEFINITIONS.c.name, ACCOUNT_DEFINITIONS.c.definition)
            .where(ACCOUNT_DEFINITIONS.c.name.in_([item.name for item in definitions])).with_for_update())}
        for item in definitions:
            values = {"definition": json.dumps(item.table, sort_keys=True), "base": str(item.base), "updated": now}
            if dry_run:
                outcome[item.name] = "added" if item.name not in known else \
                    "updated" if known[item.name] != values["definition"] else "unchanged"
            elif item.name not in known:
                connection.execute(insert(ACCOUNT_DEFINITIONS).values(name=item.name, **values))
                outcome[item.name] = "added"
            elif known[item.name] != values["definition"]:
                connection.execute(update(ACCOUNT_DEFINITIONS).where(ACCOUNT_DEFINITIONS.c.name == item.name)
                                   .values(**values))
                outcome[item.name] = "updated"
            else:
                outcome[item.name] = "unchanged"
        if not dry_run and set(outcome.values()) != {"unchanged"}:
            _changed(connection)
    return outcome


def remove(engine: Engine, name: str) -> bool:
    """Delete one definition; False when there was none. Nothing else of the account
    (its state rows, its store) is touched."""
    with engine.begin() as connection:
        gone = connection.execute(delete(ACCOUNT_DEFINITIONS).where(ACCOUNT_DEFINITIONS.c.name == name)).rowcount
        if gone:
            _changed(connection)
    return bool(gone)


def _changed(connection: Any) -> None:
    connection.execute(update(ACCOUNT_GENERATION).where(ACCOUNT_GENERATION.c.id == 1)
                       .values(generation=ACCOUNT_GENERATION.c.generation + 1))
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": CHANGED})


def notifies(engine: Engine) -> bool:
    """Whether daemons on this database hear ``wake`` (PostgreSQL's LISTEN/NOTIFY)."""
    return engine.dialect.name == "postgresql"


def wake(engine: Engine, names: Sequence[str]) -> None:
    """Ask every listening daemon to sync ``names`` now (none named: every account)."""
    with engine.begin() as connection:
        for name in names or [EVERY]:
            connection.execute(text("SELECT pg_notify(:channel, :payload)"),
                               {"channel": CHANNEL, "payload": WAKE + name})


def listeners(engine: Engine) -> int:
    """How many daemons listen on this database now (their connections say who they are)."""
    with engine.connect() as connection:
        return int(connection.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = :name"), {"name": _LISTENER}).scalar() or 0)


class Listener:
    """A connection of its own that LISTENs on the channel; ``wait`` gives the payloads.

    Not a pooled connection: it stays in LISTEN mode for the daemon's life, and a pool
    would hand it to a sync."""

    def __init__(self, engine: Engine) -> None:
        self._engine = create_engine(engine.url, poolclass=NullPool,
                                     connect_args={"application_name": _LISTENER})
        self._raw = self._engine.raw_connection()
        connection = self._raw.driver_connection
        assert connection is not None  # a fresh connection
        connection.set_autocommit(True)  # LISTEN takes effect at once, not at a commit
        connection.execute(f"LISTEN {CHANNEL}")
        self._connection: Any = connection

    def wait(self, timeout: float) -> list[str]:
        """The payloads of the notifications that came within ``timeout`` seconds (returns
        at the first). Raises the driver's error when the connection is lost."""
        return [notice.payload for notice in self._connection.notifies(timeout=timeout, stop_after=1)]

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a connection already lost
            self._raw.close()
        self._engine.dispose()


@contextlib.contextmanager
def listening(engine: Engine) -> Iterator[Listener]:
    listener = Listener(engine)
    try:
        yield listener
    finally:
        listener.close()
