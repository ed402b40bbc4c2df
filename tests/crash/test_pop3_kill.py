"""Invariants 1 and 4 for POP3 under fire, with leave_on_server = false, so that every
stop can fall between a download, its record, a DELE and the QUIT that makes it count.

Two kinds of stop, each followed by a clean run: at every effect step in turn (a forked
child calls os._exit at step k, skipping every finally block, as a kill does), and
SIGKILL of a real `mailsyncd sync` process at random moments of the download and of
the deletion. After each stop nothing is lost (every message is on the server or in
the store, and every recorded deletion has its local copy) and nothing is stored twice;
after the clean run the server is empty and the store holds each message once.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsyncd.app import App
from mailsyncd.cli import main
from mailsyncd.config import load_config
from mailsyncd.sync.effects import Counts
from tests.conftest import DovecotUser
from tests.helpers import crash_at_step, maildir_contents, mbox_contents, normalize, write_config

KILLS_PER_FORMAT = 8  # 16 in this suite, half of them during the download, half during deletion
MAILBOX = 200
STORE_CYCLES = 4  # kill cycles into one store before a new one


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Where stores and state go: tmpfs when there is one. A kill, unlike a power cut,
    loses no page cache, so these tests need no fsync to reach a disk, and on tmpfs the
    hundreds of fsyncs of each cycle cost nothing."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="mailsyncd-pop3-kill-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def generated(count: int, tag: str) -> list[bytes]:
    rng = random.Random(tag)
    out = []
    for index in range(count):
        lines = [b"%s line %d" % (tag.encode(), line) for line in range(rng.randint(20, 120))]
        lines[2:2] = [b".", b"..dots", b"From here", b">From there"]
        out.append(b"From: a@example.org\r\nSubject: %s %d\r\nMessage-ID: <%s.%d@test>\r\n\r\n"
                   % (tag.encode(), index, tag.encode(), index) + b"\r\n".join(lines) + b"\r\n")
    return out


def as_stored(data: bytes) -> bytes:
    data = normalize(data)
    return data if data.endswith(b"\n") else data + b"\n"


class Mailbox:
    """One POP3 account of the harness server, its config, and what was delivered to it."""

    def __init__(self, directory: Path, dovecot: DovecotUser, store_format: str, user: str | None = None
                 ) -> None:
        self.server = dovecot.server
        self.user = user or dovecot.user
        self.password = self.server.password(self.user) if user else dovecot.password
        self.store_format = store_format
        directory.mkdir(parents=True, exist_ok=True)
        self.config = write_config(directory, self.server, self.user, self.password, store_format,
                                   protocol="pop3", extra="leave_on_server = false")
        self.root = load_config(self.config).accounts[0].store.path
        self.delivered: list[bytes] = []

    def deliver(self, messages: list[bytes]) -> None:
        self.server.append_many(self.user, "INBOX", messages)
        self.delivered += messages

    def local(self) -> Counter[bytes]:
        if not self.root.exists():
            return Counter()
        bags = maildir_contents(self.root) if self.store_format == "maildir" else mbox_contents(self.root)
        total: Counter[bytes] = Counter()
        for bag in bags.values():
            total.update(bag)
        return total

    def on_server(self) -> Counter[bytes]:
        return Counter(as_stored(data) for data in self.server.fetch_all(self.user, "INBOX").values())

    def states(self) -> Counter[str]:
        db = sqlite3.connect(self.config.parent / "state.db")
        try:
            return Counter(state for (state,) in db.execute("select state from pop_messages"))
        finally:
            db.close()

    def sync(self) -> Counts:
        loaded = load_config(self.config)
        app = App.open(loaded)
        try:
            return app.sync_account(loaded.accounts[0])
        finally:
            app.close()

    def assert_nothing_lost(self) -> None:
        """After a stop: every message is somewhere, none twice in the store, and the
        store holds at least everything recorded stored or deleted."""
        stored, server = self.local(), self.on_server()
        assert all(count == 1 for count in stored.values()), "a message was stored twice"
        missing = [data for data in self.delivered if not stored[as_stored(data)] and not server[as_stored(data)]]
        assert not missing, f"{len(missing)} messages lost, e.g. {missing[0][:120]!r}"
        states = self.states()
        assert sum(stored.values()) >= states["stored"] + states["gone"], (states, sum(stored.values()))

    def assert_clean(self) -> None:
        """After a clean run: the server is empty and the store holds each message once."""
        assert self.on_server() == Counter()
        assert self.local() == Counter(as_stored(data) for data in self.delivered)
        states = self.states()
        # A kill after QUIT but before the deletions were recorded leaves rows "stored"
        # for messages the server no longer has; never pending, never twice.
        assert set(states) <= {"stored", "gone"} and sum(states.values()) == len(self.delivered), states


@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_stop_at_every_step_then_resume(workdir: Path, dovecot: DovecotUser, store_format: str) -> None:
    server = dovecot.server
    messages = generated(4, f"step-{store_format}")

    def mailbox(name: str) -> Mailbox:
        user = f"{dovecot.user}-{store_format}-{name}"
        server.add_user(user, "step-password")
        box = Mailbox(workdir / name, dovecot, store_format, user=user)
        box.deliver(messages)
        return box

    reference = mailbox("reference")
    steps = crash_at_step(reference.config, 10**9) - 1
    reference.assert_clean()
    # listing, intent, fetched + write per message, commit, recorded, a DELE each, quit, deleted
    assert steps == 1 + 1 + 2 * len(messages) + 2 + len(messages) + 2
    for step in range(1, steps + 1):
        box = mailbox(f"k{step}")
        assert crash_at_step(box.config, step) == step
        box.assert_nothing_lost()
        box.sync()
        box.assert_clean()


def _store_size(box: Mailbox) -> int:
    """Bytes in the store so far: how far the download has come."""
    total = 0
    for directory, _, files in os.walk(box.root):
        for name in files:
            if not name.endswith(".lock"):
                with contextlib.suppress(FileNotFoundError):  # renamed between listing and stat
                    total += (Path(directory) / name).stat().st_size
    return total


class _Forked:
    """`mailsyncd sync` run by the CLI's own main() in a forked copy of this process:
    a real process to SIGKILL, without paying the interpreter's start-up again."""

    def __init__(self, box: Mailbox) -> None:
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 70
            try:
                code = main(["--config", str(box.config), "-q", "sync"])
            finally:
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sync process {self.pid} still running")
            time.sleep(0.005)
        assert self.returncode is not None
        return self.returncode


