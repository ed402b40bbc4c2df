"""Maildir: one file per message, published by rename, flags in the name.

A message is written under ``tmp/``, fsync'd, renamed into ``new/`` (no flags yet, so
a mail reader shows it as new) or ``cur/`` (with the ``:2,`` info suffix), and the
directory is fsync'd at commit. The unique name is chosen before the write and
recorded as intent, so that after a kill the file can be found again by name, even if a
mail reader has since moved it to ``cur/`` or changed its flags.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mailsyncd import names
from mailsyncd.domain import NO_FLAGS, Flags, LocalContent, LocalCopy, LocalFolderScan, LocalMessage, Stored
from mailsyncd.errors import StoreError
from mailsyncd.fsio import fsync_dir, make_private_dirs, safe_join, sync_files, write_new_file
from mailsyncd.message import digest, message_id, server_size
from mailsyncd.stores.base import local_copy

SUBDIRS = ("tmp", "new", "cur")
INFO = ":2,"

# IMAP system flags and the common $Forwarded keyword, as Maildir info letters.
_LETTERS = {"\\draft": "D", "\\flagged": "F", "$forwarded": "P", "\\answered": "R", "\\seen": "S",
            "\\deleted": "T"}
_FLAGS = {letter: flag for flag, letter in _LETTERS.items()}


def info_letters(flags: Flags) -> str:
    return "".join(sorted({_LETTERS[flag.lower()] for flag in flags if flag.lower() in _LETTERS}))


def flags_from_name(name: str) -> Flags:
    _, _, info = name.partition(INFO)
    return frozenset(_FLAGS[letter].title() if letter != "P" else "$Forwarded"
                     for letter in info if letter in _FLAGS)


def unique_part(name: str) -> str:
    """A message's local identity: its file name before the info suffix."""
    return name.split(INFO, 1)[0]


def _keep_unknown(name: str, letters: str) -> str:
    """``letters`` plus the info letters of ``name`` that mailsyncd does not know (a
    reader's own, Dovecot's keyword letters): a rename never drops what it cannot read."""
    _, _, info = name.partition(INFO)
    return "".join(sorted(set(letters) | {letter for letter in info if letter not in _FLAGS}))


SCAN_TRIES = 3  # listings of one folder before a folder that keeps changing is taken as listed


@dataclass(frozen=True)
class MaildirListing:
    """One folder as listed: its messages (by unique name), where each file is, and the
    st_mtime_ns of cur/ and new/ the listing is valid for (None when they kept moving
    while it was listed, so the listing must not be taken as current next time)."""

    scan: LocalFolderScan
    locations: dict[str, str]
    mtimes: tuple[int, int] | None


def _escape_host(host: str) -> str:
    # The Maildir spec escapes "/" and ":" in the host part as octal.
    return host.replace("/", "\\057").replace(":", "\\072")


