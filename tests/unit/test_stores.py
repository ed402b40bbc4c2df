"""Maildir and mbox writers on a real filesystem: exact bytes, flags, recovery."""

from __future__ import annotations

import hashlib
import mailbox
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from mailsyncd.stores import mbox
from mailsyncd.stores.maildir import MaildirStore, info_letters
from mailsyncd.stores.mbox import MboxStore

WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
LINES = st.lists(st.sampled_from([b"From me", b">From x", b">>From y", b"From", b"body", b"", b".", b"x From y"]),
                 max_size=12)


@given(lines=LINES)
def test_mboxrd_escaping_round_trips(lines: list[bytes]) -> None:
    data = b"\n".join(lines)
    escaped = mbox.escape(data)
    assert mbox.unescape(escaped) == data
    assert not any(line.startswith(b"From ") for line in escaped.split(b"\n"))


def test_maildir_writes_nothing_visible_before_commit(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path)
    with store.open_folder("") as writer:
        reservation = writer.reserve(frozenset())
        location = reservation.location
        reservation.write(b"x\n")
        assert not (tmp_path / location).exists()
        assert len(os.listdir(tmp_path / "tmp")) == 1
    assert not os.listdir(tmp_path / "tmp") and not os.listdir(tmp_path / "new")  # left without commit


def test_maildir_add_is_exact_private_and_dated(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "mail")
    data = b"Subject: hi\n\nbody\r\nwith a CR kept\n"
    with store.open_folder(".A") as writer:
        reservation = writer.reserve(frozenset({"\\Seen", "\\Flagged"}), WHEN)
        location = reservation.location
        reservation.write(data)
        [stored] = writer.commit()
    assert location.startswith(".A/cur/") and location.endswith(":2,FS")
    path = tmp_path / "mail" / stored.location
    assert path.read_bytes() == data
    assert path.stat().st_mtime == WHEN.timestamp()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "mail" / ".A").stat().st_mode) == 0o700
    assert not os.listdir(tmp_path / "mail" / ".A" / "tmp")


def test_maildir_flags_follow_a_reader_that_moved_the_file(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path)
    with store.open_folder("") as writer:
        reservation = writer.reserve(frozenset())
        location = reservation.location
        reservation.write(b"x\n")
        writer.commit()
    assert location.startswith("new/")
    # A mail reader moves it to cur/ and marks it seen.
    name = location.split("/")[1]
    os.rename(tmp_path / location, tmp_path / "cur" / f"{name}:2,S")
    moved = store.set_flags(location, frozenset({"\\Answered", "\\Seen"}))
    assert moved == f"cur/{name}:2,RS"
    assert (tmp_path / moved).read_bytes() == b"x\n"
    assert info_letters(frozenset({"$Forwarded", "\\Draft", "\\Deleted", "custom"})) == "DPT"


def test_maildir_recover_adopts_whole_files_and_clears_tmp(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path)
    with store.open_folder("") as writer:
        reservation = writer.reserve(frozenset())
        done = reservation.location
        reservation.write(b"whole\n")
        writer.commit()  # killed after the commit, before the state database heard of it
        torn = writer.reserve(frozenset()).location
        (tmp_path / "tmp" / torn.split("/")[1]).write_bytes(b"half")  # killed before the rename
    found = store.recover([done, torn])
    assert set(found) == {done}
    assert not os.listdir(tmp_path / "tmp")


def test_mbox_appends_read_back_with_the_mailbox_module(tmp_path: Path) -> None:
    store = MboxStore(tmp_path, status_headers=False)
    messages = [b"From: a@example.org\nSubject: one\n\nFrom the start\n>From quoted\n",
                b"Subject: two\n\nno final newline"]
    with store.open_folder("INBOX") as writer:
        for data in messages:
            writer.reserve(frozenset(), WHEN).write(data)
        stored = writer.commit()
    assert [store.read(s.location) for s in stored] == [messages[0], messages[1] + b"\n"]
    box = mailbox.mbox(tmp_path / "INBOX")
    try:
        read = [(mbox.unescape(bytes(m)), m.get_from()) for m in box]
    finally:
        box.close()
    assert [data.rstrip(b"\n") for data, _ in read] == [m.rstrip(b"\n") for m in messages]
    assert read[0][1] == "a@example.org Mon May 06 07:08:09 2024"


