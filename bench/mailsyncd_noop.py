"""mailsyncd's no-op pass timed from inside the process, without interpreter start-up, and
the daemon's no-op cycle on a kept connection.

``python mailsyncd_noop.py CONFIG`` prints JSON:

- ``import``, ``open``, ``sync``, ``open_and_sync``: seconds spent importing mailsyncd, in
  ``App.open`` (database open + migration check) and in one ``sync_account`` per account
  (connect, log in, sync, log out), so a no-op pass can be compared with a whole mbsync run
  apart from Python's own start-up; ``sync_round_trips``: that pass's round trips.
- ``cycle_wall``, ``cycle_cpu``, ``cycle_round_trips``: what the daemon pays per no-op cycle.
  On the same App, one ``sync_account(keep=True)`` pass logs in and keeps the session (as the
  daemon's first run does), then CYCLES more passes run on the kept connection; these are the
  medians over those passes of wall time (perf_counter), CPU (process_time, this process's
  user+sys) and round trips. ``keep_first``: the wall time of the pass that logged in.

Round trips are mailsyncd's own count, from its debug line "<account>: N round trips to <host>"
on the logger ``mailsyncd.app`` (a turn: an answer read after something was sent).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path

CYCLES = 5
_ROUND_TRIPS = re.compile(r": (\d+) round trips to ")


class RoundTrips(logging.Handler):
    """Collects the round-trip counts mailsyncd logs at the end of every IMAP session use."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if match := _ROUND_TRIPS.search(record.getMessage()):
            self.counts.append(int(match.group(1)))

    def since(self, mark: int) -> int:
        """The round trips logged after the first ``mark`` counts."""
        return sum(self.counts[mark:])


def main(config_path: str) -> int:
    started = time.perf_counter()
    from mailsyncd.app import App
    from mailsyncd.config import load_config
    from mailsyncd.state import db

    imported = time.perf_counter()
    trips = RoundTrips()
    app_log = logging.getLogger("mailsyncd.app")
    app_log.addHandler(trips)
    app_log.setLevel(logging.DEBUG)
    config = load_config(Path(config_path))
    walls: list[float] = []
    cpus: list[float] = []
    cycle_trips: list[int] = []
    with db.instance_lock(config.general.state):
        opening = time.perf_counter()
        app = App.open(config)
        opened = time.perf_counter()
        try:
            for account in config.accounts:
                app.sync_account(account)
            synced = time.perf_counter()
            sync_trips = trips.since(0)
            for account in config.accounts:
                app.sync_account(account, keep=True)
            keep_first = time.perf_counter() - synced
            for _ in range(CYCLES):
                mark, wall, cpu = len(trips.counts), time.perf_counter(), time.process_time()
                for account in config.accounts:
                    app.sync_account(account, keep=True)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
                cycle_trips.append(trips.since(mark))
        finally:
            app.close()
    json.dump({"import": imported - started, "open": opened - opening, "sync": synced - opened,
               "open_and_sync": synced - opening, "sync_round_trips": sync_trips, "keep_first": keep_first,
               "cycle_wall": statistics.median(walls), "cycle_cpu": statistics.median(cpus),
               "cycle_round_trips": statistics.median(cycle_trips)}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
