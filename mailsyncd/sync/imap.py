"""The IMAP executor: carries out each folder's plan, in the order that keeps the invariants.

Snapshot -> plan (pure) -> retire, adopt, skip, fetch (through ``store_batch``), flags,
vanished -> only then advance the folder's sync point, so an interrupted sync starts
again from the old one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

from mailsyncd.domain import (
    FolderInfo,
    MessageState,
    Plan,
    Policy,
    RecordedMessage,
    RemoteMessage,
    ServerStatus,
    SnapshotBase,
    Stored,
)
from mailsyncd.errors import FolderError, MailsyncError, MessageError
from mailsyncd.message import digest, to_lf
from mailsyncd.progress import Progress
from mailsyncd.sources.base import ImapSource
from mailsyncd.state.repo import KnownFolder, StateRepo
from mailsyncd.stores.base import FolderWriter, Reservation, Store
from mailsyncd.sync.batch import FETCH_BUDGET, batches, store_batch
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
    # Each known folder's (present count, lowest fitting skipped UID) at its recorded sync
    # point, read for all folders in one query (StateRepo.sync_bases).
    bases: dict[int, tuple[int, int | None]] = field(default_factory=dict)

    def run(self, account_id: int, info: FolderInfo, known: KnownFolder | None,
            status: ServerStatus | None = None) -> None:
        if known is None or not known.on_server:
            path = known.path if known else self.store.folder_path(info.name, info.delimiter)
            folder_id = self.repo.upsert_folder(account_id, info, path)
            known = next(folder for folder in self.repo.folders(account_id) if folder.id == folder_id)
        base = self._base(known)
        if status is not None and base is not None and known.last_error is None and status.unchanged_since(base):
            # The server's own status proves the folder unchanged: not even an EXAMINE.
            self.counts.folders += 1
            self.unchanged.append(known.id)
            return
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

    def _base(self, known: KnownFolder) -> SnapshotBase | None:
        """What the source is asked for changes since; None before a first sync."""
        if known.uidvalidity is None:
            return None
        # A first sync that was cut short has its UIDVALIDITY but no UIDNEXT yet:
        # everything from UID 1 is "new", and what was stored is skipped by the plan.
        uidnext = known.uidnext or 1
        recorded = self.bases.get(known.id)
        if recorded is None:
            recorded = self.repo.sync_base(known.id, known.uidvalidity, uidnext, self.policy.max_message_size)
        present, fitting = recorded
        if fitting is not None and fitting < uidnext:
            # Skipped as too large but fitting now (the limit was raised): list the
            # folder again from the first of them on.
            uidnext = fitting
            present, _ = self.repo.sync_base(known.id, known.uidvalidity, uidnext, self.policy.max_message_size)
        return SnapshotBase(known.uidvalidity, uidnext, known.highestmodseq, present)

    def _plan(self, info: FolderInfo, known: KnownFolder) -> Plan:
        base = self._base(known)
        snapshot = self.source.snapshot(info.name, base)
        if base is not None and snapshot.uidvalidity != base.uidvalidity:
            log.warning("%s/%s: UIDVALIDITY changed (%d -> %d); matching local copies by content",
                        self.account, info.name, base.uidvalidity, snapshot.uidvalidity)
            recorded = self.repo.recorded_folder(known, None, with_retired=True)
        elif snapshot.present is not None:
            recorded = self.repo.recorded_folder(known, None)
        else:
            mentioned = [message.uid for message in snapshot.new] + [*snapshot.changed_flags, *snapshot.vanished]
            recorded = self.repo.recorded_folder(known, mentioned)
        return plan_folder(snapshot, recorded, self.policy)

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
        pool: dict[tuple[str, int], list[RecordedMessage]] = {}
        for copy in plan.adopt_pool:
            if copy.sha256:
                pool.setdefault((copy.sha256, copy.size or 0), []).append(copy)
        planned = list(batches(plan.fetch, lambda message: message.size, FETCH_BUDGET, BATCH_MAX_COUNT))
        self.progress.start_folder(self.account, name, len(plan.fetch), sum(m.size for m in plan.fetch))
        try:
            with (self.store.open_folder(path) as writer,
                  contextlib.closing(self.source.fetch_ahead(name, ([m.uid for m in batch] for batch in planned)))
                  as fetched):
                ledger = ImapLedger(self, folder_id, plan.uidvalidity, fetched, pool)
                for batch in planned:
                    store_batch(self, writer, ledger, batch)
        finally:
            self.progress.end_folder()


@dataclass
class ImapLedger:
    """IMAP's part in ``store_batch``: messages are keyed by UID within the folder's
    UIDVALIDITY, their bodies come from the fetch running ahead, and a body whose digest
    matches a retired local copy (``pool``) adopts that copy instead of storing it again."""

    folder: FolderSync
    folder_id: int
    uidvalidity: int
    fetched: Iterator[dict[int, bytes | MessageError]]  # one dict of bodies per planned batch, in order
    pool: dict[tuple[str, int], list[RecordedMessage]]
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

    def claim(self, message: RemoteMessage, data: bytes) -> bool:
        copies = self.pool.get((digest(data), message.size)) if self.pool else None
        if not copies:
            return False
        copy = copies.pop()
        self.adopted.append((message, copy, self.folder.adopt_flags(copy, message)))
        return True

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
    statuses = source.statuses()
    folder_sync = FolderSync(account, repo, store, progress, checkpoint, counts, source, policy,
                             bases=repo.sync_bases(account_id, policy.max_message_size))
    for info in selected:
        try:
            folder_sync.run(account_id, info, known.get(info.name), statuses.get(info.name))
        except FolderError as error:
            log.error("%s/%s: %s", account, info.name, error)
            counts.errors.append(f"{info.name}: {error}")
    repo.touch_folders(folder_sync.unchanged)

