"""Opening the state database: private files, WAL, one writer, migrations to head.

SQLite is the default; an SQLAlchemy URL names any other database. For SQLite, pysqlite's
own transaction handling is switched off and every transaction starts with
``BEGIN IMMEDIATE`` (the recipe from the SQLAlchemy docs), so a writer takes its lock up
front instead of failing half-way with "database is locked".
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, insert, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from mailsyncd.errors import AccountError, AlreadyRunning, StateDamaged, StateError, StateFull, StateLocked
from mailsyncd.fsio import PRIVATE_FILE, make_private_dirs
from mailsyncd.state.models import ACCOUNT_GENERATION, metadata

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# The newest revision under migrations/versions. Checking it with one query lets every
# start skip importing Alembic when the schema is current (a test keeps it in step).
HEAD_REVISION = "0007"


def database_url(state: str) -> str:
    """A bare path means SQLite at that path; anything with ``://`` is already a URL."""
    if "://" in state:
        return state
    return f"sqlite:///{Path(state).expanduser().absolute()}"


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _prepare_sqlite_file(path: Path) -> None:
    make_private_dirs(path.parent)
    # Create it 0600 ourselves; SQLite gives the -wal and -shm files the same mode.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    os.close(fd)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def create(state: str) -> Engine:
    url = database_url(state)
    path = sqlite_path(url)
    try:
        if path is not None:
            _prepare_sqlite_file(path)
        # A server may restart under a running daemon: test each pooled connection before
        # use, so the next sync reconnects instead of failing on a dead socket.
        engine = create_engine(url, pool_pre_ping=path is None)
    except Exception as error:
        raise StateError(f"cannot open the state database {_safe(url)}: {error}") from error
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def location(state: str) -> str:
    """The state database as a user finds it: the file, or the URL without its password."""
    url = database_url(state)
    path = sqlite_path(url)
    return str(path) if path is not None else _safe(url)


def graded(state: str, error: DBAPIError | sqlite3.Error, account: str | None = None
           ) -> StateError | AccountError:
    """The database's own complaint as the error a user can act on, naming the database.
    Within one ``account``'s run, a complaint that is not about the file itself (the
    server database went away, say) ends that account's run only."""
    detail = str(getattr(error, "orig", None) or error).splitlines()[0]
    where = location(state)
    lowered = detail.lower()
    if "is not a database" in lowered or "malformed" in lowered or "file is encrypted" in lowered:
        return StateDamaged(f"the state database {where} is damaged ({detail}); move it aside (mv {where} "
                            f"{where}.damaged) and run again: the stores are indexed and only what they lack "
                            "is fetched; or restore it from a backup")
    if "locked" in lowered or "busy" in lowered:
        return StateLocked(f"the state database {where} is locked by another program; close it (an sqlite3 "
                           "shell, a backup tool) and run again")
    if "disk is full" in lowered or "no space" in lowered or ("disk i/o error" in lowered and _full(state)):
        return StateFull(f"the state database {where} cannot grow: its disk is full; make room and run again")
    if account is not None:
        return AccountError(f"{account}: the state database {where}: {detail}; the next run goes on from here")
    return StateError(f"the state database {where}: {detail}")


def _full(state: str) -> bool:
    """SQLite reports a write refused for want of room in its WAL index as a mere I/O
    error; the disk's free space tells the two apart."""
    path = sqlite_path(database_url(state))
    try:
        return path is not None and shutil.disk_usage(path.parent).free < 64 * 1024
    except OSError:
        return False


@contextlib.contextmanager
def state_errors(state: str, account: str | None = None) -> Iterator[None]:
    """Turn what the database driver raises into one graded line (invariant: no traceback)."""
    try:
        yield
    except (DBAPIError, sqlite3.Error) as error:
        raise graded(state, error, account) from error


def check_writable(engine: Engine) -> None:
    """Take SQLite's write lock once, waiting two seconds at most: a lock another program
    holds is then reported at once, not after the long wait meant for short readers."""
    if engine.dialect.name != "sqlite":
        return
    raw = engine.raw_connection()
    try:
        connection = raw.driver_connection
        assert connection is not None
        connection.execute("PRAGMA busy_timeout=2000")
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
        finally:
            connection.execute("PRAGMA busy_timeout=10000")
    finally:
        raw.close()


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs (invariant 8)."""
    return make_url(url).render_as_string(hide_password=True)


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package, or the source tree."""
    with contextlib.suppress(ModuleNotFoundError):
        return Path(str(importlib.resources.files("mailsyncd._migrations")))
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(engine: Engine) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["engine"] = engine
    return config


def at_head(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            current = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except (OperationalError, ProgrammingError) as error:
        if "no such table" not in str(error) and "does not exist" not in str(error):
            raise
        return False  # no alembic_version table: a new database (SQLite and PostgreSQL say it differently)
    return current == [HEAD_REVISION]


MIGRATION_LOCK = 0x6D61696C  # "mail": the advisory lock daemons sharing a PostgreSQL migrate under


def upgrade(engine: Engine, revision: str = "head") -> None:
    if revision == "head" and at_head(engine):
        return
    try:
        with _migration_lock(engine):
            if revision == "head" and at_head(engine):
                return  # another daemon migrated while we waited
            if revision == "head" and _create_at_head(engine):
                return
            from alembic import command

            command.upgrade(alembic_config(engine), revision)
    except (DBAPIError, sqlite3.Error):
        raise  # graded by state_errors, like every other query
    except Exception as error:
        raise StateError(f"cannot migrate the state database: {error}") from error


def _create_at_head(engine: Engine) -> bool:
    """Make an empty database's schema from the models, stamped at HEAD_REVISION, in one
    transaction; False (nothing done) when the database has any table. Alembic, its
    templates and the revision scripts are then never loaded by a first run: they
    cost about a quarter of a second and 11 MiB that the process would keep through
    its whole first sync. A test checks that this builds exactly what the migrations
    build, rows included."""
    with engine.begin() as connection:
        if inspect(connection).get_table_names():
            return False
        metadata.create_all(connection)
        connection.execute(insert(ACCOUNT_GENERATION).values(id=1, generation=0))
        connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"))
        connection.execute(text("INSERT INTO alembic_version (version_num) VALUES (:head)"), {"head": HEAD_REVISION})
    return True


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Daemons started together on one PostgreSQL migrate one at a time; SQLite's
    instance lock already admits one process."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()


@contextlib.contextmanager
def instance_lock(state: str, daemon: bool = False) -> Iterator[None]:
    """Hold an exclusive, non-waiting lock beside the database (invariant 7).

    F_SETLK-style (LOCK_NB): a second instance fails at once with a clear message
    instead of queueing behind the first. The kernel drops the lock when the process
    dies, so a kill -9 never leaves a stale lock behind. The lock file names its holder's
    pid, and whether it is the daemon, which `mailsyncd sync` may then ask to sync.
    """
    path = sqlite_path(database_url(state))
    if path is None:
        yield  # a server database does its own locking
        return
    make_private_dirs(path.parent)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(path, os.pread(fd, 64, 0).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        # The holder's name only helps a second instance say who holds the lock; on a full
        # disk the lock holds without it, and the database says what is wrong.
        with contextlib.suppress(OSError):
            os.pwrite(fd, f"pid {os.getpid()}{' daemon' if daemon else ''}".encode(), 0)
        yield
    finally:
        os.close(fd)
