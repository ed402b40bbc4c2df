"""One account's runs: never two at once, and nothing asked for is lost meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection

from mailsyncd.config import AccountConfig
from mailsyncd.service.schedule import Schedule
from mailsyncd.service.watch import FolderWatch, LocalWatch


class AccountJob:
    """One account's runs: never two at once. What is asked while a run goes on (the
    schedule, IDLE pushes for some folders) is merged into the next run; a run of all
    folders covers any folders asked for."""

    def __init__(self, account: AccountConfig, schedule: Schedule) -> None:
        self.account = account
        self.schedule = schedule
        self.failures = 0
        self.retry_at = 0.0  # monotonic: pushes are ignored until the scheduled retry
        self.watches: list[FolderWatch | LocalWatch] = []
        self._guard = threading.Lock()
        self._removed = False
        self._running = False
        self._full = False
        self._asked = False  # a user asked for the next full run (wake, SIGUSR1)
        self.asked = False  # the run ``take`` handed out last was asked for: not skipped as not due
        self._folders: set[str] = set()

    def request(self, folders: Collection[str] | None, asked: bool = False) -> bool:
        """Ask for a run of ``folders`` (None: all of them; ``asked``: by a user, so that a
        shared state does not skip it as synced recently). True when the caller must now
        call ``drain``; False when a drain that runs already will pick the request up."""
        with self._guard:
            if self._removed:
                return False
            if folders is None:
                self._full = True
                self._asked = self._asked or asked
            elif time.monotonic() < self.retry_at:
                return False  # backing off; the scheduled retry syncs every folder
            else:
                self._folders.update(folders)
            if self._running:
                return False
            self._running = True
            return True

    def take(self, stopping: bool) -> tuple[str, ...] | None:
        """The folders of the next run (() means all), or None when the drain must end."""
        with self._guard:
            if not self._full and time.monotonic() < self.retry_at:
                self._folders.clear()  # the run before failed: pushes wait for the scheduled retry
            if stopping or self._removed or not (self._full or self._folders):
                self._running = False
                self._full = self._asked = False
                self._folders.clear()
                return None
            folders = () if self._full else tuple(sorted(self._folders))
            self.asked = self._full and self._asked
            self._full = self._asked = False
            self._folders.clear()
            return folders

    def release(self) -> None:
        """End a drain that failed with an unexpected exception."""
        with self._guard:
            self._running = False

    def remove(self) -> None:
        with self._guard:
            self._removed = True
        self.halt_watches()

    def halt_watches(self) -> None:
        """Ask every folder watch to end (they notice within a second); the list stays, to join."""
        for watch in self.watches:
            watch.halt.set()

    def drain(self, run_once: Callable[[AccountJob, tuple[str, ...]], None], stopping: threading.Event) -> None:
        """Run until nothing is asked any more. Call it only after ``request`` said True."""
        try:
            while (folders := self.take(stopping.is_set())) is not None:
                run_once(self, folders)
        except BaseException:
            self.release()
            raise