def test_mbox_recover_leaves_a_tail_no_journal_proves_its_own(tmp_path: Path) -> None:
    """Bytes after the committed end that no journal of ours describes were written by
    another program (a batch's journal is durable before its append begins)."""
    store = MboxStore(tmp_path)
    with store.open_folder("INBOX") as writer:
        writer.reserve(frozenset(), WHEN).write(b"Subject: kept\n\nx\n")
        writer.commit()
        intent = writer.reserve(frozenset()).location
    with (tmp_path / "INBOX").open("ab") as handle:
        handle.write(b"From x Mon May 06 07:08:09 2024\nSubject: torn\n\nhal")
    before = (tmp_path / "INBOX").read_bytes()
    assert store.recover([intent]) == {}
    assert (tmp_path / "INBOX").read_bytes() == before


def test_mbox_writer_left_without_commit_rolls_back(tmp_path: Path) -> None:
    store = MboxStore(tmp_path)
    with store.open_folder("INBOX") as writer:
        writer.reserve(frozenset(), WHEN).write(b"Subject: not committed\n\n")
    assert (tmp_path / "INBOX").stat().st_size == 0


def test_a_dotlock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    import socket

    from mailsyncd.fsio import dotlock

    gone_pid = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / "INBOX.lock").write_text(f"{gone_pid}@{socket.gethostname()}\n")
    with dotlock(tmp_path / "INBOX", timeout=1):
        assert (tmp_path / "INBOX.lock").read_text().startswith(str(os.getpid()))
    assert not (tmp_path / "INBOX.lock").exists()


def test_a_live_dotlock_is_respected(tmp_path: Path) -> None:
    import socket

    import pytest

    from mailsyncd.fsio import dotlock

    (tmp_path / "INBOX.lock").write_text(f"{os.getpid()}@{socket.gethostname()}\n")
    with pytest.raises(TimeoutError), dotlock(tmp_path / "INBOX", timeout=0.2):
        pass


def test_commit_hands_out_stored_values_in_write_order_and_only_once(tmp_path: Path) -> None:
    for store in (MaildirStore(tmp_path / "maildir"), MboxStore(tmp_path / "mbox")):
        messages = [b"Subject: one\n\n1\n", b"Subject: two\n\n2\n", b"Subject: three\n\n3\n"]
        with store.open_folder("INBOX") as writer:
            reservations = [writer.reserve(frozenset(), WHEN) for _ in messages]
            for reservation, data in zip(reversed(reservations), reversed(messages), strict=True):
                reservation.write(data)
            stored = writer.commit()
            assert writer.commit() == []
        assert [store.read(s.location) for s in stored] == list(reversed(messages))
        assert [s.sha256 for s in stored] == [hashlib.sha256(data).hexdigest() for data in reversed(messages)]


def test_an_mbox_reservation_left_unwritten_never_points_behind_a_commit(tmp_path: Path) -> None:
    """Recovery cuts an mbox back to a pending intent's offset: an intent still open
    after its batch committed must name the committed end, not the batch's start."""
    store = MboxStore(tmp_path)
    with store.open_folder("INBOX") as writer:
        written, unwritten = writer.reserve(frozenset(), WHEN), writer.reserve(frozenset(), WHEN)
        where = (mbox._parse_location(written.location)[:2], mbox._parse_location(unwritten.location)[:2])
        assert where == (("INBOX", 0), ("INBOX", 0))
        written.write(b"Subject: kept\n\nx\n")
        [stored] = writer.commit()
        size = (tmp_path / "INBOX").stat().st_size
        assert mbox._parse_location(unwritten.location)[:2] == ("INBOX", size)
    assert store.recover([unwritten.location]) == {}
    assert store.read(stored.location) == b"Subject: kept\n\nx\n"
    assert (tmp_path / "INBOX").stat().st_size == size
