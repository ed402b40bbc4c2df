"""StateRepo: the only code that reads or writes the state database.

It speaks in domain values, never ORM rows, and every method is one short transaction
(one fsync with synchronous=FULL), so the executor can batch its writes and the order
"durable, then recorded" is visible at the call sites in sync/batch.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from sqlalchemy import Engine, bindparam, case, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from mailsyncd.domain import (
    AccountStatus,
    Flags,
    FolderInfo,
    FolderStatus,
    MessageState,
    RecordedFolder,
    RecordedMessage,
    RecordedPop,
    RemoteMessage,
    RunResult,
    RunStatus,
    Stored,
)
from mailsyncd.state.models import ACCOUNTS, FOLDERS, MESSAGES
from mailsyncd.state.models import POP_MESSAGES as POP
from mailsyncd.state.models import SYNC_RUNS as RUNS


def _flags_text(flags: Flags) -> str:
    return " ".join(sorted(flags))


def _flags(text: str | None) -> Flags:
    return frozenset(text.split()) if text else frozenset()


def _new_id(result: Any) -> int:
    return int(result.inserted_primary_key[0])


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class KnownFolder:
    id: int
    name: str
    delimiter: str | None
    path: str
    uidvalidity: int | None
    uidnext: int | None
    highestmodseq: int | None
    last_error: str | None
    on_server: bool


class IntentKind(Enum):
    """Which protocol's messages an intent belongs to."""

    IMAP = "imap"
    POP = "pop"


_INTENT_TABLES = {IntentKind.IMAP: MESSAGES, IntentKind.POP: POP}


@dataclass(frozen=True)
class Pending:
    """An intent that never became ``stored``: where the bytes may be."""

    row_id: int
    location: str
    kind: IntentKind


def _message(row: Any) -> RecordedMessage:
    return RecordedMessage(
        uid=row.uid, uidvalidity=row.uidvalidity, state=MessageState(row.state), flags=_flags(row.flags),
        location=row.location, size=row.size, sha256=row.sha256, message_id=row.message_id, row_id=row.id,
    )


def _base_columns(uidnext: Any, max_size: int | None) -> tuple[Any, Any]:
    """The two aggregates of a sync base over MESSAGES rows: recorded messages below
    ``uidnext`` that should still be on the server, and the lowest UID skipped as too large
    that ``max_size`` now allows."""
    present = MESSAGES.c.state.in_([MessageState.STORED, MessageState.SKIPPED]) & (MESSAGES.c.uid < uidnext)
    fitting = MESSAGES.c.state == MessageState.SKIPPED
    if max_size is not None:
        fitting = fitting & (MESSAGES.c.size <= max_size)
    return func.count(case((present, 1))), func.min(case((fitting, MESSAGES.c.uid)))


