"""The contract every local store keeps.

A *location* is a string the store hands out and later understands again; the state
database records it verbatim. The executor's order of calls is the durability
protocol (invariant 1):

1. ``open_folder`` locks what needs locking and yields a ``FolderWriter``;
2. ``reserve`` tells where a message will go, before any byte is written, so that the
   intent can be recorded;
3. ``Reservation.write`` writes one message; it may return before the message is durable;
4. ``commit`` makes every message written so far durable and only then hands out their
   ``Stored`` values: a ``Stored`` exists only for bytes that are durable, so whatever
   holds one may record it as stored. Leaving the ``with`` block without ``commit``
   undoes what was not committed (mbox writes nothing before ``commit``).

A reservation that was never written keeps a ``location`` that recovery may act on:
after a commit it no longer points behind the committed messages, so an unfinished
intent may stay recorded beside stored ones.

``recover`` is called at start with the locations of intents that never became
``stored``; it reports which of them are whole in the store (to adopt) and clears away
the rest (temporary files, a torn mbox tail it can prove it wrote), so the message can
simply be fetched again. It never removes what another program wrote (invariant 10).

``index`` lists what a folder holds, whoever wrote it, so that a state database that
knows nothing of the store (lost, zeroed, another machine's, or a store written by
mbsync, offlineimap or getmail) can match it with the server instead of storing every
message again. It reads only: it creates, moves and removes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Protocol

from mailsyncd.domain import NO_FLAGS, Flags, LocalCopy, Stored
from mailsyncd.message import comparable, digest, message_id, server_size


class Reservation(Protocol):
    """One message's place in the store, handed out before its bytes exist."""

    @property
    def location(self) -> str:
        """What the intent records; see the module's note on unwritten reservations."""
        ...

    def write(self, data: bytes) -> None:
        """The message's bytes (LF line ends), at most once; durable only at commit."""
        ...


class FolderWriter(Protocol):
    def reserve(self, flags: Flags = NO_FLAGS, internaldate: datetime | None = None) -> Reservation:
        """A place for one message with these flags and this INTERNALDATE."""
        ...

    def replace(self, location: str) -> Reservation:
        """A place over the message at ``location`` (a placeholder), keeping its flags
        and date: from ``commit`` on, the location holds the bytes written instead, and
        at no moment neither or both. Its ``location`` is where the message is now, which
        ``recover`` finds again. Raises StoreError where the store cannot do this."""
        ...

    def commit(self) -> list[Stored]:
        """Make every reservation written since the last commit durable; their
        ``Stored`` values, in the order they were written."""
        ...


class Store(Protocol):
    root: Path

    def folder_path(self, name: str, delimiter: str | None) -> str:
        """Where a server folder lives in this store (safe, see names.py)."""
        ...

    def open_folder(self, folder: str) -> AbstractContextManager[FolderWriter]: ...

    def recover(self, pending: Iterable[str]) -> dict[str, Stored]:
        """Whole messages behind pending locations, keyed by the pending location."""
        ...

    def index(self, folder: str) -> list[LocalCopy]:
        """Every whole message in ``folder``, in the store's order; empty when the folder
        is not there."""
        ...

    def set_flags(self, location: str, flags: Flags) -> str:
        """Apply flags; returns the (possibly new) location. A message no longer in the
        store is left alone and its location returned unchanged."""
        ...

    def flags(self, location: str) -> Flags:
        """The flags a mail reader gave the message here (none where the store cannot
        tell, or the message is gone)."""
        ...

    def remove(self, location: str) -> None: ...

    def read(self, location: str) -> bytes: ...


def local_copy(location: str, data: bytes) -> LocalCopy:
    """How an indexed message is compared with the server's: its Message-ID, and the
    wire size and digest of its bytes as ``comparable`` gives them."""
    server_bytes = comparable(data)
    return LocalCopy(location, message_id(data), server_size(server_bytes), digest(server_bytes))


__all__ = ["FolderWriter", "Reservation", "Store", "Stored"]  # Stored lives in domain; stores hand it out
