"""The IMAP executor: carries out each folder's plan, in the order that keeps the invariants.

Snapshot -> plan (pure) -> retire, adopt, skip, fetch (through ``store_batch``), flags,
vanished -> only then advance the folder's sync point, so an interrupted sync starts
again from the old one.

A folder that has never finished a sync in this state database, and of which it
records nothing, is indexed first: whatever the store already holds there (the state
database was lost, or another program wrote the store) is recorded as local copies no
UID claims, and the plan matches them with the server's messages as it does after a
UIDVALIDITY change, so only what is missing is downloaded (invariant 10).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

from mailsyncd.domain import (
    AdoptPreview,
    FetchParts,
    FolderInfo,
    LargeMessages,
    MessageState,
    Plan,
    Policy,
    RecordedFolder,
    RecordedMessage,
    RemoteMessage,
    ServerStatus,
    SnapshotBase,
    Stored,
)
from mailsyncd.errors import FolderError, MailsyncError, MessageError
from mailsyncd.message import placeholder, to_lf
from mailsyncd.progress import Progress
from mailsyncd.sources.base import ImapSource
from mailsyncd.state.repo import FOUND_UIDVALIDITY, KnownFolder, StateRepo
from mailsyncd.stores.base import FolderWriter, Reservation, Store
from mailsyncd.sync.batch import FETCH_BUDGET, FLAGGED, ContentPool, batches, how_to_fetch, store_batch
from mailsyncd.sync.effects import Checkpoint, Counts, Effects, no_checkpoint
from mailsyncd.sync.plan import plan_folder

log = logging.getLogger(__name__)

BATCH_MAX_COUNT = 2000  # messages per UID FETCH and per intent/commit batch, besides the FETCH_BUDGET bytes
PLACEHOLDER_BATCH = 200  # placeholders per intent/commit batch: with fetch_parts = "text", a FETCH each


@dataclass
class FolderSync(Effects):
    """One folder's sync: snapshot, plan, execute, advance the sync point."""

    source: ImapSource
    policy: Policy
    fetch_parts: FetchParts = FetchParts.HEADERS
    unchanged: list[int] = field(default_factory=list)  # folder ids whose sync changed nothing
    # Each known folder's (present count, lowest fitting skipped UID) at its recorded sync
    # point, read for all folders in one query (StateRepo.sync_bases).
    bases: dict[int, tuple[int, int | None]] = field(default_factory=dict)

    def run(self, account_id: int, info: FolderInfo, known: KnownFolder | None,
            status: ServerStatus | None = None) -> None:
        if known is None or not known.on_server:
            path = known.path if known else self.store.folder_path(info.name, info.delimiter)
            folder_id = self.repo.upsert_folder(account_id, info, path)
            known = self.repo.folder(folder_id)
        base = self._base(known) if status is not None else None
        if (status is not None and base is not None and known.last_error is None and status.unchanged_since(base)
                and self.policy.large_messages != LargeMessages.HEADERS):
            # The server's own status proves the folder unchanged: not even an EXAMINE.
            # (Not with placeholders: one the user flagged here is fetched whole at any pass.)
            self.counts.folders += 1
            self.unchanged.append(known.id)
            return
        try:
            plans = self._plans(info, known)
            plan = next(plans)
            plan = dataclasses.replace(plan, replace=self._to_replace(known.id, plan))
            self._execute(known.id, info.name, known.path, known.uidvalidity, plan)
            empty, point = plan.empty, (plan.uidvalidity, plan.uidnext, plan.highestmodseq)
            del plan  # no slice's messages are held while the next slice is listed
            for further in plans:
                self._execute(known.id, info.name, known.path, point[0], further)
                del further
        except MailsyncError as error:
            self.repo.folder_error(known.id, str(error))
            raise
        self.counts.folders += 1
        if empty and known.last_error is None and (known.uidvalidity, known.uidnext, known.highestmodseq) == point:
            # Nothing changed: no write (and no fsync) now; one transaction notes them all.
            self.unchanged.append(known.id)
            return
        self.repo.finish_folder(known.id, *point)

    def _base(self, known: KnownFolder) -> SnapshotBase | None:
        """What the source is asked for changes since; None before a first sync."""
        if known.uidvalidity is None:
            return None
        # A first sync that was cut short has its UIDVALIDITY but no UIDNEXT yet:
        # everything from UID 1 is "new", and what was stored is skipped by the plan.
        uidnext = known.uidnext or 1
        placeholders = self.policy.large_messages == LargeMessages.HEADERS
        recorded = self.bases.get(known.id)
        if recorded is None:
            recorded = self.repo.sync_base(known.id, known.uidvalidity, uidnext, self.policy.max_message_size,
                                           placeholders)
        present, fitting = recorded
        if fitting is not None and fitting < uidnext:
            # Skipped as too large or kept as a placeholder, but fitting now (the limit
            # was raised, or placeholders are wanted now): list the folder again from
            # the first of them on.
            uidnext = fitting
            present, _ = self.repo.sync_base(known.id, known.uidvalidity, uidnext, self.policy.max_message_size,
                                             placeholders)
        return SnapshotBase(known.uidvalidity, uidnext, known.highestmodseq, present)

    def _plans(self, info: FolderInfo, known: KnownFolder) -> Iterator[Plan]:
        """``plan``, in slices where it can be: the first sync of a folder of which
        nothing is recorded is listed, planned and carried out LISTING_SLICE messages
        at a time (the planner, given no record, plans each slice as it would the
        whole), so that memory does not grow with the folder. The folder's sync point
        still advances only after the last slice."""
        base = self._base(known)
        unclaimed = known.uidnext is None and self.index_store(known)
        if base is not None or unclaimed:
            yield self._plan(info, known, base, unclaimed)
            return
        snapshot, more = self.source.first_listing(info.name)
        recorded = RecordedFolder(None, known.uidnext, known.highestmodseq)  # no UIDVALIDITY yet: no row
        yield plan_folder(snapshot, recorded, self.policy)
        snapshot = dataclasses.replace(snapshot, new=())
        for listed in more:
            planned = plan_folder(dataclasses.replace(snapshot, new=listed), recorded, self.policy)
            del listed  # neither is held while the next slice is listed
            yield planned
            del planned

    def plan(self, info: FolderInfo, known: KnownFolder) -> Plan:
        """Snapshot (read-only) and plan one folder; reads the database, writes nothing."""
        # Until its first sync finishes, a folder may hold copies no UID claims yet.
        unclaimed = known.uidnext is None and self.index_store(known)
        return self._plan(info, known, self._base(known), unclaimed)

    def _plan(self, info: FolderInfo, known: KnownFolder, base: SnapshotBase | None, unclaimed: bool) -> Plan:
        snapshot = self.source.snapshot(info.name, base, message_ids=unclaimed)
        changed = base is not None and snapshot.uidvalidity != base.uidvalidity
        if base is not None and changed:
            log.warning("%s/%s: UIDVALIDITY changed (%d -> %d); matching local copies by content",
                        self.account, info.name, base.uidvalidity, snapshot.uidvalidity)
        if changed or unclaimed:
            recorded = self.repo.recorded_folder(known, None, with_retired=True)
        elif snapshot.present is not None:
            recorded = self.repo.recorded_folder(known, None, hashes=False)
        else:
            mentioned = [message.uid for message in snapshot.new] + [*snapshot.changed_flags, *snapshot.vanished]
            recorded = self.repo.recorded_folder(known, mentioned)
        return plan_folder(snapshot, recorded, self.policy)

    def index_store(self, known: KnownFolder) -> bool:
        """Record what the store holds in a folder the state database knows nothing of,
        as copies no UID claims (before the snapshot, so a run cut short finds them
        recorded); True when the folder has such copies."""
        if not self.repo.folder_has_records(known.id):
            found = self.store.index(known.path)
            if found:
                log.info("%s/%s: the store already holds %d messages the state database does not know; "
                         "matching them with the server", self.account, known.name, len(found))
                self.repo.record_found(known.id, found)
                self.checkpoint("indexed")
        return self.repo.has_unclaimed(known.id)

    def _execute(self, folder_id: int, name: str, path: str, known_uidvalidity: int | None, plan: Plan) -> None:
        if plan.retire is not None:
            self.repo.retire(folder_id, plan.retire)
            self.checkpoint("retire")
        if plan.retire is not None or known_uidvalidity is None:
            # Before any intent: rows of this UIDVALIDITY must be found again after a crash.
            self.repo.start_uidvalidity(folder_id, plan.uidvalidity)
            self.checkpoint("uidvalidity")
        if plan.adopt:
            self.repo.adopt(plan.uidvalidity, [
                (adoption.remote, adoption.copy, self.adopt_flags(adoption.copy, adoption.remote))
                for adoption in plan.adopt])
            self.counts.adopted += len(plan.adopt)
            self.checkpoint("adopt")
        if plan.skip:
            for message in plan.skip:
                log.warning("%s/%s: UID %d skipped: %d bytes is over max_message_size",
                            self.account, name, message.uid, message.size)
            self.repo.record_skipped(folder_id, plan.uidvalidity, plan.skip)
            self.counts.skipped += len(plan.skip)
        if plan.placeholders:
            self._placeholders(folder_id, name, path, plan)
        if plan.fetch:
            self._fetch(folder_id, name, path, plan)
        if plan.replace:
            self.replace(folder_id, name, path, plan.uidvalidity, plan.replace)
        if plan.flag_updates:
            self.repo.update_flags(folder_id, plan.uidvalidity, [
                (update.uid, update.flags, self.store.set_flags(update.location, update.flags))
                for update in plan.flag_updates])
            self.counts.flags += len(plan.flag_updates)
            self.checkpoint("flags")
        if plan.gone:
            self.repo.mark_vanished(folder_id, plan.uidvalidity, [m.uid for m in plan.gone], MessageState.GONE)
            self.counts.gone += len(plan.gone)
        if plan.remove:
            # Local copy first, record second: a crash in between leaves a row that the
            # next sync removes again, finding nothing to remove.
            for copy in plan.remove:
                if copy.location:
                    self.store.remove(copy.location)
            self.checkpoint("remove")
            self.repo.mark_vanished(folder_id, plan.uidvalidity, [m.uid for m in plan.remove],
                                    MessageState.REMOVED)
            self.counts.removed += len(plan.remove)

    def adopt_flags(self, copy: RecordedMessage, remote: RemoteMessage) -> str:
        """Give a local copy being adopted the server's flags; returns its location."""
        assert copy.location is not None  # the planner adopts only copies with a location
        return self.store.set_flags(copy.location, remote.flags)

    def _to_replace(self, folder_id: int, plan: Plan) -> tuple[RecordedMessage, ...]:
        """The planned replacements, and the placeholders the user flagged in a mail
        reader (the server's flags do not have \\Flagged, the file's name does): asking
        for the whole message without a command line."""
        if self.policy.large_messages != LargeMessages.HEADERS or plan.retire is not None:
            return plan.replace
        wanted = {message.uid: message for message in plan.replace}
        for held in self.repo.placeholders(folder_id, plan.uidvalidity):
            if held.location and FLAGGED not in held.flags and FLAGGED in self.store.flags(held.location):
                wanted.setdefault(held.uid, held)
        return tuple(wanted[uid] for uid in sorted(wanted))

    def _placeholders(self, folder_id: int, name: str, path: str, plan: Plan) -> None:
        """Messages over the limit, stored as placeholders through the same batches as
        whole messages: intent, fetch (headers, structure, maybe text), write, commit, record."""
        for message in plan.placeholders:
            log.info("%s/%s: UID %d is %d bytes, over max_message_size: keeping a placeholder",
                     self.account, name, message.uid, message.size)
        text_budget = self.policy.max_message_size if self.fetch_parts == FetchParts.TEXT else None
        with self.store.open_folder(path) as writer:
            ledger = PlaceholderLedger(self, folder_id, plan.uidvalidity, iter(()), name=name,
                                       text_budget=text_budget)
            for batch in batches(plan.placeholders, lambda _: 0, FETCH_BUDGET, PLACEHOLDER_BATCH):
                store_batch(self, writer, ledger, batch)
        self.counts.placeholders += len(plan.placeholders)

    def replace(self, folder_id: int, name: str, path: str, uidvalidity: int,
                placeholders: Sequence[RecordedMessage]) -> None:
        """Fetch these placeholders' messages whole and write each over its placeholder,
        through the same batches as new messages: the intent (replacing) first, the
        whole message durable in the placeholder's place, then recorded as stored; a kill
        anywhere leaves the placeholder or the message, which recovery tells apart."""
        planned = list(batches(placeholders, lambda message: message.size or 0, FETCH_BUDGET, BATCH_MAX_COUNT))
        self.progress.start_folder(self.account, name, len(placeholders), sum(m.size or 0 for m in placeholders))
        try:
            with (self.store.open_folder(path) as writer,
                  contextlib.closing(self.source.fetch_ahead(name, ([m.uid for m in batch] for batch in planned),
                                                             whole=True)) as fetched):
                ledger = ReplaceLedger(self, folder_id, uidvalidity, fetched)
                for batch in planned:
                    store_batch(self, writer, ledger, batch)
        finally:
            self.progress.end_folder()

    def _fetch(self, folder_id: int, name: str, path: str, plan: Plan) -> None:
        pool = ContentPool(plan.adopt_pool, self.store.read)
        planned = list(batches(plan.fetch, lambda message: message.size, FETCH_BUDGET, BATCH_MAX_COUNT))
        self.progress.start_folder(self.account, name, len(plan.fetch), sum(m.size for m in plan.fetch))
        try:
            with (self.store.open_folder(path) as writer,
                  contextlib.closing(self.source.fetch_ahead(name, ([m.uid for m in batch] for batch in planned)))
                  as fetched):
                ledger = ImapLedger(self, folder_id, plan.uidvalidity, fetched)
                for batch in planned:
                    store_batch(self, writer, ledger, batch, pool)
        finally:
            self.progress.end_folder()


