"""The POP3 executor: one session, in the order that keeps invariants 1 and 4.

listing -> plan (pure) -> for each batch: record the intent, RETR and write each
message, commit the store (fsync), mark stored -> DELE what the policy asks for, by the
numbers of this session's listing and only for identities recorded stored -> QUIT ->
only after +OK, record the deletions. A kill or a dropped connection anywhere before
QUIT leaves the server as it was (POP rolls DELE back) and the next run's recovery
finishes or forgets the half-done writes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from mailsyncd.domain import NO_FLAGS, PopListing, PopPlan, PopPolicy
from mailsyncd.errors import MessageError
from mailsyncd.sources.base import Pop3Source
from mailsyncd.state.repo import StateRepo, message_id_of
from mailsyncd.stores.base import FolderWriter, Store, Stored
from mailsyncd.sync.plan import plan_pop
from mailsyncd.sync.run import FETCH_BUDGET, Checkpoint, Counts, Effects, Progress, no_checkpoint

log = logging.getLogger(__name__)

INBOX = "INBOX"  # a POP3 mailbox is stored as the store's INBOX
BATCH_MAX_COUNT = 1000  # messages per intent/commit batch, besides the FETCH_BUDGET bytes

Fetch = tuple[int, str, int]  # (message number, uidl, size), as in PopPlan.fetch


def _batches(fetches: Sequence[Fetch]) -> Iterator[Sequence[Fetch]]:
    """Bounded by bytes and count, so a kill costs at most one batch of downloads."""
    start = size = 0
    for index, (_, _, message_size) in enumerate(fetches):
        if index > start and (size + message_size > FETCH_BUDGET or index - start >= BATCH_MAX_COUNT):
            yield fetches[start:index]
            start, size = index, 0
        size += message_size
    if start < len(fetches):
        yield fetches[start:]


def _header(data: bytes) -> bytes:
    """The header block, so that looking for the Message-ID copies no large body."""
    end = data.find(b"\n\n")
    return data if end < 0 else data[:end + 1]


@dataclass
class PopSync(Effects):
    account_id: int
    source: Pop3Source
    policy: PopPolicy

    def run(self, now: datetime) -> None:
        listing = self.source.listing()
        self.checkpoint("listing")
        plan = plan_pop(listing, self.repo.pop_messages(self.account_id), self.policy, now)
        if plan.skip:
            for number, uidl, size in plan.skip:
                log.warning("%s: POP message %d (UIDL %s) skipped: %d bytes is over max_message_size",
                            self.account, number, uidl, size)
            self.repo.pop_record_skipped(self.account_id, [(uidl, size) for _, uidl, size in plan.skip])
            self.counts.skipped += len(plan.skip)
        if plan.fetch:
            self._fetch(plan.fetch)
        # Plan again on what is recorded now, so that what this session stored counts
        # (leave_on_server = false deletes it at once); the listing is the same one.
        plan = plan_pop(listing, self.repo.pop_messages(self.account_id), self.policy, now)
        deleted = self._delete(self._confirmed(listing, plan))
        # Order is important: a deletion counts only once QUIT was answered +OK
        # (invariant 4); quit() raises otherwise and nothing is recorded deleted.
        self.source.quit()
        self.checkpoint("quit")
        if deleted:
            self.repo.pop_mark_deleted(self.account_id, deleted)
            self.counts.gone += len(deleted)
            self.checkpoint("deleted")
        self.counts.folders += 1

    def _fetch(self, fetches: Sequence[Fetch]) -> None:
        self.progress.start_folder(self.account, INBOX, len(fetches), sum(size for _, _, size in fetches))
        try:
            with self.store.open_folder(self.store.folder_path(INBOX, None)) as writer:
                for batch in _batches(fetches):
                    self._fetch_batch(writer, batch)
        finally:
            self.progress.end_folder()

    def _fetch_batch(self, writer: FolderWriter, batch: Sequence[Fetch]) -> None:
        intents = [(number, uidl, size, writer.reserve(NO_FLAGS)) for number, uidl, size in batch]
        self.repo.pop_record_pending(self.account_id, [(uidl, size, location)
                                                       for _, uidl, size, location in intents])
        self.checkpoint("intent")
        done: list[tuple[str, Stored, str | None]] = []
        size_done = 0
        try:
            for number, uidl, size, location in intents:
                try:
                    data = self.source.retrieve(number)
                except MessageError as error:
                    # Expunged by another client meanwhile, most likely: not stored, so
                    # never deleted; it is fetched next time if it is still there.
                    log.warning("%s", error)
                    continue
                self.checkpoint("fetched")
                done.append((uidl, writer.add(location, data, NO_FLAGS, None), message_id_of(_header(data))))
                del data  # memory is bounded by one message, not two
                size_done += size
                self.checkpoint("write")
        finally:
            # Whatever was written is made durable, then recorded; runs on errors too
            # (a dropped connection), so what arrived is kept.
            writer.commit()
            self.checkpoint("commit")
            self._record(writer, intents, done)
            # Counted once recorded, also when the batch was cut short: the run records them.
            self.counts.fetched += len(done)
            self.counts.fetched_bytes += size_done
        self.progress.advance(len(done), size_done)

    def _record(self, writer: FolderWriter, intents: Sequence[tuple[int, str, int, str]],
                done: Sequence[tuple[str, Stored, str | None]]) -> None:
        finished = {uidl for uidl, _, _ in done}
        unfinished = [(uidl, size) for _, uidl, size, _ in intents if uidl not in finished]
        if unfinished:
            # Order is important for mbox, where every intent of a batch names the batch's
            # start offset and recovery cuts the file back to it: the unfinished intents
            # are first moved past the data just committed, so that no moment exists at
            # which a stored message lies behind a pending offset.
            self.repo.pop_record_pending(self.account_id, [(uidl, size, writer.reserve(NO_FLAGS))
                                                           for uidl, size in unfinished])
        self.repo.pop_mark_stored(self.account_id, done)
        self.checkpoint("recorded")
        if unfinished:
            # Now the only pending POP rows of the account are these (recovery cleared
            # older ones before the run): forget them, to be fetched again next run.
            leftover = [intent for intent in self.repo.pending(self.account_id)
                        if intent.table == "pop_messages"]
            self.repo.resolve_pending([], leftover)

    def _confirmed(self, listing: PopListing, plan: PopPlan) -> tuple[tuple[int, str], ...]:
        """The planned deletions whose number still names the same UIDL right now.

        RFC 1939 keeps numbers fixed for a session, so this costs one UIDL and guards
        against servers that renumber anyway. Header digests are not re-read (that would
        cost a TOP per message); they come from this session's listing all the same.
        """
        if not plan.delete or not listing.has_uidl:
            return plan.delete
        current = self.source.listing().entries
        confirmed = tuple((number, uidl) for number, uidl in plan.delete
                          if number in current and current[number][0] == uidl)
        if len(confirmed) != len(plan.delete):
            log.warning("%s: %d messages changed number during the session; not deleting them",
                        self.account, len(plan.delete) - len(confirmed))
        return confirmed

    def _delete(self, deletions: Sequence[tuple[int, str]]) -> list[str]:
        deleted: list[str] = []
        for number, uidl in deletions:
            try:
                self.source.delete(number)
            except MessageError as error:
                log.warning("%s", error)
                continue
            deleted.append(uidl)
            self.checkpoint("delete")
        return deleted


def sync_pop(account: str, account_id: int, repo: StateRepo, store: Store, source: Pop3Source,
             policy: PopPolicy, progress: Progress, now: datetime,
             checkpoint: Checkpoint = no_checkpoint, *, counts: Counts) -> None:
    """One POP3 session's worth of work; ``now`` decides delete_after_days. Raises
    AccountError when the session fails (nothing is then recorded deleted); ``counts`` is
    the caller's, so that it still holds what was done then."""
    PopSync(account, repo, store, progress, checkpoint, counts, account_id, source, policy).run(now)
