"""The executor: carries out plans, in the order that keeps the invariants.

For every batch of new messages: record the intent (pending rows), fetch, write each
message, commit the store (fsync), and only then mark the messages stored. A
``Checkpoint`` is called after every effect step; it does nothing in production and
lets the crash tests stop the process at each step in turn.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from mailsyncd.domain import (
    FolderInfo,
    MessageState,
    Plan,
    Policy,
    RecordedMessage,
    RemoteMessage,
    SnapshotBase,
    Stored,
)
from mailsyncd.errors import FolderError, MailsyncError, MessageError
from mailsyncd.sources.base import ImapSource
from mailsyncd.state.repo import KnownFolder, StateRepo, message_id_of
from mailsyncd.stores.base import FolderWriter, Store
from mailsyncd.sync.plan import batches, plan_folder

log = logging.getLogger(__name__)

Checkpoint = Callable[[str], None]
FETCH_BUDGET = 3 * 1024 * 1024  # bytes per UID FETCH; two batches are in memory at most


def no_checkpoint(_step: str) -> None:
    """Production checkpoint: nothing to do."""


class Progress:
    """Receives progress of long runs; the CLI draws a bar from it on a terminal."""

    def start_folder(self, account: str, folder: str, messages: int, size: int) -> None:
        if messages:
            log.info("%s/%s: fetching %d messages (%d bytes)", account, folder, messages, size)

    def advance(self, messages: int, size: int) -> None:
        """Called after each durable batch."""

    def end_folder(self) -> None:
        """Called when a folder is finished or failed."""


@dataclass
class Counts:
    fetched: int = 0
    fetched_bytes: int = 0
    skipped: int = 0
    flags: int = 0
    gone: int = 0
    removed: int = 0
    adopted: int = 0
    folders: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.folders} folders, {self.fetched} new ({self.fetched_bytes} bytes), {self.flags} flag "
                f"changes, {self.gone} gone, {self.removed} removed, {self.adopted} re-adopted, "
                f"{self.skipped} skipped")


def normalize(raw: bytes) -> bytes:
    """What the store keeps: the server's bytes with CRLF turned into LF, nothing else."""
    return raw.replace(b"\r\n", b"\n")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recover(repo: StateRepo, store: Store, account_id: int) -> tuple[int, int]:
    """Finish or undo the writes a killed run left behind (invariant 1).

    Returns (adopted, forgotten). Must run before anything else touches the account.
    """
    pending = repo.pending(account_id)
    if not pending:
        return 0, 0
    found = store.recover(intent.location for intent in pending)
    adopted = [(intent, found[intent.location]) for intent in pending if intent.location in found]
    forgotten = [intent for intent in pending if intent.location not in found]
    repo.resolve_pending(adopted, forgotten)
    log.info("recovered an interrupted run: %d messages found whole, %d to fetch again",
             len(adopted), len(forgotten))
    return len(adopted), len(forgotten)


def select_folders(folders: Sequence[FolderInfo], include: Sequence[str], exclude: Sequence[str],
                   only: Sequence[str] = ()) -> list[FolderInfo]:
    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    return [folder for folder in folders if folder.selectable and matches(folder.name, include)
            and not matches(folder.name, exclude) and (not only or matches(folder.name, only))]


