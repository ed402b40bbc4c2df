"""Folder watches: one thread per folder in ``idle``, each on its own IMAP connection."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mailsyncd.config import AccountConfig
from mailsyncd.errors import MailsyncError, Retry
from mailsyncd.oauth2 import log_in
from mailsyncd.service.schedule import BACKOFF_CAP, RECONNECT_CAP, human, reconnect_delay
from mailsyncd.sources import imap
from mailsyncd.stores.maildir import MaildirStore

log = logging.getLogger(__name__)

STABLE_CONNECTION = 60.0  # an IDLE connection that lived this long resets the reconnect backoff
IDLE_SLICE = 1.0  # an IDLE thread notices a stop within this many seconds
LOCAL_POLL = 2.0  # seconds between two looks at a two-way account's Maildir directories


def open_watcher(account: AccountConfig, folder: str, renew: float) -> imap.IdleWatcher:
    """The one place a watch connects and logs in; AccountError (or AuthError) if it cannot."""
    return log_in(account, lambda secret: imap.watch_folder(account, secret, folder, renew))


class FolderWatch(threading.Thread):
    """One folder watched with IDLE on its own connection; calls ``push(folder)`` on
    every change and after every reconnect (changes made while it was away). Reconnects
    with backoff; ends when the server has no IDLE, leaving the folder to polling."""

    def __init__(self, account: AccountConfig, folder: str, push: Callable[[str], None], renew: float) -> None:
        super().__init__(name=f"idle {account.name}/{folder}", daemon=True)
        self.account = account
        self.folder = folder
        self.push = push
        self.renew = renew
        self.halt = threading.Event()

    def run(self) -> None:
        failures = 0
        reconnect = False
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                if not self._watch(reconnect):
                    return
            except MailsyncError as error:
                if error.retry is Retry.TEMPORARY:
                    failures = 1 if time.monotonic() - started > STABLE_CONNECTION else failures + 1
                    delay = reconnect_delay(failures)
                else:
                    failures, delay = failures + 1, BACKOFF_CAP
                reason = str(error)
            except Exception as error:  # a bug: log it and keep watching (the account boundary)
                log.exception("%s/%s: IDLE failed unexpectedly", self.account.name, self.folder)
                failures, delay, reason = failures + 1, RECONNECT_CAP, type(error).__name__
            if self.halt.is_set():
                return
            reconnect = True
            log.warning("%s (IDLE on %s: next try in %s)", reason, self.folder, human(delay))
            self.halt.wait(delay)

    def _watch(self, catch_up: bool) -> bool:
        """Watch until halted (True) or until the server turns out to lack IDLE (False)."""
        with open_watcher(self.account, self.folder, self.renew) as watcher:
            if not watcher.supports_idle:
                log.warning("%s: %s does not support IDLE; %s is polled on the account's schedule instead",
                            self.account.name, self.account.host, self.folder)
                return False
            log.info("%s/%s: watching with IDLE", self.account.name, self.folder)
            if catch_up:
                self.push(self.folder)
            while not self.halt.is_set():
                if watcher.wait(IDLE_SLICE):
                    log.debug("%s/%s: IDLE reported a change", self.account.name, self.folder)
                    self.push(self.folder)
        return True


class LocalWatch(threading.Thread):
    """Two-way (``mode = "sync"``): notices what a mail reader does in the Maildir and asks
    for a pass of the whole account (a move crosses folders). Every rename, new file or
    removal moves the mtime of a ``cur/`` or ``new/``, so a stat of each every LOCAL_POLL
    seconds is enough, portable and costs no dependency. The pass decides from its own
    scan; a pass's own changes make one more, which finds nothing to do."""

    def __init__(self, account: AccountConfig, push: Callable[[], None], interval: float = LOCAL_POLL) -> None:
        super().__init__(name=f"maildir {account.name}", daemon=True)
        self.account = account
        self.push = push
        self.interval = interval
        self.folder = "(the Maildir)"  # what the daemon's start-up line names as watched
        self.halt = threading.Event()
        self._store = MaildirStore(account.store.path, account.store.layout)

    def _mtimes(self) -> dict[str, tuple[int, int] | None]:
        folders = ["" if self._store.layout == "maildir++" else "INBOX", *self._store.local_folders()]
        return {folder: self._store.dir_mtimes(folder) for folder in folders}

    def run(self) -> None:
        try:
            seen = self._mtimes()
            while not self.halt.wait(self.interval):
                now = self._mtimes()
                if now != seen:
                    seen = now
                    log.debug("%s: the Maildir changed", self.account.name)
                    self.push()
        except OSError as error:  # the store went away: the scheduled passes say what that means
            log.warning("%s: stopped watching the Maildir: %s", self.account.name, error)
