"""Shared test helpers: write an account config for the harness server, run the CLI,
crash a sync at a chosen step, and read a store back for comparison."""

from __future__ import annotations

import contextlib
import itertools
import logging
import mailbox
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailsyncd import cli
from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.state import db
from mailsyncd.stores import mbox as mbox_format

REPO = Path(__file__).resolve().parents[1]
# Real messages from the public test suites of six mail libraries (see its README and
# MANIFEST.tsv for sources and licences), kept byte-exact (.gitattributes: -text).
CORPUS = REPO / "tests" / "corpus"


def corpus_messages(limit: int | None = None) -> list[Path]:
    files = sorted(path for path in (CORPUS / "messages").rglob("*") if path.is_file())
    assert len(files) > 800, f"the message corpus is missing from {CORPUS}"
    return files[:limit] if limit else files


def write_config(directory: Path, server: Any, user: str, password: str, store_format: str = "maildir",
                 name: str = "acct", protocol: str = "imap", extra: str = "", store_extra: str = "",
                 state: str | None = None) -> Path:
    """A config for one account of the harness server over implicit TLS; its state in
    ``directory`` unless ``state`` names another (a path or a database URL)."""
    port = server.imaps_port if protocol == "imap" else server.pop3s_port
    store = directory / f"store-{name}"
    text = f"""
[general]
state = "{state or directory / 'state.db'}"

[[account]]
name = "{name}"
protocol = "{protocol}"
host = "{server.host}"
port = {port}
tls_ca_file = "{server.ca_file}"
username = "{user}"
password = "{password}"
{extra}

[account.store]
format = "{store_format}"
path = "{store}"
{store_extra}
"""
    path = directory / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def sync(config: Path, *args: str) -> int:
    """`mailsyncd sync` in this process (fast; the kill tests use a subprocess)."""
    return cli.main(["--config", str(config), "-q", "sync", *args])


@contextlib.contextmanager
def debug_records(logger: str, handler: logging.Handler) -> Iterator[None]:
    """``handler`` on ``logger``, at debug level, while in the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def round_trips() -> Iterator[list[int]]:
    """The waits for the server of each IMAP run in the block, after its login, from the
    line the app logs at debug level when a run's session ends."""
    found: list[int] = []
    handler = logging.Handler(logging.DEBUG)

    def emit(record: logging.LogRecord) -> None:
        if match := re.search(r": (\d+) round trips to ", record.getMessage()):
            found.append(int(match.group(1)))

    handler.emit = emit  # type: ignore[method-assign]
    with debug_records("mailsyncd.app", handler):
        yield found


def assert_read_only(sent: Iterable[bytes]) -> list[bytes]:
    """Invariant 2 on the wire: of the command lines a pull sent, every folder was opened
    with EXAMINE, every body fetched with BODY.PEEK, and nothing changed the server.
    Returns the commands' first lines, upper case, for further checks."""
    commands = [line.split(b"\r\n", 1)[0].upper() for line in sent]
    opened = [command for command in commands if re.search(rb"^\S+ (SELECT|EXAMINE) ", command)]
    assert all(b" EXAMINE " in command for command in opened), opened
    for command in commands:
        if re.search(rb"FETCH .*BODY", command):
            assert not re.search(rb"BODY\[", command), f"a body fetched without PEEK: {command!r}"
    assert not any(re.search(rb"\b(STORE|EXPUNGE|APPEND|COPY|MOVE|DELETE|CREATE|RENAME)\b", command)
                   for command in commands), "a pull changed the server"
    return commands


def run_cli(config: Path | None, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mailsyncd"] + (["--config", str(config)] if config else []) + list(args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def crash_at_step(config: Path, step: int, work: Callable[[App, Any, Callable[[str], None]], object] | None = None
                  ) -> int:
    """Fork, run one sync (or ``work(app, account, checkpoint)`` for each account) whose
    Checkpoint exits hard (like kill -9) at effect step ``step``; returns the number of
    steps the child reached (step+1 means it finished)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        count = 0

        def checkpoint(_name: str) -> None:
            nonlocal count
            count += 1
            if count == step:
                os.write(write_end, str(count).encode())
                os._exit(9)

        try:
            loaded = load_config(config)
            with db.instance_lock(loaded.general.state):
                app = App.open(loaded)
                for account in loaded.accounts:
                    if work is None:
                        app.sync_account(account, checkpoint=checkpoint)
                    else:
                        work(app, account, checkpoint)
        finally:
            os.write(write_end, str(count + 1).encode())
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    reached = int(os.read(read_end, 32) or b"0")
    os.close(read_end)
    assert os.WIFEXITED(status), status
    return reached


def kill_after(argv: list[str], seconds: float) -> int:
    """Start a command and SIGKILL it after ``seconds``; returns its exit status."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        return process.wait()


