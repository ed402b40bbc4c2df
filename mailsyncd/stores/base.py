"""The contract every local store keeps.

A *location* is a string the store hands out and later understands again; the state
database records it verbatim. The executor's order of calls is the durability
protocol (invariant 1):

1. ``open_folder`` locks what needs locking and yields a ``FolderWriter``;
2. ``reserve`` tells where a message will go, before any byte is written, so that the
   intent can be recorded;
3. ``add`` writes one message; it may return before the message is durable;
4. ``commit`` makes every message added so far durable. Only after it returns may
   they be recorded as stored. Leaving the ``with`` block without ``commit`` undoes
   what was not committed where the format allows it (mbox truncates back).

``recover`` is called at start with the locations of intents that never became
``stored``; it reports which of them are whole in the store (to adopt) and clears away
the rest (temporary files, a torn mbox tail), so the message can simply be fetched again.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Protocol

from mailsyncd.domain import Flags, Stored


class FolderWriter(Protocol):
    def reserve(self, flags: Flags) -> str: ...

    def add(self, location: str, data: bytes, flags: Flags, internaldate: datetime | None) -> Stored: ...

    def commit(self) -> None: ...


class Store(Protocol):
    root: Path

    def folder_path(self, name: str, delimiter: str | None) -> str:
        """Where a server folder lives in this store (safe, see names.py)."""
        ...

    def open_folder(self, folder: str) -> AbstractContextManager[FolderWriter]: ...

    def recover(self, pending: Iterable[str]) -> dict[str, Stored]:
        """Whole messages behind pending locations, keyed by the pending location."""
        ...

    def set_flags(self, location: str, flags: Flags) -> str:
        """Apply flags; returns the (possibly new) location. A message no longer in the
        store is left alone and its location returned unchanged."""
        ...

    def remove(self, location: str) -> None: ...

    def read(self, location: str) -> bytes: ...


__all__ = ["FolderWriter", "Store", "Stored"]  # Stored lives in domain; stores hand it out