class MaildirStore:
    def __init__(self, root: Path, layout: names.Layout = "maildir++") -> None:
        self.root = root
        self.layout = layout
        self._host = _escape_host(socket.gethostname())
        self._sequence = itertools.count()

    def folder_path(self, name: str, delimiter: str | None) -> str:
        return names.folder_path(name, delimiter, self.layout)

    def _folder_dir(self, folder: str) -> Path:
        path = safe_join(self.root, folder) if folder else self.root
        for sub in SUBDIRS:
            if not (path / sub).is_dir():
                make_private_dirs(path / sub)
        return path

    def _unique(self) -> str:
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micro}P{os.getpid()}Q{next(self._sequence)}.{self._host}"

    @contextlib.contextmanager
    def open_folder(self, folder: str) -> Iterator[MaildirWriter]:
        writer = MaildirWriter(self, folder, self._folder_dir(folder))
        try:
            yield writer
        finally:
            writer.rollback()

    def ensure_folder(self, folder: str) -> None:
        """Create a folder's cur/, new/ and tmp/ (a folder first met on the server)."""
        self._folder_dir(folder)

    def local_folders(self) -> list[str]:
        """The folders of this store, as relative paths: every directory under the root
        (at its top for Maildir++) that has both cur/ and new/. The root itself (INBOX in
        Maildir++) is left out."""
        found: list[str] = []
        if not self.root.is_dir():
            return found
        if self.layout == "maildir++":
            candidates = [entry for entry in self.root.iterdir() if entry.name.startswith(".")]
        else:
            candidates = [path for path in self.root.rglob("*") if path.name not in SUBDIRS
                          and not any(part in SUBDIRS or part.startswith(".") for part in path.relative_to(
                              self.root).parts)]
        for path in candidates:
            if (path / "cur").is_dir() and (path / "new").is_dir():
                found.append(path.relative_to(self.root).as_posix())
        return sorted(found)

    def dir_mtimes(self, folder: str) -> tuple[int, int] | None:
        """st_mtime_ns of the folder's cur/ and new/, or None when either is missing.
        Every rename, creation or removal of a message changes one of them."""
        try:
            directory = safe_join(self.root, folder) if folder else self.root
            return (directory / "cur").stat().st_mtime_ns, (directory / "new").stat().st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list_folder(self, folder: str) -> MaildirListing:
        """Every message file of a folder, without reading one. A folder whose cur/ or
        new/ is missing lists as not present, never as empty. The directories are stat'd
        before and after the listing; when they moved meanwhile, it is listed again
        ("somebody messed with the mailbox since we started listing it"). A listing of
        directories changed within the second it started is not to be trusted later: a
        message could still come in that second without moving their mtime (notmuch)."""
        directory = safe_join(self.root, folder) if folder else self.root
        prefix = f"{folder}/" if folder else ""
        for _ in range(SCAN_TRIES):
            started = time.time_ns()
            before = self.dir_mtimes(folder)
            if before is None:
                return MaildirListing(LocalFolderScan(False), {}, None)
            messages: dict[str, LocalMessage] = {}
            locations: dict[str, str] = {}
            try:
                for sub in ("new", "cur"):
                    with os.scandir(directory / sub) as entries:
                        for entry in entries:
                            if entry.name.startswith("."):
                                continue
                            stat = entry.stat(follow_symlinks=False)
                            unique = unique_part(entry.name)
                            messages[unique] = LocalMessage(unique, sub, flags_from_name(entry.name), stat.st_size,
                                                            stat.st_mtime_ns)
                            locations[unique] = f"{prefix}{sub}/{entry.name}"
            except FileNotFoundError:
                continue  # a file or directory went while listing: list again
            after = self.dir_mtimes(folder)
            if after == before:
                recent = max(before) // 1_000_000_000 >= started // 1_000_000_000
                return MaildirListing(LocalFolderScan(True, messages), locations, None if recent else before)
        return MaildirListing(LocalFolderScan(True, messages), locations, None)

    def read_content(self, location: str) -> LocalContent | None:
        """What matching a file with a server message needs; None when it is gone."""
        current = self.find(location)
        if current is None:
            return None
        data = self._path(current).read_bytes()
        return LocalContent(digest(data), message_id(data), server_size(data))

    def move_into(self, location: str, folder: str) -> str:
        """Rename a message into another folder of this store (a move another client made
        on the server), keeping its name; returns the new location, or ``location`` when
        the file is no longer there."""
        current = self.find(location)
        if current is None:
            return location
        _, sub, name = self._split(current)
        target_dir = self._folder_dir(folder)
        os.rename(self._path(current), target_dir / sub / name)
        fsync_dir(target_dir / sub)
        fsync_dir(self._path(current).parent)
        return f"{folder}/{sub}/{name}" if folder else f"{sub}/{name}"

    def _split(self, location: str) -> tuple[str, str, str]:
        folder, _, rest = location.rpartition("/")
        folder, _, sub = folder.rpartition("/") if "/" in folder else ("", "", folder)
        if sub not in ("new", "cur"):
            raise StoreError(f"not a Maildir location: {location!r}")
        return folder, sub, rest

    def find(self, location: str) -> str | None:
        """The current location of a message, following a mail reader's moves."""
        folder, sub, name = self._split(location)
        base = name.split(INFO, 1)[0]
        directory = safe_join(self.root, folder) if folder else self.root
        if (directory / sub / name).exists():
            return location
        prefix = f"{folder}/" if folder else ""
        if (directory / "new" / base).exists():
            return f"{prefix}new/{base}"
        with contextlib.suppress(FileNotFoundError), os.scandir(directory / "cur") as entries:
            for entry in entries:
                if entry.name == base or entry.name.startswith(base + INFO):
                    return f"{prefix}cur/{entry.name}"
        return None

    def _path(self, location: str) -> Path:
        return safe_join(self.root, location)

    def read(self, location: str) -> bytes:
        current = self.find(location)
        if current is None:
            raise StoreError(f"message missing from the store: {location}")
        return self._path(current).read_bytes()

    def recover(self, pending: Iterable[str]) -> dict[str, Stored]:
        found: dict[str, Stored] = {}
        for location in pending:
            folder, _, name = self._split(location)
            base = name.split(INFO, 1)[0]
            directory = safe_join(self.root, folder) if folder else self.root
            with contextlib.suppress(FileNotFoundError):
                (directory / "tmp" / base).unlink()
            current = self.find(location)
            if current is not None:
                data = self._path(current).read_bytes()
                found[location] = Stored(current, digest(data))
        return found

    def index(self, folder: str) -> list[LocalCopy]:
        """The files of new/ and cur/, by name (tmp/ holds no whole message); a file
        removed while the index is read is passed over."""
        directory = safe_join(self.root, folder) if folder else self.root
        prefix = f"{folder}/" if folder else ""
        copies: list[LocalCopy] = []
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                names_found = sorted(entry.name for entry in os.scandir(directory / sub)
                                     if not entry.name.startswith(".") and entry.is_file())
                for name in names_found:
                    with contextlib.suppress(FileNotFoundError):
                        copies.append(local_copy(f"{prefix}{sub}/{name}", (directory / sub / name).read_bytes()))
        return copies

    def set_flags(self, location: str, flags: Flags) -> str:
        current = self.find(location)
        if current is None:
            return location
        folder, sub, name = self._split(current)
        base = name.split(INFO, 1)[0]
        letters = _keep_unknown(name, info_letters(flags))
        # Keep a flagless message in new/ so that readers still show it as new.
        target_sub = "new" if sub == "new" and not letters else "cur"
        target_name = base if target_sub == "new" else base + INFO + letters
        prefix = f"{folder}/" if folder else ""
        target = f"{prefix}{target_sub}/{target_name}"
        if target != current:
            os.rename(self._path(current), self._path(target))
        return target

    def flags(self, location: str) -> Flags:
        current = self.find(location)
        return NO_FLAGS if current is None else flags_from_name(current)

    def remove(self, location: str) -> None:
        current = self.find(location)
        if current is not None:
            path = self._path(current)
            path.unlink()
            fsync_dir(path.parent)


