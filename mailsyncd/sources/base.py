"""The contracts of the protocol sources, so the executor depends on these and not on
imapclient or poplib.

Errors: a source raises AccountError (or AuthError) when the connection or login fails
and FolderError when one folder cannot be read; nothing else escapes it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from typing import Protocol

from mailsyncd.domain import FolderInfo, FolderSnapshot, PopListing, ServerStatus, SnapshotBase
from mailsyncd.errors import MessageError


class ImapSource(Protocol):
    def list_folders(self) -> list[FolderInfo]: ...

    def statuses(self) -> dict[str, ServerStatus]:
        """Folder states the last ``list_folders`` learnt without opening any folder, by
        name; a folder missing here is simply opened by ``snapshot``."""
        ...

    def snapshot(self, name: str, base: SnapshotBase | None) -> FolderSnapshot:
        """Open ``name`` read-only and describe what changed since ``base`` (everything
        when ``base`` is None or its UIDVALIDITY no longer holds). Leaves the folder
        selected for ``fetch``."""
        ...

    def fetch_ahead(self, name: str, batches: Iterable[Sequence[int]]
                    ) -> Generator[dict[int, bytes | MessageError], None, None]:
        """Raw bodies of the selected folder, one dict per batch of UIDs, in order; a UID
        expunged meanwhile is left out, and one whose body was refused (larger than the
        limit) maps to the error saying so. The source may fetch the next batch while the
        caller handles this one, so the caller uses the source for nothing else until the
        iterator is exhausted or closed (closing it waits for a fetch under way)."""
        ...


class Pop3Source(Protocol):
    def listing(self) -> PopListing:
        """Message numbers with their identities, valid for this session only."""
        ...

    def retrieve(self, number: int) -> bytes:
        """One message, dot-unstuffed, with LF line ends."""
        ...

    def retrieve_many(self, numbers: Sequence[int]) -> Generator[bytes | MessageError, None, None]:
        """``retrieve`` of each number in order, a refused message as its MessageError;
        later requests may already be on the wire. Closing the generator early leaves
        the session usable."""
        ...

    def delete(self, number: int) -> None:
        """Mark for deletion; takes effect only when ``quit`` succeeds."""
        ...

    def quit(self) -> None:
        """End the session; raises if the server did not confirm (deletions then did
        not happen)."""
        ...
