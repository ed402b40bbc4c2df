"""Tests that watch the invariants where they happen: in the system calls and on the wire.

The kill tests prove that nothing is lost when the process dies, but a killed process
loses no page cache: a sync that forgot an fsync passes them. These tests read the order
of the real system calls of a real ``mailsyncd sync`` (strace), hold the mbox locks from
another process, record every IMAP command sent, and log at debug level with no
redaction filter, so that each invariant fails its own test when it is broken.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailsyncd import cli
from mailsyncd.config import load_config
from tests.conftest import DovecotUser
from tests.helpers import assert_read_only, corpus_messages, every_log_record, write_config

STRACE = shutil.which("strace")
_CALL = re.compile(r"^(?P<pid>\d+) +(?P<name>\w+)\((?P<args>.*)$")
_RESUMED = re.compile(r"^(?P<pid>\d+) +<\.\.\. (?P<name>\w+) resumed>(?P<args>.*)$")
_FD_PATH = re.compile(r"^-?\d+<(?P<path>[^>]*)>")
_RENAME_PATHS = re.compile(r'"(?P<old>[^"]*)",\s*(?:(?:-?\d+<[^>]*>|AT_FDCWD),\s*)?"(?P<new>[^"]*)"')


@dataclass(frozen=True)
class Call:
    """One completed system call: its name, the path of its first descriptor (or, for a
    rename, the old and new names) and its place in the sequence."""

    index: int
    name: str
    path: str
    new_path: str = ""


def _complete_calls(trace: str) -> list[Call]:
    """Calls in the order they returned; an ``unfinished`` call is placed where it resumed."""
    started: dict[str, tuple[str, str]] = {}
    calls: list[Call] = []
    for line in trace.splitlines():
        if line.endswith("<unfinished ...>"):
            match = _CALL.match(line)
            if match:
                started[match["pid"]] = (match["name"], match["args"])
            continue
        resumed = _RESUMED.match(line)
        if resumed:
            name, args = started.pop(resumed["pid"], (resumed["name"], ""))
            args += resumed["args"]
        else:
            match = _CALL.match(line)
            if not match:
                continue
            name, args = match["name"], match["args"]
        if " = -1 " in args:
            continue  # failed calls did nothing
        if name.startswith("rename"):
            found = _RENAME_PATHS.search(args)
            if found:
                calls.append(Call(len(calls), "rename", found["old"], found["new"]))
            continue
        fd_path = _FD_PATH.match(args)
        calls.append(Call(len(calls), name, fd_path["path"] if fd_path else ""))
    return calls


def _strace_sync(config: Path, output: Path) -> list[Call]:
    """Run a whole ``mailsyncd sync`` under strace, every thread followed."""
    if STRACE is None:
        pytest.fail("strace is not installed; run scripts/test which installs it", pytrace=False)
    completed = subprocess.run(
        [STRACE, "-f", "-qq", "-y", "-s", "4096", "-o", str(output),
         "-e", "trace=write,pwrite64,writev,pwritev,fsync,fdatasync,syncfs,rename,renameat,renameat2",
         sys.executable, "-m", "mailsyncd", "--config", str(config), "-q", "sync"],
        capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    return _complete_calls(output.read_text())


def _is_data_sync(call: Call) -> bool:
    return call.name in ("fsync", "fdatasync", "syncfs")


def _state_commits(calls: list[Call], state: str) -> list[int]:
    """Indexes of the fsyncs that make a state transaction durable (WAL or journal)."""
    return [call.index for call in calls if _is_data_sync(call) and call.path.startswith(state)]


def _next_after(indexes: list[int], position: int) -> int | None:
    return next((index for index in indexes if index > position), None)


@pytest.fixture
def filled(dovecot: DovecotUser) -> DovecotUser:
    dovecot.server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in corpus_messages(60)])
    return dovecot


def test_maildir_data_is_durable_before_the_rename_and_the_name_before_the_record(
        tmp_path: Path, filled: DovecotUser) -> None:
    config = write_config(tmp_path, filled.server, filled.user, filled.password)
    calls = _strace_sync(config, tmp_path / "trace")
    state = str(tmp_path / "state.db")
    commits = _state_commits(calls, state)
    store = str(tmp_path / "store-acct")
    renames = [call for call in calls if call.name == "rename" and call.path.startswith(store)
               and Path(call.path).parent.name == "tmp"]
    assert len(renames) >= 60, f"expected a rename per message, saw {len(renames)}"
    for rename in renames:
        tmp_file, final = rename.path, rename.new_path
        last_write = max(call.index for call in calls[:rename.index]
                         if call.name.startswith(("write", "pwrite")) and call.path == tmp_file)
        # Data: a syncfs, or an fsync of this very file, between its last write and its rename.
        assert any(_is_data_sync(call) and (call.name == "syncfs" or call.path == tmp_file)
                   for call in calls[last_write + 1:rename.index]), f"{final} renamed before its data was synced"
        # Name: its directory fsync'd after the rename and before the next state commit.
        directory = str(Path(final).parent)
        recorded = _next_after(commits, rename.index)
        assert recorded is not None, f"{final}: no state commit after it"
        assert any(call.name == "fsync" and call.path == directory for call in calls[rename.index + 1:recorded]), \
            f"{final} recorded in the state database before its directory was fsync'd"


def test_mbox_appends_are_durable_before_they_are_recorded(tmp_path: Path, filled: DovecotUser) -> None:
    config = write_config(tmp_path, filled.server, filled.user, filled.password, store_format="mbox")
    calls = _strace_sync(config, tmp_path / "trace")
    commits = _state_commits(calls, str(tmp_path / "state.db"))
    store = str(tmp_path / "store-acct")
    appends = [call for call in calls if call.name.startswith("write") and call.path.startswith(store)
               and not call.path.endswith(".lock")]
    assert appends, "no write to the mbox seen"
    for append in appends:
        recorded = _next_after(commits, append.index)
        assert recorded is not None
        assert any(call.name in ("fsync", "fdatasync") and call.path == append.path
                   for call in calls[append.index + 1:recorded]), \
            f"a write to {append.path} was recorded before the mbox was fsync'd"


def _sync_process(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "mailsyncd", "--config", str(config), "-q", "sync"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


_HOLD_FCNTL = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("lock", ["dotlock", "fcntl"])
def test_mbox_append_waits_for_a_lock_another_program_holds(tmp_path: Path, filled: DovecotUser, lock: str) -> None:
    """A mail reader or delivery agent holding the mbox lock must hold off our append."""
    config = write_config(tmp_path, filled.server, filled.user, filled.password, store_format="mbox")
    inbox = tmp_path / "store-acct" / "INBOX"
    inbox.parent.mkdir(parents=True)
    inbox.touch(mode=0o600)
    holder: subprocess.Popen[str] | None = None
    if lock == "dotlock":
        # A live process of this host owns it, so it is not stale.
        holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                                  text=True)
        (tmp_path / "store-acct" / "INBOX.lock").write_text(f"{holder.pid}@{os.uname().nodename}\n")
    else:
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_FCNTL, str(inbox)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    syncing = _sync_process(config)
    try:
        time.sleep(4.0)
        assert syncing.poll() is None, "the sync finished although the mbox was locked"
        assert inbox.stat().st_size == 0, "the sync wrote to an mbox another program had locked"
    finally:
        if lock == "dotlock":
            (tmp_path / "store-acct" / "INBOX.lock").unlink()
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    _, stderr = syncing.communicate(timeout=120)
    assert syncing.returncode == 0, stderr
    assert inbox.stat().st_size > 0


def test_pull_opens_every_folder_read_only_and_fetches_every_body_with_peek(
        tmp_path: Path, filled: DovecotUser, sent_commands: list[bytes]) -> None:
    filled.server.create_folder(filled.user, "Archive")
    filled.server.append_many(filled.user, "Archive", [path.read_bytes() for path in corpus_messages(5)])
    config = write_config(tmp_path, filled.server, filled.user, filled.password)
    ours: list[bytes] = []
    for more in (0, 3):  # a first sync, then an incremental one
        if more:
            filled.server.append_many(filled.user, "INBOX", [path.read_bytes() for path in corpus_messages(more)])
        sent_commands.clear()  # the test server's own helpers speak imaplib too
        assert cli.main(["--config", str(config), "-q", "sync"]) == 0
        ours += sent_commands
    commands = assert_read_only(ours)
    assert len([command for command in commands if b" EXAMINE " in command]) >= 4, commands
    assert any(re.search(rb"FETCH .*BODY", command) for command in commands)


def _opened(sent: list[bytes]) -> list[bytes]:
    """The folders a run opened, by the names on the wire (without QRESYNC's parameters)."""
    return [match.group(2).strip(b"\"") for line in sent
            if (match := re.search(rb"^\S+ (SELECT|EXAMINE) (.+?)(?: \(QRESYNC .*)?\r\n", line, re.IGNORECASE))]


def test_a_folder_is_opened_only_when_its_status_changed(
        tmp_path: Path, filled: DovecotUser, sent_commands: list[bytes]) -> None:
    """LIST-STATUS lets an unchanged folder go unopened; a flag change, an expunge and new
    mail each still open their folder, and reach the store."""
    server = filled.server
    server.create_folder(filled.user, "Archive")
    uids = server.append_many(filled.user, "Archive", [path.read_bytes() for path in corpus_messages(5)])
    config = write_config(tmp_path, server, filled.user, filled.password)
    assert cli.main(["--config", str(config), "-q", "sync"]) == 0
    sent_commands.clear()
    assert cli.main(["--config", str(config), "-q", "sync"]) == 0
    assert _opened(sent_commands) == []
    archive = load_config(config).accounts[0].store.path / ".Archive"

    server.add_flags(filled.user, "Archive", uids[:1], ["\\Flagged"])
    sent_commands.clear()
    assert cli.main(["--config", str(config), "-q", "sync"]) == 0
    assert _opened(sent_commands) == [b"Archive"]
    assert sum("F" in path.name.partition(":2,")[2] for path in (archive / "cur").iterdir()) == 1

    server.expunge(filled.user, "Archive", uids[1:2])
    server.append_many(filled.user, "INBOX", [path.read_bytes() for path in corpus_messages(1)])
    sent_commands.clear()
    assert cli.main(["--config", str(config), "-q", "sync"]) == 0
    assert sorted(_opened(sent_commands)) == [b"Archive", b"INBOX"]


def test_no_secret_reaches_any_log_record_even_without_the_redaction_filter(
        tmp_path: Path, filled: DovecotUser, monkeypatch: pytest.MonkeyPatch) -> None:
    """The redaction filter is the last line of defence, not the first: with every
    logger of every library at debug level, and the records read before any handler's
    filter, the password must never be there, in a good login or a refused one."""
    records = every_log_record(monkeypatch)
    config = write_config(tmp_path, filled.server, filled.user, filled.password)
    assert cli.main(["--config", str(config), "-v", "sync"]) == 0
    refused = tmp_path / "refused"
    refused.mkdir()
    config = write_config(refused, filled.server, filled.user, filled.password + "-not-it")
    assert cli.main(["--config", str(config), "-v", "sync"]) == 1
    assert any("LOGIN" in text.upper() for text in records), "the login was not logged at all: nothing was tested"
    leaked = [text for text in records if filled.password in text]
    assert not leaked, leaked[:3]
