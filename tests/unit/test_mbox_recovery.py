"""mbox recovery next to other programs: it cuts back only a tail it can prove it wrote,
finds its messages again by content after a mail reader rewrote the file, and never
removes a byte another program wrote (invariant 10). Also the Status:/X-Status: fields
written at append time, as the standard library's mailbox module reads them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mailbox
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailsyncd.domain import NO_FLAGS, Flags
from mailsyncd.stores import mbox
from mailsyncd.stores.mbox import MboxStore
from tests.helpers import rewrite_like_a_mail_reader

WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
FOREIGN = (b"From mda@example.org Tue May  7 10:00:00 2024\n"
           b"From: mda@example.org\nSubject: delivered by another program\n\nhello\n\n")


def message(index: int, size: int = 3000) -> bytes:
    body = b"".join(b"line %d of message %d\n" % (line, index) for line in range(size // 24))
    return (b"From: sender%d@example.org\nMessage-ID: <m%d@example.org>\nSubject: message %d\n\n"
            % (index, index, index)) + b"From the start, a line to escape\n" + body


def commit_batch(store: MboxStore, messages: Sequence[bytes], flags: Flags = NO_FLAGS) -> tuple[list[str], list[str]]:
    """(pending locations as recorded before the write, stored locations) of one batch."""
    with store.open_folder("INBOX") as writer:
        reservations = [writer.reserve(flags, WHEN) for _ in messages]
        pending = [reservation.location for reservation in reservations]
        for reservation, data in zip(reservations, messages, strict=True):
            reservation.write(data)
        stored = writer.commit()
    return pending, [s.location for s in stored]


def killed_during_append(store: MboxStore, messages: Sequence[bytes], written: Callable[[int], int]) -> list[str]:
    """A child process commits one batch and is killed (os._exit) after ``written(n)``
    of the chunk's n bytes reached the file; returns the intents it had recorded."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)

        def torn(fd: int, data: bytes) -> None:
            os.write(fd, data[:written(len(data))])
            os._exit(9)

        try:
            mbox._write_all = torn  # type: ignore[assignment]
            with store.open_folder("INBOX") as writer:
                reservations = [writer.reserve(NO_FLAGS, WHEN) for _ in messages]
                os.write(write_end, json.dumps([r.location for r in reservations]).encode())
                for reservation, data in zip(reservations, messages, strict=True):
                    reservation.write(data)
                writer.commit()
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    pending: list[str] = json.loads(os.read(read_end, 1 << 16))
    os.close(read_end)
    assert os.WEXITSTATUS(status) == 9, "the child was not stopped inside the append"
    return pending


def messages_in(path: Path) -> list[bytes]:
    box = mailbox.mbox(path, create=False)
    try:
        return [mbox.strip_status(mbox.unescape(box.get_bytes(key)))
                for key in box.keys()]  # noqa: SIM118 - a mailbox, not a dict
    finally:
        box.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a kill after the append, then another program ----------------------------------------


def test_a_message_appended_by_another_program_after_a_kill_is_kept(tmp_path: Path) -> None:
    store = MboxStore(tmp_path)
    commit_batch(store, [message(0)])
    batch = [message(1), message(2)]
    pending, _ = commit_batch(store, batch)  # killed before the state database heard of it
    with (tmp_path / "INBOX").open("ab") as handle:  # a delivery agent appends under the lock
        handle.write(FOREIGN)
    before = (tmp_path / "INBOX").read_bytes()

    found = store.recover(pending)

    assert (tmp_path / "INBOX").read_bytes() == before, "recovery changed bytes another program wrote"
    assert set(found) == set(pending)  # both whole: adopted, not fetched again
    assert [store.read(found[location].location) for location in pending] == batch
    assert [found[location].sha256 for location in pending] == [digest(data) for data in batch]


