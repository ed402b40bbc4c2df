"""The one sequence that brings new messages into a store, for every protocol.

For each batch, in the order that keeps invariant 1 (durable, then recorded):

1. reserve a place in the store for every message and record the intents (pending
   rows) in one transaction, before any byte is written;
2. fetch and write each message;
3. commit the store (fsync), which alone hands out ``Stored`` values;
4. record in ONE transaction the stored messages and the intents not finished, at the
   place their reservation names after the commit (for mbox: past the committed
   messages, so no moment exists at which a stored message lies behind a pending
   offset that recovery would cut the file back to);
5. forget the unfinished intents: they are fetched again next time.

Steps 3 to 5 run on errors too (a dropped connection), so what arrived is kept. What
differs between protocols (how messages are named, fetched and recorded) is a
``Ledger``; the sequence itself lives only here.

Before a message is written, its bytes are looked up in a ``ContentPool``: the local
copies no record claims (retired by a UIDVALIDITY change, or found by indexing a store
the state database knew nothing of). A match is adopted where it lies instead of being
stored a second time; this is how a lost state database costs no duplicate.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

from mailsyncd.domain import RecordedMessage, Stored
from mailsyncd.errors import LeaseLost, StoreError
from mailsyncd.message import comparable, digest, holds, message_id
from mailsyncd.stores.base import FolderWriter, Reservation
from mailsyncd.sync.effects import Effects

FETCH_BUDGET = 3 * 1024 * 1024  # bytes per batch; two IMAP batches are in memory at most
FLAGGED = "\\Flagged"  # a placeholder the user flagged in a mail reader asks for the whole message

Item = TypeVar("Item")
Message = TypeVar("Message")
Message_contra = TypeVar("Message_contra", contravariant=True)


def how_to_fetch(account: str, folder: str, uid: int | str) -> str:
    """The line a placeholder shows: the two ways to get the whole message."""
    return (f"flag it and sync again, or run: mailsyncd fetch {shlex.quote(account)} {shlex.quote(folder)} "
            f"--uid {shlex.quote(str(uid))}")


def batches(items: Iterable[Item], size_of: Callable[[Item], int], budget: int, max_count: int
            ) -> Iterator[list[Item]]:
    """Split items, in order, into batches of at most ``max_count`` whose sizes add up
    to at most ``budget``, so memory stays flat however large the mailbox and a kill
    costs at most one batch of downloads; an item larger than the budget goes alone."""
    batch: list[Item] = []
    size = 0
    for item in items:
        item_size = size_of(item)
        if batch and (size + item_size > budget or len(batch) >= max_count):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item_size
    if batch:
        yield batch


class ContentPool:
    """Local copies a fetched message may turn out to be, by the SHA-256 their record
    holds: of the stored bytes (our own copies), or of the bytes as message.comparable
    gives them (copies found by indexing); failing that, a copy with the same Message-ID
    that ``read`` shows to be the message with fields added (message.holds). Each copy
    is claimed at most once."""

    def __init__(self, copies: Iterable[RecordedMessage] = (),
                 read: Callable[[str], bytes] | None = None) -> None:
        self._by_digest: dict[str, list[RecordedMessage]] = {}
        self._by_id: dict[str, list[RecordedMessage]] = {}
        self._claimed: set[str] = set()  # locations
        self._read = read
        for copy in copies:
            if copy.location and copy.sha256:
                self._by_digest.setdefault(copy.sha256, []).append(copy)
            if copy.location and copy.message_id and read is not None:
                self._by_id.setdefault(copy.message_id, []).append(copy)

    def claim(self, data: bytes) -> RecordedMessage | None:
        """The copy these LF bytes are, taken out of the pool; None when none is."""
        if not self._by_digest and not self._by_id:
            return None
        found = self._take(self._by_digest.get(digest(data), []))
        if found is None:
            normalised = comparable(data)
            if normalised != data:
                found = self._take(self._by_digest.get(digest(normalised), []))
        if found is None and self._by_id:
            found = self._take(self._by_id.get(message_id(data) or "", []), data)
        if found is not None:
            self._claimed.add(found.location or "")
        return found

    def _take(self, copies: list[RecordedMessage], data: bytes | None = None) -> RecordedMessage | None:
        """The first unclaimed copy (that holds ``data``, when given)."""
        for copy in copies:
            if copy.location in self._claimed:
                continue
            if data is not None:
                assert self._read is not None and copy.location is not None
                try:
                    if not holds(comparable(self._read(copy.location)), comparable(data)):
                        continue
                except StoreError:
                    continue  # gone from the store meanwhile
            return copy
        return None


NO_POOL = ContentPool()


class Ledger(Protocol[Message_contra]):
    """One protocol's part in ``store_batch``: its messages' places, bodies and rows."""

    def size(self, message: Message_contra) -> int:
        """The size the server announced, for counts and progress."""
        ...

    def reserve(self, writer: FolderWriter, message: Message_contra) -> Reservation: ...

    def record_intents(self, intents: Sequence[tuple[Message_contra, str]]) -> None:
        """(message, location) pending rows, in one transaction."""
        ...

    def bodies(self, messages: Sequence[Message_contra]) -> Generator[bytes | None, None, None]:
        """Each message's bytes with LF line ends, in order, fetched only as they are
        asked for; None for one the server no longer has."""
        ...

    def adopt(self, message: Message_contra, copy: RecordedMessage) -> None:
        """The message is ``copy``, from the pool: recorded at its location by ``finish``."""
        ...

    def finish(self, done: Sequence[tuple[Message_contra, Stored, str | None]],
               unfinished: Sequence[tuple[Message_contra, str]]) -> None:
        """Stored messages (with their Message-ID) and the unfinished intents' current
        locations, in ONE transaction, with whatever ``adopt`` was given."""
        ...

    def forget(self, unfinished: Sequence[Message_contra]) -> None:
        """Drop the unfinished intents, so they are fetched again next time."""
        ...


def store_batch(effects: Effects, writer: FolderWriter, ledger: Ledger[Message], batch: Sequence[Message],
                pool: ContentPool = NO_POOL) -> None:
    reserved = [(message, ledger.reserve(writer, message)) for message in batch]
    ledger.record_intents([(message, reservation.location) for message, reservation in reserved])
    effects.checkpoint("intent")
    written: list[tuple[Message, str | None]] = []
    finished: set[int] = set()  # indexes into ``reserved`` that were written or adopted
    bodies = ledger.bodies(batch)
    lost = False
    try:
        for index, (message, reservation) in enumerate(reserved):
            data = next(bodies)
            if data is None:
                continue  # gone from the server meanwhile: nothing to keep
            finished.add(index)
            copy = pool.claim(data)
            if copy is not None:
                ledger.adopt(message, copy)  # already in the store: not written again
                continue
            reservation.write(data)
            written.append((message, message_id(data)))
            del data  # memory is bounded by one message, not two
            effects.checkpoint("write")
    except LeaseLost:
        # Another daemon may hold the account now and fetch these very messages: nothing
        # of the batch is published (the writer rolls it back), as after a kill, and its
        # intents are left to the holder's recovery.
        lost = True
        raise
    finally:
        bodies.close()
        if not lost:
            stored = writer.commit()
            effects.checkpoint("commit")
            done = [(message, what, found_id) for (message, found_id), what in zip(written, stored, strict=True)]
            unfinished = [(message, reservation.location) for index, (message, reservation) in enumerate(reserved)
                          if index not in finished]
            ledger.finish(done, unfinished)
            # Counted once recorded, also when the batch was cut short: the run records them.
            size = sum(ledger.size(message) for message, _, _ in done)
            claimed = len(finished) - len(written)
            effects.counts.fetched += len(done)
            effects.counts.fetched_bytes += size
            effects.counts.adopted += claimed
            effects.checkpoint("recorded")
            if unfinished:
                ledger.forget([message for message, _ in unfinished])
    effects.progress.advance(len(done) + claimed, size)
