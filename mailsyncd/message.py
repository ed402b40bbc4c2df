"""PURE rules about message bytes, each written once: what the store keeps (CRLF turned
into LF, nothing else), where the header block ends, what the Message-ID is, and the
digest by which a stored copy is known again, and how a copy another program wrote
(or rewrote) is compared with the server's bytes: without the fields it added, at the
size the server reports.

No I/O and nothing of ours is imported, so every layer may use these. Large messages
pass through here, so nothing copies a body it does not need: the header block is a
slice up to the first empty line.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(.*(?:\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
# Header fields other programs add to a stored copy, never part of what a server sent:
# mbsync's X-TUID and offlineimap's X-OfflineIMAP, and the flag and length fields that
# mutt, neomutt and Dovecot (and mailsyncd's own mbox store) keep in an mbox.
_MARKS = re.compile(rb"(?:x-tuid|x-offlineimap|status|x-status|x-keywords|x-uid|x-imap|x-imapbase|content-length"
                    rb"|lines)[ \t]*:", re.IGNORECASE)


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


def without_marks(data: bytes) -> bytes:
    """An LF message without the fields sync tools and mail readers add to a stored copy
    (``_MARKS``, with their folded continuations): the server's bytes again, as far as
    they can be told. Everything else, the body above all, stays byte for byte."""
    if data.startswith(b"\n"):
        return data  # no header fields at all
    header = header_block(data)
    if not _MARKS.search(header):
        return data
    kept: list[bytes] = []
    dropping = False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # a folded continuation belongs to the field before
            if not dropping:
                kept.append(line)
            continue
        dropping = bool(_MARKS.match(line))
        if not dropping:
            kept.append(line)
    return b"".join(kept) + data[len(header):]


def comparable(data: bytes) -> bytes:
    """What a stored copy and the server's bytes are compared by: the message without
    the fields other programs add (``without_marks``) and with one line end at its end,
    however many empty lines a store or another program left after it (an mbox ends a
    message with a blank line, and not every writer adds exactly one)."""
    return without_marks(data).rstrip(b"\n") + b"\n"


def wire_size(data: bytes) -> int:
    """The RFC822.SIZE (or POP3 LIST size) a server reports for an LF message: each line
    end counted as CRLF."""
    return len(data) + data.count(b"\n")


def _fields(header: bytes) -> Counter[bytes]:
    """The header fields of a header block, each with its continuation lines."""
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return Counter(fields)


def holds(copy: bytes, message: bytes) -> bool:
    """Whether a stored ``copy`` is ``message`` (both LF) with header fields added and
    nothing else changed: every field of the message still there byte for byte, and the
    same body (trailing empty lines aside). This is how a copy is known whose tool added
    fields no list names, such as the Delivered-To:, Return-Path: and Received: that
    getmail puts on top of what it stores."""
    if copy.startswith(b"\n") or message.startswith(b"\n"):
        return copy.rstrip(b"\n") == message.rstrip(b"\n")
    copy_header, message_header = header_block(copy), header_block(message)
    if copy[len(copy_header):].rstrip(b"\n") != message[len(message_header):].rstrip(b"\n"):
        return False
    return not _fields(message_header) - _fields(copy_header)
