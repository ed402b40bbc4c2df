"""IMAP connections the daemon keeps open between runs of an account.

A run on a kept connection pays no TCP and TLS handshake and no login: on a real network
that is three or four round trips and most of a no-op run's CPU. What a kept connection
must never do is carry a run it cannot serve, so one is given out again only when:

- the account's settings are the ones it logged in with (a reload that changed the host,
  the user or the password source logs in anew);
- its login is still good: an OAuth2 access token has a life, and a server may end a
  session whose token expired, so past the token's renewal time the next run logs in
  with a fresh one;
- nothing arrived on it while it waited (``ImapSession.reusable``): a BYE, an EOF, a
  reset, or a dead peer found by TCP keepalive all mean a fresh login, not a failed run.

While it waits, ``keep_alive`` (run by the daemon every minute) sends a NOOP to each
connection quiet for KEEPALIVE seconds, which keeps servers that log out idle clients
(RFC 9051 allows it after 30 minutes) and middleboxes from dropping it, and closes
connections that failed it or that no run took for LINGER seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailsyncd.config import AccountConfig
from mailsyncd.errors import MailsyncError
from mailsyncd.sources.imap import ImapSession

log = logging.getLogger(__name__)

KEEPALIVE = 240.0  # seconds without a command before a waiting connection gets a NOOP
NOOP_TIMEOUT = 15.0  # a NOOP not answered within this ends the connection
LINGER = 1800.0  # seconds a connection waits for its next run before it is closed


@dataclass
class Kept:
    """A logged-in session, and until when (``time.time()``) its login may be used."""

    session: ImapSession
    good_until: float = float("inf")


@dataclass
class _Waiting:
    kept: Kept
    account: AccountConfig  # the settings it logged in with
    used: float  # monotonic: when a run last gave it back
    active: float  # monotonic: when a command last went over it (a run or a NOOP)


class KeptSessions:
    """At most one waiting session per account; thread-safe. A session taken belongs to
    the taker until it is given back with ``put`` or closed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}

    def take(self, account: AccountConfig) -> Kept | None:
        """The account's waiting session if it can carry a run now, else None (and any
        session that cannot is closed)."""
        with self._lock:
            waiting = self._waiting.pop(account.name, None)
        if waiting is None:
            return None
        why = self._unusable(waiting, account)
        if why is not None:
            log.debug("%s: not using the kept connection: %s; logging in again", account.name, why)
            waiting.kept.session.close()
            return None
        return waiting.kept

    def _unusable(self, waiting: _Waiting, account: AccountConfig) -> str | None:
        if waiting.account != account:
            return "the account's settings changed"
        if self._wall() >= waiting.kept.good_until:
            return "its login is due for renewal"
        if self._clock() - waiting.used >= LINGER:
            return "it waited too long"
        if not waiting.kept.session.reusable():
            return "the server closed it"
        return None

    def put(self, account: AccountConfig, kept: Kept) -> None:
        """Keep ``kept`` for the account's next run; a session already waiting (one the
        run did not take) is closed."""
        if not kept.session.keep():
            log.debug("%s: the connection cannot wait for the next run (no UNSELECT); logging out", account.name)
            kept.session.close()
            return
        with self._lock:
            old = self._waiting.pop(account.name, None)
            now = self._clock()
            self._waiting[account.name] = _Waiting(kept, account, now, now)
        if old is not None:
            old.kept.session.close()

    def drop(self, name: str) -> None:
        """Close the account's waiting session: the account was removed or changed."""
        with self._lock:
            waiting = self._waiting.pop(name, None)
        if waiting is not None:
            waiting.kept.session.close()

    def keep_alive(self) -> None:
        """NOOP every session quiet for KEEPALIVE seconds; close those that fail it or
        waited LINGER seconds. A session is out of the table while its NOOP runs, so a
        run that starts meanwhile logs in anew rather than share the connection."""
        now = self._clock()
        with self._lock:
            due = {name: waiting for name, waiting in self._waiting.items() if now - waiting.active >= KEEPALIVE}
            for name in due:
                del self._waiting[name]
        for name, waiting in due.items():
            if now - waiting.used >= LINGER:
                log.debug("%s: closing the kept connection, unused for %.0f s", name, now - waiting.used)
                waiting.kept.session.close()
                continue
            try:
                waiting.kept.session.noop(self._clock() + NOOP_TIMEOUT)
            except MailsyncError as error:
                log.info("%s: the kept connection was lost (%s); the next run logs in again", name, error)
                waiting.kept.session.close()
                continue
            waiting.active = self._clock()
            self._restore(name, waiting)

    def _restore(self, name: str, waiting: _Waiting) -> None:
        with self._lock:
            if name in self._waiting:  # a run gave back a newer one meanwhile
                stale = waiting
            else:
                self._waiting[name] = waiting
                return
        stale.kept.session.close()

    def close(self) -> None:
        """Log out of every waiting session (the daemon stops)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for entry in waiting:
            with contextlib.suppress(Exception):
                entry.kept.session.close()