class StateRepo:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- accounts and folders ---------------------------------------------------------

    def account_id(self, name: str, protocol: str) -> int:
        with self.engine.begin() as connection:
            found = connection.execute(select(ACCOUNTS.c.id).where(ACCOUNTS.c.name == name)).scalar()
            if found is not None:
                return int(found)
            return _new_id(connection.execute(insert(ACCOUNTS).values(name=name, protocol=protocol)))

    def folders(self, account_id: int) -> list[KnownFolder]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(FOLDERS).where(FOLDERS.c.account_id == account_id)
                                      .order_by(FOLDERS.c.name))
            return [KnownFolder(row.id, row.name, row.delimiter, row.path, row.uidvalidity, row.uidnext,
                                row.highestmodseq, row.last_error, row.on_server)
                    for row in rows]

    def upsert_folder(self, account_id: int, info: FolderInfo, path: str) -> int:
        """Known folders keep their recorded path: a folder never moves in the store."""
        with self.engine.begin() as connection:
            found = connection.execute(select(FOLDERS.c.id).where(
                FOLDERS.c.account_id == account_id, FOLDERS.c.name == info.name)).scalar()
            if found is not None:
                connection.execute(update(FOLDERS).where(FOLDERS.c.id == found).values(on_server=True))
                return int(found)
            return _new_id(connection.execute(insert(FOLDERS).values(
                account_id=account_id, name=info.name, delimiter=info.delimiter, path=path, on_server=True,
            )))

    def mark_folders_absent(self, account_id: int, present: Iterable[str]) -> None:
        """Folders gone from the server stay in the store; only the flag changes."""
        vanished = FOLDERS.c.account_id == account_id, FOLDERS.c.name.not_in(list(present)), FOLDERS.c.on_server
        with self.engine.connect() as connection:
            if connection.execute(select(func.count()).where(*vanished)).scalar_one() == 0:
                return  # the common case, and a read costs no fsync
        with self.engine.begin() as connection:
            connection.execute(update(FOLDERS).where(*vanished).values(on_server=False))

    def touch_folders(self, folder_ids: Iterable[int]) -> None:
        """Note a sync that changed nothing, for many folders in one transaction."""
        ids = list(folder_ids)
        if ids:
            with self.engine.begin() as connection:
                connection.execute(update(FOLDERS).where(FOLDERS.c.id.in_(ids)).values(last_sync=_now()))

    def finish_folder(self, folder_id: int, uidvalidity: int, uidnext: int, highestmodseq: int | None) -> None:
        """Advance the folder's sync point. Called only after every planned action is
        done, so an interrupted sync starts again from the old point."""
        with self.engine.begin() as connection:
            connection.execute(update(FOLDERS).where(FOLDERS.c.id == folder_id).values(
                uidvalidity=uidvalidity, uidnext=uidnext, highestmodseq=highestmodseq,
                last_sync=_now(), last_error=None))

    def start_uidvalidity(self, folder_id: int, uidvalidity: int) -> None:
        """A first sync, or one after a UIDVALIDITY change: no sync point yet."""
        with self.engine.begin() as connection:
            connection.execute(update(FOLDERS).where(FOLDERS.c.id == folder_id).values(
                uidvalidity=uidvalidity, uidnext=None, highestmodseq=None))

    def folder_error(self, folder_id: int, error: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(FOLDERS).where(FOLDERS.c.id == folder_id).values(last_error=error))

    # --- IMAP messages ----------------------------------------------------------------

    def sync_base(self, folder_id: int, uidvalidity: int, uidnext: int, max_size: int | None) -> tuple[int, int | None]:
        """In one query: how many recorded messages below ``uidnext`` should still be on
        the server, and the lowest UID skipped as too large that ``max_size`` now allows."""
        query = select(*_base_columns(uidnext, max_size)).where(
            MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity)
        with self.engine.connect() as connection:
            count, lowest = connection.execute(query).one()
        return int(count), None if lowest is None else int(lowest)

    def sync_bases(self, account_id: int, max_size: int | None) -> dict[int, tuple[int, int | None]]:
        """``sync_base`` of every folder of the account at its recorded UIDVALIDITY and
        UIDNEXT, in one query, so that unchanged folders cost no query each. Folders
        without a recorded UIDVALIDITY are left out; those without messages show (0, None)."""
        uidnext = func.coalesce(FOLDERS.c.uidnext, 1)
        query = (select(FOLDERS.c.id, *_base_columns(uidnext, max_size))
                 .select_from(FOLDERS.outerjoin(MESSAGES, (MESSAGES.c.folder_id == FOLDERS.c.id)
                                                & (MESSAGES.c.uidvalidity == FOLDERS.c.uidvalidity)))
                 .where(FOLDERS.c.account_id == account_id, FOLDERS.c.uidvalidity.is_not(None))
                 .group_by(FOLDERS.c.id))
        with self.engine.connect() as connection:
            return {int(folder_id): (int(count), None if lowest is None else int(lowest))
                    for folder_id, count, lowest in connection.execute(query)}

    def recorded_folder(self, folder: KnownFolder, uids: Iterable[int] | None,
                        with_retired: bool = False) -> RecordedFolder:
        """The recorded messages of the current UIDVALIDITY: those in ``uids``, or all
        of them when ``uids`` is None (a full scan needs every one)."""
        with self.engine.connect() as connection:
            query = select(MESSAGES).where(MESSAGES.c.folder_id == folder.id,
                                           MESSAGES.c.uidvalidity == (folder.uidvalidity or 0))
            messages: dict[int, RecordedMessage] = {}
            if uids is None:
                messages = {row.uid: _message(row) for row in connection.execute(query)}
            else:
                wanted = sorted(set(uids))
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start:start + 500]
                    rows = connection.execute(query.where(MESSAGES.c.uid.in_(chunk)))
                    messages.update((row.uid, _message(row)) for row in rows)
            retired: tuple[RecordedMessage, ...] = ()
            if with_retired:
                retired = tuple(_message(row) for row in connection.execute(select(MESSAGES).where(
                    MESSAGES.c.folder_id == folder.id, MESSAGES.c.state == MessageState.RETIRED)))
        return RecordedFolder(folder.uidvalidity, folder.uidnext, folder.highestmodseq, messages,
                              complete=uids is None, retired=retired)

    def record_pending(self, folder_id: int, uidvalidity: int,
                       intents: Sequence[tuple[RemoteMessage, str]]) -> None:
        """The intent, committed before any byte of these messages is written. It
        replaces a SKIPPED row: the size limit was raised since."""
        if not intents:
            return
        with self.engine.begin() as connection:
            connection.execute(delete(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity,
                MESSAGES.c.uid.in_([remote.uid for remote, _ in intents]),
                MESSAGES.c.state.in_([MessageState.PENDING, MessageState.SKIPPED])))
            connection.execute(insert(MESSAGES), [
                {"folder_id": folder_id, "uidvalidity": uidvalidity, "uid": remote.uid,
                 "state": MessageState.PENDING, "location": location, "size": remote.size,
                 "internaldate": remote.internaldate, "flags": _flags_text(remote.flags)}
                for remote, location in intents])

    def finish_batch(self, folder_id: int, uidvalidity: int,
                     done: Sequence[tuple[RemoteMessage, Stored, str | None]],
                     unfinished: Sequence[tuple[RemoteMessage, str]],
                     adopted: Sequence[tuple[RemoteMessage, RecordedMessage, str]]) -> None:
        """Record a committed batch in ONE transaction: the stored messages (only those
        whose store commit has returned, invariant 1), the intents not yet finished at
        the location their reservation names now, and copies re-adopted by hash (whose
        own intents end here). One transaction matters for mbox: a pending row left
        behind stored ones would make recovery cut the file back over them."""
        uid = MESSAGES.c.uid == bindparam("b_uid")
        with self.engine.begin() as connection:
            if done:
                connection.execute(update(MESSAGES).where(
                    MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity, uid,
                ).values(state=MessageState.STORED, location=bindparam("b_location"),
                         sha256=bindparam("b_sha256"), message_id=bindparam("b_message_id")), [
                    {"b_uid": remote.uid, "b_location": stored.location, "b_sha256": stored.sha256,
                     "b_message_id": message_id} for remote, stored, message_id in done])
            if unfinished:
                connection.execute(update(MESSAGES).where(
                    MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity, uid,
                    MESSAGES.c.state == MessageState.PENDING,
                ).values(location=bindparam("b_location")), [
                    {"b_uid": remote.uid, "b_location": location} for remote, location in unfinished])
            self._forget(connection, folder_id, uidvalidity, [remote.uid for remote, _, _ in adopted])
            self._adopt(connection, uidvalidity, adopted)

    def forget(self, folder_id: int, uidvalidity: int, uids: Sequence[int]) -> None:
        """Intents that came to nothing this run: dropped, so they are fetched again."""
        with self.engine.begin() as connection:
            self._forget(connection, folder_id, uidvalidity, uids)

    def _forget(self, connection: Connection, folder_id: int, uidvalidity: int, uids: Sequence[int]) -> None:
        if uids:
            connection.execute(delete(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity,
                MESSAGES.c.uid.in_(list(uids)), MESSAGES.c.state == MessageState.PENDING))

    def record_skipped(self, folder_id: int, uidvalidity: int, remotes: Sequence[RemoteMessage]) -> None:
        if not remotes:
            return
        with self.engine.begin() as connection:
            connection.execute(insert(MESSAGES), [
                {"folder_id": folder_id, "uidvalidity": uidvalidity, "uid": remote.uid,
                 "state": MessageState.SKIPPED, "size": remote.size, "internaldate": remote.internaldate,
                 "flags": _flags_text(remote.flags)} for remote in remotes])

    def update_flags(self, folder_id: int, uidvalidity: int,
                     changes: Sequence[tuple[int, Flags, str]]) -> None:
        if not changes:
            return
        statement = update(MESSAGES).where(
            MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity,
            MESSAGES.c.uid == bindparam("b_uid"),
        ).values(flags=bindparam("b_flags"), location=bindparam("b_location"))
        with self.engine.begin() as connection:
            connection.execute(statement, [
                {"b_uid": uid, "b_flags": _flags_text(flags), "b_location": location}
                for uid, flags, location in changes])

    def mark_vanished(self, folder_id: int, uidvalidity: int, uids: Iterable[int], state: MessageState) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity,
                MESSAGES.c.uid.in_(list(uids))).values(state=state))

    def retire(self, folder_id: int, old_uidvalidity: int) -> None:
        """Old UIDs are over; their local copies stay, waiting to be re-adopted.
        Pending and skipped rows of the old UIDVALIDITY are dropped: nothing is stored
        for them (recovery already ran)."""
        with self.engine.begin() as connection:
            connection.execute(delete(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == old_uidvalidity,
                MESSAGES.c.state.in_([MessageState.PENDING, MessageState.SKIPPED])))
            connection.execute(update(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == old_uidvalidity,
                MESSAGES.c.state.in_([MessageState.STORED, MessageState.GONE])).values(state=MessageState.RETIRED))

    def adopt(self, uidvalidity: int,
              adoptions: Sequence[tuple[RemoteMessage, RecordedMessage, str]]) -> None:
        """Give a retired local copy its new UID (and the server's flags, at ``location``)."""
        with self.engine.begin() as connection:
            self._adopt(connection, uidvalidity, adoptions)

    def _adopt(self, connection: Connection, uidvalidity: int,
               adoptions: Sequence[tuple[RemoteMessage, RecordedMessage, str]]) -> None:
        for remote, copy, location in adoptions:
            connection.execute(update(MESSAGES).where(MESSAGES.c.id == copy.row_id).values(
                uidvalidity=uidvalidity, uid=remote.uid, state=MessageState.STORED, location=location,
                flags=_flags_text(remote.flags), size=remote.size))

    # --- recovery ----------------------------------------------------------------------

    def pending(self, account_id: int) -> list[Pending]:
        with self.engine.connect() as connection:
            imap = connection.execute(select(MESSAGES.c.id, MESSAGES.c.location).join(
                FOLDERS, FOLDERS.c.id == MESSAGES.c.folder_id).where(
                FOLDERS.c.account_id == account_id, MESSAGES.c.state == MessageState.PENDING))
            pop = connection.execute(select(POP.c.id, POP.c.location).where(
                POP.c.account_id == account_id, POP.c.state == MessageState.PENDING))
            return ([Pending(row.id, row.location, IntentKind.IMAP) for row in imap]
                    + [Pending(row.id, row.location, IntentKind.POP) for row in pop])

    def resolve_pending(self, adopted: Sequence[tuple[Pending, Stored]], forgotten: Sequence[Pending]) -> None:
        """Adopted intents become stored; the others are dropped so they are fetched again."""
        with self.engine.begin() as connection:
            for intent, stored in adopted:
                table = _INTENT_TABLES[intent.kind]
                connection.execute(update(table).where(table.c.id == intent.row_id).values(
                    state=MessageState.STORED, location=stored.location, sha256=stored.sha256))
            for intent in forgotten:
                table = _INTENT_TABLES[intent.kind]
                connection.execute(delete(table).where(table.c.id == intent.row_id))

    # --- POP3 ---------------------------------------------------------------------------

    def pop_messages(self, account_id: int) -> dict[str, RecordedPop]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(POP).where(POP.c.account_id == account_id))
            return {row.uidl: RecordedPop(row.uidl, MessageState(row.state), row.first_seen, row.location)
                    for row in rows}

    def pop_record_pending(self, account_id: int, intents: Sequence[tuple[str, int, str]]) -> None:
        """(uidl, size, location) intents, before the download."""
        if not intents:
            return
        with self.engine.begin() as connection:
            connection.execute(delete(POP).where(POP.c.account_id == account_id,
                                                 POP.c.uidl.in_([uidl for uidl, _, _ in intents]),
                                                 POP.c.state.in_([MessageState.PENDING, MessageState.SKIPPED])))
            now = _now()
            connection.execute(insert(POP), [
                {"account_id": account_id, "uidl": uidl, "state": MessageState.PENDING, "location": location,
                 "size": size, "first_seen": now} for uidl, size, location in intents])

    def pop_finish_batch(self, account_id: int, done: Sequence[tuple[str, Stored, str | None]],
                         unfinished: Sequence[tuple[str, str]]) -> None:
        """Record a committed batch in ONE transaction, as ``finish_batch`` does for IMAP:
        the stored messages, and the (uidl, location) intents not yet finished at the
        location their reservation names now."""
        uidl = POP.c.uidl == bindparam("b_uidl")
        with self.engine.begin() as connection:
            if done:
                connection.execute(update(POP).where(POP.c.account_id == account_id, uidl).values(
                    state=MessageState.STORED, location=bindparam("b_location"), sha256=bindparam("b_sha256"),
                    message_id=bindparam("b_message_id")), [
                    {"b_uidl": key, "b_location": stored.location, "b_sha256": stored.sha256,
                     "b_message_id": message_id} for key, stored, message_id in done])
            if unfinished:
                connection.execute(update(POP).where(
                    POP.c.account_id == account_id, uidl, POP.c.state == MessageState.PENDING,
                ).values(location=bindparam("b_location")), [
                    {"b_uidl": key, "b_location": location} for key, location in unfinished])

    def pop_forget(self, account_id: int, uidls: Sequence[str]) -> None:
        """Intents that came to nothing this run: dropped, so they are fetched again."""
        with self.engine.begin() as connection:
            connection.execute(delete(POP).where(POP.c.account_id == account_id, POP.c.uidl.in_(list(uidls)),
                                                 POP.c.state == MessageState.PENDING))

    def pop_record_skipped(self, account_id: int, skipped: Sequence[tuple[str, int]]) -> None:
        if not skipped:
            return
        with self.engine.begin() as connection:
            now = _now()
            connection.execute(insert(POP), [
                {"account_id": account_id, "uidl": uidl, "state": MessageState.SKIPPED, "size": size,
                 "first_seen": now} for uidl, size in skipped])

    def pop_mark_deleted(self, account_id: int, uidls: Iterable[str]) -> None:
        """Called only after QUIT returned +OK (invariant 4)."""
        with self.engine.begin() as connection:
            connection.execute(update(POP).where(
                POP.c.account_id == account_id, POP.c.uidl.in_(list(uidls)),
            ).values(state=MessageState.GONE, deleted_at=_now()))

    # --- runs and status ----------------------------------------------------------------

    def start_run(self, account_id: int) -> int:
        with self.engine.begin() as connection:
            return _new_id(connection.execute(insert(RUNS).values(
                account_id=account_id, started=_now(), result=RunResult.RUNNING, fetched=0, fetched_bytes=0,
            )))

    def finish_run(self, run_id: int, result: RunResult, fetched: int, fetched_bytes: int,
                   error: str | None) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(RUNS).where(RUNS.c.id == run_id).values(
                finished=_now(), result=result, fetched=fetched, fetched_bytes=fetched_bytes, error=error))

    def status(self) -> list[AccountStatus]:
        """Per account, by name: the last run and per-folder counts. ``configured`` and
        ``schedule`` are left for the caller, who has the config."""
        with self.engine.connect() as connection:
            return [self._account_status(connection, row) for row in
                    connection.execute(select(ACCOUNTS).order_by(ACCOUNTS.c.name))]

    def _account_status(self, connection: Connection, account: Any) -> AccountStatus:
        run = connection.execute(select(RUNS).where(RUNS.c.account_id == account.id)
                                 .order_by(RUNS.c.id.desc()).limit(1)).first()
        last_ok = connection.execute(select(func.max(RUNS.c.finished)).where(
            RUNS.c.account_id == account.id, RUNS.c.result == RunResult.OK)).scalar()
        counts = connection.execute(select(MESSAGES.c.folder_id, MESSAGES.c.state, func.count())
                                    .join(FOLDERS, FOLDERS.c.id == MESSAGES.c.folder_id)
                                    .where(FOLDERS.c.account_id == account.id)
                                    .group_by(MESSAGES.c.folder_id, MESSAGES.c.state)).all()
        by_folder: dict[int, dict[str, int]] = {}
        for folder_id, state, count in counts:
            by_folder.setdefault(folder_id, {})[state] = count
        folders = tuple(
            FolderStatus(row.name, row.path, row.last_sync, row.last_error, row.on_server, row.uidvalidity,
                         by_folder.get(row.id, {}))
            for row in connection.execute(select(FOLDERS).where(FOLDERS.c.account_id == account.id)
                                          .order_by(FOLDERS.c.name))
        )
        pop_counts = connection.execute(select(POP.c.state, func.count()).where(
            POP.c.account_id == account.id).group_by(POP.c.state)).all()
        last_run = None if run is None else RunStatus(run.started, run.finished, RunResult(run.result),
                                                       run.fetched, run.fetched_bytes, run.error)
        return AccountStatus(account.name, account.protocol, last_run, last_ok, folders,
                             {str(state): int(count) for state, count in pop_counts})
