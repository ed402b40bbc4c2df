"""mboxrd: one file per folder, appended under a dotlock and an fcntl lock, shared with
other programs: a delivery agent appends to the same file, and a mail reader (neomutt,
Dovecot) rewrites it to keep its flags in ``Status:`` fields, which moves every offset.
Hence three rules (invariant 10):

* A batch reaches the file in one append at commit, and only after a *journal* of it
  is durable: where it starts, a digest of the bytes just before that, a digest of each
  page-sized piece (split where the file's pages split, which is where the kernel stops a
  killed writer) and, for each message, its reservation, place, digests and content key.
  The journal is a file beside the mbox, ``.<name>.mailsyncd.lock``: hidden, and named
  like a lock, so neither neomutt (dot files) nor Dovecot (``*.lock``) lists it as a
  folder. Losing it loses no mail: recovery then cuts nothing.
* Recovery cuts back only what the journal proves to be our own unfinished tail: the
  bytes before it unchanged, each piece of it matching, and nothing after it. Whole
  messages of ours are adopted where they lie; everything else stays, and after a
  rewrite our messages are found again by their content key.
* A stored message's location is ``<file>@<offset>#<key>``: the offset of its ``From ``
  line and the start of its content key. A location made stale by a rewrite is found
  again by the key. A pending intent's location is ``<file>@<offset>+<reservation>``:
  where its batch would start, and which reservation of the journal it is.

The bytes are the server's with CRLF turned into LF, mboxrd-escaped, plus (unless
``status_headers`` is off) ``Status:`` and ``X-Status:`` fields at the end of the header
block, so that mail readers show the flags the message had when it was stored. Flags
changed later are kept in the state database only: rewriting the file to change them
would move every other program's offsets. The ``sha256`` handed out is of the message
as the server sent it (LF), without those fields, so a copy can be matched to the
server's bytes; the *content key* leaves out every field mail readers rewrite, so a
copy is known again after they did. A batch is kept in memory until its commit.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from mailsyncd import names
from mailsyncd.domain import NO_FLAGS, Flags, LocalCopy, Stored
from mailsyncd.errors import StoreError
from mailsyncd.fsio import PRIVATE_FILE, fsync_dir, locked_file, make_private_dirs, safe_join
from mailsyncd.message import digest, drop_fields, header_block
from mailsyncd.stores.base import local_copy

log = logging.getLogger(__name__)

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_UNESCAPE = re.compile(rb"^>(>*From )", re.MULTILINE)
_HEADER_SENDER = re.compile(rb"^(?:Return-Path|From):[ \t]*(.*)$", re.MULTILINE | re.IGNORECASE)
# Fields that mutt, neomutt and Dovecot add, drop or rewrite in messages they store in an
# mbox; the content key leaves them out.
_READER_FIELDS = re.compile(rb"(?:status|x-status|content-length|lines|x-uid|x-imap|x-imapbase|x-keywords)[ \t]*:",
                            re.IGNORECASE)
# IMAP flags in X-Status:, in the order and with the letters Dovecot and mutt use.
_X_STATUS = (("\\answered", "A"), ("\\flagged", "F"), ("\\draft", "T"), ("\\deleted", "D"))
_LOCATION = re.compile(r"(\d+)(?:\+([0-9a-f]+\.\d+)|#([0-9a-f]{16}))?")
PAGE = 4096  # where a write cut short by a kill stops, and how much of the bytes before a batch is compared
KEY_LENGTH = 16  # hex digits of the content key kept in a location
PIECE_DIGEST = 16  # hex digits kept per piece: the journal of a 3 MB batch stays near 20 KB


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


def _split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header block with its last newline, the rest from the empty line on); a
    message that starts with an empty line has no header fields at all."""
    if data.startswith(b"\n"):
        return b"", data
    header = header_block(data)
    if not header.endswith(b"\n"):
        header += b"\n"  # a message of header fields only, without a final newline
    return header, data[len(header):]


def status_fields(flags: Flags) -> bytes:
    """``Status:`` (R for \\Seen; O always: nothing we store is new to the reader) and,
    when any of its flags is set, ``X-Status:`` (A, F, T, D), as Dovecot and mutt read them."""
    lowered = {flag.lower() for flag in flags}
    fields = b"Status: " + (b"R" if "\\seen" in lowered else b"") + b"O\n"
    letters = "".join(letter for flag, letter in _X_STATUS if flag in lowered)
    return fields + (f"X-Status: {letters}\n".encode() if letters else b"")


