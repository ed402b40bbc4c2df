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


def digest(data: bytes) -> str:
    """SHA-256 of the stored bytes, in hex: how a local copy is recognised again."""
    return hashlib.sha256(data).hexdigest()
