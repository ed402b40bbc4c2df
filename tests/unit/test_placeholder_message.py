"""The placeholder's bytes (pure): the header block byte-exact, the marker, and a body
that keeps the message's MIME structure valid for any reader."""

from __future__ import annotations

import base64
import email
import email.policy

from mailsyncd.domain import MimePart, PartialMessage
from mailsyncd.message import placeholder

MIXED = (b"From: a@example.org\r\nSubject: Report\r\nMIME-Version: 1.0\r\n"
         b'Content-Type: multipart/mixed;\r\n boundary="XYZ"\r\n\r\n')
PARTS = (MimePart("1", "text/plain", 40), MimePart("2", "application/pdf", 3_000_000, "r\u00e9sum\u00e9.pdf", True))


def test_multipart_placeholder_keeps_the_header_block_and_the_boundary() -> None:
    data = placeholder(PartialMessage(MIXED, 3_001_000, PARTS), "mailsyncd fetch acct INBOX --uid 7")
    header = MIXED.replace(b"\r\n", b"\n")[:-1]
    assert data.startswith(header + b"X-Mailsyncd-Placeholder: 3001000\n\n")
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.get_boundary() == "XYZ" and not parsed.defects
    note = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "part 2, application/pdf, r\u00e9sum\u00e9.pdf, 3,000,000 bytes" in note
    assert "mailsyncd fetch acct INBOX --uid 7" in note


def test_text_parts_kept_and_attachments_stood_for() -> None:
    texts = {"1": (b"Content-Type: text/plain\r\n\r\n", b"Hello\r\n")}
    data = placeholder(PartialMessage(MIXED, 3_001_000, PARTS, texts), "how")
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    bodies = [part.get_content() for part in parsed.iter_parts()]  # type: ignore[attr-defined]
    assert len(bodies) == 3 and bodies[1] == "Hello\n" and bodies[2].startswith("[left out: part 2,")


def test_single_part_placeholder_speaks_the_message_transfer_encoding() -> None:
    header = b"Subject: Scan\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
    data = placeholder(PartialMessage(header, 9_000_000, (MimePart("1", "application/pdf", 8_999_000),)), "how")
    body = data.split(b"\n\n", 1)[1]
    assert b"over max_message_size" in base64.b64decode(body)
    pop = placeholder(PartialMessage(b"Subject: x\n\n", 5_000_000), "how")
    assert b"POP3 shows only the header block" in pop