@dataclass
class Effects:
    """What every executor writes through and reports to."""

    account: str
    repo: StateRepo
    store: Store
    progress: Progress
    checkpoint: Checkpoint
    counts: Counts


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
                (adoption.remote, adoption.copy, self._set_flags(adoption.copy.location, adoption.remote))
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

    def _set_flags(self, location: str | None, remote: RemoteMessage) -> str:
        assert location is not None  # the planner adopts only copies with a location
        return self.store.set_flags(location, remote.flags)

    def _fetch(self, folder_id: int, name: str, path: str, plan: Plan) -> None:
        pool: dict[tuple[str, int], list[RecordedMessage]] = {}
        for copy in plan.adopt_pool:
            if copy.sha256:
                pool.setdefault((copy.sha256, copy.size or 0), []).append(copy)
        self.progress.start_folder(self.account, name, len(plan.fetch), sum(m.size for m in plan.fetch))
        try:
            with self.store.open_folder(path) as writer:
                for batch, bodies in self._prefetched(name, batches(plan.fetch, FETCH_BUDGET)):
                    self._store_batch(folder_id, plan.uidvalidity, writer, batch, bodies, pool)
        finally:
            self.progress.end_folder()

    def _prefetched(self, name: str, planned: Iterable[list[RemoteMessage]]
                    ) -> Iterator[tuple[list[RemoteMessage], Future[dict[int, bytes | MessageError]]]]:
        """Fetch batch k+1 on a helper thread while batch k is written: the network and
        the disk overlap. Only that thread uses the connection until it is joined, and
        at most two batches are in memory at once."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch") as fetcher:
            upcoming = iter(planned)
            batch = next(upcoming, None)
            pending = fetcher.submit(self.source.fetch, name, [m.uid for m in batch]) if batch else None
            try:
                while batch is not None and pending is not None:
                    following = next(upcoming, None)
                    current = pending
                    current.result()  # raise fetch errors here, before the next request
                    pending = (fetcher.submit(self.source.fetch, name, [m.uid for m in following])
                               if following else None)
                    yield batch, current
                    batch = following
            finally:
                if pending is not None:
                    pending.cancel()
                    with contextlib.suppress(Exception):
                        pending.result()  # the connection is ours again only after this

    def _store_batch(self, folder_id: int, uidvalidity: int, writer: FolderWriter, batch: list[RemoteMessage],
                     fetched: Future[dict[int, bytes | MessageError]],
                     pool: dict[tuple[str, int], list[RecordedMessage]]) -> None:
        intents = [(message, writer.reserve(message.flags)) for message in batch]
        self.repo.record_pending(folder_id, uidvalidity, intents)
        self.checkpoint("intent")
        bodies = fetched.result()
        self.checkpoint("fetched")
        done: list[tuple[RemoteMessage, Stored, str | None]] = []
        adopted: list[tuple[RemoteMessage, RecordedMessage, str]] = []
        refused: list[RemoteMessage] = []
        try:
            for message, location in intents:
                raw = bodies.pop(message.uid, None)
                if raw is None:
                    continue  # expunged while we fetched: nothing to keep
                if isinstance(raw, MessageError):
                    log.error("%s", raw)
                    self.counts.errors.append(str(raw))
                    refused.append(message)
                    continue
                data = normalize(raw)
                copies = pool.get((sha256(data), message.size)) if pool else None
                if copies:
                    copy = copies.pop()
                    adopted.append((message, copy, self._set_flags(copy.location, message)))
                    continue
                done.append((message, writer.add(location, data, message.flags, message.internaldate),
                             message_id_of(data)))
                self.checkpoint("write")
        finally:
            # Whatever was written is made durable, then recorded; the rest of the
            # batch is forgotten and fetched again next time.
            writer.commit()
            self.checkpoint("commit")
            finished = {message.uid for message, _, _ in done}
            self.repo.finish_batch(folder_id, uidvalidity, done, [m.uid for m in batch if m.uid not in finished],
                                   adopted)
            # Recorded as skipped, so the next run lists it again and reports it again,
            # rather than forgetting it or stopping at it.
            self.repo.record_skipped(folder_id, uidvalidity, refused)
            self.checkpoint("recorded")
        size = sum(message.size for message, _, _ in done)
        self.counts.fetched += len(done)
        self.counts.adopted += len(adopted)
        self.counts.fetched_bytes += size
        self.progress.advance(len(done) + len(adopted), size)


def sync_folders(account: str, account_id: int, repo: StateRepo, store: Store, source: ImapSource,
                 selected: Sequence[FolderInfo], policy: Policy, progress: Progress,
                 checkpoint: Checkpoint = no_checkpoint) -> Counts:
    """Sync each selected folder; a FolderError spoils only its own folder."""
    counts = Counts()
    known = {folder.name: folder for folder in repo.folders(account_id)}
    folder_sync = FolderSync(account, repo, store, progress, checkpoint, counts, source, policy)
    for info in selected:
        try:
            folder_sync.run(account_id, info, known.get(info.name))
        except FolderError as error:
            log.error("%s/%s: %s", account, info.name, error)
            counts.errors.append(f"{info.name}: {error}")
    repo.touch_folders(folder_sync.unchanged)
    return counts

