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

from sqlalchemy import ColumnElement, Engine, bindparam, case, delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from mailsyncd.domain import (
    NO_FLAGS,
    AccountStatus,
    Flags,
    FolderInfo,
    FolderStatus,
    LocalCopy,
    MessageState,
    RecordedFolder,
    RecordedMessage,
    RecordedPop,
    RemoteMessage,
    RunResult,
    RunStatus,
    Stored,
    shared_flags,
)
from mailsyncd.errors import StateError
from mailsyncd.state.models import ACCOUNTS, FOLDERS, MESSAGES, PUSH_INTENTS
from mailsyncd.state.models import POP_MESSAGES as POP
from mailsyncd.state.models import SYNC_RUNS as RUNS

# The UIDVALIDITY under which copies found by indexing the store are recorded: no
# server's (RFC 3501 makes it a non-zero 32-bit number), so they are always retired
# ones, and none of them is ever taken for a message of the folder's own UIDVALIDITY.
FOUND_UIDVALIDITY = -1
# How a found copy is named among a POP account's UIDLs: no UIDL has a space in it.
FOUND_UIDL = "found: "


def _flags_text(flags: Flags) -> str:
    return " ".join(sorted(flags))


def _flags(text: str | None) -> Flags:
    return shared_flags(frozenset(text.split())) if text else NO_FLAGS


def _known_folder(row: Any) -> KnownFolder:
    return KnownFolder(row.id, row.name, row.delimiter, row.path, row.uidvalidity, row.uidnext, row.highestmodseq,
                       row.last_error, row.on_server,
                       None if row.cur_mtime_ns is None or row.new_mtime_ns is None
                       else (row.cur_mtime_ns, row.new_mtime_ns))


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
    local_mtimes: tuple[int, int] | None = None  # two-way: cur/ and new/ when last listed and matched


@dataclass(frozen=True)
class PushIntent:
    """A two-way effect announced before it happened (see models.PUSH_INTENTS).
    ``kind`` is one of the executor's intent kinds; the other fields are what that kind
    needs to be settled after a crash."""

    folder_id: int
    kind: str
    uidvalidity: int | None = None
    uid: int | None = None
    local_name: str | None = None
    target_folder_id: int | None = None
    uidnext: int | None = None
    size: int | None = None
    sha256: str | None = None
    message_id: str | None = None
    flags: Flags = frozenset()
    row_id: int | None = None


class IntentKind(Enum):
    """Which protocol's messages an intent belongs to."""

    IMAP = "imap"
    POP = "pop"


_INTENT_TABLES = {IntentKind.IMAP: MESSAGES, IntentKind.POP: POP}


@dataclass(frozen=True)
class Pending:
    """An intent that never became ``stored``: where the bytes may be. For the
    replacement of a placeholder, ``placeholder`` is the SHA-256 of the placeholder,
    which tells whether the whole message took its place."""

    row_id: int
    location: str
    kind: IntentKind
    placeholder: str | None = None


def _message(row: Any) -> RecordedMessage:
    return RecordedMessage(
        uid=row.uid, uidvalidity=row.uidvalidity, state=MessageState(row.state), flags=_flags(row.flags),
        location=row.location, size=row.size, sha256=getattr(row, "sha256", None),
        message_id=getattr(row, "message_id", None), row_id=row.id,
    )


# A record for planning a listing of the same UIDVALIDITY: without the SHA-256 and
# Message-ID, which only matching copies by content (or pairing them, two-way) reads.
_LISTED = (MESSAGES.c.id, MESSAGES.c.uid, MESSAGES.c.uidvalidity, MESSAGES.c.state, MESSAGES.c.flags,
           MESSAGES.c.location, MESSAGES.c.size)