def with_status(data: bytes, flags: Flags) -> bytes:
    """The message with our status fields after its own header fields."""
    header, rest = _split_header(data)
    return header + status_fields(flags) + rest


def strip_status(data: bytes) -> bytes:
    """Undo ``with_status``: the last field is ours ``Status:``, or ours ``X-Status:``
    right after ours ``Status:``; a message's own fields before them stay."""
    header, rest = _split_header(data)
    lines = header.splitlines(keepends=True)
    if lines and lines[-1].startswith(b"X-Status: ") and len(lines) > 1 and lines[-2].startswith(b"Status: "):
        lines.pop()
    if lines and lines[-1].startswith(b"Status: "):
        lines.pop()
    return b"".join(lines) + rest


def content_key(data: bytes) -> str:
    """SHA-256 of a message without the fields mail readers rewrite and without trailing
    empty lines: the same for our copy before and after neomutt or Dovecot saved it."""
    header, rest = _split_header(data)
    return hashlib.sha256(drop_fields(header, _READER_FIELDS) + b"\0" + rest.rstrip(b"\n")).hexdigest()


def _parse_location(location: str) -> tuple[str, int, str | None, str | None]:
    """(file, offset, reservation of a pending intent, key of a stored message)."""
    path, _, rest = location.rpartition("@")
    match = _LOCATION.fullmatch(rest)
    if not path or match is None:
        raise StoreError(f"not an mbox location: {location!r}")
    return path, int(match[1]), match[2], match[3]


def _stored_location(folder: str, offset: int, key: str) -> str:
    return f"{folder}@{offset}#{key[:KEY_LENGTH]}"


def _journal_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.mailsyncd.lock")


def _sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def _piece_digest(data: bytes | bytearray) -> str:
    return _sha(data)[:PIECE_DIGEST]


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        part = os.pread(fd, length, offset)
        if not part:
            break
        parts.append(part)
        length -= len(part)
        offset += len(part)
    return b"".join(parts)


def _before(fd: int, offset: int) -> str:
    """Digest of the page before ``offset``: a rewrite that moved it shows here."""
    start = max(0, offset - PAGE)
    return _sha(_pread_all(fd, offset - start, start))


def _messages(handle: IO[bytes], start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset of the ``From `` line, message unescaped without the blank line that
    ends it) for each message from ``start`` on; bytes before the first ``From ``
    line (a torn or foreign start) are passed over."""
    handle.seek(start)
    offset = start
    current: int | None = None
    lines: list[bytes] = []
    at_line_start = True
    for line in handle:
        if at_line_start and line.startswith(b"From "):
            if current is not None:
                yield current, _message_bytes(lines)
            current, lines = offset, []
        elif current is not None:
            lines.append(line)
        at_line_start = line.endswith(b"\n")
        offset += len(line)
    if current is not None:
        yield current, _message_bytes(lines)


def _message_bytes(lines: list[bytes]) -> bytes:
    body = b"".join(lines)
    return unescape(body[:-1] if body.endswith(b"\n\n") else body)


@dataclass(frozen=True)
class _Journalled:
    """One message of a journalled batch: its place in the batch's chunk."""

    reservation: str
    start: int
    length: int
    entry_sha256: str  # of its bytes in the file
    sha256: str  # of the message as the server sent it (Stored.sha256)
    key: str  # content_key


