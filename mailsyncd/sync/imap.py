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
import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

from mailsyncd.domain import (
    AdoptPreview,
    FolderInfo,
    MessageState,
    Plan,
    Policy,
    RecordedFolder,
    RecordedMessage,
    RemoteMessage,
    SnapshotBase,
    Stored,
)
from mailsyncd.errors import FolderError, MailsyncError, MessageError
from mailsyncd.message import to_lf
from mailsyncd.progress import Progress
from mailsyncd.sources.base import ImapSource
from mailsyncd.state.repo import FOUND_UIDVALIDITY, KnownFolder, StateRepo
from mailsyncd.stores.base import FolderWriter, Reservation, Store
from mailsyncd.sync.batch import FETCH_BUDGET, ContentPool, batches, store_batch
from mailsyncd.sync.effects import Checkpoint, Counts, Effects, no_checkpoint
from mailsyncd.sync.plan import plan_folder

log = logging.getLogger(__name__)

BATCH_MAX_COUNT = 2000  # messages per UID FETCH and per intent/commit batch, besides the FETCH_BUDGET bytes


@dataclass
class FolderSync(Effects):
    """One folder's sync: snapshot, plan, execute, advance the sync point."""

    source: ImapSource
    policy: Policy
    unchanged: list[int] = field(default_factory=list)  # folder ids whose sync changed nothing

    def run(self, account_id: int, info: FolderInfo, known: KnownFolder | None) -> None:
        if known is None or not known.on_server:
            path = known.path if known else self.store.folder_path(info.name, info.delimiter)
            folder_id = self.repo.upsert_folder(account_id, info, path)
            known = next(folder for folder in self.repo.folders(account_id) if folder.id == folder_id)
        try:
            plan = self._plan(info, known)
            self._execute(known.id, info.name, known.path, known.uidvalidity, plan)
        except MailsyncError as error:
            self.repo.folder_error(known.id, str(error))
            raise
        self.counts.folders += 1
        if plan.empty and known.last_error is None and (known.uidvalidity, known.uidnext, known.highestmodseq) == (
                plan.uidvalidity, plan.uidnext, plan.highestmodseq):
            # Nothing changed: no write (and no fsync) now; one transaction notes them all.
            self.unchanged.append(known.id)
            return
        self.repo.finish_folder(known.id, plan.uidvalidity, plan.uidnext, plan.highestmodseq)

    def _plan(self, info: FolderInfo, known: KnownFolder) -> Plan:
        base: SnapshotBase | None = None
        if known.uidvalidity is not None:
            # A first sync that was cut short has its UIDVALIDITY but no UIDNEXT yet:
            # everything from UID 1 is "new", and what was stored is skipped by the plan.
            uidnext = known.uidnext or 1
            present, fitting = self.repo.sync_base(known.id, known.uidvalidity, uidnext, self.policy.max_message_size)
            if fitting is not None and fitting < uidnext:
                # Skipped as too large but fitting now (the limit was raised): list the
                # folder again from the first of them on.
                uidnext = fitting
                present, _ = self.repo.sync_base(known.id, known.uidvalidity, uidnext, self.policy.max_message_size)
            base = SnapshotBase(known.uidvalidity, uidnext, known.highestmodseq, present)
        # Until its first sync finishes, a folder may hold copies no UID claims yet.
        unclaimed = known.uidnext is None and self.index_store(known)
        snapshot = self.source.snapshot(info.name, base, message_ids=unclaimed)
        changed = base is not None and snapshot.uidvalidity != base.uidvalidity
        if base is not None and changed:
            log.warning("%s/%s: UIDVALIDITY changed (%d -> %d); matching local copies by content",
                        self.account, info.name, base.uidvalidity, snapshot.uidvalidity)
        if changed or unclaimed:
            recorded = self.repo.recorded_folder(known, None, with_retired=True)
        elif snapshot.present is not None:
            recorded = self.repo.recorded_folder(known, None)
        else:
            mentioned = [message.uid for message in snapshot.new] + [*snapshot.changed_flags, *snapshot.vanished]
            recorded = self.repo.recorded_folder(known, mentioned)
        return plan_folder(snapshot, recorded, self.policy)

    def index_store(self, known: KnownFolder) -> bool:
        """Record what the store holds in a folder the state database knows nothing of,
        as copies no UID claims (before the snapshot, so a run cut short finds them
        recorded); True when the folder has such copies."""
        if not self.repo.has_messages(known.id):
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
        if plan.fetch:
            self._fetch(folder_id, name, path, plan)
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
        bodies = next(self.fetched)
        self.folder.checkpoint("fetched")
        for message in messages:
            raw = bodies.pop(message.uid, None)
            if isinstance(raw, MessageError):
                # Larger on the wire than any limit allows: not stored, reported, and
                # recorded as skipped once its intent is dropped (``forget``).
                log.error("%s", raw)
                self.folder.counts.errors.append(str(raw))
                self.refused.append(message)
                raw = None
            yield None if raw is None else to_lf(raw)

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


def sync_folders(account: str, account_id: int, repo: StateRepo, store: Store, source: ImapSource,
                 selected: Sequence[FolderInfo], policy: Policy, progress: Progress,
                 checkpoint: Checkpoint = no_checkpoint, *, counts: Counts) -> None:
    """Sync each selected folder; a FolderError spoils only its own folder. ``counts`` is
    the caller's, so that it still holds what was done when an error escapes."""
    known = {folder.name: folder for folder in repo.folders(account_id)}
    folder_sync = FolderSync(account, repo, store, progress, checkpoint, counts, source, policy)
    for info in selected:
        try:
            folder_sync.run(account_id, info, known.get(info.name))
        except FolderError as error:
            log.error("%s/%s: %s", account, info.name, error)
            counts.errors.append(f"{info.name}: {error}")
    repo.touch_folders(folder_sync.unchanged)



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
