"""Asking the running daemon to sync now: what ``mailsyncd sync`` does while ``mailsyncd
run`` holds the state database, instead of refusing.

The request is SIGUSR1 (every account, each after its running sync, if any); the answer is
read from the state database, where the daemon records every run: for each account, the
first run that started after the request, once it has finished. The daemon's pid comes
from the single-instance lock, which names a daemon as such, so a ``mailsyncd sync``
holding the lock is never sent a signal that would end it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection

from mailsyncd.app import App
from mailsyncd.domain import RunStatus
from mailsyncd.errors import FatalError
from mailsyncd.service.signals import SYNC_NOW

START_TIMEOUT = 30.0  # a daemon starts an asked-for run at once, or after the account's running one
POLL = 0.2  # seconds between looks at the state database


def sync_by_daemon(app: App, pid: int, names: Collection[str]) -> dict[str, RunStatus]:
    """Ask the daemon with ``pid`` for a run of every account and wait for the runs of
    ``names``; their recorded results, by name. FatalError when the daemon is gone or does
    not start a run of one of them in time (its config may not have the account)."""
    before = _last_runs(app, names)
    ask_daemon(pid)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        now = _last_runs(app, names)
        new = {name: run for name, run in now.items() if _started_since(run, before.get(name))}
        finished = {name: run for name, run in new.items() if run.finished is not None}
        if len(finished) == len(names):
            return finished
        late = sorted(name for name in names if name not in new)
        if late and time.monotonic() > deadline:
            raise FatalError(f"the running mailsyncd (pid {pid}) did not start a sync of {', '.join(late)} "
                             f"within {START_TIMEOUT:.0f} s; does its config have the account?")
        time.sleep(POLL)


def ask_daemon(pid: int) -> None:
    """Send SYNC_NOW to the daemon with ``pid``: a run of every account, soon."""
    try:
        os.kill(pid, SYNC_NOW)
    except ProcessLookupError:
        raise FatalError(f"the running mailsyncd (pid {pid}) has just stopped; try again") from None


def _last_runs(app: App, names: Collection[str]) -> dict[str, RunStatus]:
    return {entry.account: entry.last_run for entry in app.status()
            if entry.account in names and entry.last_run is not None}


def _started_since(run: RunStatus, before: RunStatus | None) -> bool:
    """True for a run that is not ``before``: a run going on at the request is not the
    one asked for (the daemon merges the request into the run after it)."""
    return before is None or run.started != before.started
