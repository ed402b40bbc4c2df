"""Shared test helpers: write an account config for the harness server, run the CLI,
crash a sync at a chosen step, and read a store back for comparison."""

from __future__ import annotations

import mailbox
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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
                 name: str = "acct", protocol: str = "imap", extra: str = "", store_extra: str = "") -> Path:
    """A config for one account of the harness server over implicit TLS."""
    port = server.imaps_port if protocol == "imap" else server.pop3s_port
    store = directory / f"store-{name}"
    text = f"""
[general]
state = "{directory / 'state.db'}"

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


def run_cli(config: Path | None, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mailsyncd"] + (["--config", str(config)] if config else []) + list(args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def crash_at_step(config: Path, step: int) -> int:
    """Fork, run one sync whose Checkpoint exits hard (like kill -9) at effect step
    ``step``; returns the number of steps the child reached (step+1 means it finished)."""
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
                    app.sync_account(account, checkpoint=checkpoint)
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
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
