"""IDLE delivery latency: from a message's APPEND on the server to its file, durable, in the
Maildir of mailsyncd's daemon (`mailsyncd run` with ``idle = ["INBOX"]``), against a bare
IDLE client on the same server that does the least a syncing client must: IDLE, on EXISTS
leave IDLE, fetch the new message, write it to a file, fsync it and its directory, IDLE again.

Each side has its own user; deliveries alternate between them, each over a logged-in IMAP
connection of the benchmark's own, so no delivery waits for a login. The
daemon's side is seen by polling its Maildir every millisecond.

    .venv/bin/python bench/idle_latency.py --deliveries 30
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imapclient import IMAPClient

from tests.server_helpers import DevServer

REPO = Path(__file__).resolve().parents[1]


def message(number: int) -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: delivery {number}\r\n"
            f"Message-ID: <{number}.{time.time_ns()}@idle-bench>\r\n\r\nhello\r\n").encode()


class BareClient(threading.Thread):
    """IDLE, fetch, durable write: the floor for a client that stores what IDLE announces."""

    def __init__(self, server: DevServer, user: str, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.stored: list[float] = []  # perf_counter of each durable write
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._client = IMAPClient(server.host, port=server.imaps_port, ssl=True,
                                  ssl_context=server.client_context())
        self._client.login(user, server.password(user))
        self._next = int(self._client.select_folder("INBOX", readonly=True)[b"UIDNEXT"])

    def run(self) -> None:
        client = self._client
        directory = os.open(self.directory, os.O_RDONLY)
        while not self._stop.is_set():
            client.idle()
            self.ready.set()
            responses = []
            while not responses and not self._stop.is_set():
                responses = [r for r in client.idle_check(0.5) if len(r) > 1 and r[1] == b"EXISTS"]
            client.idle_done()
            if self._stop.is_set():
                break
            new = client.search(["UID", f"{self._next}:*"])
            for uid, item in client.fetch(new, [b"BODY.PEEK[]"]).items():
                self._next = max(self._next, uid + 1)
                path = self.directory / f"{uid}"
                with open(path, "wb") as file:
                    file.write(item[b"BODY[]"].replace(b"\r\n", b"\n"))
                    file.flush()
                    os.fsync(file.fileno())
                os.fsync(directory)
                self.stored.append(time.perf_counter())
        os.close(directory)
        client.logout()

    def stop(self) -> None:
        self._stop.set()


def files(store: Path) -> int:
    return sum(len(os.listdir(store / sub)) for sub in ("new", "cur") if (store / sub).is_dir())


def daemon_config(root: Path, server: DevServer, user: str) -> Path:
    config = root / "config.toml"
    config.write_text(f'[general]\nstate = "{root / "state.db"}"\n' + server.account_toml(
        user, root / "store", name="bench", extra='interval = "20m"\nidle = ["INBOX"]\nfolders = ["INBOX"]'))
    config.chmod(0o600)
    return config


def wait_until(predicate: object, timeout: float, step: float = 0.001) -> float:
    """Poll ``predicate`` until true; the perf_counter at which it was seen true."""
    assert callable(predicate)
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if predicate():
            return time.perf_counter()
        time.sleep(step)
    raise TimeoutError("not delivered in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=30, help="messages delivered to each side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="idle-bench-") as temp, \
            DevServer(Path(temp) / "dovecot", users=()) as server:
        root = Path(temp)
        for user in ("daemon", "bare"):
            server.add_user(user, f"{user}-pw")
            server.append(user, "INBOX", message(0))
        (root / "bare").mkdir()
        (root / "daemon").mkdir()
        config = daemon_config(root / "daemon", server, "daemon")
        log = (root / "daemon" / "daemon.log").open("wb")  # closed after the daemon
        daemon = subprocess.Popen([sys.executable, "-m", "mailsyncd", "--config", str(config), "run"],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        store = root / "daemon" / "store"
        bare = BareClient(server, "bare", root / "bare")
        bare.start()
        sender = IMAPClient(server.host, port=server.imaps_port, ssl=True, ssl_context=server.client_context())
        try:
            wait_until(lambda: files(store) == 1, 30, 0.05)
            log_path = root / "daemon" / "daemon.log"
            wait_until(lambda: b"watching with IDLE" in log_path.read_bytes(), 30, 0.05)
            bare.ready.wait(10)
            sender.login("daemon", server.password("daemon"))
            # One logged-in sender per mailbox, opened once: each user appends to its own INBOX.
            other = IMAPClient(server.host, port=server.imaps_port, ssl=True, ssl_context=server.client_context())
            other.login("bare", server.password("bare"))
            daemon_ms: list[float] = []
            bare_ms: list[float] = []
            for number in range(1, args.deliveries + 1):
                time.sleep(0.3)  # both sides back in IDLE
                sent = time.perf_counter()
                sender.append("INBOX", message(number))
                daemon_ms.append((wait_until(lambda n=number: files(store) == n + 1, 30) - sent) * 1000)
                time.sleep(0.3)
                before = len(bare.stored)
                sent = time.perf_counter()
                other.append("INBOX", message(number))
                wait_until(lambda b=before: len(bare.stored) > b, 30)
                bare_ms.append((bare.stored[-1] - sent) * 1000)
            other.logout()
        finally:
            bare.stop()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(20)
            log.close()
        for name, samples in (("mailsyncd daemon", daemon_ms), ("bare IDLE client", bare_ms)):
            ordered = sorted(samples)
            print(f"{name:>17}: median {statistics.median(samples):6.1f} ms, "
                  f"p90 {ordered[int(len(ordered) * 0.9) - 1]:6.1f} ms, max {ordered[-1]:6.1f} ms "
                  f"({len(samples)} deliveries)")
        print(f"difference of the medians: {statistics.median(daemon_ms) - statistics.median(bare_ms):+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