def test_after_a_rewrite_messages_are_found_again_by_content(tmp_path: Path) -> None:
    store = MboxStore(tmp_path)
    _, earlier = commit_batch(store, [message(0), message(1)])
    batch = [message(2), message(3)]
    pending, _ = commit_batch(store, batch)  # killed before it was recorded
    rewrite_like_a_mail_reader(tmp_path / "INBOX")
    before = (tmp_path / "INBOX").read_bytes()

    found = store.recover(pending)

    assert (tmp_path / "INBOX").read_bytes() == before
    assert set(found) == set(pending)
    for location, data in zip(pending, batch, strict=True):
        assert mbox.content_key(store.read(found[location].location)) == mbox.content_key(data)
    # Messages stored before the rewrite are found although every offset moved ...
    for location, data in zip(earlier, [message(0), message(1)], strict=True):
        assert mbox.content_key(store.read(location)) == mbox.content_key(data)
    # ... and a new append after the rewrite lands whole and is found.
    _, [later] = commit_batch(store, [message(4)])
    assert store.read(later) == message(4)
    assert len(messages_in(tmp_path / "INBOX")) == 5


def test_an_append_after_a_file_that_does_not_end_in_a_newline_lands_whole(tmp_path: Path) -> None:
    store = MboxStore(tmp_path)
    (tmp_path / "INBOX").write_bytes(FOREIGN.rstrip(b"\n"))
    _, [location] = commit_batch(store, [message(1)])
    assert store.read(location) == message(1)
    assert messages_in(tmp_path / "INBOX")[1] == message(1)
    assert (tmp_path / "INBOX").read_bytes().startswith(FOREIGN.rstrip(b"\n"))


# --- a kill inside the append -----------------------------------------------------------


