"""The one place where bytes become durable on disk.

Every store goes through these helpers so that the ordering rules of invariant 1 are
written once: data is fsync'd before the rename that publishes it, and the directory is
fsync'd after the rename so that the new name itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from mailsyncd.errors import UnsafePath

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def safe_join(root: Path, relative: str) -> Path:
    """Join a relative store path to its root, refusing anything that would leave it.

    names.py already makes escaping impossible; this is the second lock on the door,
    checked on every path a store creates.
    """
    if relative.startswith("/") or "\0" in relative:
        raise UnsafePath(f"refusing path outside the store: {relative!r}")
    parts = [part for part in relative.split("/") if part]
    if any(part in {".", ".."} for part in parts):
        raise UnsafePath(f"refusing path outside the store: {relative!r}")
    path = root.joinpath(*parts)
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise UnsafePath(f"refusing path outside the store (symlink?): {relative!r}")
    return path


def make_private_dirs(path: Path) -> None:
    """mkdir -p with 0700 for every directory it creates (invariant 8)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=PRIVATE_DIR)
            fsync_dir(directory.parent)


# What a local disk answers when a store cannot be written at all, as opposed to the
# network errors that are OSErrors too.
STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EACCES,
                          errno.EPERM, errno.EIO, errno.EFBIG, errno.ENAMETOOLONG})


def write_refusal(path: Path) -> str | None:
    """Why ``path`` (a directory, made if missing) could not be made or written, or None.
    Changes nothing: asks the nearest existing ancestor."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            return f"{existing} is a dangling symbolic link"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        except OSError:
            read_only = 0
        return f"{existing} is on a read-only file system" if read_only else f"{existing} is not writable"
    return None


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable. EINVAL means the filesystem cannot, not that
    anything went wrong, so only that one is swallowed."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


_SYNCFS = _load_syncfs()


def sync_files(paths: Sequence[Path], directory: Path) -> None:
    """Make the data of many files durable at once (a group commit).

    On Linux one syncfs(2) of the filesystem holding ``directory`` writes back every
    file's data and metadata in one journal commit, several times faster than one
    fsync per file; elsewhere, or if syncfs fails, each file is fsync'd in turn.
    """
    if not paths:
        return
    if _SYNCFS is not None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_new_file(path: Path, data: bytes, mtime: float | None = None, sync: bool = True) -> None:
    """Create ``path`` exclusively, write all of ``data`` (and its mtime) and, unless the
    caller will group-commit with sync_files, fsync it.

    On any failure the partial file is removed, so a temporary name never holds a torn
    message that something could mistake for a whole one.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    os.close(fd)


@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[int]:
    """Open (creating 0600) and lock ``path`` the way mutt and Dovecot expect for mbox:
    a ``.lock`` dotlock file first, then an fcntl write lock. Yields the descriptor."""
    with dotlock(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, PRIVATE_FILE)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # closing drops the fcntl lock


def _stale(lock: Path, stale_after: float) -> bool:
    """Old enough, or left by a process of this host that is gone (a kill -9 leaves
    its dotlock behind; waiting minutes for it would stall every later run)."""
    if time.time() - lock.stat().st_mtime > stale_after:
        return True
    pid, _, host = lock.read_text(errors="replace").strip().partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def dotlock(path: Path, timeout: float = 30.0, stale_after: float = 300.0) -> Iterator[None]:
    """The classic ``<file>.lock`` taken with O_EXCL; a lock older than ``stale_after``
    seconds is taken over, as procmail and Dovecot do."""
    lock = path.with_name(path.name + ".lock")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if _stale(lock, stale_after):
                    lock.unlink()
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lock} is held by another program") from None
            time.sleep(0.05)
            continue
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        os.close(fd)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