@dataclass(frozen=True)
class _Journal:
    offset: int
    length: int
    before: str
    pieces: tuple[tuple[int, str], ...]  # (end within the chunk, digest) of each page-aligned piece
    messages: tuple[_Journalled, ...]

    @classmethod
    def of(cls, fd: int, offset: int, chunk: bytes | bytearray, messages: tuple[_Journalled, ...]) -> _Journal:
        ends = [*range(PAGE - offset % PAGE, len(chunk), PAGE), len(chunk)]
        pieces = tuple((end, _piece_digest(chunk[start:end])) for start, end in zip([0, *ends], ends, strict=False)
                       if end > start)
        return cls(offset, len(chunk), _before(fd, offset), pieces, messages)

    def dump(self) -> bytes:
        text = json.dumps({"offset": self.offset, "length": self.length, "before": self.before,
                           "pieces": self.pieces, "messages": [vars(m) for m in self.messages]},
                          separators=(",", ":"))
        return f"{_sha(text.encode())} {text}\n".encode()

    @classmethod
    def load(cls, path: Path) -> _Journal | None:
        """None when there is none, or it is torn (a kill while writing it, so before
        the append it describes began)."""
        try:
            check, _, text = path.read_bytes().rstrip(b"\n").partition(b" ")
        except FileNotFoundError:
            return None
        if _sha(text) != check.decode("ascii", "replace"):
            return None
        try:
            raw: dict[str, Any] = json.loads(text)
            return cls(raw["offset"], raw["length"], raw["before"], tuple((end, sha) for end, sha in raw["pieces"]),
                       tuple(_Journalled(**m) for m in raw["messages"]))
        except (ValueError, KeyError, TypeError):  # not a journal this version wrote: proves nothing
            return None

    def proven(self, fd: int, size: int) -> tuple[int, list[_Journalled]]:
        """How many bytes from ``offset`` on are provably the start of this chunk, and
        the messages whole in the file as written. Whole messages prove themselves; a
        torn one's page-aligned pieces prove the part that reached the file."""
        whole: list[_Journalled] = []
        padding = self.messages[0].start  # newlines before our first From line
        proven = padding if _pread_all(fd, padding, self.offset) == b"\n" * padding else 0
        for message in self.messages if proven == padding else ():
            if _sha(_pread_all(fd, message.length, self.offset + message.start)) != message.entry_sha256:
                break
            whole.append(message)
            proven = message.start + message.length
        start = 0
        for end, piece in self.pieces:
            if self.offset + end > size or _piece_digest(_pread_all(fd, end - start, self.offset + start)) != piece:
                break
            proven, start = max(proven, end), end
        return proven, whole


