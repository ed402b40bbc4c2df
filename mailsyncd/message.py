"""PURE rules about message bytes, each written once: what the store keeps (CRLF turned
into LF, nothing else), where the header block ends, what the Message-ID is, and the
digest by which a stored copy is known again, and how a copy another program wrote
(or rewrote) is compared with the server's bytes: without the fields it added, at the
size the server reports.

No I/O and nothing of ours but domain values is imported, so every layer may use these. Large messages
pass through here, so nothing copies a body it does not need: the header block is a
slice up to the first empty line.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import quopri
import re
from collections import Counter

from mailsyncd.domain import MimePart, PartialMessage

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


# --- placeholders: what stands for a message over max_message_size ----------------------

PLACEHOLDER_FIELD = b"X-Mailsyncd-Placeholder"


def placeholder(partial: PartialMessage, how_to_fetch: str) -> bytes:
    """A placeholder's bytes (LF): the message's own header block byte-exact, the marker
    field with the server's size, and a body that keeps the message's MIME structure
    valid, so any reader shows it.

    For a multipart message the body uses the message's own boundary: a note (the list of
    parts and ``how_to_fetch``), then, when text parts were fetched, each of them whole
    and a short stand-in for every part left out. Any other message's body is the note,
    in the message's own Content-Transfer-Encoding, since its Content-Type field (kept
    byte-exact) already speaks for the body.
    """
    header = header_block(to_lf(partial.header)).rstrip(b"\n") + b"\n"
    marked = header + PLACEHOLDER_FIELD + b": %d\n\n" % partial.size
    fields = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header)
    note = _note(partial, how_to_fetch).encode("utf-8")
    boundary = fields.get_boundary() if fields.get_content_maintype() == "multipart" else None
    if not boundary:
        return marked + _encoded(note, str(fields.get("Content-Transfer-Encoding", "")).strip().lower())
    delimiter = b"--" + boundary.encode("ascii", "replace")
    pieces = [_text_part(note)]
    for part in (partial.parts or ()) if partial.texts else ():
        if part.section in partial.texts:
            mime, body = partial.texts[part.section]
            pieces.append(header_block(to_lf(mime)).rstrip(b"\n") + b"\n\n" + to_lf(body))
        else:
            pieces.append(_text_part(f"[left out: {_described(part)}]\n".encode()))
    out = [marked]
    for piece in pieces:
        # The line break before a delimiter belongs to the delimiter (RFC 2046), so it
        # comes on top of the part's own last one.
        out += [delimiter, b"\n", piece, b"\n"]
    out += [delimiter, b"--\n"]
    return b"".join(out)


def _described(part: MimePart) -> str:
    name = f", {part.filename}" if part.filename else ""
    return f"part {part.section}, {part.content_type}{name}, {part.size:,} bytes"


def _note(partial: PartialMessage, how_to_fetch: str) -> str:
    kept = "its header block and text parts were" if partial.texts else "only its header block was"
    lines = [f"This message is {partial.size:,} bytes on the server, over max_message_size, so {kept}",
             "downloaded (mailsyncd keeps this placeholder in its place).", ""]
    if partial.parts is None:
        lines.append("Its parts are not known here: POP3 shows only the header block.")
    else:
        lines.append("Its parts on the server:")
        lines += [f"  {_described(part)}" + (" (kept below)" if part.section in partial.texts else "")
                  for part in partial.parts]
    lines += ["", "To replace this placeholder by the whole message:", f"  {how_to_fetch}", ""]
    return "\n".join(lines)


def _text_part(text: bytes) -> bytes:
    return (b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n"
            b"Content-Disposition: inline\n\n" + text)


def _encoded(text: bytes, transfer_encoding: str) -> bytes:
    if transfer_encoding == "base64":
        return base64.encodebytes(text)
    if transfer_encoding == "quoted-printable":
        return quopri.encodestring(text)
    return text


def without_marks(data: bytes) -> bytes:
    """An LF message without the fields sync tools and mail readers add to a stored copy
    (``_MARKS``, with their folded continuations): the server's bytes again, as far as
    they can be told. Everything else, the body above all, stays byte for byte."""
    if data.startswith(b"\n"):
        return data  # no header fields at all
    header = header_block(data)
    if not _MARKS.search(header):
        return data
    return drop_fields(header, _MARKS) + data[len(header):]


def drop_fields(header: bytes, names: re.Pattern[bytes]) -> bytes:
    """A header block without the fields whose line ``names`` matches at its start, each
    with its folded continuation lines; the other lines byte for byte."""
    kept: list[bytes] = []
    dropping = False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # a folded continuation belongs to the field before
            if not dropping:
                kept.append(line)
            continue
        dropping = bool(names.match(line))
        if not dropping:
            kept.append(line)
    return b"".join(kept)


def comparable(data: bytes) -> bytes:
    """What a stored copy and the server's bytes are compared by: the message without
    the fields other programs add (``without_marks``) and with one line end at its end,
    however many empty lines a store or another program left after it (an mbox ends a
    message with a blank line, and not every writer adds exactly one)."""
    return without_marks(data).rstrip(b"\n") + b"\n"


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
