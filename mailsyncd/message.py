"""PURE rules about message bytes, each written once: what the store keeps (CRLF turned
into LF, nothing else), where the header block ends, what the Message-ID is, and the
digest by which a stored copy is known again.

No I/O and nothing of ours is imported, so every layer may use these. Large messages
pass through here, so nothing copies a body it does not need: the header block is a
slice up to the first empty line.
"""

from __future__ import annotations

import hashlib
import re

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(.*(?:\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def to_lf(raw: bytes) -> bytes:
    """What the store keeps: the server's bytes with CRLF turned into LF, nothing else."""
    return raw.replace(b"\r\n", b"\n")


def header_block(data: bytes) -> bytes:
    """The header block of an LF message, up to and including the newline of its last
    field; the whole of ``data`` when it has no empty line (a message without a body)."""
    end = data.find(b"\n\n")
    return data if end < 0 else data[:end + 1]


def message_id(data: bytes) -> str | None:
    """The Message-ID of a message (or of its header block, or of one fetched header
    field, CRLF or LF), unfolded, or None; never raises on junk."""
    match = _MESSAGE_ID.search(header_block(data))
    if not match:
        return None
    value = b" ".join(match.group(1).split()).decode("utf-8", "replace").strip()
    return value or None


_LINE_END = re.compile(rb"\r\n|\r|\n")


def to_crlf(data: bytes) -> bytes:
    """The bytes an IMAP APPEND sends for a stored message: every line end as CRLF."""
    return _LINE_END.sub(b"\r\n", data)


def server_size(data: bytes) -> int:
    """The RFC822.SIZE a server reports for these bytes once appended (``to_crlf``),
    without building the copy: how a local file is matched with a server message."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n") + data.count(b"\r") - data.count(b"\r\n")


def digest(data: bytes) -> str:
    """SHA-256 of the stored bytes, in hex: how a local copy is recognised again."""
    return hashlib.sha256(data).hexdigest()