def test_a_torn_tail_of_our_own_is_cut_back(tmp_path: Path) -> None:
    store = MboxStore(tmp_path)
    commit_batch(store, [message(0)])
    size = (tmp_path / "INBOX").stat().st_size
    batch = [message(1), message(2), message(3)]
    # The kernel stops a killed writer at a page boundary: two thirds of the chunk, page-aligned.
    pending = killed_during_append(store, batch, lambda n: ((size + 2 * n // 3) // 4096 * 4096) - size)
    assert (tmp_path / "INBOX").stat().st_size > size

    found = store.recover(pending)

    whole = [location for location in pending if location in found]
    assert [store.read(found[location].location) for location in whole] == batch[:len(whole)]
    assert messages_in(tmp_path / "INBOX") == [message(0), *batch[:len(whole)]], "a torn message was left"
    assert store.recover(pending) == found  # idempotent: a second start changes nothing


def test_nothing_is_cut_when_the_append_never_began(tmp_path: Path) -> None:
    store = MboxStore(tmp_path)
    commit_batch(store, [message(0)])
    before = (tmp_path / "INBOX").read_bytes()
    pending = killed_during_append(store, [message(1)], lambda n: 0)
    with (tmp_path / "INBOX").open("ab") as handle:
        handle.write(FOREIGN)
    assert store.recover(pending) == {}
    assert (tmp_path / "INBOX").read_bytes() == before + FOREIGN


def test_a_torn_tail_followed_by_another_programs_message_is_left_alone(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = MboxStore(tmp_path)
    commit_batch(store, [message(0)])
    size = (tmp_path / "INBOX").stat().st_size
    batch = [message(1), message(2), message(3)]
    pending = killed_during_append(store, batch, lambda n: ((size + 2 * n // 3) // 4096 * 4096) - size)
    with (tmp_path / "INBOX").open("ab") as handle:
        handle.write(b"\n" + FOREIGN)
    before = (tmp_path / "INBOX").read_bytes()

    with caplog.at_level(logging.WARNING, logger="mailsyncd"):
        found = store.recover(pending)

    assert (tmp_path / "INBOX").read_bytes() == before, "recovery cut bytes another program wrote"
    assert 0 < len(found) < len(batch)
    assert "another program changed the file after an interrupted append; nothing was cut" in caplog.text
    assert [store.read(found[location].location) for location in pending if location in found] == \
        batch[:len(found)]


def test_a_tail_that_differs_from_what_was_journalled_is_not_cut(tmp_path: Path) -> None:
    """Same length as our append, other bytes: not provably ours, so it stays."""
    store = MboxStore(tmp_path)
    commit_batch(store, [message(0)])
    size = (tmp_path / "INBOX").stat().st_size
    pending = killed_during_append(store, [message(1)], lambda n: 0)
    chunk = mbox.entry(mbox.with_status(message(1), NO_FLAGS), WHEN)
    other = FOREIGN + b"x" * (len(chunk) - len(FOREIGN) - 1) + b"\n"
    with (tmp_path / "INBOX").open("ab") as handle:
        handle.write(other)
    assert (tmp_path / "INBOX").stat().st_size == size + len(chunk)
    assert store.recover(pending) == {}
    assert (tmp_path / "INBOX").read_bytes()[size:] == other


# --- Status: and X-Status: ------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "mailbox_flags", "fields"), [
    (set(), "O", b"Status: O\n"),
    ({"\\Seen"}, "RO", b"Status: RO\n"),
    ({"\\Flagged"}, "OF", b"Status: O\nX-Status: F\n"),
    ({"\\Seen", "\\Answered", "\\Flagged", "\\Draft", "\\Deleted"}, "ROAFTD", b"Status: RO\nX-Status: AFTD\n"),
    ({"$Forwarded", "custom"}, "O", b"Status: O\n"),
])
def test_flags_are_written_as_status_fields_that_readers_understand(tmp_path: Path, flags: set[str],
                                                                    mailbox_flags: str, fields: bytes) -> None:
    store = MboxStore(tmp_path)
    data = message(1)
    _, [location] = commit_batch(store, [data], frozenset(flags))
    box = mailbox.mbox(tmp_path / "INBOX", create=False)
    try:
        [read] = list(box)
    finally:
        box.close()
    assert sorted(read.get_flags()) == sorted(mailbox_flags)
    assert read.get_from() == "sender1@example.org Mon May 06 07:08:09 2024"
    assert store.read(location) == data  # the message as the server sent it
    header = mbox.unescape(bytes(read)).partition(b"\n\n")[0] + b"\n"
    assert header.endswith(b"\nSubject: message 1\n" + fields)  # at the end of the header block
    assert mbox.strip_status(mbox.with_status(data, frozenset(flags))) == data


def test_status_fields_go_after_the_messages_own_and_are_taken_off_exactly(tmp_path: Path) -> None:
    own = b"Subject: had its own\nStatus: RO\nX-Status: F\n\nbody\n"
    assert mbox.with_status(own, frozenset()) == b"Subject: had its own\nStatus: RO\nX-Status: F\nStatus: O\n\nbody\n"
    assert mbox.strip_status(mbox.with_status(own, frozenset())) == own
    headers_only = b"Subject: no body"
    assert mbox.strip_status(mbox.with_status(headers_only, frozenset({"\\Seen"}))) == headers_only + b"\n"


def test_status_headers_off_keeps_the_bytes_exact(tmp_path: Path) -> None:
    store = MboxStore(tmp_path, status_headers=False)
    data = message(1)
    _, [location] = commit_batch(store, [data], frozenset({"\\Seen"}))
    assert (tmp_path / "INBOX").read_bytes() == mbox.entry(data, WHEN)
    assert store.read(location) == data


def test_a_torn_journal_proves_nothing(tmp_path: Path) -> None:
    """A kill while the journal was written came before the append it describes."""
    store = MboxStore(tmp_path)
    pending, _ = commit_batch(store, [message(1)])
    journal = tmp_path / ".INBOX.mailsyncd.lock"
    journal.write_bytes(journal.read_bytes()[:-40])
    before = (tmp_path / "INBOX").read_bytes()
    assert store.recover(pending) == {}
    assert (tmp_path / "INBOX").read_bytes() == before


def test_a_location_recorded_before_keys_were_kept_still_reads(tmp_path: Path) -> None:
    store = MboxStore(tmp_path)
    _, [_, second] = commit_batch(store, [message(1), message(2)])
    legacy = second.partition("#")[0]
    assert store.read(legacy) == message(2)
    assert store.set_flags(legacy, frozenset()) == second  # brought up to date
