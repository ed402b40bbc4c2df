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
_FLAG_SETS: dict[Flags, Flags] = {}


def shared_flags(flags: Flags) -> Flags:
    """The one frozenset kept for this combination of flags. A folder's messages share
    a handful of combinations, and a set of its own for each of tens of thousands of
    messages (about 200 bytes) would weigh as much as the rest of its description."""
    return _FLAG_SETS.setdefault(flags, flags)


class Mode(StrEnum):
    ARCHIVE = "archive"  # what vanished from the server stays here (the default)
    MIRROR = "mirror"  # what vanished from the server is removed here too
    SYNC = "sync"  # two-way: changes on either side reach the other (Maildir only; see twoway.md)


class MessageState(StrEnum):
    PENDING = "pending"  # intent recorded, bytes maybe not yet durable
    STORED = "stored"  # durable in the store, on the server as far as we know
    GONE = "gone"  # expunged on the server, local copy kept (archive)
    REMOVED = "removed"  # expunged on the server, local copy removed (mirror)
    SKIPPED = "skipped"  # over max_message_size, not downloaded
    RETIRED = "retired"  # its UIDVALIDITY is over; the local copy stays and may be re-adopted
    PLACEHOLDER = "placeholder"  # over max_message_size: a placeholder (headers, maybe text) is stored
    REPLACING = "replacing"  # a placeholder whose full message is being written over it (an intent)


class LargeMessages(StrEnum):
    """What becomes of a message over ``max_message_size``."""

    HEADERS = "headers"  # a placeholder: its header block, a list of its parts, how to fetch it whole
    SKIP = "skip"  # nothing stored; reported at every sync


class FetchParts(StrEnum):
    """What a placeholder keeps of its message besides the header block."""

    HEADERS = "headers"  # nothing more: a list of the parts stands for the body
    TEXT = "text"  # its text/plain and text/html parts too; a short part stands for each attachment


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
class LocalCopy:
    """A message found in the store by indexing it (a state database that knows nothing
    of the store, or a store another program wrote). ``size`` and ``sha256`` are of its
    bytes without the fields other programs add (message.comparable), with ``size`` as
    a server counts it, so both compare with what the server lists and sends."""

    location: str
    message_id: str | None
    size: int
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
class MimePart:
    """One leaf of a message's MIME tree, as BODYSTRUCTURE describes it. ``section`` is
    the IMAP part number ("1", "2.1"); ``size`` the encoded size on the server."""

    section: str
    content_type: str  # lower case, "type/subtype"
    size: int
    filename: str | None = None
    attachment: bool = False  # Content-Disposition: attachment

    @property
    def text(self) -> bool:
        """A part a reader shows as the message's text (not a file attached to it)."""
        return self.content_type in ("text/plain", "text/html") and not self.attachment


@dataclass(frozen=True)
class PartialMessage:
    """What a placeholder is built from: the header block as the server sent it, the
    MIME leaves when the protocol can tell them (None for POP3), and the text parts
    fetched: section -> (the part's MIME header block, its body), both raw."""

    header: bytes
    size: int  # the whole message's size on the server
    parts: tuple[MimePart, ...] | None = None
    texts: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict)

    @property
    def fetched(self) -> int:
        """Bytes of message content this placeholder cost to download."""
        return len(self.header) + sum(len(mime) + len(body) for mime, body in self.texts.values())


@dataclass(frozen=True)
class ServerStatus:
    """A folder's state as the server reports it without opening the folder (STATUS,
    or LIST-STATUS for every folder at once, RFC 5819)."""

    uidvalidity: int
    uidnext: int
    messages: int
    highestmodseq: int | None  # None without CONDSTORE

    def unchanged_since(self, base: SnapshotBase) -> bool:
        """True when nothing in the folder can have changed since ``base``: same
        UIDVALIDITY, no new UID, the same count (no expunge) and no new MODSEQ (no flag
        change). Without HIGHESTMODSEQ flag changes cannot be ruled out."""
        return (self.highestmodseq is not None and self.highestmodseq == base.highestmodseq
                and (self.uidvalidity, self.uidnext, self.messages)
                == (base.uidvalidity, base.uidnext, base.present_count))