class MboxStore:
    def __init__(self, root: Path, status_headers: bool = True) -> None:
        self.root = root
        self.status_headers = status_headers
        self._writing: dict[Path, int] = {}  # files this process holds locked, by path
        self._index: dict[Path, tuple[tuple[int, int], dict[str, list[int]]]] = {}

    def folder_path(self, name: str, delimiter: str | None) -> str:
        return names.folder_path(name, delimiter, "mbox")

    @contextlib.contextmanager
    def open_folder(self, folder: str) -> Iterator[MboxWriter]:
        path = safe_join(self.root, folder)
        make_private_dirs(path.parent)
        with locked_file(path) as fd:
            writer = MboxWriter(folder, fd, _journal_path(path), self.status_headers)
            self._writing[path] = fd
            try:
                yield writer
            finally:
                del self._writing[path]
                writer.rollback()

    @contextlib.contextmanager
    def _reading(self, path: Path) -> Iterator[IO[bytes]]:
        """The file for reading. A file this process holds locked is read through the
        locked descriptor, never opened again: closing any descriptor of a file drops
        every fcntl lock the process holds on it."""
        fd = self._writing.get(path)
        with open(fd, "rb", closefd=False) if fd is not None else open(path, "rb") as handle:
            yield handle

    def recover(self, pending: Iterable[str]) -> dict[str, Stored]:
        """Pending intents are grouped by file; a file whose journal names the batch they
        belong to is recovered as the module's note says. An intent no journal names was
        never appended (its batch's journal is written before the append), so nothing is
        cut for it."""
        by_file: dict[str, dict[str, tuple[int, str | None]]] = {}
        for location in pending:
            folder, offset, reservation, _ = _parse_location(location)
            by_file.setdefault(folder, {})[location] = (offset, reservation)
        found: dict[str, Stored] = {}
        for folder, intents in by_file.items():
            path = safe_join(self.root, folder)
            journal = _Journal.load(_journal_path(path))
            if not path.exists() or journal is None or journal.offset not in {o for o, _ in intents.values()}:
                continue
            with locked_file(path) as fd:
                adopted = self._recover_batch(folder, path, fd, journal)
            found.update((location, adopted[reservation]) for location, (offset, reservation) in intents.items()
                         if offset == journal.offset and reservation in adopted)
        return found

    def _recover_batch(self, folder: str, path: Path, fd: int, journal: _Journal) -> dict[str, Stored]:
        size = os.fstat(fd).st_size
        unmoved = size >= journal.offset and _before(fd, journal.offset) == journal.before
        proven, whole = journal.proven(fd, size) if unmoved else (0, [])
        end = whole[-1].start + whole[-1].length if whole else 0
        if unmoved and proven >= size - journal.offset:
            # All that follows the batch's start is provably ours: keep its whole
            # messages, cut off the torn one.
            if size > journal.offset + end:
                os.ftruncate(fd, journal.offset + end)
                os.fsync(fd)
            rest: list[_Journalled] = []
        else:
            # Another program appended or rewrote: cut nothing, find the rest by content.
            rest = list(journal.messages[len(whole):])
        adopted = {m.reservation: Stored(_stored_location(folder, journal.offset + m.start, m.key), m.sha256)
                   for m in whole}
        if rest:
            self._writing[path] = fd
            try:
                adopted.update(self._find_again(folder, path, journal.offset + end if unmoved else 0, rest))
            finally:
                del self._writing[path]
            if len(adopted) < len(journal.messages):
                log.warning("%s: another program changed the file after an interrupted append; nothing was cut, "
                            "%d of its %d messages will be fetched again", folder,
                            len(journal.messages) - len(adopted), len(journal.messages))
        return adopted

    def _find_again(self, folder: str, path: Path, start: int, wanted: list[_Journalled]) -> dict[str, Stored]:
        """Journalled messages found by content key from ``start`` on. The last copies
        are taken, in the batch's order: what a batch appended comes after what was there
        before, and readers keep the order of messages when they rewrite a file."""
        with self._reading(path) as handle:
            found = [(offset, content_key(data)) for offset, data in _messages(handle, start)]
        adopted: dict[str, Stored] = {}
        position = len(found)
        for message in reversed(wanted):
            for index in range(position - 1, -1, -1):
                offset, key = found[index]
                if key == message.key:
                    adopted[message.reservation] = Stored(_stored_location(folder, offset, key), message.sha256)
                    position = index
                    break
        return adopted

    def _locate(self, location: str) -> tuple[str, bytes] | None:
        """The message's current location and bytes: at its recorded offset when the
        content key there agrees, else wherever the key is now (a reader rewrote the file)."""
        folder, offset, _, key = _parse_location(location)
        path = safe_join(self.root, folder)
        with contextlib.suppress(FileNotFoundError), self._reading(path) as handle:
            candidates = [offset]
            if key is not None:
                candidates += [other for other in self._offsets(path, handle).get(key, []) if other != offset]
            for candidate in candidates:
                if candidate:  # a message starts a line
                    handle.seek(candidate - 1)
                    if handle.read(1) != b"\n":
                        continue
                for found, data in _messages(handle, candidate):
                    current = content_key(data)
                    if found == candidate and (key is None or current.startswith(key)):
                        return _stored_location(folder, found, current), data
                    break
        return None

    def _offsets(self, path: Path, handle: IO[bytes]) -> dict[str, list[int]]:
        """Offsets by key of every message in the file, kept while the file is unchanged."""
        stat = os.fstat(handle.fileno())
        version = (stat.st_size, stat.st_mtime_ns)
        cached = self._index.get(path)
        if cached is None or cached[0] != version:
            offsets: dict[str, list[int]] = {}
            for offset, data in _messages(handle):
                offsets.setdefault(content_key(data)[:KEY_LENGTH], []).append(offset)
            cached = self._index[path] = (version, offsets)
        return cached[1]

    def index(self, folder: str) -> list[LocalCopy]:
        """Every message of the file, located by offset and content key, whoever wrote
        it; the status fields we or a mail reader added are left out of the comparison."""
        path = safe_join(self.root, folder)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError), self._reading(path) as handle:
            return [local_copy(_stored_location(folder, offset, content_key(data)), data)
                    for offset, data in _messages(handle)]
        return []

    def read(self, location: str) -> bytes:
        """The message, without the status fields we added to it."""
        found = self._locate(location)
        if found is None:
            raise StoreError(f"message missing from the store: {location}")
        return strip_status(found[1]) if self.status_headers else found[1]

    def set_flags(self, location: str, flags: Flags) -> str:
        """Flags stay in the state database (see the module's note); the location is
        brought up to date if a mail reader moved the message."""
        found = self._locate(location)
        return location if found is None else found[0]

    def flags(self, location: str) -> Flags:
        """Not read back: an mbox store never holds placeholders, the one use of this."""
        return NO_FLAGS

    def remove(self, location: str) -> None:
        raise StoreError("mbox stores are append-only; mode = \"mirror\" needs a Maildir store")


