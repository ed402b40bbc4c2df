"""The Maildir side of two-way sync: listing a folder, its directories' mtimes, reading
what matching needs, and renames that keep letters mailsyncd does not know."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from mailsyncd.message import to_crlf
from mailsyncd.stores.maildir import MaildirStore


def folder(tmp_path: Path) -> MaildirStore:
    store = MaildirStore(tmp_path / "mail")
    store.ensure_folder(".Work")
    return store


def test_listing_reads_names_not_files(tmp_path: Path) -> None:
    store = folder(tmp_path)
    work = store.root / ".Work"
    (work / "new" / "1.A.host").write_bytes(b"Subject: a\n\nbody\n")
    (work / "cur" / "2.B.host:2,FSa").write_bytes(b"Subject: b\n\n")
    (work / "cur" / "3.C.host").write_bytes(b"Subject: c\n\n")
    (work / "cur" / ".hidden").write_bytes(b"")
    for sub in ("cur", "new"):
        os.utime(work / sub, (1_600_000_000, 1_600_000_000))
    listing = store.list_folder(".Work")
    assert listing.scan.present
    assert set(listing.scan.messages) == {"1.A.host", "2.B.host", "3.C.host"}
    assert listing.scan.messages["2.B.host"].flags == {"\\Flagged", "\\Seen"}
    assert listing.scan.messages["1.A.host"].subdir == "new"
    assert listing.scan.messages["1.A.host"].content is None  # nothing read
    assert listing.locations["2.B.host"] == ".Work/cur/2.B.host:2,FSa"
    assert listing.mtimes == store.dir_mtimes(".Work")


def test_a_listing_of_this_second_is_not_trusted_later(tmp_path: Path) -> None:
    """A message arriving later in the second of the last change would not move the mtime."""
    store = folder(tmp_path)
    (store.root / ".Work" / "new" / "1.A.host").write_bytes(b"x\n")
    assert store.list_folder(".Work").mtimes is None


def test_a_missing_directory_is_not_an_empty_folder(tmp_path: Path) -> None:
    store = folder(tmp_path)
    (store.root / ".Work" / "cur").rmdir()
    listing = store.list_folder(".Work")
    assert not listing.scan.present
    assert not store.list_folder(".Gone").scan.present
    assert store.dir_mtimes(".Gone") is None


def test_every_rename_moves_a_directory_mtime(tmp_path: Path) -> None:
    store = folder(tmp_path)
    path = store.root / ".Work" / "cur" / "1.A.host:2,"
    path.write_bytes(b"x\n")
    before = store.dir_mtimes(".Work")
    path.rename(path.with_name("1.A.host:2,S"))
    assert store.dir_mtimes(".Work") != before


def test_a_folder_changing_while_listed_is_listed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = folder(tmp_path)
    real = store.dir_mtimes
    ticks = itertools.count()
    monkeypatch.setattr(store, "dir_mtimes", lambda name: (next(ticks), 0) if real(name) else None)
    listing = store.list_folder(".Work")
    assert listing.scan.present and listing.mtimes is None  # never steady: not to be trusted next time


def test_content_is_what_a_server_would_count(tmp_path: Path) -> None:
    store = folder(tmp_path)
    data = b"Message-ID: <m@x>\nSubject: s\n\nline\r\nother\n"
    (store.root / ".Work" / "cur" / "1.A.host:2,S").write_bytes(data)
    content = store.read_content(".Work/cur/1.A.host:2,S")
    assert content is not None
    assert content.message_id == "<m@x>"
    assert content.server_size == len(to_crlf(data))
    assert store.read_content(".Work/cur/9.gone:2,") is None


def test_flag_renames_keep_unknown_letters(tmp_path: Path) -> None:
    store = folder(tmp_path)
    (store.root / ".Work" / "cur" / "1.A.host:2,Sab").write_bytes(b"x\n")
    moved = store.set_flags(".Work/cur/1.A.host:2,Sab", frozenset({"\\Flagged"}))
    assert moved == ".Work/cur/1.A.host:2,Fab"


def test_move_into_another_folder_keeps_the_name(tmp_path: Path) -> None:
    store = folder(tmp_path)
    (store.root / "cur").mkdir(parents=True, exist_ok=True)
    (store.root / ".Work" / "cur" / "1.A.host:2,S").write_bytes(b"x\n")
    assert store.move_into(".Work/cur/1.A.host:2,S", ".Archive") == ".Archive/cur/1.A.host:2,S"
    assert (store.root / ".Archive" / "cur" / "1.A.host:2,S").read_bytes() == b"x\n"