@dataclass(frozen=True)
class SnapshotBase:
    """What we recorded at the end of the last good sync of a folder; the source asks
    the server only for what changed since then."""

    uidvalidity: int
    uidnext: int
    highestmodseq: int | None
    present_count: int  # recorded messages with uid < uidnext still on the server

    def accounts_for(self, exists: int, new: int, vanished: int = 0) -> bool:
        """True when the server's message count is exactly the recorded messages, less
        the ``vanished`` ones it reported expunged (UIDs below ``uidnext``), plus the
        ``new`` ones listed from ``uidnext`` on: then no other recorded message vanished
        (mbsync's check), and no UID listing is needed to find out. A report that names
        UIDs expunged before the base makes the count disagree, never agree wrongly."""
        return exists == self.present_count - vanished + new


@dataclass(frozen=True)
class FolderSnapshot:
    """The server's view of one folder, as much of it as the source had to ask for.

    With no base (first sync) or a changed UIDVALIDITY, every message on the server is
    listed in ``new`` and ``present`` is empty: a complete listing with nothing besides
    ``new`` (one set of every UID of a large folder would cost as much memory as the
    listing itself). Otherwise ``new`` lists UIDs >= base.uidnext, ``changed_flags``
    the flags of older UIDs that may have changed, and expunges are told by ``present``
    (the complete set of older UIDs still on the server, ``new`` being listed too) or
    ``vanished``; when both are empty the source proved that no older UID vanished.
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
    large_messages: LargeMessages = LargeMessages.SKIP


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
    placeholders: tuple[RemoteMessage, ...] = ()  # over the limit: stored as placeholders
    replace: tuple[RecordedMessage, ...] = ()  # placeholders that fit the limit now: fetched whole over them
    flag_updates: tuple[FlagUpdate, ...] = ()
    gone: tuple[RecordedMessage, ...] = ()  # archive: keep the copy, mark it gone
    remove: tuple[RecordedMessage, ...] = ()  # mirror: remove the copy

    @property
    def empty(self) -> bool:
        return not (self.retire or self.adopt or self.fetch or self.skip or self.placeholders or self.replace
                    or self.flag_updates or self.gone or self.remove)


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
    large_messages: LargeMessages = LargeMessages.SKIP


@dataclass(frozen=True)
class PopPlan:
    fetch: tuple[tuple[int, str, int], ...] = ()  # (message number, uidl, size)
    skip: tuple[tuple[int, str, int], ...] = ()
    placeholders: tuple[tuple[int, str, int], ...] = ()  # over the limit: stored as placeholders
    replace: tuple[tuple[int, str, int], ...] = ()  # placeholders that fit the limit now
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
    pushed: int | None = None  # two-way: changes the last pass made on the server
    pulled: int | None = None  # ... and here
    placeholders: tuple[tuple[int, int | None, str | None], ...] = ()  # (uid, size on the server, Message-ID)


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
class AdoptPreview:
    """What ``adopt`` finds for one folder (a POP3 account's mailbox is its INBOX).
    ``matched`` copies are the server's messages by Message-ID and size: recorded where
    they lie, not downloaded. The ``fetch`` server messages are downloaded; one of them
    whose bytes turn out to be a copy of ``local_only`` is recorded there instead of being
    stored again, so ``local_only`` is at most what stays local only. POP3 UIDLs tell
    nothing of a message's content, so there everything is retrieved and compared.
    ``recorded`` folders are already in the state database and sync as usual."""

    folder: str
    found: int
    matched: int = 0
    fetch: int = 0
    local_only: int = 0
    recorded: bool = False


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


# --- Two-way ---------------------------------------------------------------------------
# The values the two-way planner (sync/twoway.py) reads and returns. Flags are IMAP flag
# names throughout; the six a Maildir can hold are spelt as in HOLDABLE_FLAGS.

# The Maildir info letters and the IMAP flags they stand for (P is the $Forwarded keyword).
MAILDIR_LETTERS: Mapping[str, str] = {
    "D": "\\Draft", "F": "\\Flagged", "P": "$Forwarded", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted",
}
HOLDABLE_FLAGS: Flags = frozenset(MAILDIR_LETTERS.values())


class Expunge(StrEnum):
    NEVER = "never"  # a local deletion only sets \Deleted on the server
    OWN = "own"  # ... then UID EXPUNGE removes exactly the UIDs mailsyncd marked


@dataclass(frozen=True)
class DeletionLimit:
    """The mass-deletion guard: a pass may delete at most the larger of ``count``
    messages and ``percent`` percent of the folder on each side."""

    count: int = 50
    percent: int = 25

    def allows(self, deletions: int, folder_size: int) -> bool:
        # Integer arithmetic, so "25% of 7" is exact: 1 passes, 2 does not.
        return deletions <= self.count or deletions * 100 <= self.percent * folder_size


DEFAULT_MAX_DELETIONS = DeletionLimit()


@dataclass(frozen=True)
class TwoWayPolicy:
    """``allow_deletions`` names the folders whose guard the user lifted for one pass."""

    expunge: Expunge = Expunge.OWN
    max_deletions: DeletionLimit = DEFAULT_MAX_DELETIONS
    allow_deletions: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class LocalContent:
    """What reading a Maildir file tells: needed only for files with no recorded pair
    (to match them by content or to APPEND them)."""

    sha256: str  # of the file's bytes
    message_id: str | None
    server_size: int  # the size a server reports for these bytes: each LF counted as CRLF


@dataclass(frozen=True, slots=True)  # one per message: thousands at once
class LocalMessage:
    """One Maildir file as a scan sees it. ``unique`` is the file name before ":2,",
    the message's local identity; ``flags`` are the IMAP names of its info letters."""

    unique: str
    subdir: str  # "new" or "cur"
    flags: Flags
    size: int
    mtime_ns: int
    content: LocalContent | None = None


@dataclass(frozen=True)
class LocalFolderScan:
    """One Maildir folder. ``present`` is false when its cur/ or new/ is missing (or the
    store root is not there): that is never read as "every message was deleted"."""

    present: bool
    messages: Mapping[str, LocalMessage] = field(default_factory=dict)  # by unique name


@dataclass(frozen=True, slots=True)  # one per message: thousands at once
class RecordedPair:
    """A server UID paired with a local file, and the flags both had at the last sync
    (the base of the three-way merge, server keywords included)."""

    uid: int
    unique: str
    flags: Flags
    size: int | None = None  # the server's RFC822.SIZE
    sha256: str | None = None  # of the local file's bytes
    message_id: str | None = None


@dataclass(frozen=True)
class RecordedPairs:
    """The pairs of one folder under the UIDVALIDITY they were recorded with; ``None``
    when the folder was never synced two-way."""

    uidvalidity: int | None
    pairs: Mapping[int, RecordedPair] = field(default_factory=dict)  # by uid


@dataclass(frozen=True)
class TwoWayFolder:
    """Everything the planner needs about one folder: the server, the files, the base."""

    name: str
    snapshot: FolderSnapshot
    recorded: RecordedPairs
    local: LocalFolderScan


@dataclass(frozen=True)
class FlagMerge:
    """The outcome of one three-way flag merge: what to write each way, and the new base."""

    add: Flags  # to the server (+FLAGS.SILENT)
    remove: Flags  # from the server (-FLAGS.SILENT)
    local: Flags | None  # the file's new flags; None when its letters are already right
    base: Flags


@dataclass(frozen=True)
class FlagPush:
    """UID STORE +FLAGS.SILENT ``add`` and -FLAGS.SILENT ``remove``; never a replace."""

    uid: int
    add: Flags = NO_FLAGS
    remove: Flags = NO_FLAGS


@dataclass(frozen=True)
class FlagPull:
    """Rename the file ``unique`` so its info letters show ``flags``."""

    uid: int
    unique: str
    flags: Flags


@dataclass(frozen=True)
class Rebase:
    """The pair's new base once the flag writes of this pass are confirmed."""

    uid: int
    flags: Flags


@dataclass(frozen=True)
class Relink:
    """One message got a new identity on one side of the same folder: a mail reader
    gave the file a new unique name, or the server a new UID. Only the record changes."""

    old_uid: int
    uid: int
    unique: str


@dataclass(frozen=True)
class NewPair:
    """An unpaired server message and an unpaired file found to be one message by
    content (Message-ID and size): paired, not copied either way."""

    uid: int
    unique: str
    size: int
    sha256: str
    message_id: str | None


@dataclass(frozen=True)
class LocalMove:
    """The user moved a file from this folder to ``target``: UID MOVE ``uid`` there
    (no upload), then write the merged flags to the new UID and to the file."""

    uid: int
    target: str
    unique: str  # the file, now in target
    flags: FlagMerge


@dataclass(frozen=True)
class ServerMove:
    """Another client moved ``uid`` from this folder to ``target`` (as ``target_uid``):
    rename the file into target (no download), then write the merged flags."""

    uid: int
    unique: str
    target: str
    target_uid: int
    flags: FlagMerge


@dataclass(frozen=True)
class Rejoin:
    """The user moved a message into this folder while another client moved it into
    ``target``: the server's folder wins (other machines may already show it there), so
    the file ``unique`` is renamed into target (if it is not there) and paired with
    ``target_uid``; neither side gets a second copy."""

    unique: str
    target: str
    target_uid: int
    flags: FlagMerge


@dataclass(frozen=True)
class Download:
    """Fetch a server message into this folder; ``restores`` names the file whose
    deletion lost a conflict (its pair then moves to the new file)."""

    remote: RemoteMessage
    restores: str | None = None


@dataclass(frozen=True)
class Append:
    """APPEND a local file with its flags and INTERNALDATE = its mtime; ``restores``
    names the UID whose expunge lost a conflict (the pair moves to the new UID)."""

    unique: str
    flags: Flags
    mtime_ns: int
    content: LocalContent
    restores: int | None = None


@dataclass(frozen=True)
class PushDeletion:
    """\\Deleted on ``uid`` then UID EXPUNGE of exactly that UID (expunge = "own");
    ``unique`` is the file still to remove after it (set when the file was trashed)."""

    uid: int
    unique: str | None = None


@dataclass(frozen=True)
class LocalRemoval:
    """The server expunged ``uid``: remove its file."""

    uid: int
    unique: str


@dataclass(frozen=True)
class Conflict:
    """Deleted on one side, changed on the other since the base: the message is kept
    (restored on the side that deleted it) and ``note`` tells the user."""

    uid: int
    unique: str
    note: str


@dataclass(frozen=True)
class LocalVanished:
    """Candidate: the pair's file is gone while the server still has ``remote_flags``.
    A move when a byte-identical file appeared elsewhere, else a deletion."""

    pair: RecordedPair
    remote_flags: Flags


@dataclass(frozen=True)
class LocalAppeared:
    """Candidate: a file with no pair. A move or rename when it matches a vanished
    pair, else an APPEND."""

    local: LocalMessage
    content: LocalContent


@dataclass(frozen=True)
class ServerVanished:
    """Candidate: the server expunged the pair's UID while the file is still here.
    A move when the same message appeared on the server elsewhere, else a removal."""

    pair: RecordedPair
    local: LocalMessage


@dataclass(frozen=True)
class ServerAppeared:
    """Candidate: a server message with no pair. A move when it matches a vanished
    pair, else a download."""

    remote: RemoteMessage


@dataclass(frozen=True)
class GuardStop:
    """The folder is left alone this pass, and why (one line for the user)."""

    reason: str


@dataclass(frozen=True)
class TwoWayPlan:
    """What one pass does to one folder, grouped in the order it must be carried out
    (sync/twoway.py says how each group is executed and recorded). The candidate
    fields are open questions between folders; ``settle`` turns what no move claimed
    into deletions, removals, appends and downloads."""

    folder: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int | None
    stop: GuardStop | None = None
    # 1. flags and identities
    push_flags: tuple[FlagPush, ...] = ()
    pull_flags: tuple[FlagPull, ...] = ()
    rebase: tuple[Rebase, ...] = ()
    relink: tuple[Relink, ...] = ()
    new_pairs: tuple[NewPair, ...] = ()
    # 2. moves out of this folder
    local_moves: tuple[LocalMove, ...] = ()
    server_moves: tuple[ServerMove, ...] = ()
    rejoins: tuple[Rejoin, ...] = ()
    # 3. new messages each way
    downloads: tuple[Download, ...] = ()
    appends: tuple[Append, ...] = ()
    adopt_pool: tuple[str, ...] = ()  # files a download may turn out to be (same SHA-256)
    # 4. deletions
    push_deletions: tuple[PushDeletion, ...] = ()
    local_removals: tuple[LocalRemoval, ...] = ()
    forget: tuple[int, ...] = ()  # pairs gone on both sides
    conflicts: tuple[Conflict, ...] = ()
    # open candidates, before moves are paired across folders
    local_vanished: tuple[LocalVanished, ...] = ()
    local_appeared: tuple[LocalAppeared, ...] = ()
    server_vanished: tuple[ServerVanished, ...] = ()
    server_appeared: tuple[ServerAppeared, ...] = ()
    vanished_both: tuple[RecordedPair, ...] = ()  # also in forget; a move on each side may rejoin them

    @property
    def empty(self) -> bool:
        """Nothing to write on either side (a guard stop is not empty: it must be told)."""
        return self.stop is None and not any((
            self.push_flags, self.pull_flags, self.rebase, self.relink, self.new_pairs, self.local_moves,
            self.server_moves, self.rejoins, self.downloads, self.appends, self.push_deletions, self.local_removals,
            self.forget, self.conflicts, self.local_vanished, self.local_appeared, self.server_vanished,
            self.server_appeared, self.vanished_both))
