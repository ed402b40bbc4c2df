"""The rules about message bytes: line ends, header block, Message-ID, digest."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from mailsyncd.message import digest, header_block, message_id, to_lf

LINES = st.lists(st.sampled_from([b"Subject: x", b"Message-ID: <a@b>", b" folded", b"", b"body", b"x\ry"]),
                 max_size=12)


@given(lines=LINES, ending=st.sampled_from([b"\n", b"\r\n"]))
def test_to_lf_turns_crlf_into_lf_and_changes_nothing_else(lines: list[bytes], ending: bytes) -> None:
    lf = b"\n".join(lines)
    assert to_lf(ending.join(lines)) == to_lf(lf)
    assert b"\r\n" not in to_lf(lf)
    assert to_lf(b"a\rb\n") == b"a\rb\n"  # a lone CR stays


def test_header_block_ends_at_the_first_empty_line() -> None:
    assert header_block(b"Subject: a\nFrom: b\n\nbody\n\nmore\n") == b"Subject: a\nFrom: b\n"
    assert header_block(b"Subject: no body\n") == b"Subject: no body\n"


@given(lines=LINES)
def test_the_header_block_is_a_prefix_without_an_empty_line(lines: list[bytes]) -> None:
    data = b"\n".join(lines)
    header = header_block(data)
    assert data.startswith(header)
    assert b"\n\n" not in header


def test_message_id_is_read_from_the_header_block_only_and_unfolded() -> None:
    assert message_id(b"Subject: a\nMessage-Id:  <one@example.org>\n\nbody\n") == "<one@example.org>"
    assert message_id(b"Message-ID:\n <folded@example.org>\nSubject: x\n\n") == "<folded@example.org>"
    assert message_id(b"Subject: a\n\nMessage-ID: <in-the-body@example.org>\n") is None
    assert message_id(b"Message-ID:   \n\n") is None
    assert message_id(b"X-Message-ID: <not@this>\n\n") is None
    assert message_id(b"Message-ID: <\xff@x>\n\n") == "<\ufffd@x>"  # junk never raises


def test_message_id_of_a_fetched_header_field_with_crlf() -> None:
    """What an IMAP server returns for BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]."""
    assert message_id(b"Message-ID: <crlf@example.org>\r\n\r\n") == "<crlf@example.org>"
    assert message_id(b"Message-ID:\r\n\t<folded@example.org>\r\n\r\n") == "<folded@example.org>"
    assert message_id(b"\r\n") is None
    assert message_id(b"") is None


@given(data=st.binary(max_size=200))
def test_message_id_never_raises(data: bytes) -> None:
    found = message_id(data)
    assert found is None or (found and found == found.strip())


def test_digest_is_sha256_hex() -> None:
    assert digest(b"x\n") == hashlib.sha256(b"x\n").hexdigest()
    assert len(digest(b"")) == 64


def test_without_marks_drops_what_sync_tools_and_readers_add_and_nothing_else() -> None:
    from mailsyncd.message import comparable, server_size, without_marks

    server = b"From: a@b\nSubject: Status: fine\nMessage-ID: <x@y>\n\nStatus: in the body stays\n"
    marked = (b"From: a@b\nX-TUID: AbCdEf\nSubject: Status: fine\nMessage-ID: <x@y>\nStatus: RO\n"
              b"X-Status: F\n folded on\nContent-Length: 27\nLines: 1\n\nStatus: in the body stays\n")
    assert without_marks(marked) == server
    assert without_marks(server) == server
    assert comparable(marked + b"\n\n") == server
    assert server_size(server) == len(server.replace(b"\n", b"\r\n"))


def test_the_content_pool_finds_marked_copies_once() -> None:
    from mailsyncd.domain import MessageState, RecordedMessage
    from mailsyncd.message import comparable
    from mailsyncd.sync.batch import ContentPool

    server = b"From: a@b\nMessage-ID: <x@y>\n\nbody\n"
    found = RecordedMessage(1, -1, MessageState.RETIRED, location="cur/a",
                            sha256=digest(comparable(b"X-TUID: q\n" + server)))
    own = RecordedMessage(2, 7, MessageState.RETIRED, location="cur/b", sha256=digest(b"other\n"))
    pool = ContentPool([found, own])
    assert pool.claim(b"unrelated\n") is None
    assert pool.claim(server) == found
    assert pool.claim(server) is None  # claimed at most once
    assert pool.claim(b"other\n") == own


def test_a_copy_holds_the_message_when_only_fields_were_added() -> None:
    from mailsyncd.message import holds

    message = b"From: a@b\nSubject: s\n folded\nMessage-ID: <x@y>\n\nbody\n"
    assert holds(b"Return-Path: <a@b>\nDelivered-To: me\n" + message + b"\n", message)
    assert not holds(message.replace(b"body", b"Body"), message)
    assert not holds(message.replace(b" folded\n", b""), message)  # a field changed, not added
    assert not holds(b"From: a@b\nMessage-ID: <x@y>\n\nbody\n", message)  # fields missing
