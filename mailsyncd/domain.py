"""Plain values that cross the seams between sources, stores, state and the planner.

Nothing here does I/O or imports anything of ours, so the planner can be tested with
plain data, and every adapter converts its library's types into these at its edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

Flags = frozenset[str]
NO_FLAGS: Flags = frozenset()


class Mode(StrEnum):
    ARCHIVE = "archive"  # what vanished from the server stays here (the default)
    MIRROR = "mirror"  # what vanished from the server is removed here too


class MessageState(StrEnum):
    PENDING = "pending"  # intent recorded, bytes maybe not yet durable
    STORED = "stored"  # durable in the store, on the server as far as we know
    GONE = "gone"  # expunged on the server, local copy kept (archive)
    REMOVED = "removed"  # expunged on the server, local copy removed (mirror)
    SKIPPED = "skipped"  # over max_message_size, not downloaded
    RETIRED = "retired"  # its UIDVALIDITY is over; the local copy stays and may be re-adopted


@dataclass(frozen=True)
class FolderInfo:
    """A folder as LIST shows it, name already decoded from modified UTF-7."""

    name: str
    delimiter: str | None
    attributes: frozenset[str] = frozenset()

    @property
    def selectable(self) -> bool:
        lowered = {attribute.lower() for attribute in self.attributes}
        return "\\noselect" not in lowered and "\\nonexistent" not in lowered


@dataclass(frozen=True)
class Stored:
    """Where a store put a message, and the SHA-256 of the bytes it holds."""

    location: str
    sha256: str


@dataclass(frozen=True, slots=True)  # one per message: thousands at once
class RemoteMessage:
    """What the server told us about one message, before its body is fetched."""

    uid: int
    size: int
    flags: Flags = NO_FLAGS
    internaldate: datetime | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class SnapshotBase:
    """What we recorded at the end of the last good sync of a folder; the source asks
    the server only for what changed since then."""

    uidvalidity: int
    uidnext: int
    highestmodseq: int | None
    present_count: int  # recorded messages with uid < uidnext still on the server


@dataclass(frozen=True)
class FolderSnapshot:
    """The server's view of one folder, as much of it as the source had to ask for.

    With no base (first sync) or a changed UIDVALIDITY, every message on the server is
    listed in ``new`` and ``present``. Otherwise ``new`` lists UIDs >= base.uidnext, ``changed_flags``
    the flags of older UIDs that may have changed, and expunges are told by ``present``
    (the complete set of older UIDs still on the server) or ``vanished``; when both are
    empty the source proved that no older UID vanished.
    """

    uidvalidity: int
    uidnext: int
    highestmodseq: int | None
    exists: int
    new: tuple[RemoteMessage, ...] = ()
    changed_flags: Mapping[int, Flags] = field(default_factory=dict)
    present: frozenset[int] | None = None
    vanished: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)  # one per message: thousands at once
class RecordedMessage:
    """One message as the state database remembers it."""

    uid: int
    uidvalidity: int
    state: MessageState
    flags: Flags = NO_FLAGS
    location: str | None = None
    size: int | None = None  # the server's RFC822.SIZE
    sha256: str | None = None  # of the stored bytes
    message_id: str | None = None
    row_id: int | None = None


@dataclass(frozen=True)
class RecordedFolder:
    """What the state database holds for one folder.

    ``messages`` holds at least the UIDs the snapshot mentions; it is every recorded
    message of the current UIDVALIDITY when ``complete`` is true. ``retired`` lists the
    local copies left from earlier UIDVALIDITY values that no UID claims yet.
    """

    uidvalidity: int | None
    uidnext: int | None
    highestmodseq: int | None
    messages: Mapping[int, RecordedMessage] = field(default_factory=dict)
    complete: bool = True
    retired: tuple[RecordedMessage, ...] = ()


@dataclass(frozen=True)
class Policy:
    mode: Mode = Mode.ARCHIVE
    max_message_size: int | None = None


@dataclass(frozen=True)
class FlagUpdate:
    uid: int
    location: str
    flags: Flags


@dataclass(frozen=True)
class Adoption:
    """A server message that is already stored locally under a retired UID."""

    uid: int
    remote: RemoteMessage
    copy: RecordedMessage


@dataclass(frozen=True)
class Plan:
    """What to do to one folder, in order: retire, adopt, fetch/skip, flags, vanish.

    ``adopt_pool`` is the retired local copies that no Message-ID match claimed: after
    fetching, a message whose bytes hash to one of them is adopted, not stored again.
    """

    uidvalidity: int
    uidnext: int
    highestmodseq: int | None
    retire: int | None = None  # the old UIDVALIDITY whose UIDs are retired
    adopt: tuple[Adoption, ...] = ()
    adopt_pool: tuple[RecordedMessage, ...] = ()
    fetch: tuple[RemoteMessage, ...] = ()
    skip: tuple[RemoteMessage, ...] = ()
    flag_updates: tuple[FlagUpdate, ...] = ()
    gone: tuple[RecordedMessage, ...] = ()  # archive: keep the copy, mark it gone
    remove: tuple[RecordedMessage, ...] = ()  # mirror: remove the copy

    @property
    def empty(self) -> bool:
        return not (self.retire or self.adopt or self.fetch or self.skip or self.flag_updates
                    or self.gone or self.remove)


# --- POP3 -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PopListing:
    """One POP3 session's view: message number -> (identity, size).

    The identity is the UIDL, or a digest of the header block when the server has no
    UIDL. It is only valid for the session it was taken in (invariant 4).
    """

    entries: Mapping[int, tuple[str, int]]
    has_uidl: bool = True


@dataclass(frozen=True)
class RecordedPop:
    uidl: str
    state: MessageState
    first_seen: datetime
    location: str | None = None


@dataclass(frozen=True)
class PopPolicy:
    leave_on_server: bool = True
    delete_after_days: int | None = None
    max_message_size: int | None = None


@dataclass(frozen=True)
class PopPlan:
    fetch: tuple[tuple[int, str, int], ...] = ()  # (message number, uidl, size)
    skip: tuple[tuple[int, str, int], ...] = ()
    delete: tuple[tuple[int, str], ...] = ()  # (message number, uidl); only durable copies


# --- runs and status ---------------------------------------------------------------------


class RunResult(StrEnum):
    RUNNING = "running"  # started, not finished (or the process died)
    OK = "ok"
    PARTIAL = "partial"  # some folders failed; the others synced
    FAILED = "failed"  # the account as a whole failed
    INTERRUPTED = "interrupted"  # stopped at a safe point; what was written is recorded


@dataclass(frozen=True)
class RunStatus:
    """One recorded run, as ``status`` shows it."""

    started: datetime
    finished: datetime | None
    result: RunResult
    fetched: int
    fetched_bytes: int
    error: str | None


@dataclass(frozen=True)
class FolderStatus:
    name: str
    path: str
    last_sync: datetime | None
    last_error: str | None
    on_server: bool
    uidvalidity: int | None
    messages: Mapping[str, int]  # message state -> how many


@dataclass(frozen=True)
class AccountStatus:
    """What the state database knows of one account, and whether the config still has it.

    ``schedule`` is None when the account is not configured (any more).
    """

    account: str
    protocol: str
    last_run: RunStatus | None
    last_success: datetime | None
    folders: tuple[FolderStatus, ...]
    pop_messages: Mapping[str, int]  # POP message state -> how many
    configured: bool = False
    schedule: str | None = None


@dataclass(frozen=True)
class ImapCheck:
    """An IMAP account logged in and listed its folders; ``selected`` are those synced."""

    account: str
    folders: tuple[str, ...]
    selected: tuple[str, ...]


@dataclass(frozen=True)
class PopCheck:
    """A POP3 account logged in; what STAT said, and how the login went."""

    account: str
    messages: int
    size: int
    login_method: str


AccountCheck = ImapCheck | PopCheck
