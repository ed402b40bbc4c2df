"""The daemon's ear on the state database: account definitions that changed, and wake-ups.

One thread. On PostgreSQL it LISTENs on the ``mailsyncd`` channel, so an ``accounts
import``/``remove`` or a ``wake`` reaches it at once; on every backend it also reads the
definitions' change counter every POLL seconds, which catches what a lost connection or
a SQLite state (no NOTIFY) would miss. It acts only through the callbacks: a change of
the accounts becomes the daemon's ordinary reload, a wake-up a request for a run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine

from mailsyncd.state import definitions

log = logging.getLogger(__name__)

POLL = 5.0  # seconds between reads of the change counter
RETRY = 5.0  # seconds before listening again after the database went away
LISTEN_TICK = 1.0  # the longest a wait for a notice blocks, so that a stop is seen soon


class StateWatch:
    """Calls ``changed()`` when the accounts in the database changed since ``generation``,
    and ``woken(name)`` (None: every account) for each ``mailsyncd wake``, until ``stop``."""

    def __init__(self, engine: Engine, generation: int, changed: Callable[[], None],
                 woken: Callable[[str | None], None], stop: threading.Event, poll: float = POLL) -> None:
        self.engine = engine
        self.seen = generation
        self.changed = changed
        self.woken = woken
        self.stop = stop
        self.poll = poll
        self.thread = threading.Thread(target=self._run, name="state watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                if definitions.notifies(self.engine):
                    self._listen()
                else:
                    while not self.stop.wait(self.poll):
                        self._check()
            except Exception as error:  # a restarted or unreachable server: try again, never end the daemon
                log.warning("the state database's notices: %s; trying again in %.0f s", type(error).__name__, RETRY)
                self.stop.wait(RETRY)

    def _listen(self) -> None:
        with definitions.listening(self.engine) as listener:
            self._check()  # what changed while no connection listened
            next_poll = time.monotonic() + self.poll
            while not self.stop.is_set():
                for payload in listener.wait(min(LISTEN_TICK, max(next_poll - time.monotonic(), 0.0))):
                    self._heard(payload)
                if time.monotonic() >= next_poll:
                    self._check()
                    next_poll = time.monotonic() + self.poll

    def _heard(self, payload: str) -> None:
        if payload == definitions.CHANGED:
            self._check()
        elif payload.startswith(definitions.WAKE):
            name = payload.removeprefix(definitions.WAKE)
            self.woken(None if name == definitions.EVERY else name)

    def _check(self) -> None:
        current = definitions.generation(self.engine)
        if current != self.seen:
            self.seen = current
            self.changed()
