"""The contracts of the protocol sources, so the executor depends on these and not on
imapclient or poplib.

Errors: a source raises AccountError (or AuthError) when the connection or login fails
and FolderError when one folder cannot be read; nothing else escapes it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Protocol

from mailsyncd.domain import (
    FolderInfo,
    FolderSnapshot,
    PartialMessage,
    PopListing,
    RemoteMessage,
    ServerStatus,
    SnapshotBase,
)
from mailsyncd.errors import MessageError


class ImapSource(Protocol):
    def list_folders(self) -> list[FolderInfo]: ...

    def statuses(self) -> dict[str, ServerStatus]:
        """Folder states the last ``list_folders`` learnt without opening any folder, by
        name; a folder missing here is simply opened by ``snapshot``."""
        ...

    def snapshot(self, name: str, base: SnapshotBase | None, *, message_ids: bool = False) -> FolderSnapshot:
        """Open ``name`` read-only and describe what changed since ``base`` (everything
        when ``base`` is None or its UIDVALIDITY no longer holds). Leaves the folder
        selected for ``fetch``. New messages carry their Message-ID when the UIDVALIDITY
        changed or ``message_ids`` asks for it (local copies are to be matched)."""
        ...

    def first_listing(self, name: str) -> tuple[FolderSnapshot, Iterator[tuple[RemoteMessage, ...]]]:
        """``snapshot`` of a folder with no base (and no Message-IDs), listed a slice at a
        time: ``new`` holds the first slice, the iterator each further one, described
        only when it is asked for. The folder stays selected in between; the caller
        asks for the next slice only once it is done with ``fetch_ahead``. A first sync
        of a large folder so never holds every message's description at once."""
        ...

    def fetch_ahead(self, name: str, batches: Iterable[Sequence[int]], whole: bool = False
                    ) -> Generator[dict[int, bytes | MessageError], None, None]:
        """Raw bodies of the selected folder, one dict per batch of UIDs, in order; a UID
        expunged meanwhile is left out, and one whose body was refused (larger than the
        limit: max_message_size, or with ``whole`` only the source's ceiling) maps to the
        error saying so. The source may fetch the next batch while the
        caller handles this one, so the caller uses the source for nothing else until the
        iterator is exhausted or closed (closing it waits for a fetch under way)."""
        ...


    def examine(self, name: str) -> int:
        """Open ``name`` read-only, for ``fetch_ahead`` or ``fetch_partial``; its UIDVALIDITY."""
        ...

    def fetch_partial(self, name: str, uids: Sequence[int], text_budget: int | None
                      ) -> dict[int, PartialMessage]:
        """What placeholders are built from, for messages of the selected folder: the
        header block (BODY.PEEK[HEADER]) and the MIME leaves (BODYSTRUCTURE); with a
        ``text_budget``, also the text parts that fit in it together (BODY.PEEK[n.MIME],
        BODY.PEEK[n]). Never sets \\Seen. A UID expunged meanwhile is left out."""
        ...


class TwoWaySource(ImapSource, Protocol):
    """What two-way sync (``mode = "sync"``) needs besides pulling: the only writes to the
    server. Every method acts on the folder ``open_writable`` selected last (``name`` is
    for error messages), except ``create_folder``."""

    condstore: bool

    @property
    def uidplus(self) -> bool:
        """UID EXPUNGE, APPENDUID, COPYUID are offered."""
        ...

    @property
    def moves_away(self) -> bool:
        """``move`` leaves nothing behind (MOVE, or COPY + UID EXPUNGE); else the source
        message stays, marked \\Deleted."""
        ...

    def open_writable(self, name: str, base: SnapshotBase | None, *, readonly: bool = False) -> FolderSnapshot:
        """``snapshot``, with the folder opened read-write (SELECT; EXAMINE when
        ``readonly``) and the Message-ID of every message in ``new``."""
        ...

    def select(self, name: str) -> None:
        """Open ``name`` read-write for the writes that follow."""
        ...

    def store_flags(self, name: str, uids: Sequence[int], flags: Iterable[str], add: bool,
                    unchangedsince: int | None) -> frozenset[int]:
        """+FLAGS.SILENT or -FLAGS.SILENT, never a replace; the UIDs the server refused
        because they changed since ``unchangedsince`` (CONDSTORE's MODIFIED)."""
        ...

    def append(self, name: str, data: bytes, flags: Iterable[str], when: datetime) -> tuple[int, int] | None:
        """(UIDVALIDITY, UID) from APPENDUID, or None when the server does not tell."""
        ...

    def move(self, name: str, uid: int, target: str) -> int | None:
        """The UID in ``target`` (COPYUID), or None when the server does not tell."""
        ...

    def expunge_uids(self, name: str, uids: Sequence[int]) -> None:
        """UID EXPUNGE of exactly these UIDs; never a plain EXPUNGE."""
        ...

    def find_uploaded(self, name: str, since_uid: int, found_id: str | None, size: int) -> list[int]:
        """Candidate UIDs >= ``since_uid`` with this Message-ID (if any) and size, in
        ``name``, which it selects."""
        ...

    def fetch(self, name: str, uids: Sequence[int]) -> dict[int, bytes | MessageError]:
        """Bodies (raw, as sent) of UIDs of the selected folder, with BODY.PEEK[]."""
        ...

    def flags(self, name: str, uids: Sequence[int]) -> dict[int, frozenset[str]]:
        """The flags of these UIDs in ``name``, which it selects; expunged ones are missing."""
        ...

    def create_folder(self, name: str) -> None: ...


class Pop3Source(Protocol):
    def listing(self) -> PopListing:
        """Message numbers with their identities, valid for this session only."""
        ...

    def retrieve(self, number: int) -> bytes:
        """One message, dot-unstuffed, with LF line ends."""
        ...

    def retrieve_many(self, numbers: Sequence[int], then: Sequence[int] = ()
                      ) -> Generator[bytes | MessageError, None, None]:
        """``retrieve`` of each number in order, a refused message as its MessageError;
        later requests, ``then`` (what the next call will ask for) included, may already
        be on the wire. Closing the generator early leaves the session usable."""
        ...

    def header(self, number: int) -> bytes:
        """TOP n 0: the header block, with LF line ends; MessageError if refused."""
        ...

    def delete(self, number: int) -> None:
        """Mark for deletion; takes effect only when ``quit`` succeeds."""
        ...

    def quit(self) -> None:
        """End the session; raises if the server did not confirm (deletions then did
        not happen)."""
        ...
