"""Two-way sync tests' view of the world: a machine (config, Maildir, state database)
and the server's side read back by subject, so tests compare contents, not transcripts."""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mailsyncd.stores.maildir import INFO
from tests.conftest import DovecotUser
from tests.helpers import normalize, sync, write_config

SYNC = 'mode = "sync"'


def message(number: int, folder: str = "INBOX", size: int = 0) -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: message {number} in {folder}\r\n"
            f"Message-ID: <{number}.{folder}@example.org>\r\n\r\nbody {number}\r\n" + "x" * size).encode()


@dataclass
class Machine:
    """One machine's side: its config, store and state database."""

    config: Path

    @property
    def root(self) -> Path:
        return self.config.parent / "store-acct"

    def sync(self, *args: str) -> int:
        return sync(self.config, *args)

    def folder_dir(self, folder: str) -> Path:
        return self.root if folder == "INBOX" else self.root / f".{folder}"

    def files(self, folder: str = "INBOX") -> dict[str, Path]:
        """Subject -> file, for every message file of the folder."""
        found: dict[str, Path] = {}
        for sub in ("new", "cur"):
            for path in (self.folder_dir(folder) / sub).glob("*"):
                subject = next(line for line in path.read_bytes().split(b"\n") if line.startswith(b"Subject:"))
                assert subject.decode() not in found, f"two files of {subject!r} in {folder}"
                found[subject.decode()[len("Subject: "):]] = path
        return found

    def letters(self, folder: str = "INBOX") -> dict[str, str]:
        return {subject: path.name.partition(INFO)[2] for subject, path in self.files(folder).items()}

    def set_letters(self, subject: str, letters: str, folder: str = "INBOX") -> None:
        path = self.files(folder)[subject]
        base = path.name.split(INFO)[0]
        path.rename(path.parent.parent / "cur" / f"{base}{INFO}{letters}")

    def intents(self) -> int:
        db = sqlite3.connect(self.config.parent / "state.db")
        try:
            return int(db.execute("select count(*) from push_intents").fetchone()[0])
        finally:
            db.close()


def machine(tmp_path: Path, dovecot: DovecotUser, name: str, extra: str = "",
            folders: str = '["INBOX", "Archive"]') -> Machine:
    directory = tmp_path / name
    directory.mkdir()
    return Machine(write_config(directory, dovecot.server, dovecot.user, dovecot.password,
                                extra=f"{SYNC}\nfolders = {folders}\n{extra}"))


def server_subjects(dovecot: DovecotUser, folder: str = "INBOX") -> Counter[str]:
    bodies = dovecot.server.fetch_all(dovecot.user, folder).values()
    return Counter(next(line for line in normalize(body).split(b"\n") if line.startswith(b"Subject:"))
                   .decode()[len("Subject: "):] for body in bodies)


def server_flags(dovecot: DovecotUser, folder: str = "INBOX") -> dict[str, set[str]]:
    bodies = dovecot.server.fetch_all(dovecot.user, folder)
    flags = dovecot.server.flags(dovecot.user, folder)
    return {next(line for line in normalize(body).split(b"\n") if line.startswith(b"Subject:"))
            .decode()[len("Subject: "):]: flags[uid] for uid, body in bodies.items()}


def internaldates(dovecot: DovecotUser, folder: str) -> dict[str, str]:
    with dovecot.server.session(dovecot.user, folder, readonly=True) as conn:
        _, data = conn.uid("FETCH", "1:*", "(INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    found = {}
    for item in data:
        if isinstance(item, tuple):
            date = re.search(rb'INTERNALDATE "([^"]+)"', item[0])
            assert date is not None
            found[item[1].decode().strip()[len("Subject: "):]] = date.group(1).decode()
    return found
