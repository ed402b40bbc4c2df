"""The POP3 executor: one session, in the order that keeps invariants 1 and 4.

listing -> plan (pure) -> for each batch (through ``store_batch``): record the intent,
RETR and write each message, commit the store (fsync), mark stored -> DELE what the policy asks for, by the
numbers of this session's listing and only for identities recorded stored -> QUIT ->
only after +OK, record the deletions. A kill or a dropped connection anywhere before
QUIT leaves the server as it was (POP rolls DELE back) and the next run's recovery
finishes or forgets the half-done writes.

An account of which the state database records nothing has its store indexed first
(invariant 10): UIDLs tell nothing about local copies, so each message is still
retrieved, and one whose bytes are a copy already in the store is recorded there
instead of being written again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailsyncd.domain import (
    LargeMessages,
    MessageState,
    PartialMessage,
    PopListing,
    PopPlan,
    PopPolicy,
    RecordedMessage,
    Stored,
)
from mailsyncd.errors import MessageError
from mailsyncd.message import placeholder
from mailsyncd.progress import Progress
from mailsyncd.sources.base import Pop3Source
from mailsyncd.state.repo import StateRepo
from mailsyncd.stores.base import FolderWriter, Reservation, Store
from mailsyncd.sync.batch import FETCH_BUDGET, FLAGGED, NO_POOL, ContentPool, batches, how_to_fetch, store_batch
from mailsyncd.sync.effects import Checkpoint, Counts, Effects, no_checkpoint
from mailsyncd.sync.plan import plan_pop

log = logging.getLogger(__name__)

INBOX = "INBOX"  # a POP3 mailbox is stored as the store's INBOX
BATCH_MAX_COUNT = 1000  # messages per intent/commit batch, besides the FETCH_BUDGET bytes

Fetch = tuple[int, str, int]  # (message number, uidl, size), as in PopPlan.fetch
Replacement = tuple[int, str, int, str]  # (message number, uidl, size, the placeholder's location)
PLACEHOLDER_BATCH = 200  # placeholders per intent/commit batch


@dataclass
class PopSync(Effects):
    account_id: int
    source: Pop3Source
    policy: PopPolicy

    def run(self, now: datetime) -> None:
        recorded = self.repo.pop_messages(self.account_id)
        if not recorded:
            self._index_store()
        listing = self.source.listing()
        self.checkpoint("listing")
        plan = plan_pop(listing, recorded, self.policy, now)
        if plan.skip:
            for number, uidl, size in plan.skip:
                log.warning("%s: POP message %d (UIDL %s) skipped: %d bytes is over max_message_size",
                            self.account, number, uidl, size)
            self.repo.pop_record_skipped(self.account_id, [(uidl, size) for _, uidl, size in plan.skip])
            self.counts.skipped += len(plan.skip)
        if plan.placeholders:
            self._write(plan.placeholders, PopPlaceholderLedger(self), lambda _: 0, PLACEHOLDER_BATCH)
            self.counts.placeholders += len(plan.placeholders)
        if plan.fetch:
            self._fetch(plan.fetch)
        replace = self._to_replace(listing, plan)
        if replace:
            self.replace(replace)
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

    def _index_store(self) -> None:
        """Record what the store's INBOX already holds, before anything is fetched."""
        found = self.store.index(self.store.folder_path(INBOX, None))
        if found:
            log.info("%s: the store already holds %d messages the state database does not know; a message "
                     "retrieved that is one of them is not stored again", self.account, len(found))
            self.repo.pop_record_found(self.account_id, found)
            self.checkpoint("indexed")

    def _fetch(self, fetches: Sequence[Fetch]) -> None:
        self.progress.start_folder(self.account, INBOX, len(fetches), sum(size for _, _, size in fetches))
        try:
            pool = ContentPool(self.repo.pop_unclaimed(self.account_id), self.store.read)
            self._write(fetches, PopLedger(self, [number for number, _, _ in fetches]), _size, BATCH_MAX_COUNT,
                        pool)
        finally:
            self.progress.end_folder()

    def _write(self, messages: Sequence[Any], ledger: Any, size_of: Callable[[Any], int], count: int,
               pool: ContentPool = NO_POOL) -> None:
        with self.store.open_folder(self.store.folder_path(INBOX, None)) as writer:
            for batch in batches(messages, size_of, FETCH_BUDGET, count):
                store_batch(self, writer, ledger, batch, pool)

    def _to_replace(self, listing: PopListing, plan: PopPlan) -> list[Replacement]:
        """The planned replacements, and the placeholders the user flagged in a mail reader."""
        if self.policy.large_messages != LargeMessages.HEADERS:
            return []
        recorded = self.repo.pop_messages(self.account_id)
        wanted = {uidl for _, uidl, _ in plan.replace}
        numbers = {uidl: (number, size) for number, (uidl, size) in listing.entries.items()}
        for uidl, held in recorded.items():
            if held.state == MessageState.PLACEHOLDER and held.location and uidl in numbers and (
                    FLAGGED in self.store.flags(held.location)):
                wanted.add(uidl)
        replacements: list[Replacement] = []
        for uidl in sorted(wanted):
            location = recorded[uidl].location if uidl in recorded else None
            if uidl in numbers and location:
                replacements.append((numbers[uidl][0], uidl, numbers[uidl][1], location))
        return replacements

    def replace(self, replacements: Sequence[Replacement]) -> None:
        """Each message whole over its placeholder, as ``FolderSync.replace`` does for IMAP."""
        self.progress.start_folder(self.account, INBOX, len(replacements), sum(r[2] for r in replacements))
        try:
            self._write(replacements, PopReplaceLedger(self), lambda replacement: replacement[2], BATCH_MAX_COUNT)
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


