"""The benchmark's mail: deterministic messages, how they fill the server, and the changes
applied between the no-op and the incremental round.

Every message is a pure function of (seed, number): the same command line gives the same bytes,
folders, flags and changes on every machine. Sizes: 98 % between 2 and 20 KB of text, 2 % between
100 KB and 2 MB (log-uniform) carrying a base64 attachment. Headers look like delivered mail:
Return-Path, Received, From, To, Subject, Date, Message-ID, sometimes Cc, In-Reply-To/References,
List-Id, RFC 2047 encoded subjects and 8-bit UTF-8 bodies.
"""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.header import Header
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # bench.py puts the repository on the path and builds the server
    from tests.server_helpers import DevServer

_NAMED_FOLDERS = (
    "INBOX", "Archive/2021", "Archive/2022", "Archive/2023", "Lists/python-dev", "Lists/debian-devel",
    "Work/Projects/alpha", "Work/Projects/beta", "Receipts", "Travel", "Family", "Lists/lkml", "Archive/2020",
    "Work/Team", "Newsletters", "Lists/dovecot", "Archive/2019", "Friends", "Work/Reports", "Accounts",
)
_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she",
    "there", "been", "one", "all", "we", "their", "has", "would", "when", "if", "so", "no", "what", "up", "out",
    "more", "about", "into", "them", "can", "server", "mailbox", "folder", "message", "archive", "backup", "offline",
    "durable", "sync", "release", "patch", "review", "meeting", "invoice", "schedule", "budget", "report", "deploy",
    "kernel", "package", "upstream", "maintainer", "question", "answer", "thanks", "regards", "über", "café",
    "naïve", "Grüße", "straße", "déjà", "señor",
)
_NAMES = ("Alice Martin", "Bob Chen", "Carol Díaz", "Dave Okafor", "Eve Novak", "Frank Müller", "Grace Ito",
          "Heidi Larsen", "Ivan Petrov", "Judy Smith", "Mallory Brown", "Niaj Kumar", "Olivia Rossi")
_LINE_POOL_SIZE = 4000
SEEN, ANSWERED, FLAGGED = "\\Seen", "\\Answered", "\\Flagged"


def folder_names(count: int) -> list[str]:
    """INBOX plus count-1 realistic folder names (hierarchy with '/')."""
    names = list(_NAMED_FOLDERS[:count])
    names += [f"Archive/Extra/{index:03d}" for index in range(count - len(names))]
    return names


def _rng(*parts: int) -> random.Random:
    return random.Random(":".join(map(str, parts)))  # noqa: S311 - test data, not secrets


def _line_pool(seed: int) -> list[str]:
    rng = _rng(seed, -1)
    lines = []
    for _ in range(_LINE_POOL_SIZE):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < rng.randint(40, 74):
            words.append(rng.choice(_WORDS))
        lines.append(" ".join(words))
    return lines