class MboxWriter:
    """Collects a batch in memory and appends it at commit, after its journal."""

    def __init__(self, folder: str, fd: int, journal: Path, status_headers: bool) -> None:
        self._folder = folder
        self._fd = fd
        self._journal = journal
        self._status_headers = status_headers
        self._committed = os.fstat(fd).st_size
        self._chunk = bytearray()
        self._messages: list[_Journalled] = []
        self._batch = secrets.token_hex(4)  # no reservation of another batch or run has this tag
        self._reserved = 0

    def reserve(self, flags: Flags = NO_FLAGS, internaldate: datetime | None = None) -> MboxReservation:
        self._reserved += 1
        return MboxReservation(self, f"{self._batch}.{self._reserved}", flags, internaldate)

    def replace(self, location: str) -> MboxReservation:
        """Refused: a message in the middle of an mbox cannot be replaced without
        rewriting the file around it, under the noses of its other writers (config.py
        keeps placeholders out of mbox stores for this)."""
        raise StoreError(f"an mbox store cannot replace a message in place: {location}")

    def _intent(self, reservation: str) -> str:
        # Where the batch will start, and which of its reservations this is: recovery
        # finds the reservation in the journal of the batch that starts there.
        return f"{self._folder}@{self._committed}+{reservation}"

    def _add(self, reservation: str, data: bytes, flags: Flags, internaldate: datetime | None) -> None:
        written = entry(with_status(data, flags) if self._status_headers else data, internaldate)
        self._messages.append(_Journalled(reservation, len(self._chunk), len(written), _sha(written), digest(data),
                                          content_key(data)))
        self._chunk += written

    def commit(self) -> list[Stored]:
        """Journal (durable), then append, then fsync. Order is important: an append
        without its journal could never be proven ours, so it could never be cut back."""
        if not self._messages:
            return []
        offset = os.fstat(self._fd).st_size
        padding = _padding(self._fd, offset)
        messages = tuple(_Journalled(m.reservation, m.start + len(padding), m.length, m.entry_sha256, m.sha256,
                                     m.key) for m in self._messages)
        self._chunk[:0] = padding
        self._write_journal(_Journal.of(self._fd, offset, self._chunk, messages))
        try:
            _write_all(self._fd, self._chunk)
            os.fsync(self._fd)
        except BaseException:
            # Still under our lock, so nothing after ``offset`` is another program's.
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
            raise
        finally:
            self._chunk = bytearray()
            self._messages = []
        self._committed = offset + sum((m.length for m in messages), len(padding))
        self._batch, self._reserved = secrets.token_hex(4), 0
        return [Stored(_stored_location(self._folder, offset + m.start, m.key), m.sha256) for m in messages]

    def _write_journal(self, journal: _Journal) -> None:
        created = not self._journal.exists()
        fd = os.open(self._journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(journal.dump())
            handle.flush()
            os.fsync(fd)
        if created:
            fsync_dir(self._journal.parent)

    def rollback(self) -> None:
        """Nothing reaches the file before commit, so there is nothing to undo there."""
        self._chunk = bytearray()
        self._messages = []


def _padding(fd: int, size: int) -> bytes:
    """Newlines that make our ``From `` line start a line after an empty one, whatever
    another program left at the end of the file."""
    if size == 0:
        return b""
    tail = _pread_all(fd, min(size, 2), size - min(size, 2))
    if tail.endswith(b"\n\n") or tail == b"\n":
        return b""
    return b"\n" if tail.endswith(b"\n") else b"\n\n"


class MboxReservation:
    """A message to append. Its intent names the offset the file was committed up to,
    read when the intent is recorded, so a reservation left unwritten past a commit
    names the new end, where no journal has it, and recovery leaves the file alone."""

    def __init__(self, writer: MboxWriter, tag: str, flags: Flags, internaldate: datetime | None) -> None:
        self._writer = writer
        self._tag = tag
        self._flags = flags
        self._internaldate = internaldate

    @property
    def location(self) -> str:
        return self._writer._intent(self._tag)

    def write(self, data: bytes) -> None:
        self._writer._add(self._tag, data, self._flags, self._internaldate)
