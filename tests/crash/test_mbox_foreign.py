"""Invariant 10 under fire: a sync into an mbox stopped at a step of its batch sequence,
then another program at the file (a delivery agent appending a message; a mail reader
saving it, which rewrites every message's Status: fields: a plain rewrite as neomutt and
Dovecot do it, and real neomutt in tmux), then clean runs. Afterwards every server
message is stored exactly once and found at its recorded location, and every message
of the other program is still there.
"""

from __future__ import annotations

import contextlib
import mailbox
import os
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.fsio import locked_file
from mailsyncd.stores import mbox
from mailsyncd.stores.mbox import MboxStore
from mailsyncd.sync import imap as imap_sync
from tests.conftest import DovecotUser
from tests.helpers import (
    corpus_messages,
    crash_at_step,
    neomutt,
    normalize,
    rewrite_like_a_mail_reader,
    sync,
    write_config,
)

FILES = {"INBOX": "INBOX", "Work/2024": "Work.sbd/2024"}  # server folder -> mbox file in the store
DELIVERED = b"From: mda@example.org\nSubject: delivered by another program\nMessage-ID: <mda@example.org>\n\nhi\n"

Other = Callable[[Path], list[bytes]]  # acts on a store; returns the messages it added to each file


def deliver(root: Path) -> list[bytes]:
    """A delivery agent appends a message to each file, under the dotlock and fcntl lock."""
    for name in FILES.values():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        with locked_file(root / name) as fd:
            os.write(fd, mbox.entry(DELIVERED, None))
    return [DELIVERED]


def rewrite(root: Path) -> list[bytes]:
    for name in FILES.values():
        if (root / name).exists():
            rewrite_like_a_mail_reader(root / name)
    return []


def open_in_neomutt(root: Path) -> list[bytes]:
    for name in FILES.values():
        if (root / name).exists() and (root / name).stat().st_size:  # neomutt opens no empty file
            # The killed run's dotlock is stale (its process is gone); mailsyncd takes it
            # over by itself, neomutt would ask first.
            (root / f"{name}.lock").unlink(missing_ok=True)
            before = (root / name).read_bytes()
            with neomutt(root / name, root.parent / "home"):
                pass
            after = (root / name).read_bytes()
            assert len(after) > len(before), "neomutt did not save the file (and move its offsets)"
    return []


def fill(dovecot: DovecotUser, count: int) -> None:
    files = corpus_messages(count)
    for index, folder in enumerate(FILES):
        uids = dovecot.server.append_many(dovecot.user, folder, [p.read_bytes() for p in files[index::2]])
        dovecot.server.add_flags(dovecot.user, folder, uids[::3], ["\\Seen"])
        dovecot.server.add_flags(dovecot.user, folder, uids[1::4], ["\\Flagged"])


def keys_in(path: Path) -> Counter[str]:
    box = mailbox.mbox(path, create=False)
    try:
        return Counter(mbox.content_key(mbox.unescape(box.get_bytes(key))) for key in box.keys())  # noqa: SIM118 - a mailbox, not a dict
    finally:
        box.close()


def assert_each_once_and_theirs_kept(dovecot: DovecotUser, config: Path, theirs: list[bytes]) -> None:
    """Compared by content key, which a mail reader's rewrite leaves as it was."""
    store = load_config(config).accounts[0].store
    wanted: dict[str, Counter[str]] = {}
    for folder, name in FILES.items():
        server = dovecot.server.fetch_all(dovecot.user, folder)
        wanted[folder] = Counter(mbox.content_key(normalize(body)) for body in server.values())
        assert keys_in(store.path / name) == wanted[folder] + Counter(mbox.content_key(data) for data in theirs)
        assert all(data in (store.path / name).read_bytes() for data in theirs), "their bytes were changed"
    reader = MboxStore(store.path, store.mbox_status_headers)
    with contextlib.closing(sqlite3.connect(config.parent / "state.db")) as state:
        rows = state.execute("select f.name, m.state, m.location from messages m join folders f on f.id = m.folder_id")
        found: dict[str, Counter[str]] = {}
        for folder, row_state, location in rows:
            if row_state == "retired":
                # A file the state database knew nothing of was indexed: another
                # program's message there is recorded as local only, never as ours.
                assert mbox.content_key(reader.read(location)) in {mbox.content_key(data) for data in theirs}
                continue
            assert row_state == "stored", (folder, row_state, location)
            found.setdefault(folder, Counter())[mbox.content_key(reader.read(location))] += 1
    assert found == wanted


def run_then(tmp_path: Path, dovecot: DovecotUser, step: int, other: Other, store_extra: str = "") -> Path:
    run = tmp_path / f"k{step}"
    run.mkdir()
    config = write_config(run, dovecot.server, dovecot.user, dovecot.password, "mbox", store_extra=store_extra)
    assert crash_at_step(config, step) == step
    theirs = other(load_config(config).accounts[0].store.path)
    assert sync(config) == 0
    assert_each_once_and_theirs_kept(dovecot, config, theirs)
    return config


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several batches per folder, so that a stop falls between batches too."""
    monkeypatch.setattr(imap_sync, "FETCH_BUDGET", 12_000)


def steps_of_a_clean_run(tmp_path: Path, dovecot: DovecotUser) -> list[str]:
    """The name of each effect step of a whole run, in order (step k is names[k - 1])."""
    reference = tmp_path / "reference"
    reference.mkdir()
    loaded = load_config(write_config(reference, dovecot.server, dovecot.user, dovecot.password, "mbox"))
    names: list[str] = []
    app = App.open(loaded)
    try:
        app.sync_account(loaded.accounts[0], checkpoint=names.append)
    finally:
        app.close()
    assert names.count("commit") >= 4, names  # several batches in each folder
    return names


@pytest.mark.usefixtures("small_batches")
@pytest.mark.parametrize("other", [deliver, rewrite], ids=["delivery-agent-appends", "reader-rewrites"])
def test_stop_at_every_step_then_another_program_then_resume(tmp_path: Path, dovecot: DovecotUser,
                                                            other: Other) -> None:
    fill(dovecot, 16)
    for step in range(1, len(steps_of_a_clean_run(tmp_path, dovecot)) + 1):
        run_then(tmp_path, dovecot, step, other)


@pytest.mark.usefixtures("small_batches")
def test_stop_then_neomutt_saves_the_file_then_resume_and_append_more(tmp_path: Path, dovecot: DovecotUser) -> None:
    """Without our status fields every message is new to neomutt, so quitting it rewrites
    the whole file; more mail after that must land whole and be found."""
    fill(dovecot, 16)
    names = steps_of_a_clean_run(tmp_path, dovecot)
    commits = [step for step, name in enumerate(names, 1) if name == "commit"]
    # Stopped after a batch was appended but before it was recorded (first, middle and
    # last batch), and once in the middle of a batch, before anything of it was appended.
    checkpoints = [commits[0], commits[len(commits) // 2], commits[-1], names.index("write", commits[1]) + 1]
    for step in checkpoints:
        config = run_then(tmp_path, dovecot, step, open_in_neomutt, "mbox_status_headers = false")
        more = [p.read_bytes() for p in corpus_messages(24)[16:]]
        for index, folder in enumerate(FILES):
            dovecot.server.append_many(dovecot.user, folder, more[index::2])
        assert sync(config) == 0
        assert_each_once_and_theirs_kept(dovecot, config, [])
        for folder in FILES:
            dovecot.server.expunge(dovecot.user, folder, dovecot.server.uids(dovecot.user, folder)[-4:])