class MaildirWriter:
    """Writes a batch under tmp/ and publishes it at commit, in the order that keeps
    invariant 1: all data durable (one group commit), then the renames, then the
    directories fsync'd so the new names survive a power cut too."""

    def __init__(self, store: MaildirStore, folder: str, directory: Path) -> None:
        self._store = store
        self._prefix = f"{folder}/" if folder else ""
        self._directory = directory
        self._written: list[tuple[Path, Path, Stored]] = []  # (tmp, final, what) not yet published
        self._replacing: set[Path] = set()  # tmp files that go over a message already there

    def reserve(self, flags: Flags = NO_FLAGS, internaldate: datetime | None = None) -> MaildirReservation:
        letters = info_letters(flags)
        base = self._store._unique()
        if letters or "\\seen" in {flag.lower() for flag in flags}:
            return MaildirReservation(self, f"{self._prefix}cur/{base}{INFO}{letters}", internaldate)
        return MaildirReservation(self, f"{self._prefix}new/{base}", internaldate)

    def replace(self, location: str) -> MaildirReservation:
        """Over the file at ``location``, wherever a mail reader moved it: the whole
        message goes to tmp/ under the same unique name, and commit renames it over the
        file, whose name (and so its flags) it takes; rename(2) is atomic, so the name
        holds the old bytes or the new ones, never neither or both."""
        current = self._store.find(location)
        if current is None:
            raise StoreError(f"message missing from the store: {location}")
        mtime = self._store._path(current).stat().st_mtime
        reservation = MaildirReservation(self, current, datetime.fromtimestamp(mtime, UTC))
        self._replacing.add(self._directory / "tmp" / self._store._split(current)[2].split(INFO, 1)[0])
        return reservation

    def _write(self, location: str, data: bytes, internaldate: datetime | None) -> None:
        _, sub, name = self._store._split(location)
        tmp = self._directory / "tmp" / name.split(INFO, 1)[0]
        mtime = internaldate.timestamp() if internaldate is not None else None
        write_new_file(tmp, data, mtime, sync=False)
        self._written.append((tmp, self._directory / sub / name, Stored(location, digest(data))))

    def _target(self, tmp: Path, final: Path, what: Stored) -> tuple[Path, Stored]:
        """Where a written file goes: its reserved name, or for a replacement the name
        the file it replaces has now (a reader may have changed its flags meanwhile)."""
        if tmp not in self._replacing:
            return final, what
        current = self._store.find(what.location) or what.location
        return self._store._path(current), Stored(current, what.sha256)

    def commit(self) -> list[Stored]:
        if not self._written:
            return []
        # Order matters: no name is published before every byte behind it is on disk,
        # so no reader and no recovery ever sees a torn message.
        sync_files([tmp for tmp, _, _ in self._written], self._directory)
        published = [(tmp, *self._target(tmp, final, what)) for tmp, final, what in self._written]
        for tmp, final, _ in published:
            os.rename(tmp, final)
        for sub in sorted({final.parent for _, final, _ in published} | {self._directory / "tmp"}):
            fsync_dir(sub)
        self._written.clear()
        self._replacing.clear()
        return [what for _, _, what in published]

    def rollback(self) -> None:
        """Unpublished temporaries are removed; recovery would do it too, but sooner is tidier."""
        for tmp, _, _ in self._written:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._written.clear()
        self._replacing.clear()


class MaildirReservation:
    """A unique name, chosen before the write: recovery finds the file again by it."""

    def __init__(self, writer: MaildirWriter, location: str, internaldate: datetime | None) -> None:
        self._writer = writer
        self.location = location
        self._internaldate = internaldate

    def write(self, data: bytes) -> None:
        self._writer._write(self.location, data, self._internaldate)
