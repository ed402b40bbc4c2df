"""Correctness of a tool's Maildir against the server: every server message present exactly once,
byte-equal after CRLF->LF, all messages of one server folder in one local folder, and (for tools
that sync flags) the same flags. Extra local files are classified, not failed: an archive keeps
what the server expunged, a mirror drops it."""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rawmail import normalize

# IMAP system flag -> Maildir info letter (Maildir spec); keywords are not compared.
_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}


def letters(flags: frozenset[str]) -> str:
    return "".join(sorted(_LETTERS[f] for f in flags if f in _LETTERS))


@dataclass(frozen=True)
class Expected:
    """The server's state: folder -> {sha256: Maildir flag letters}."""

    folders: dict[str, dict[str, str]]

    @property
    def count(self) -> int:
        return sum(map(len, self.folders.values()))

    def digests(self) -> set[str]:
        return {h for messages in self.folders.values() for h in messages}


@dataclass
class LocalCopy:
    directory: str
    flags: str


@dataclass
class Verdict:
    checked: int = 0
    missing: int = 0
    duplicated: int = 0
    misplaced: int = 0
    wrong_flags: int = 0
    kept_expunged: int = 0
    unknown: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.misplaced or self.wrong_flags or self.unknown
                    or self.errors)

    def text(self) -> str:
        problems = [f"{count} {label}" for count, label in (
            (self.missing, "missing"), (self.duplicated, "duplicated"), (self.misplaced, "in wrong folder"),
            (self.wrong_flags, "wrong flags"), (self.unknown, "unknown/altered files"))
            if count]
        problems += self.errors
        kept = f"; kept {self.kept_expunged} expunged" if self.kept_expunged else ""
        return ("ok" if not problems else "FAIL: " + ", ".join(problems)) + kept


def _strip_headers(data: bytes, names: tuple[bytes, ...]) -> bytes:
    """Drop header fields a tool adds on delivery (documented per tool), with their continuations."""
    if not names:
        return data
    head, separator, body = data.partition(b"\n\n")
    prefixes = tuple(name.lower() + b":" for name in names)
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(prefixes)
        if not dropping:
            kept.append(line)
    return b"\n".join(kept) + separator + body


def scan(root: Path, added_headers: tuple[bytes, ...] = ()) -> dict[str, list[LocalCopy]]:
    """Every message file under ``root`` (any layout): sha256 -> where and with which flags."""
    found: dict[str, list[LocalCopy]] = defaultdict(list)
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        here = Path(directory)
        if here.name not in ("cur", "new"):
            continue
        for name in files:
            data = _strip_headers(normalize((here / name).read_bytes()), added_headers)
            info = name.rsplit(":2,", 1)[1] if ":2," in name else ""
            found[hashlib.sha256(data).hexdigest()].append(
                LocalCopy(str(here.parent.relative_to(root)), "".join(sorted(info))))
    return found


def compare(expected: Expected, local: dict[str, list[LocalCopy]], ever_seen: set[str],
            check_flags: bool) -> Verdict:
    verdict = Verdict()
    owner: dict[str, str] = {}  # local directory -> server folder stored there
    for folder, messages in expected.folders.items():
        places: Counter[str] = Counter()
        for digest, flag_letters in messages.items():
            verdict.checked += 1
            copies = local.get(digest, [])
            if not copies:
                verdict.missing += 1
                continue
            if len(copies) > 1:
                verdict.duplicated += 1
            places[copies[0].directory] += 1
            if check_flags and copies[0].flags != flag_letters:
                verdict.wrong_flags += 1
        if places:
            home, count = places.most_common(1)[0]
            verdict.misplaced += sum(places.values()) - count
            if owner.setdefault(home, folder) != folder:
                verdict.errors.append(f"folders {owner[home]!r} and {folder!r} share {home!r}")
    wanted = expected.digests()
    for digest, copies in local.items():
        if digest in wanted:
            continue
        if digest in ever_seen:
            verdict.kept_expunged += len(copies)
        else:
            verdict.unknown += len(copies)
    return verdict