def replace_pop_placeholder(account: str, account_id: int, repo: StateRepo, store: Store, source: Pop3Source,
                            uidl: str, location: str, progress: Progress, checkpoint: Checkpoint = no_checkpoint,
                            *, counts: Counts) -> bool:
    """``mailsyncd fetch`` for POP3: the message with this UIDL whole over its
    placeholder at ``location``, then QUIT. False when the server no longer has it."""
    listing = source.listing()
    found = [(number, size) for number, (identity, size) in listing.entries.items() if identity == uidl]
    session = PopSync(account, repo, store, progress, checkpoint, counts, account_id, source, PopPolicy())
    fetched = counts.fetched
    if len(found) == 1:
        session.replace([(found[0][0], uidl, found[0][1], location)])
    source.quit()
    return counts.fetched > fetched


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
    retrieved one at a time, so memory is bounded by one message. ``order`` is every
    number the batches will ask for, in their order: a batch's RETRs run on into the
    next batch's, so the server keeps sending while a batch is committed."""

    session: PopSync
    order: Sequence[int]
    adopted: list[tuple[str, RecordedMessage]] = field(default_factory=list)
    asked: int = 0  # numbers of ``order`` the batches so far asked for

    def size(self, message: Fetch) -> int:
        return _size(message)

    def reserve(self, writer: FolderWriter, message: Fetch) -> Reservation:
        return writer.reserve()

    def record_intents(self, intents: Sequence[tuple[Fetch, str]]) -> None:
        self.session.repo.pop_record_pending(self.session.account_id, [
            (uidl, size, location) for (_, uidl, size), location in intents])

    def bodies(self, messages: Sequence[Fetch]) -> Generator[bytes | None, None, None]:
        self.asked += len(messages)
        then = self.order[self.asked:self.asked + BATCH_MAX_COUNT]
        with contextlib.closing(self.session.source.retrieve_many([number for number, _, _ in messages],
                                                                  then)) as answers:
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

    def adopt(self, message: Fetch, copy: RecordedMessage) -> None:
        self.adopted.append((message[1], copy))

    def finish(self, done: Sequence[tuple[Fetch, Stored, str | None]],
               unfinished: Sequence[tuple[Fetch, str]]) -> None:
        adopted, self.adopted = self.adopted, []
        self.session.repo.pop_finish_batch(self.session.account_id, [
            (uidl, stored, found_id) for (_, uidl, _), stored, found_id in done], [
            (uidl, location) for (_, uidl, _), location in unfinished], adopted=adopted)

    def forget(self, unfinished: Sequence[Fetch]) -> None:
        self.session.repo.pop_forget(self.session.account_id, [uidl for _, uidl, _ in unfinished])


class PopPlaceholderLedger(PopLedger):
    """Placeholders from TOP n 0 (the header block; POP3 cannot tell the parts), recorded
    as placeholders. ``size`` is what each one cost to download."""

    def __init__(self, session: PopSync) -> None:
        super().__init__(session, ())
        self.downloaded: dict[str, int] = {}

    def size(self, message: Fetch) -> int:
        return self.downloaded.get(message[1], 0)

    def bodies(self, messages: Sequence[Fetch]) -> Generator[bytes | None, None, None]:
        for number, uidl, size in messages:
            try:
                header = self.session.source.header(number)
            except MessageError as error:
                log.warning("%s", error)
                yield None
                continue
            self.session.checkpoint("fetched")
            self.downloaded[uidl] = len(header)
            yield placeholder(PartialMessage(header, size), how_to_fetch(self.session.account, INBOX, uidl))

    def finish(self, done: Sequence[tuple[Fetch, Stored, str | None]],
               unfinished: Sequence[tuple[Fetch, str]]) -> None:
        self.session.repo.pop_finish_batch(self.session.account_id, [
            (uidl, stored, found_id) for (_, uidl, _), stored, found_id in done], [
            (uidl, location) for (_, uidl, _), location in unfinished], stored_as=MessageState.PLACEHOLDER)


@dataclass
class PopReplaceLedger:
    """Replacements' part in ``store_batch`` for POP3: each whole message (RETR) goes
    over its placeholder; what is not finished stays a placeholder."""

    session: PopSync

    def size(self, message: Replacement) -> int:
        return message[2]

    def reserve(self, writer: FolderWriter, message: Replacement) -> Reservation:
        return writer.replace(message[3])

    def record_intents(self, intents: Sequence[tuple[Replacement, str]]) -> None:
        self.session.repo.pop_mark_replacing(self.session.account_id, [
            (message[1], location) for message, location in intents])

    def bodies(self, messages: Sequence[Replacement]) -> Generator[bytes | None, None, None]:
        for number, _, _, _ in messages:  # a few, asked for one by one: no pipelining needed
            try:
                data = self.session.source.retrieve(number)
            except MessageError as error:
                log.warning("%s", error)  # gone from the server: the placeholder stays
                yield None
                continue
            self.session.checkpoint("fetched")
            yield data

    def adopt(self, message: Replacement, copy: RecordedMessage) -> None:
        raise AssertionError("a replacement is never matched to a copy: its batches have no pool")

    def finish(self, done: Sequence[tuple[Replacement, Stored, str | None]],
               unfinished: Sequence[tuple[Replacement, str]]) -> None:
        self.session.repo.pop_finish_batch(self.session.account_id, [
            (message[1], stored, found_id) for message, stored, found_id in done], [])

    def forget(self, unfinished: Sequence[Replacement]) -> None:
        self.session.repo.pop_keep_placeholders(self.session.account_id, [message[1] for message in unfinished])
