"""Invariant 1 under fire: a sync stopped at any instant, followed by a clean run, ends
with every server message stored exactly once, whole, and recorded.

Two kinds of stop: at every effect step in turn (a forked child calls os._exit at step
k, which skips every finally block, as a kill does), and SIGKILL of a real
`mailsyncd sync` process at random moments.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mailsyncd.config import load_config
from tests.conftest import DovecotUser
from tests.helpers import (
    corpus_messages,
    crash_at_step,
    expected,
    kill_after,
    maildir_contents,
    mbox_contents,
    sync,
    write_config,
)

FOLDERS = ("INBOX", "Work/2024")


def fill(dovecot: DovecotUser, count: int) -> None:
    files = corpus_messages(count)
    for index, folder in enumerate(FOLDERS):
        uids = dovecot.server.append_many(dovecot.user, folder, [p.read_bytes() for p in files[index::2]])
        dovecot.server.add_flags(dovecot.user, folder, uids[::3], ["\\Seen"])


def assert_exactly_once(dovecot: DovecotUser, config: Path, store_format: str, mode: str = "archive") -> None:
    root = load_config(config).accounts[0].store.path
    stored = maildir_contents(root) if store_format == "maildir" else mbox_contents(root)
    wanted = Counter({name: expected(dovecot.server.fetch_all(dovecot.user, name).values(), store_format)
                      for name in FOLDERS})
    assert sorted(stored.values(), key=sorted) == sorted(wanted.values(), key=sorted)
    db = sqlite3.connect(config.parent / "state.db")
    try:
        states = Counter(state for (state,) in db.execute("select state from messages"))
        if store_format == "maildir":
            for (location,) in db.execute("select location from messages where state = 'stored'"):
                assert (root / location).exists() or any((root / location.rsplit("/", 2)[0] / "cur").glob(
                    location.rsplit("/", 1)[1].split(":2,")[0] + "*")), location
    finally:
        db.close()
    total = sum(sum(bag.values()) for bag in wanted.values())
    assert states["stored"] == total, states
    assert set(states) <= ({"stored", "removed"} if mode == "mirror" else {"stored"}), states


@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_stop_at_every_step_then_resume(tmp_path: Path, dovecot: DovecotUser, store_format: str) -> None:
    fill(dovecot, 14)
    reference = tmp_path / "reference"
    reference.mkdir()
    steps = crash_at_step(write_config(reference, dovecot.server, dovecot.user, dovecot.password, store_format),
                          10**9) - 1
    assert steps >= 14  # intent, fetch, writes, commit, record for each folder
    for step in range(1, steps + 1):
        run = tmp_path / f"k{step}"
        run.mkdir()
        config = write_config(run, dovecot.server, dovecot.user, dovecot.password, store_format)
        assert crash_at_step(config, step) == step
        assert sync(config) == 0
        assert_exactly_once(dovecot, config, store_format)


def test_stop_at_every_step_of_an_incremental_mirror_sync(tmp_path: Path, dovecot: DovecotUser) -> None:
    """Flag renames, new mail and mirror removals interrupted at each step."""
    fill(dovecot, 10)
    server = dovecot.server
    configs = []
    for step in range(1, 40):
        run = tmp_path / f"k{step}"
        run.mkdir()
        configs.append(write_config(run, server, dovecot.user, dovecot.password, extra='mode = "mirror"'))
        assert sync(configs[-1]) == 0
    inbox = server.uids(dovecot.user, "INBOX")
    server.expunge(dovecot.user, "INBOX", inbox[:2])
    server.add_flags(dovecot.user, "INBOX", inbox[2:], ["\\Flagged"])
    server.append_many(dovecot.user, "Work/2024", [p.read_bytes() for p in corpus_messages(14)[10:]])
    steps = crash_at_step(configs[0], 10**9) - 1
    assert steps >= 5
    for step, config in zip(range(1, steps + 1), configs[1:], strict=False):
        assert crash_at_step(config, step) == step
        assert sync(config) == 0
        assert_exactly_once(dovecot, config, "maildir", mode="mirror")
        flagged = [p for p in (config.parent / "store-acct" / "cur").iterdir() if ":2," in p.name and "F" in
                   p.name.split(":2,")[1]]
        assert len(flagged) == len(inbox) - 2


@pytest.mark.slow
@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_random_sigkill_during_a_large_sync(tmp_path: Path, dovecot: DovecotUser, store_format: str) -> None:
    files = corpus_messages()
    for index, folder in enumerate(FOLDERS):
        dovecot.server.append_many(dovecot.user, folder, [p.read_bytes() for p in files[index::2]])
    def argv(config: Path) -> list[str]:
        return [sys.executable, "-m", "mailsyncd", "--config", str(config), "-q", "sync"]

    # How long a whole run takes here, so that the kills land inside one however fast
    # the machine is: spread over start-up, migration, the fetches and the bookkeeping.
    reference = tmp_path / "reference"
    reference.mkdir()
    started = time.monotonic()
    assert kill_after(argv(write_config(reference, dovecot.server, dovecot.user, dovecot.password,
                                        store_format)), 120) == 0
    whole = time.monotonic() - started
    rng = random.Random(f"{store_format}-kill")  # reproducible moments, different per format
    kills = attempt = 0
    while kills < 12 and attempt < 32:
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        attempt += 1
        config = write_config(run, dovecot.server, dovecot.user, dovecot.password, store_format)
        status = kill_after(argv(config), rng.uniform(0.2, whole * 0.95))
        if status == -9:
            kills += 1
        else:
            # It finished first: on a machine whose load changes, the reference run was
            # slower than this one, so aim earlier from now on.
            whole *= 0.8
        assert sync(config) == 0
        assert_exactly_once(dovecot, config, store_format)
    assert kills >= 12, f"only {kills} of {attempt} runs were killed before they finished"