@dataclass
class ImapLedger:
    """IMAP's part in ``store_batch``: messages are keyed by UID within the folder's
    UIDVALIDITY, their bodies come from the fetch running ahead, and a local copy a body
    turned out to be takes the UID (and the server's flags)."""

    folder: FolderSync
    folder_id: int
    uidvalidity: int
    fetched: Iterator[dict[int, bytes | MessageError]]  # one dict of bodies per planned batch, in order
    adopted: list[tuple[RemoteMessage, RecordedMessage, str]] = field(default_factory=list)
    refused: list[RemoteMessage] = field(default_factory=list)  # bodies over the limit, in this batch

    def size(self, message: RemoteMessage) -> int:
        return message.size

    def reserve(self, writer: FolderWriter, message: RemoteMessage) -> Reservation:
        return writer.reserve(message.flags, message.internaldate)

    def record_intents(self, intents: Sequence[tuple[RemoteMessage, str]]) -> None:
        self.folder.repo.record_pending(self.folder_id, self.uidvalidity, intents)

    def bodies(self, messages: Sequence[RemoteMessage]) -> Generator[bytes | None, None, None]:
        batch = _next_batch(self.folder, self.fetched)
        for message in messages:
            # No local name holds the bytes across the yield (see ``_take``).
            yield self._stored_form(message, _take(self.folder, batch, message.uid))

    def _stored_form(self, message: RemoteMessage, raw: bytes | MessageError | None) -> bytes | None:
        if isinstance(raw, MessageError):
            # Larger on the wire than any limit allows: not stored, reported, and
            # recorded as skipped once its intent is dropped (``forget``).
            self.refused.append(message)
        return _as_lf(raw)

    def adopt(self, message: RemoteMessage, copy: RecordedMessage) -> None:
        self.adopted.append((message, copy, self.folder.adopt_flags(copy, message)))

    def finish(self, done: Sequence[tuple[RemoteMessage, Stored, str | None]],
               unfinished: Sequence[tuple[RemoteMessage, str]]) -> None:
        adopted, self.adopted = self.adopted, []
        self.folder.repo.finish_batch(self.folder_id, self.uidvalidity, done, unfinished, adopted)

    def forget(self, unfinished: Sequence[RemoteMessage]) -> None:
        self.folder.repo.forget(self.folder_id, self.uidvalidity, [message.uid for message in unfinished])
        refused, self.refused = self.refused, []
        # Recorded as skipped, so the next run lists it again and reports it again,
        # rather than forgetting it or stopping at it.
        self.folder.repo.record_skipped(self.folder_id, self.uidvalidity, refused)