class _Spawned(_Forked):
    """`python -m mailsyncd sync` as a fresh process: the real entry point."""

    def __init__(self, box: Mailbox) -> None:
        self.returncode = None
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mailsyncd", "--config", str(box.config), "-q", "sync"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self._process.pid

    def poll(self) -> int | None:
        self.returncode = self._process.poll()
        return self.returncode

    def kill(self) -> None:
        self._process.kill()


@pytest.mark.slow
@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_sigkill_at_random_moments(workdir: Path, dovecot: DovecotUser, store_format: str) -> None:
    rng = random.Random(f"pop3-kill-{store_format}")
    box = Mailbox(workdir / "box", dovecot, store_format)

    # A clean run first, to time the deletion tail: from "everything downloaded" to exit.
    box.deliver(generated(MAILBOX, "calibrate"))
    target = _store_size(box) + sum(len(as_stored(data)) for data in box.delivered)
    process = _Forked(box)
    while _store_size(box) < target and process.poll() is None:
        time.sleep(0.001)
    downloaded = time.monotonic()
    assert process.wait() == 0
    tail = time.monotonic() - downloaded
    box.assert_clean()

    kills = {"download": 0, "deletion": 0}
    earliest = 1.0  # the largest share of a download to wait for; lowered after a miss
    for cycle in range(6 * KILLS_PER_FORMAT):
        if min(kills.values()) >= KILLS_PER_FORMAT // 2:
            break
        if cycle % STORE_CYCLES == 0:
            # A new store (and state) now and then: watching a store of thousands of
            # files would take longer than the run being watched. The server is empty
            # after every clean run, so the new store starts from the same place.
            box = Mailbox(workdir / f"box{cycle}", dovecot, store_format)
        phase = "download" if kills["download"] <= kills["deletion"] else "deletion"
        fresh = generated(MAILBOX, f"cycle{cycle}-{store_format}")
        box.deliver(fresh)
        start_size = _store_size(box)
        new_bytes = sum(len(as_stored(data)) for data in fresh)
        # Download: stop once a random share of the new bytes is in the store. Deletion:
        # stop a random moment after the last message landed.
        share = rng.uniform(0.02, 0.98) * earliest if phase == "download" else 1.0
        delay = 0.0 if phase == "download" else rng.uniform(0.0, 0.9 * tail)
        # The first kill of each phase hits `python -m mailsyncd` itself; the others a
        # forked main(), which starts in milliseconds instead of a second.
        process = _Spawned(box) if kills[phase] == 0 else _Forked(box)
        while _store_size(box) - start_size < share * new_bytes and process.poll() is None:
            time.sleep(0.0005)
        time.sleep(delay)
        killed = False
        if process.poll() is None:
            process.kill()
            killed = process.wait() == -signal.SIGKILL
        # else it finished first; that run counts as a clean one
        kills[phase] += killed
        # It finished first: a loaded machine varies, so aim earlier next time.
        if not killed and phase == "deletion":
            tail /= 2  # the tail measured at calibration was longer than this run's
        if not killed and phase == "download":
            earliest /= 2  # the download outran the watching
        box.assert_nothing_lost()
        box.sync()
        box.assert_clean()
    assert kills["download"] >= KILLS_PER_FORMAT // 2 and kills["deletion"] >= KILLS_PER_FORMAT // 2, kills


class _Killed(BaseException):
    """Raised from a checkpoint: stops the run there, past every except clause."""


@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_stop_right_after_a_batch_in_which_a_message_vanished(workdir: Path, dovecot: DovecotUser,
                                                              store_format: str) -> None:
    """Another client expunges two messages after our listing, so their RETR fails and
    their intents stay unfinished; the run stops just after the rest was recorded stored.
    For mbox those intents must not send recovery cutting the file back over messages
    recorded stored (which, with leave_on_server = false, would then be deleted)."""
    box = Mailbox(workdir / "box", dovecot, store_format)
    box.deliver(generated(12, f"vanish-{store_format}"))
    uids = box.server.uids(box.user, "INBOX")
    vanished = [box.delivered[3], box.delivered[8]]

    def checkpoint(step: str) -> None:
        if step == "listing":
            box.server.expunge(box.user, "INBOX", [uids[3], uids[8]])
        if step == "recorded":
            raise _Killed

    loaded = load_config(box.config)
    app = App.open(loaded)
    try:
        with pytest.raises(_Killed):
            app.sync_account(loaded.accounts[0], checkpoint=checkpoint)
    finally:
        app.close()
    assert box.states() == {"stored": 10, "pending": 2}
    box.delivered = [data for data in box.delivered if data not in vanished]
    box.assert_nothing_lost()
    box.sync()
    box.assert_clean()
