"""`mailsyncd demo`: the whole path on a throwaway server, with no account needed.

Starts a private Dovecot on loopback (mailsyncd.testing), fills a few folders with
generated mail, syncs them into a Maildir with the same code as `mailsyncd sync`, shows
a second sync that has nothing to do, and leaves the store behind for a look.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.errors import FatalError
from mailsyncd.progress import Progress, TerminalProgress
from mailsyncd.state import db
from mailsyncd.testing import DovecotServer, find_dovecot

FOLDERS = ("INBOX", "Archive/2024", "Entwürfe", "Lists/python")
WORDS = ("mail", "sync", "durable", "archive", "folder", "server", "offline", "message", "flag", "backup")


def generate(count: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """Deterministic messages of 1-20 KB, spread over FOLDERS."""
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    out = []
    for number in range(count):
        when = start + timedelta(hours=number * 7)
        body = "\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(rng.randint(10, 260)))
        text = (f"From: Demo Sender <sender{number % 7}@example.org>\nTo: you@example.org\n"
                f"Subject: demo message {number}\nDate: {when.strftime('%a, %d %b %Y %H:%M:%S +0000')}\n"
                f"Message-ID: <demo-{number}@mailsyncd.example>\n\n{body}\n")
        out.append((FOLDERS[number % len(FOLDERS)], text.encode()))
    return out


def run_demo(directory: Path | None, count: int) -> int:
    if find_dovecot() is None:
        raise FatalError("the demo needs Dovecot (Debian: dovecot-imapd dovecot-pop3d); scripts/run installs it")
    root = directory or Path(tempfile.mkdtemp(prefix="mailsyncd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"demo: starting a private Dovecot in {root / 'server'}")
    with DovecotServer(root / "server", users=(("demo", "demo-password"),)) as server:
        by_folder: dict[str, list[bytes]] = {}
        for folder, data in generate(count):
            by_folder.setdefault(folder, []).append(data)
        for folder, messages in by_folder.items():
            server.append_many("demo", folder, messages)
        config_path = root / "config.toml"
        config_path.write_text(f'[general]\nstate = "{root / "state.db"}"\n'
                               + server.account_toml("demo", root / "Mail"))
        config_path.chmod(0o600)
        print(f"demo: {count} messages in {len(by_folder)} folders on imaps://{server.host}:{server.imaps_port}")
        config = load_config(config_path)
        progress = TerminalProgress(sys.stdout) if sys.stdout.isatty() else Progress()
        with db.instance_lock(config.general.state):
            app = App.open(config)
            try:
                for label in ("first sync", "second sync (nothing new)"):
                    started = time.monotonic()
                    counts = app.sync_account(config.accounts[0], progress=progress)
                    elapsed = time.monotonic() - started
                    print(f"demo: {label}: {counts.summary()} in {elapsed:.2f} s")
            finally:
                progress.close()
                app.close()
    print(f"demo: the Maildir is in {root / 'Mail'}; try: mailsyncd --config {config_path} status")
    return 0