def _next_batch(folder: FolderSync, fetched: Iterator[dict[int, bytes | MessageError]]
                ) -> dict[int, bytes | MessageError]:
    """The next batch's bodies from the fetch running ahead."""
    bodies = next(fetched)
    folder.checkpoint("fetched")
    return bodies


def _as_lf(raw: bytes | MessageError | None) -> bytes | None:
    """What the store keeps of a body; None for one refused or gone from the server."""
    return None if raw is None or isinstance(raw, MessageError) else to_lf(raw)


def _take(folder: FolderSync, bodies: dict[int, bytes | MessageError], uid: int) -> bytes | MessageError | None:
    """One body, taken out of its batch; a refused one is reported here and handed on
    as its error. Callers pass the result straight on (``yield f(_take(...))``), so that
    the server's CRLF bytes are dropped as soon as their LF copy exists and that copy as
    soon as it is written: one message in memory twice at most, not two or three."""
    raw = bodies.pop(uid, None)
    if isinstance(raw, MessageError):
        log.error("%s", raw)
        folder.counts.errors.append(str(raw))
    return raw


@dataclass
class PlaceholderLedger(ImapLedger):
    """Placeholders' part in ``store_batch``: the header block and structure (and the
    text parts, within ``text_budget``) are fetched instead of the body, and the rows
    are recorded as placeholders. ``size`` is what each one cost to download."""

    name: str = ""
    text_budget: int | None = None
    downloaded: dict[int, int] = field(default_factory=dict)

    def size(self, message: RemoteMessage) -> int:
        return self.downloaded.get(message.uid, 0)

    def bodies(self, messages: Sequence[RemoteMessage]) -> Generator[bytes | None, None, None]:
        partial = self.folder.source.fetch_partial(self.name, [message.uid for message in messages],
                                                   self.text_budget)
        self.folder.checkpoint("fetched")
        for message in messages:
            found = partial.pop(message.uid, None)
            if found is None:
                yield None
                continue
            self.downloaded[message.uid] = found.fetched
            yield placeholder(found, how_to_fetch(self.folder.account, self.name, message.uid))

    def finish(self, done: Sequence[tuple[RemoteMessage, Stored, str | None]],
               unfinished: Sequence[tuple[RemoteMessage, str]]) -> None:
        self.folder.repo.finish_batch(self.folder_id, self.uidvalidity, done, unfinished, [],
                                      stored_as=MessageState.PLACEHOLDER)


