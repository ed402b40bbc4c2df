"""Memory that must not grow with a folder's size, checked without a clock: tracemalloc's
peak while the planner and the state database work on N and then on 4N messages.

What a sync holds for a large folder is what decides its peak RSS (the benchmark's
50,000 messages in one folder); these tests catch a whole-folder structure coming back
(a set of every listed UID, every row loaded where a few were asked for) long before
a benchmark would."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailsyncd.domain import (
    FolderInfo,
    FolderSnapshot,
    MessageState,
    Policy,
    RecordedFolder,
    RecordedMessage,
    RemoteMessage,
)
from mailsyncd.state import db
from mailsyncd.state.models import MESSAGES
from mailsyncd.state.repo import KnownFolder, StateRepo
from mailsyncd.sync.plan import plan_folder

N = 5_000
SEEN = frozenset({"\\Seen"})


def peak(work: Callable[[], Any]) -> int:
    """Bytes ``work`` allocated at its peak beyond what existed before it ran (its
    inputs are built before, so they do not count; its result does)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        work()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def per_extra_message(cost: Callable[[int], int]) -> float:
    """How many bytes each message past the first N adds to the peak, from N to 4N."""
    small, large = cost(N), cost(4 * N)
    return (large - small) / (3 * N)


def recorded(count: int) -> RecordedFolder:
    messages = {uid: RecordedMessage(uid, 7, MessageState.STORED, SEEN, location=f"cur/{uid}:2,S", size=5000)
                for uid in range(1, count + 1)}
    return RecordedFolder(7, count + 1, 100, messages)


def test_planning_a_complete_listing_of_an_unchanged_folder_holds_nothing_per_message() -> None:
    """Without CONDSTORE every older UID is listed with its flags: telling what vanished
    must not build a set of every listed UID (nor anything else per message)."""
    def cost(count: int) -> int:
        record = recorded(count)
        snapshot = FolderSnapshot(7, count + 1, None, count, changed_flags=dict.fromkeys(record.messages, SEEN),
                                  present=frozenset(record.messages))
        return peak(lambda: plan_folder(snapshot, record, Policy()))

    assert per_extra_message(cost) < 4


def test_planning_a_first_sync_holds_a_few_references_per_message() -> None:
    """Everything is fetched: the plan itself lists every message, and what planning
    holds besides is a few sorted copies of that list, no set of every UID."""
    def cost(count: int) -> int:
        new = tuple(RemoteMessage(uid, 5000, SEEN) for uid in range(1, count + 1))
        snapshot = FolderSnapshot(7, count + 1, 100, count, new=new, present=frozenset())
        return peak(lambda: plan_folder(snapshot, RecordedFolder(None, None, None), Policy()))

    assert per_extra_message(cost) < 56  # 8 bytes a reference


@pytest.fixture
def folder(tmp_path: Path) -> tuple[StateRepo, KnownFolder, Callable[[int], None]]:
    """A real SQLite state with one folder, and a way to give it more recorded messages."""
    engine = db.create(str(tmp_path / "state.db"))
    db.upgrade(engine)
    repo = StateRepo(engine)
    account = repo.account_id("acct", "imap")
    folder_id = repo.upsert_folder(account, FolderInfo("INBOX", "/"), "")
    repo.start_uidvalidity(folder_id, 7)
    repo.finish_folder(folder_id, 7, 1, 100)
    known = next(folder for folder in repo.folders(account) if folder.id == folder_id)
    rows = 0

    def grow_to(count: int) -> None:
        nonlocal rows
        with engine.begin() as connection:
            connection.execute(MESSAGES.insert(), [
                {"folder_id": folder_id, "uidvalidity": 7, "uid": uid, "state": MessageState.STORED,
                 "location": f"cur/1796524411.M{uid}P20335Q{uid}.host:2,S", "size": 5000, "sha256": f"{uid:064x}",
                 "message_id": f"<{uid}.message@example.org>", "flags": "\\Seen"}
                for uid in range(rows + 1, count + 1)])
        rows = count

    return repo, known, grow_to


def test_reading_the_records_of_a_few_uids_does_not_grow_with_the_folder(
        folder: tuple[StateRepo, KnownFolder, Callable[[int], None]]) -> None:
    """An incremental sync reads the rows of the UIDs the server mentioned, never the folder's."""
    repo, known, grow_to = folder

    def cost(count: int) -> int:
        grow_to(count)
        return peak(lambda: repo.recorded_folder(known, [1, 2, 3, count]))

    assert per_extra_message(cost) < 4


def test_reading_every_record_of_a_folder_costs_a_bounded_few_hundred_bytes_a_message(
        folder: tuple[StateRepo, KnownFolder, Callable[[int], None]]) -> None:
    """A complete listing needs every row of the folder: each costs its record, its
    location and numbers, but not a set of flags of its own, nor the SHA-256 and
    Message-ID that planning a listing does not read."""
    repo, known, grow_to = folder

    def cost(count: int) -> int:
        grow_to(count)
        return peak(lambda: repo.recorded_folder(known, None, hashes=False))

    assert per_extra_message(cost) < 400
