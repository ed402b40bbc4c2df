"""The signal inbox: handlers only note a signal; the main loop takes them out and acts.

A handler runs between two bytecodes of the main thread and must not take a lock the
main thread may hold, so it appends to a list and nothing more; a wakeup pipe
(``signal.set_wakeup_fd``) ends the main loop's sleep at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP = frozenset({signal.SIGTERM, signal.SIGINT})
RELOAD = signal.SIGHUP
SYNC_NOW = signal.SIGUSR1  # sent by `mailsyncd sync` while the daemon runs (service.control)
HANDLED = (*STOP, RELOAD, SYNC_NOW)


class SignalInbox:
    """Installs the handlers on ``__enter__`` and puts the previous ones back on ``__exit__``."""

    def __init__(self) -> None:
        self._signals: list[int] = []  # appended by the handler, consumed by ``wait``
        self._wakeup: tuple[int, int] | None = None
        self._old_fd = -1
        self._old: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> SignalInbox:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = (read_fd, write_fd)
        self._old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._old = {signum: signal.signal(signum, self._on_signal) for signum in HANDLED}
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._old_fd)
        assert self._wakeup is not None
        for fd in self._wakeup:
            os.close(fd)
        self._wakeup = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)

    def post(self, signum: int) -> None:
        """Deliver ``signum`` as if the process had received it: from a thread of ours
        (the state database's notices), so one code path answers both."""
        self._signals.append(signum)
        assert self._wakeup is not None
        with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is pending anyway
            os.write(self._wakeup[1], b"\0")

    def wait(self, timeout: float) -> list[int]:
        """Sleep until a signal arrives or ``timeout`` passes; the signals that came."""
        assert self._wakeup is not None
        with contextlib.suppress(InterruptedError):
            select.select([self._wakeup[0]], [], [], max(timeout, 0.0))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wakeup[0], 512):
                pass
        taken = []
        while self._signals:  # pop, not copy-and-clear: a signal may land in between
            taken.append(self._signals.pop(0))
        return taken