@dataclass
class ReplaceLedger:
    """Replacements' part in ``store_batch``: each placeholder's place is reserved over
    it, the intent marks its row replacing, and what is not finished stays a placeholder."""

    folder: FolderSync
    folder_id: int
    uidvalidity: int
    fetched: Iterator[dict[int, bytes | MessageError]]

    def size(self, message: RecordedMessage) -> int:
        return message.size or 0

    def reserve(self, writer: FolderWriter, message: RecordedMessage) -> Reservation:
        assert message.location is not None  # only placeholders with a location are replaced
        return writer.replace(message.location)

    def record_intents(self, intents: Sequence[tuple[RecordedMessage, str]]) -> None:
        self.folder.repo.mark_replacing(self.folder_id, self.uidvalidity,
                                        [(message.uid, location) for message, location in intents])

    def bodies(self, messages: Sequence[RecordedMessage]) -> Generator[bytes | None, None, None]:
        batch = _next_batch(self.folder, self.fetched)
        for message in messages:
            yield _as_lf(_take(self.folder, batch, message.uid))

    def adopt(self, message: RecordedMessage, copy: RecordedMessage) -> None:
        raise AssertionError("a replacement is never matched to a copy: its batches have no pool")

    def finish(self, done: Sequence[tuple[RecordedMessage, Stored, str | None]],
               unfinished: Sequence[tuple[RecordedMessage, str]]) -> None:
        self.folder.repo.finish_batch(self.folder_id, self.uidvalidity, done, [], [])

    def forget(self, unfinished: Sequence[RecordedMessage]) -> None:
        self.folder.repo.keep_placeholders(self.folder_id, self.uidvalidity, [message.uid for message in unfinished])