@dataclass
class Generator:
    """Makes message ``number`` of data set ``seed`` (and its initial flags)."""

    seed: int
    _pool: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pool = _line_pool(self.seed)

    def size_target(self, number: int) -> int:
        rng = _rng(self.seed, number, 1)
        if rng.random() < 0.02:
            return int(math.exp(rng.uniform(math.log(100_000), math.log(2_000_000))))
        return rng.randint(2_000, 20_000)

    def message(self, number: int, folder: str) -> bytes:
        rng = _rng(self.seed, number, 2)
        target = self.size_target(number)
        when = datetime(2019, 1, 1, tzinfo=UTC) + timedelta(minutes=37 * number + rng.randint(0, 30))
        sender = rng.choice(_NAMES)
        address = sender.split()[0].lower() + "@" + rng.choice(("example.org", "example.net", "example.com"))
        subject = " ".join(rng.choices(_WORDS, k=rng.randint(3, 9))).capitalize() + f" #{number}"
        headers = [
            f"Return-Path: <{address}>",
            f"Received: from mx{rng.randint(1, 9)}.example.net (mx.example.net [192.0.2.{rng.randint(1, 254)}])\n"
            f"\tby mail.example.org (Postfix) with ESMTPS id {rng.getrandbits(40):010X}\n"
            f"\tfor <alice@example.org>; {_date(when)}",
            f"From: {_encoded(sender, 'From')} <{address}>",
            "To: Alice <alice@example.org>",
        ]
        if rng.random() < 0.3:
            headers.append(f"Cc: {rng.choice(_NAMES).split()[0]} <cc{rng.randint(1, 50)}@example.com>")
        headers += [f"Subject: {_encoded(subject, 'Subject')}", f"Date: {_date(when)}",
                    f"Message-ID: <{self.seed}.{number}.{rng.getrandbits(32):08x}@mail.example.org>"]
        if rng.random() < 0.3:
            parent = f"<{self.seed}.{max(0, number - rng.randint(1, 50))}.0@mail.example.org>"
            headers += [f"In-Reply-To: {parent}", f"References: {parent}"]
        if folder.startswith("Lists/"):
            headers.append(f"List-Id: <{folder[6:]}.lists.example.org>")
        headers.append("MIME-Version: 1.0")
        text = self._text(rng, min(target, 20_000) - sum(len(h) for h in headers) - 200)
        if target <= 20_000:
            head = "\n".join([*headers, "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"])
            return (head + "\n\n" + text + "\n").replace("\n", "\r\n").encode("utf-8")
        return self._with_attachment(rng, headers, text, target)

    def _text(self, rng: random.Random, size: int) -> str:
        lines = rng.choices(self._pool, k=max(3, size // 58))
        return "\n".join(lines)

    @staticmethod
    def _with_attachment(rng: random.Random, headers: list[str], text: str, target: int) -> bytes:
        boundary = f"=_bench_{rng.getrandbits(64):016x}"
        payload = base64.encodebytes(rng.randbytes(target * 3 // 4)).decode("ascii")
        body = "\n".join([
            "This is a multi-part message in MIME format.", "", f"--{boundary}",
            "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit", "", text, "",
            f"--{boundary}", "Content-Type: application/octet-stream; name=\"attachment.bin\"",
            "Content-Transfer-Encoding: base64", "Content-Disposition: attachment; filename=\"attachment.bin\"", "",
            payload.rstrip("\n"), f"--{boundary}--", "",
        ])
        head = "\n".join([*headers, f"Content-Type: multipart/mixed; boundary=\"{boundary}\""])
        return (head + "\n\n" + body).replace("\n", "\r\n").encode("utf-8")

    def initial_flags(self, number: int) -> tuple[str, ...]:
        rng = _rng(self.seed, number, 3)
        flags = []
        if rng.random() < 0.7:
            flags.append(SEEN)
            if rng.random() < 0.15:
                flags.append(ANSWERED)
        if rng.random() < 0.03:
            flags.append(FLAGGED)
        return tuple(flags)


def _date(when: datetime) -> str:
    return when.strftime("%a, %d %b %Y %H:%M:%S +0000")


def _encoded(text: str, name: str) -> str:
    """RFC 2047 for non-ASCII header text, folded to 78 columns, as mail clients send it."""
    return Header(text, "us-ascii" if text.isascii() else "utf-8", header_name=name).encode()


@dataclass
class Layout:
    """Which message numbers go to which folder, and the UIDs the server gave them."""

    folders: list[str]
    numbers: dict[str, list[int]]
    uids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.numbers.values())


def layout_imap(count: int, folders: int, seed: int) -> Layout:
    names = folder_names(folders)
    rng = _rng(seed, -2)
    weights = [1.0 / math.sqrt(index + 1) for index in range(len(names))]  # INBOX and archives are bigger
    numbers: dict[str, list[int]] = {name: [] for name in names}
    for number in range(count):
        numbers[rng.choices(names, weights)[0]].append(number)
    return Layout(names, numbers)


def layout_pop(count: int) -> Layout:
    return Layout(["INBOX"], {"INBOX": list(range(count))})


def fill(server: DevServer, user: str, layout: Layout, generator: Generator) -> int:
    """Append every message (MULTIAPPEND), then set the initial flags; returns total bytes."""
    total = 0
    for folder in layout.folders:
        def stream(folder: str = folder) -> Iterator[bytes]:
            nonlocal total
            for number in layout.numbers[folder]:
                data = generator.message(number, folder)
                total += len(data)
                yield data

        if not layout.numbers[folder]:
            server.create_folder(user, folder)
            layout.uids[folder] = []
            continue
        layout.uids[folder] = server.append_many(user, folder, stream())
        by_flag: dict[str, list[int]] = {}
        for uid, number in zip(layout.uids[folder], layout.numbers[folder], strict=True):
            for flag in generator.initial_flags(number):
                by_flag.setdefault(flag, []).append(uid)
        for flag, uids in by_flag.items():
            for chunk in _chunks(uids):
                server.add_flags(user, folder, chunk, [flag])
    return total


def _chunks(items: list[int], size: int = 2000) -> Iterator[list[int]]:
    """UID lists short enough for one IMAP command line (Dovecot allows 64 KB)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Changes:
    """What happens on the server between round 2 and round 3: identical for every tool."""

    new: dict[str, list[int]] = field(default_factory=dict)  # folder -> new message numbers
    add: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (folder, flag) -> UIDs
    remove: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    expunge: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        new = sum(map(len, self.new.values()))
        flagged = sum(map(len, self.add.values())) + sum(map(len, self.remove.values()))
        expunged = sum(map(len, self.expunge.values()))
        return (f"{new} new messages in {len(self.new)} folder(s), {flagged} flag changes, "
                f"{expunged} expunged in {len(self.expunge)} folder(s)")

    @property
    def new_count(self) -> int:
        return sum(map(len, self.new.values()))


def plan_changes(layout: Layout, seed: int, with_flags: bool = True) -> Changes:
    """About 1 % new mail (in up to three folders), 2 % flag changes, 0.5 % expunged."""
    rng = _rng(seed, -3)
    total = layout.total
    changes = Changes()
    targets = layout.folders[: min(3, len(layout.folders))]
    next_number = 10_000_000
    for index in range(max(5, total // 100)):
        changes.new.setdefault(targets[index % len(targets)], []).append(next_number + index)
    pool = [(folder, uid) for folder in layout.folders for uid in layout.uids[folder]]
    picked = rng.sample(pool, min(len(pool), max(5, total // 50) + max(3, total // 200)))
    expunged, flagged = picked[: max(3, total // 200)], picked[max(3, total // 200) :]
    for folder, uid in expunged:
        changes.expunge.setdefault(folder, []).append(uid)
    if with_flags:
        for folder, uid in flagged:
            how, flag = rng.choice(((changes.add, SEEN), (changes.remove, SEEN), (changes.add, FLAGGED),
                                    (changes.add, ANSWERED)))
            how.setdefault((folder, flag), []).append(uid)
    return changes


def apply_changes(server: DevServer, user: str, changes: Changes, generator: Generator) -> None:
    for folder, numbers in changes.new.items():
        server.append_many(user, folder, (generator.message(n, folder) for n in numbers))
    for (folder, flag), uids in changes.add.items():
        server.add_flags(user, folder, uids, [flag])
    for (folder, flag), uids in changes.remove.items():
        server.remove_flags(user, folder, uids, [flag])
    for folder, uids in changes.expunge.items():
        server.expunge(user, folder, uids)