def normalize(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def maildir_contents(root: Path) -> dict[str, Counter[bytes]]:
    """Every message file under a Maildir tree, by folder directory, as a multiset."""
    out: dict[str, Counter[bytes]] = {}
    for sub in root.rglob("*"):
        if sub.is_dir() and sub.name in ("new", "cur"):
            folder = "" if sub.parent == root else sub.parent.relative_to(root).as_posix()
            bag = out.setdefault(folder, Counter())
            bag.update(path.read_bytes() for path in sub.iterdir())
    for folder in list(out):
        if not out[folder]:
            del out[folder]
    return out


def mbox_contents(root: Path, status_headers: bool = True) -> dict[str, Counter[bytes]]:
    """Every message of every mbox file under root, mboxrd-unescaped, read with the
    standard library's mailbox module (what other tools would see); with
    ``status_headers``, without the Status:/X-Status: fields the store added."""
    out: dict[str, Counter[bytes]] = {}
    for path in root.rglob("*"):
        if not path.is_file() or path.name.endswith(".lock") or path.name.startswith("."):
            continue  # locks and the stores' journals
        box = mailbox.mbox(path, create=False)
        try:
            # get_bytes leaves out the From line and the blank line that ends a message.
            strip = mbox_format.strip_status if status_headers else bytes
            bag = Counter(strip(mbox_format.unescape(box.get_bytes(key))) for key in box.keys())  # noqa: SIM118 - a mailbox, not a dict
        finally:
            box.close()
        if bag:
            out[str(path.relative_to(root))] = bag
    return out


def expected(server_bodies: Iterable[bytes], store_format: str) -> Counter[bytes]:
    bag: Counter[bytes] = Counter()
    for body in server_bodies:
        data = normalize(body)
        if store_format == "mbox" and not data.endswith(b"\n"):
            data += b"\n"
        bag[data] += 1
    return bag


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def rewrite_like_a_mail_reader(path: Path) -> None:
    """What neomutt and Dovecot do when they save an mbox they opened: every message's
    Status:/X-Status: fields dropped and written anew at the end of its header block,
    with Content-Length: and Lines: (mutt's CH_UPDATE_LEN), so every offset moves."""
    data = path.read_bytes()
    starts = [match.start() for match in re.finditer(rb"^From ", data, re.MULTILINE)]
    out = bytearray(data[:starts[0]] if starts else data)
    for start, end in zip(starts, [*starts[1:], len(data)], strict=False):
        from_line, _, rest = data[start:end].partition(b"\n")
        header, separator, body = rest.partition(b"\n\n")
        kept = [line for line in header.split(b"\n")
                if not re.match(rb"(?i)(x-)?status:|content-length:|lines:", line)]
        fields = b"Status: RO\nX-Status: \nContent-Length: %d\nLines: %d\n" % (len(body), body.count(b"\n"))
        out += from_line + b"\n" + b"\n".join(kept) + b"\n" + fields + (separator and b"\n") + body
    path.write_bytes(bytes(out))


_TMUX_SESSIONS = itertools.count()


@contextlib.contextmanager
def neomutt(mbox: Path, home: Path, *settings: str) -> Iterator[Callable[[str], str]]:
    """Real neomutt on ``mbox`` in a tmux server of its own; yields ``keys(text)``, which
    types ``text`` (tmux key names, space separated) and returns the screen after it.
    Leaving the block quits neomutt with ``q``, which writes back what neomutt changed
    (with ``mark_old``, every new message becomes old: the whole file is rewritten)."""
    home.mkdir(parents=True, exist_ok=True)
    muttrc = home / "muttrc"
    muttrc.write_text("\n".join([
        "set mbox_type=mbox", "set move=no", "set mark_old=yes", "set quit=yes", "set sort=mailbox-order",
        'set header_cache=""', 'set index_format="%4C [%Z] %s"', f'set folder="{mbox.parent}"', *settings]) + "\n")
    socket = f"mailsyncd-test-{os.getpid()}-{next(_TMUX_SESSIONS)}"
    tmux = ["tmux", "-L", socket]
    env = {**os.environ, "HOME": str(home), "TERM": "xterm"}
    subprocess.run([*tmux, "new-session", "-d", "-s", "mua", "-x", "160", "-y", "50",
                    f"neomutt -n -F {muttrc} -f {mbox}"], env=env, check=True)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "mua"], capture_output=True, text=True,
                              check=False).stdout

    def keys(text: str) -> str:
        if text:
            subprocess.run([*tmux, "send-keys", "-t", "mua", *text.split()], check=True)
            time.sleep(0.3)
        return screen()

    def running() -> bool:
        return subprocess.run([*tmux, "has-session", "-t", "mua"], capture_output=True, check=False).returncode == 0

    try:
        assert wait_for(lambda: "q:Quit" in screen() or not running(), 20) and running(), \
            f"neomutt did not show its index:\n{screen()}"
        yield keys
        subprocess.run([*tmux, "send-keys", "-t", "mua", "q"], check=True)
        if wait_for(lambda: not running() or "Purge" in screen(), 20) and running():
            subprocess.run([*tmux, "send-keys", "-t", "mua", "n"], check=True)  # keep what is marked deleted
        assert wait_for(lambda: not running(), 20), f"neomutt did not quit:\n{screen()}"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)


def every_log_record(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every logger of every library at debug level, and each record's text (and its
    exception's) collected before any handler's filter sees it: what a secret must never
    be found in, the redaction filter being the last line of defence, not the first."""
    records: list[str] = []
    deliver = logging.Logger.callHandlers

    def spy(self: logging.Logger, record: logging.LogRecord) -> None:
        records.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            records.append(repr(record.exc_info[1]))
        deliver(self, record)

    monkeypatch.setattr(logging.Logger, "isEnabledFor", lambda self, level: True)
    monkeypatch.setattr(logging.Logger, "callHandlers", spy)
    return records