def sync_folders(account: str, account_id: int, repo: StateRepo, store: Store, source: ImapSource,
                 selected: Sequence[FolderInfo], policy: Policy, progress: Progress,
                 checkpoint: Checkpoint = no_checkpoint, *, counts: Counts,
                 fetch_parts: FetchParts = FetchParts.HEADERS) -> None:
    """Sync each selected folder; a FolderError spoils only its own folder. ``counts`` is
    the caller's, so that it still holds what was done when an error escapes."""
    known = {folder.name: folder for folder in repo.folders(account_id)}
    statuses = source.statuses()
    placeholders = policy.large_messages == LargeMessages.HEADERS
    folder_sync = FolderSync(account, repo, store, progress, checkpoint, counts, source, policy, fetch_parts,
                             bases=repo.sync_bases(account_id, policy.max_message_size, placeholders))
    for info in selected:
        try:
            folder_sync.run(account_id, info, known.get(info.name), statuses.get(info.name))
        except FolderError as error:
            log.error("%s/%s: %s", account, info.name, error)
            counts.errors.append(f"{info.name}: {error}")
    repo.touch_folders(folder_sync.unchanged)



def replace_placeholder(account: str, repo: StateRepo, store: Store, source: ImapSource, folder: KnownFolder,
                        held: RecordedMessage, progress: Progress, checkpoint: Checkpoint = no_checkpoint, *,
                        counts: Counts) -> bool:
    """``mailsyncd fetch``: the whole message over one placeholder of ``folder``, whose
    UIDVALIDITY must still be the server's. True when it was replaced; False when the
    server no longer has it (or refused it, which ``counts`` then reports)."""
    if source.examine(folder.name) != held.uidvalidity:
        raise FolderError(f"{account}: folder {folder.name!r}: its UIDVALIDITY changed on the server; "
                          "run `mailsyncd sync` first, which finds the message again")
    fetched = counts.fetched
    folder_sync = FolderSync(account, repo, store, progress, checkpoint, counts, source, Policy())
    folder_sync.replace(folder.id, folder.name, folder.path, held.uidvalidity, [held])
    return counts.fetched > fetched


def preview_folder(store: Store, source: ImapSource, info: FolderInfo, path: str, policy: Policy) -> AdoptPreview:
    """What syncing a folder the state database knows nothing of would do with the
    copies the store holds there, by the same match a sync makes; reads only (the
    store, and the server through EXAMINE)."""
    found = store.index(path)
    snapshot = source.snapshot(info.name, None, message_ids=bool(found))
    copies = tuple(RecordedMessage(uid=number, uidvalidity=FOUND_UIDVALIDITY, state=MessageState.RETIRED,
                                   location=copy.location, size=copy.size, sha256=copy.sha256,
                                   message_id=copy.message_id) for number, copy in enumerate(found, 1))
    plan = plan_folder(snapshot, RecordedFolder(None, None, None, retired=copies), policy)
    return AdoptPreview(info.name, len(found), len(plan.adopt), len(plan.fetch), len(plan.adopt_pool))
