"""mboxrd: one file per folder, appended under a dotlock and an fcntl lock.

The file is only ever appended to. The writer notes the file's size when it takes the
lock; that offset is recorded with the intent, so after a kill a torn tail can be cut
off (truncated back) before anything else is written. Flags are not written into the
file (that would rewrite messages); the state database keeps them.

A location is ``<file>@<offset>``: the offset of the message's ``From `` line.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from mailsyncd import names
from mailsyncd.domain import NO_FLAGS, Flags, Stored
from mailsyncd.errors import StoreError
from mailsyncd.fsio import locked_file, make_private_dirs, safe_join
from mailsyncd.message import digest, header_block

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_UNESCAPE = re.compile(rb"^>(>*From )", re.MULTILINE)
_HEADER_SENDER = re.compile(rb"^(?:Return-Path|From):[ \t]*(.*)$", re.MULTILINE | re.IGNORECASE)


def escape(data: bytes) -> bytes:
    """mboxrd: every line that matches ``>*From `` gains one ``>``, so it can be undone."""
    return _FROM_LINE.sub(rb">\1", data)


def unescape(data: bytes) -> bytes:
    return _UNESCAPE.sub(rb"\1", data)


def _sender(data: bytes) -> str:
    match = _HEADER_SENDER.search(header_block(data))
    if match:
        address = email.utils.parseaddr(match.group(1).decode("ascii", "replace"))[1]
        if address and " " not in address and address.isprintable():
            return address
    return "MAILER-DAEMON"


def separator(data: bytes, internaldate: datetime | None) -> bytes:
    when = (internaldate or datetime.now(UTC)).astimezone(UTC)
    return f"From {_sender(data)} {when.strftime('%a %b %d %H:%M:%S %Y')}\n".encode()


def entry(data: bytes, internaldate: datetime | None) -> bytes:
    """The bytes appended for one message: separator, escaped body, a blank line."""
    body = escape(data)
    if not body.endswith(b"\n"):
        body += b"\n"
    return separator(data, internaldate) + body + b"\n"


def split_location(location: str) -> tuple[str, int]:
    path, _, offset = location.rpartition("@")
    if not path or not offset.isdigit():
        raise StoreError(f"not an mbox location: {location!r}")
    return path, int(offset)


class MboxStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def folder_path(self, name: str, delimiter: str | None) -> str:
        return names.folder_path(name, delimiter, "mbox")

    @contextlib.contextmanager
    def open_folder(self, folder: str) -> Iterator[MboxWriter]:
        path = safe_join(self.root, folder)
        make_private_dirs(path.parent)
        with locked_file(path) as fd:
            writer = MboxWriter(folder, fd)
            try:
                yield writer
            finally:
                writer.rollback()

    def recover(self, pending: Iterable[str]) -> dict[str, Stored]:
        """Cut each file back to the earliest offset an unfinished batch started at.

        Nothing of an unfinished batch is adopted: the messages are fetched again, which
        is simpler than parsing a tail that may be torn anywhere.
        """
        cut: dict[str, int] = {}
        for location in pending:
            folder, offset = split_location(location)
            cut[folder] = min(offset, cut.get(folder, offset))
        for folder, offset in cut.items():
            path = safe_join(self.root, folder)
            if not path.exists():
                continue
            with locked_file(path) as fd:
                if os.fstat(fd).st_size > offset:
                    os.ftruncate(fd, offset)
                    os.fsync(fd)
        return {}

    def read(self, location: str) -> bytes:
        folder, offset = split_location(location)
        with open(safe_join(self.root, folder), "rb") as handle:
            handle.seek(offset)
            handle.readline()  # the From separator
            lines = []
            for line in handle:
                if line.startswith(b"From "):
                    break
                lines.append(line)
        body = b"".join(lines)
        return unescape(body[:-1] if body.endswith(b"\n\n") else body)

    def set_flags(self, location: str, flags: Flags) -> str:
        return location

    def remove(self, location: str) -> None:
        raise StoreError("mbox stores are append-only; mode = \"mirror\" needs a Maildir store")


class MboxWriter:
    def __init__(self, folder: str, fd: int) -> None:
        self._folder = folder
        self._fd = fd
        self._committed = os.fstat(fd).st_size
        self._end = self._committed
        self._written: list[Stored] = []  # appended since the last commit

    def reserve(self, flags: Flags = NO_FLAGS, internaldate: datetime | None = None) -> MboxReservation:
        return MboxReservation(self, internaldate)

    def _intent(self) -> str:
        # Every message of a batch shares the batch's start offset as its intent: that
        # is where recovery cuts back to if the batch never commits.
        return f"{self._folder}@{self._committed}"

    def _append(self, data: bytes, internaldate: datetime | None) -> None:
        chunk = entry(data, internaldate)
        offset = self._end
        try:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            os.ftruncate(self._fd, offset)
            raise
        self._end = offset + len(chunk)
        self._written.append(Stored(f"{self._folder}@{offset}", digest(data)))

    def commit(self) -> list[Stored]:
        os.fsync(self._fd)
        self._committed = self._end
        stored, self._written = self._written, []
        return stored

    def rollback(self) -> None:
        self._written.clear()
        if self._end != self._committed:
            os.ftruncate(self._fd, self._committed)
            os.fsync(self._fd)
            self._end = self._committed


class MboxReservation:
    """A message to append. Its intent is the offset the file was committed up to,
    read when the intent is recorded, so a reservation left unwritten past a commit
    names the new end and recovery never cuts back over what that commit made durable."""

    def __init__(self, writer: MboxWriter, internaldate: datetime | None) -> None:
        self._writer = writer
        self._internaldate = internaldate

    @property
    def location(self) -> str:
        return self._writer._intent()

    def write(self, data: bytes) -> None:
        self._writer._append(data, self._internaldate)
