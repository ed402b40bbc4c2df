"""Putting mail into the private Dovecot over IMAP, byte for byte.

The helpers speak IMAP over implicit TLS with stdlib :mod:`imaplib`, verifying against the
server's throwaway CA, so they share no protocol code with the client under test.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import ssl
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

from imapclient import imap_utf7

from mailsyncd.testing.launch import DovecotError

Message = tuple[Sequence[str], datetime | None, bytes]  # flags, internaldate, bytes

_APPENDUID = re.compile(rb"\[APPENDUID \d+ ([0-9:,]+)\]")
_BATCH_BYTES = 8 << 20  # a MULTIAPPEND stops growing here, so a big fill never sits in one command
_BATCH_COUNT = 2000


def mailbox(folder: str) -> str:
    """The quoted wire form of a decoded folder name: imaplib sends its arguments verbatim."""
    encoded: str = imap_utf7.encode(folder).decode("ascii")
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check(result: tuple[str, Sequence[object]], what: str) -> Sequence[object]:
    """The data of an imaplib reply, or :class:`DovecotError` naming the command."""
    status, data = result
    if status != "OK":
        raise DovecotError(f"{what} failed: {status} {data!r}")
    return data


@contextlib.contextmanager
def session(
    host: str, port: int, context: ssl.SSLContext, user: str, password: str,
    folder: str | None = None, *, readonly: bool = False,
) -> Iterator[imaplib.IMAP4]:
    """A logged-in IMAPS connection, with ``folder`` selected (or examined) if given."""
    conn = imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=60)
    try:
        conn.login(user, password)
        if folder is not None:
            check(conn.select(mailbox(folder), readonly=readonly), f"SELECT {folder!r}")
        yield conn
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            conn.logout()


def append(conn: imaplib.IMAP4, folder: str, messages: Sequence[Message]) -> list[int]:
    """One MULTIAPPEND with LITERAL+ (a single round trip); returns the UIDs from APPENDUID.

    Written to the socket by hand because imaplib.append() rewrites bare CR and LF to CRLF,
    and test messages must reach the server byte for byte.
    """
    if folder.upper() != "INBOX":
        status, reply = conn.create(mailbox(folder))
        if status != "OK" and b"ALREADYEXISTS" not in b" ".join(r for r in reply if isinstance(r, bytes)):
            raise DovecotError(f"CREATE {folder!r} failed: {reply!r}")
    tag = b"DS%d" % time.monotonic_ns()
    parts = [tag + b" APPEND " + mailbox(folder).encode("ascii")]
    for flags, internaldate, data in messages:
        if flags:
            parts.append(b" (" + " ".join(flags).encode("ascii") + b")")
        if internaldate is not None:
            parts.append(b" " + imaplib.Time2Internaldate(internaldate).encode("ascii"))
        # NUL goes as literal8 (BINARY): Dovecot then stores binary MIME parts base64-encoded,
        # so IMAP and POP3 serve the same bytes. From a plain literal it would store the NUL,
        # but send it as 0x80 over IMAP and as NUL over POP3.
        literal = b" ~{%d+}\r\n" if b"\0" in data else b" {%d+}\r\n"
        parts.append(literal % len(data) + data)
    conn.send(b"".join(parts) + b"\r\n")
    line = b""
    while not line.startswith(tag + b" "):
        line = conn.readline()
        if not line:
            raise DovecotError("connection closed during APPEND")
    match = _APPENDUID.search(line)
    if not line.startswith(tag + b" OK") or match is None:
        raise DovecotError(f"APPEND to {folder!r} failed: {line!r}")
    uids: list[int] = []
    for part in match.group(1).decode("ascii").split(","):
        low, _, high = part.partition(":")
        uids.extend(range(int(low), int(high or low) + 1))
    if len(uids) != len(messages):
        raise DovecotError(f"APPENDUID lists {len(uids)} UIDs for {len(messages)} messages")
    return uids


def append_batches(conn: imaplib.IMAP4, folder: str, messages: Iterable[bytes]) -> list[int]:
    """Append many messages in MULTIAPPEND batches of bounded count and size; returns their UIDs."""
    uids: list[int] = []
    batch: list[Message] = []
    size = 0
    for data in messages:
        batch.append(((), None, data))
        size += len(data)
        if len(batch) >= _BATCH_COUNT or size >= _BATCH_BYTES:
            uids += append(conn, folder, batch)
            batch, size = [], 0
    if batch:
        uids += append(conn, folder, batch)
    return uids