def _base_columns(uidnext: Any, max_size: int | None, placeholders: bool) -> tuple[Any, Any]:
    """The two aggregates of a sync base over MESSAGES rows: recorded messages below
    ``uidnext`` that should still be on the server, and the lowest UID that must be listed
    again: skipped as too large or kept as a placeholder, and allowed whole by
    ``max_size`` now, or skipped while ``placeholders`` are now wanted for what is too large."""
    present = MESSAGES.c.state.in_([MessageState.STORED, MessageState.SKIPPED, MessageState.PLACEHOLDER]) & (
        MESSAGES.c.uid < uidnext)
    fitting: ColumnElement[bool] = MESSAGES.c.state.in_([MessageState.SKIPPED, MessageState.PLACEHOLDER])
    if max_size is not None:
        fitting = fitting & (MESSAGES.c.size <= max_size)
    if placeholders:
        fitting = fitting | (MESSAGES.c.state == MessageState.SKIPPED)
    return func.count(case((present, 1))), func.min(case((fitting, MESSAGES.c.uid)))


class StateRepo:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- accounts and folders ---------------------------------------------------------

    def account_id(self, name: str, protocol: str) -> int:
        """The account's row, made at its first sync. Daemons sharing a database may make
        it at the same instant: the one whose insert loses finds the winner's row."""
        for _attempt in range(2):
            try:
                with self.engine.begin() as connection:
                    found = connection.execute(select(ACCOUNTS.c.id).where(ACCOUNTS.c.name == name)).scalar()
                    if found is not None:
                        return int(found)
                    return _new_id(connection.execute(insert(ACCOUNTS).values(name=name, protocol=protocol)))
            except IntegrityError:
                continue
        raise StateError(f"{name}: cannot record the account in the state database")

    def find_account(self, name: str) -> int | None:
        """The account's id, without recording it when it is new (for read-only commands)."""
        with self.engine.connect() as connection:
            found = connection.execute(select(ACCOUNTS.c.id).where(ACCOUNTS.c.name == name)).scalar()
            return None if found is None else int(found)

    def folders(self, account_id: int) -> list[KnownFolder]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(FOLDERS).where(FOLDERS.c.account_id == account_id)
                                      .order_by(FOLDERS.c.name))
            return [_known_folder(row) for row in rows]

    def folder(self, folder_id: int) -> KnownFolder:
        """One folder's record, as ``folders`` gives it (a folder just recorded, without
        reading every folder of the account again)."""
        with self.engine.connect() as connection:
            return _known_folder(connection.execute(select(FOLDERS).where(FOLDERS.c.id == folder_id)).one())

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

    def sync_base(self, folder_id: int, uidvalidity: int, uidnext: int, max_size: int | None,
                  placeholders: bool = False) -> tuple[int, int | None]:
        """In one query: how many recorded messages below ``uidnext`` should still be on
        the server, and the lowest UID that must be listed again: skipped as too large or
        kept as a placeholder, and allowed whole by ``max_size`` now, or skipped while
        ``placeholders`` are now wanted for what is too large."""
        query = select(*_base_columns(uidnext, max_size, placeholders)).where(
            MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity)
        with self.engine.connect() as connection:
            count, lowest = connection.execute(query).one()
        return int(count), None if lowest is None else int(lowest)

    def sync_bases(self, account_id: int, max_size: int | None, placeholders: bool = False
                   ) -> dict[int, tuple[int, int | None]]:
        """``sync_base`` of every folder of the account at its recorded UIDVALIDITY and
        UIDNEXT, in one query, so that unchanged folders cost no query each. Folders
        without a recorded UIDVALIDITY are left out; those without messages show (0, None)."""
        uidnext = func.coalesce(FOLDERS.c.uidnext, 1)
        query = (select(FOLDERS.c.id, *_base_columns(uidnext, max_size, placeholders))
                 .select_from(FOLDERS.outerjoin(MESSAGES, (MESSAGES.c.folder_id == FOLDERS.c.id)
                                                & (MESSAGES.c.uidvalidity == FOLDERS.c.uidvalidity)))
                 .where(FOLDERS.c.account_id == account_id, FOLDERS.c.uidvalidity.is_not(None))
                 .group_by(FOLDERS.c.id))
        with self.engine.connect() as connection:
            return {int(folder_id): (int(count), None if lowest is None else int(lowest))
                    for folder_id, count, lowest in connection.execute(query)}

    def recorded_folder(self, folder: KnownFolder, uids: Iterable[int] | None,
                        with_retired: bool = False, hashes: bool = True) -> RecordedFolder:
        """The recorded messages of the current UIDVALIDITY: those in ``uids``, or all
        of them when ``uids`` is None (a full scan needs every one); without their
        SHA-256 and Message-ID unless ``hashes`` (of every message of a large folder,
        they would be the larger part of the record)."""
        with self.engine.connect() as connection:
            query = select(*(MESSAGES.c if hashes else _LISTED)).where(
                MESSAGES.c.folder_id == folder.id, MESSAGES.c.uidvalidity == (folder.uidvalidity or 0))
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
                     done: Sequence[tuple[RemoteMessage | RecordedMessage, Stored, str | None]],
                     unfinished: Sequence[tuple[RemoteMessage, str]],
                     adopted: Sequence[tuple[RemoteMessage, RecordedMessage, str]],
                     stored_as: MessageState = MessageState.STORED) -> None:
        """Record a committed batch in ONE transaction: the stored messages (only those
        whose store commit has returned, invariant 1) as ``stored_as``, the intents not
        yet finished at the location their reservation names now, and copies re-adopted
        by hash (whose own intents end here). One transaction matters for mbox: a pending
        row left behind stored ones would make recovery cut the file back over them."""
        uid = MESSAGES.c.uid == bindparam("b_uid")
        with self.engine.begin() as connection:
            if done:
                connection.execute(update(MESSAGES).where(
                    MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity, uid,
                ).values(state=stored_as, location=bindparam("b_location"),
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

    def placeholders(self, folder_id: int, uidvalidity: int) -> list[RecordedMessage]:
        """The folder's placeholders, for the executor to look at their local flags."""
        with self.engine.connect() as connection:
            return [_message(row) for row in connection.execute(select(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity,
                MESSAGES.c.state == MessageState.PLACEHOLDER))]

    def find_placeholder(self, folder_id: int, uid: int | None, message_id: str | None) -> RecordedMessage | None:
        """The placeholder of the folder's current UIDVALIDITY with this UID or Message-ID."""
        query = select(MESSAGES).join(FOLDERS, FOLDERS.c.id == MESSAGES.c.folder_id).where(
            MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == FOLDERS.c.uidvalidity,
            MESSAGES.c.state == MessageState.PLACEHOLDER)
        query = query.where(MESSAGES.c.uid == uid) if uid is not None else query.where(
            MESSAGES.c.message_id == message_id)
        with self.engine.connect() as connection:
            row = connection.execute(query.order_by(MESSAGES.c.uid).limit(1)).first()
        return None if row is None else _message(row)

    def find_stored(self, folder_id: int, uidvalidity: int, uid: int) -> str | None:
        """Where a stored message is, as recorded."""
        with self.engine.connect() as connection:
            found = connection.execute(select(MESSAGES.c.location).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity, MESSAGES.c.uid == uid,
                MESSAGES.c.state == MessageState.STORED)).scalar()
        return None if found is None else str(found)

    def mark_replacing(self, folder_id: int, uidvalidity: int, intents: Sequence[tuple[int, str]]) -> None:
        """The intent to write whole messages over their (uid, location) placeholders,
        committed before any byte is written; the rows keep the placeholders' SHA-256,
        by which recovery tells which of the two a location holds."""
        with self.engine.begin() as connection:
            connection.execute(update(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity,
                MESSAGES.c.uid == bindparam("b_uid"), MESSAGES.c.state == MessageState.PLACEHOLDER,
            ).values(state=MessageState.REPLACING, location=bindparam("b_location")), [
                {"b_uid": uid, "b_location": location} for uid, location in intents])

    def keep_placeholders(self, folder_id: int, uidvalidity: int, uids: Sequence[int]) -> None:
        """Replacements that came to nothing this run: the placeholders stay."""
        with self.engine.begin() as connection:
            connection.execute(update(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity,
                MESSAGES.c.uid.in_(list(uids)), MESSAGES.c.state == MessageState.REPLACING,
            ).values(state=MessageState.PLACEHOLDER))

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

    def folder_has_records(self, folder_id: int) -> bool:
        """Whether anything at all is recorded for the folder."""
        with self.engine.connect() as connection:
            return connection.execute(select(MESSAGES.c.id).where(MESSAGES.c.folder_id == folder_id).limit(1)
                                      ).first() is not None

    def has_unclaimed(self, folder_id: int) -> bool:
        """Whether the folder has local copies no UID claims (retired, or found)."""
        with self.engine.connect() as connection:
            return connection.execute(select(MESSAGES.c.id).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.state == MessageState.RETIRED).limit(1)
                                      ).first() is not None

    def record_found(self, folder_id: int, copies: Sequence[LocalCopy]) -> None:
        """Copies found by indexing the store, recorded as retired copies of no server's
        UIDVALIDITY: matched and adopted like those, and never removed."""
        with self.engine.begin() as connection:
            connection.execute(insert(MESSAGES), [
                {"folder_id": folder_id, "uidvalidity": FOUND_UIDVALIDITY, "uid": number,
                 "state": MessageState.RETIRED, "location": copy.location, "size": copy.size, "sha256": copy.sha256,
                 "message_id": copy.message_id, "flags": ""} for number, copy in enumerate(copies, 1)])

    def retire(self, folder_id: int, old_uidvalidity: int) -> None:
        """Old UIDs are over; their local copies stay, waiting to be re-adopted.
        Pending and skipped rows of the old UIDVALIDITY are dropped: nothing is stored
        for them (recovery already ran). A placeholder is retired without its Message-ID,
        so it is never re-adopted as if it were the whole message."""
        with self.engine.begin() as connection:
            connection.execute(delete(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == old_uidvalidity,
                MESSAGES.c.state.in_([MessageState.PENDING, MessageState.SKIPPED])))
            connection.execute(update(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == old_uidvalidity,
                MESSAGES.c.state.in_([MessageState.STORED, MessageState.GONE])).values(state=MessageState.RETIRED))
            connection.execute(update(MESSAGES).where(
                MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == old_uidvalidity,
                MESSAGES.c.state == MessageState.PLACEHOLDER).values(state=MessageState.RETIRED, message_id=None))

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

    # --- two-way -------------------------------------------------------------------------

    def has_messages(self, account_id: int) -> bool:
        """Whether anything was ever stored for the account: then a missing store root is
        a disk that is not mounted, never an empty mailbox to start from."""
        with self.engine.connect() as connection:
            return connection.execute(select(MESSAGES.c.id).join(FOLDERS, FOLDERS.c.id == MESSAGES.c.folder_id)
                                      .where(FOLDERS.c.account_id == account_id).limit(1)).first() is not None

    def restart_pairs(self, folder_id: int, uidvalidity: int) -> None:
        """A first two-way sync of a folder, or one after a UIDVALIDITY change: the old
        UIDs mean nothing, so their pairs go; the files stay and are paired again by
        content (nothing is deleted or copied for it)."""
        with self.engine.begin() as connection:
            connection.execute(delete(MESSAGES).where(MESSAGES.c.folder_id == folder_id,
                                                      MESSAGES.c.uidvalidity != uidvalidity))
            connection.execute(update(FOLDERS).where(FOLDERS.c.id == folder_id).values(
                uidvalidity=uidvalidity, uidnext=None, highestmodseq=None, cur_mtime_ns=None, new_mtime_ns=None))

    def add_intents(self, intents: Sequence[PushIntent]) -> list[int]:
        """Commit intents before their effects; returns their ids in order."""
        now = _now()
        with self.engine.begin() as connection:
            return [_new_id(connection.execute(insert(PUSH_INTENTS).values(
                folder_id=intent.folder_id, kind=intent.kind, uidvalidity=intent.uidvalidity, uid=intent.uid,
                local_name=intent.local_name, target_folder_id=intent.target_folder_id, uidnext=intent.uidnext,
                size=intent.size, sha256=intent.sha256, message_id=intent.message_id,
                flags=_flags_text(intent.flags), created=now))) for intent in intents]

    def push_intents(self, account_id: int) -> list[PushIntent]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(PUSH_INTENTS).join(FOLDERS, FOLDERS.c.id == PUSH_INTENTS.c.folder_id)
                                      .where(FOLDERS.c.account_id == account_id).order_by(PUSH_INTENTS.c.id))
            return [PushIntent(row.folder_id, row.kind, row.uidvalidity, row.uid, row.local_name,
                               row.target_folder_id, row.uidnext, row.size, row.sha256, row.message_id,
                               _flags(row.flags), row.id) for row in rows]

    def record_pushes(self, folder_id: int, uidvalidity: int, *, pairs: Sequence[RecordedMessage] = (),
                      relinks: Sequence[tuple[int, int, str]] = (),
                      rebases: Sequence[tuple[int, Flags, str | None]] = (),
                      forget: Sequence[int] = (), done: Sequence[int] = (), relist_from: int | None = None) -> None:
        """The outcome of two-way effects and the end of their intents, in ONE
        transaction, so no crash leaves an effect recorded while its intent lingers or
        the reverse: ``relinks`` (old UID, UID, location) first, then ``pairs`` (new or
        moved here; a row with the same UID is replaced), then ``rebases`` (UID, new
        base, location or None to keep it), then ``forget`` (UIDs whose pair is over).
        ``relist_from`` lowers the folder's sync point to that UID, so the next snapshot
        lists the forgotten UIDs again even if the effect that follows never happens."""
        where = (MESSAGES.c.folder_id == folder_id, MESSAGES.c.uidvalidity == uidvalidity)
        with self.engine.begin() as connection:
            for old_uid, new_uid, location in relinks:
                if old_uid != new_uid:
                    connection.execute(delete(MESSAGES).where(*where, MESSAGES.c.uid == new_uid))
                connection.execute(update(MESSAGES).where(*where, MESSAGES.c.uid == old_uid).values(
                    uid=new_uid, location=location))
            if pairs:
                connection.execute(delete(MESSAGES).where(*where, MESSAGES.c.uid.in_([p.uid for p in pairs])))
                connection.execute(insert(MESSAGES), [
                    {"folder_id": folder_id, "uidvalidity": uidvalidity, "uid": pair.uid,
                     "state": MessageState.STORED, "location": pair.location, "size": pair.size,
                     "sha256": pair.sha256, "message_id": pair.message_id, "flags": _flags_text(pair.flags)}
                    for pair in pairs])
            for changed_uid, flags, moved_to in rebases:
                values: dict[str, Any] = {"flags": _flags_text(flags)}
                if moved_to is not None:
                    values["location"] = moved_to
                connection.execute(update(MESSAGES).where(*where, MESSAGES.c.uid == changed_uid).values(**values))
            if forget:
                connection.execute(delete(MESSAGES).where(*where, MESSAGES.c.uid.in_(list(forget))))
            if done:
                connection.execute(delete(PUSH_INTENTS).where(PUSH_INTENTS.c.id.in_(list(done))))
            if relist_from is not None:
                connection.execute(update(FOLDERS).where(FOLDERS.c.id == folder_id, FOLDERS.c.uidnext > relist_from)
                                   .values(uidnext=relist_from))

    def drop_intents(self, intent_ids: Sequence[int]) -> None:
        if intent_ids:
            with self.engine.begin() as connection:
                connection.execute(delete(PUSH_INTENTS).where(PUSH_INTENTS.c.id.in_(list(intent_ids))))

    def finish_twoway_folder(self, folder_id: int, uidvalidity: int, uidnext: int, highestmodseq: int | None,
                             local_mtimes: tuple[int, int] | None, pushed: int, pulled: int) -> None:
        """``finish_folder`` for two-way, with the listed directories' mtimes (None: list
        them next time) and what the pass did each way."""
        with self.engine.begin() as connection:
            connection.execute(update(FOLDERS).where(FOLDERS.c.id == folder_id).values(
                uidvalidity=uidvalidity, uidnext=uidnext, highestmodseq=highestmodseq, last_sync=_now(),
                last_error=None, cur_mtime_ns=local_mtimes[0] if local_mtimes else None,
                new_mtime_ns=local_mtimes[1] if local_mtimes else None, pushed=pushed, pulled=pulled))

    # --- recovery ----------------------------------------------------------------------

    def pending(self, account_id: int) -> list[Pending]:
        """Every intent of the account: new messages (pending) and replacements."""
        intents = (MessageState.PENDING, MessageState.REPLACING)
        with self.engine.connect() as connection:
            imap = connection.execute(select(MESSAGES.c.id, MESSAGES.c.location, MESSAGES.c.state,
                                             MESSAGES.c.sha256).join(
                FOLDERS, FOLDERS.c.id == MESSAGES.c.folder_id).where(
                FOLDERS.c.account_id == account_id, MESSAGES.c.state.in_(intents)))
            pop = connection.execute(select(POP.c.id, POP.c.location, POP.c.state, POP.c.sha256).where(
                POP.c.account_id == account_id, POP.c.state.in_(intents)))
            return [Pending(row.id, row.location, kind,
                            row.sha256 if row.state == MessageState.REPLACING else None)
                    for kind, rows in ((IntentKind.IMAP, imap), (IntentKind.POP, pop)) for row in rows]

    def resolve_pending(self, adopted: Sequence[tuple[Pending, Stored]], forgotten: Sequence[Pending],
                        kept: Sequence[tuple[Pending, Stored | None]] = ()) -> None:
        """Adopted intents become stored; the others are dropped so they are fetched
        again, except replacements that found their placeholder still there (``kept``):
        those are placeholders again, at the location it has now."""
        with self.engine.begin() as connection:
            for intent, stored in adopted:
                table = _INTENT_TABLES[intent.kind]
                connection.execute(update(table).where(table.c.id == intent.row_id).values(
                    state=MessageState.STORED, location=stored.location, sha256=stored.sha256))
            for intent in forgotten:
                table = _INTENT_TABLES[intent.kind]
                connection.execute(delete(table).where(table.c.id == intent.row_id))
            for intent, found in kept:
                table = _INTENT_TABLES[intent.kind]
                connection.execute(update(table).where(table.c.id == intent.row_id).values(
                    state=MessageState.PLACEHOLDER, location=found.location if found else intent.location))

    # --- POP3 ---------------------------------------------------------------------------

    def pop_messages(self, account_id: int) -> dict[str, RecordedPop]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(POP).where(POP.c.account_id == account_id))
            return {row.uidl: RecordedPop(row.uidl, MessageState(row.state), row.first_seen, row.location)
                    for row in rows}

    def pop_record_found(self, account_id: int, copies: Sequence[LocalCopy]) -> None:
        """Copies found by indexing the store, under a stand-in identity no listing has
        (``FOUND_UIDL``): a message fetched again is matched to one of them by content."""
        with self.engine.begin() as connection:
            now = _now()
            connection.execute(insert(POP), [
                {"account_id": account_id, "uidl": f"{FOUND_UIDL}{copy.location}", "state": MessageState.RETIRED,
                 "location": copy.location, "size": copy.size, "sha256": copy.sha256, "message_id": copy.message_id,
                 "first_seen": now} for copy in copies])

    def pop_unclaimed(self, account_id: int) -> list[RecordedMessage]:
        """The found copies no UIDL claimed yet, as retired messages (``row_id`` is theirs)."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(POP).where(POP.c.account_id == account_id,
                                                        POP.c.state == MessageState.RETIRED))
            return [RecordedMessage(uid=0, uidvalidity=FOUND_UIDVALIDITY, state=MessageState.RETIRED,
                                    location=row.location, size=row.size, sha256=row.sha256,
                                    message_id=row.message_id, row_id=row.id) for row in rows]

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
                         unfinished: Sequence[tuple[str, str]],
                         stored_as: MessageState = MessageState.STORED,
                         adopted: Sequence[tuple[str, RecordedMessage]] = ()) -> None:
        """Record a committed batch in ONE transaction, as ``finish_batch`` does for IMAP:
        the stored messages as ``stored_as``, the (uidl, location) intents not yet
        finished at the location their reservation names now, and found copies that
        turned out to be (uidl)'s message: the found row takes the UIDL, its intent ends here."""
        uidl = POP.c.uidl == bindparam("b_uidl")
        with self.engine.begin() as connection:
            if done:
                connection.execute(update(POP).where(POP.c.account_id == account_id, uidl).values(
                    state=stored_as, location=bindparam("b_location"), sha256=bindparam("b_sha256"),
                    message_id=bindparam("b_message_id")), [
                    {"b_uidl": key, "b_location": stored.location, "b_sha256": stored.sha256,
                     "b_message_id": message_id} for key, stored, message_id in done])
            if unfinished:
                connection.execute(update(POP).where(
                    POP.c.account_id == account_id, uidl, POP.c.state == MessageState.PENDING,
                ).values(location=bindparam("b_location")), [
                    {"b_uidl": key, "b_location": location} for key, location in unfinished])
            for key, copy in adopted:
                connection.execute(delete(POP).where(POP.c.account_id == account_id, POP.c.uidl == key,
                                                     POP.c.state == MessageState.PENDING))
                connection.execute(update(POP).where(POP.c.id == copy.row_id).values(
                    uidl=key, state=MessageState.STORED, first_seen=_now()))

    def pop_forget(self, account_id: int, uidls: Sequence[str]) -> None:
        """Intents that came to nothing this run: dropped, so they are fetched again."""
        with self.engine.begin() as connection:
            connection.execute(delete(POP).where(POP.c.account_id == account_id, POP.c.uidl.in_(list(uidls)),
                                                 POP.c.state == MessageState.PENDING))

    def pop_find_placeholder(self, account_id: int, uidl: str | None, message_id: str | None
                             ) -> tuple[str, str] | None:
        """(uidl, location) of the POP3 placeholder with this UIDL or Message-ID."""
        query = select(POP.c.uidl, POP.c.location).where(
            POP.c.account_id == account_id, POP.c.state == MessageState.PLACEHOLDER, POP.c.location.is_not(None))
        query = query.where(POP.c.uidl == uidl) if uidl is not None else query.where(POP.c.message_id == message_id)
        with self.engine.connect() as connection:
            row = connection.execute(query.order_by(POP.c.id).limit(1)).first()
        return None if row is None else (str(row.uidl), str(row.location))

    def pop_location(self, account_id: int, uidl: str) -> str | None:
        with self.engine.connect() as connection:
            found = connection.execute(select(POP.c.location).where(
                POP.c.account_id == account_id, POP.c.uidl == uidl)).scalar()
        return None if found is None else str(found)

    def pop_mark_replacing(self, account_id: int, intents: Sequence[tuple[str, str]]) -> None:
        """As ``mark_replacing``, for (uidl, location) placeholders of a POP3 account."""
        with self.engine.begin() as connection:
            connection.execute(update(POP).where(
                POP.c.account_id == account_id, POP.c.uidl == bindparam("b_uidl"),
                POP.c.state == MessageState.PLACEHOLDER,
            ).values(state=MessageState.REPLACING, location=bindparam("b_location")), [
                {"b_uidl": uidl, "b_location": location} for uidl, location in intents])

    def pop_keep_placeholders(self, account_id: int, uidls: Sequence[str]) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(POP).where(
                POP.c.account_id == account_id, POP.c.uidl.in_(list(uidls)), POP.c.state == MessageState.REPLACING,
            ).values(state=MessageState.PLACEHOLDER))

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
        held: dict[int, list[tuple[int, int | None, str | None]]] = {}
        for row in connection.execute(select(MESSAGES.c.folder_id, MESSAGES.c.uid, MESSAGES.c.size,
                                             MESSAGES.c.message_id)
                                      .join(FOLDERS, FOLDERS.c.id == MESSAGES.c.folder_id)
                                      .where(FOLDERS.c.account_id == account.id,
                                             MESSAGES.c.state == MessageState.PLACEHOLDER)
                                      .order_by(MESSAGES.c.uid)):
            held.setdefault(row.folder_id, []).append((int(row.uid), row.size, row.message_id))
        folders = tuple(
            FolderStatus(row.name, row.path, row.last_sync, row.last_error, row.on_server, row.uidvalidity,
                         by_folder.get(row.id, {}), row.pushed, row.pulled, tuple(held.get(row.id, ())))
            for row in connection.execute(select(FOLDERS).where(FOLDERS.c.account_id == account.id)
                                          .order_by(FOLDERS.c.name))
        )
        pop_counts = connection.execute(select(POP.c.state, func.count()).where(
            POP.c.account_id == account.id).group_by(POP.c.state)).all()
        last_run = None if run is None else RunStatus(run.started, run.finished, RunResult(run.result),
                                                       run.fetched, run.fetched_bytes, run.error)
        return AccountStatus(account.name, account.protocol, last_run, last_ok, folders,
                             {str(state): int(count) for state, count in pop_counts})
