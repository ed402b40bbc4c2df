"""The POP3 executor: one session, in the order that keeps invariants 1 and 4.

listing -> plan (pure) -> for each batch (through ``store_batch``): record the intent,
RETR and write each message, commit the store (fsync), mark stored -> DELE what the policy asks for, by the
numbers of this session's listing and only for identities recorded stored -> QUIT ->
only after +OK, record the deletions. A kill or a dropped connection anywhere before
QUIT leaves the server as it was (POP rolls DELE back) and the next run's recovery
finishes or forgets the half-done writes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime

from mailsyncd.domain import PopListing, PopPlan, PopPolicy, Stored
from mailsyncd.errors import MessageError
from mailsyncd.progress import Progress
from mailsyncd.sources.base import Pop3Source
from mailsyncd.state.repo import StateRepo
from mailsyncd.stores.base import FolderWriter, Reservation, Store
from mailsyncd.sync.batch import FETCH_BUDGET, batches, store_batch
from mailsyncd.sync.effects import Checkpoint, Counts, Effects, no_checkpoint
from mailsyncd.sync.plan import plan_pop

log = logging.getLogger(__name__)

INBOX = "INBOX"  # a POP3 mailbox is stored as the store's INBOX
BATCH_MAX_COUNT = 1000  # messages per intent/commit batch, besides the FETCH_BUDGET bytes

Fetch = tuple[int, str, int]  # (message number, uidl, size), as in PopPlan.fetch


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
                ledger = PopLedger(self)
                for batch in batches(fetches, _size, FETCH_BUDGET, BATCH_MAX_COUNT):
                    store_batch(self, writer, ledger, batch)
        finally:
            self.progress.end_folder()

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


def _size(fetch: Fetch) -> int:
    return fetch[2]


@dataclass
class PopLedger:
    """POP's part in ``store_batch``: messages are keyed by UIDL within the account and
    retrieved one at a time, so memory is bounded by one message."""

    session: PopSync

    def size(self, message: Fetch) -> int:
        return _size(message)

    def reserve(self, writer: FolderWriter, message: Fetch) -> Reservation:
        return writer.reserve()

    def record_intents(self, intents: Sequence[tuple[Fetch, str]]) -> None:
        self.session.repo.pop_record_pending(self.session.account_id, [
            (uidl, size, location) for (_, uidl, size), location in intents])

    def bodies(self, messages: Sequence[Fetch]) -> Generator[bytes | None, None, None]:
        with contextlib.closing(self.session.source.retrieve_many([number for number, _, _ in messages])) as answers:
            for answer in answers:
                if isinstance(answer, MessageError):
                    # Expunged by another client meanwhile, most likely: not stored, so
                    # never deleted; it is fetched next time if it is still there.
                    log.warning("%s", answer)
                    yield None
                    continue
                self.session.checkpoint("fetched")
                yield answer
                del answer  # one message in memory

    def claim(self, message: Fetch, data: bytes) -> bool:
        return False  # a POP mailbox has no earlier copies to adopt

    def finish(self, done: Sequence[tuple[Fetch, Stored, str | None]],
               unfinished: Sequence[tuple[Fetch, str]]) -> None:
        self.session.repo.pop_finish_batch(self.session.account_id, [
            (uidl, stored, found_id) for (_, uidl, _), stored, found_id in done], [
            (uidl, location) for (_, uidl, _), location in unfinished])

    def forget(self, unfinished: Sequence[Fetch]) -> None:
        self.session.repo.pop_forget(self.session.account_id, [uidl for _, uidl, _ in unfinished])
