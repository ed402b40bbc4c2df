"""Schedule arithmetic: each account's trigger, jitter, backoff after failures, and the
reconnect delays of IDLE connections. No threads, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from mailsyncd.config import AccountConfig
from mailsyncd.errors import ConfigError, Retry

JITTER_FRACTION = 0.1  # of the interval, so that accounts drift apart...
JITTER_MAX = 60.0  # ...but a daily sync is not an hour late
FIRST_RUN_SPREAD = 2.0  # seconds over which the first runs at start are spread
BACKOFF_CAP = 3600.0  # a failing account is tried at least hourly (or at its interval, if longer)
RECONNECT_FIRST, RECONNECT_CAP = 1.0, 300.0  # IDLE reconnects: 1 s, 2 s, 4 s ... 5 min


def jitter_for(period: float) -> float:
    """The most a run may start late, on purpose: 10% of the period, at most 60 s."""
    return max(0.0, min(period * JITTER_FRACTION, JITTER_MAX))


def backoff_delay(period: float, failures: int, retry: Retry = Retry.TEMPORARY) -> float:
    """Seconds until the next try after ``failures`` failures in a row.

    period * 2^failures, capped at an hour; never sooner than the normal schedule, so an
    account synced daily is not tried hourly. A failure that retrying soon will not mend
    (a refused login, what only the user can fix) goes to the cap at once.
    """
    cap = max(BACKOFF_CAP, period)
    if failures <= 0:
        return period
    if retry is not Retry.TEMPORARY:
        return cap
    return min(period * 2.0 ** min(failures, 32), cap)


def reconnect_delay(failures: int) -> float:
    """Seconds before the ``failures``-th reconnect of an IDLE connection in a row."""
    return min(RECONNECT_FIRST * 2.0 ** min(max(failures - 1, 0), 32), RECONNECT_CAP)


@dataclass(frozen=True)
class Schedule:
    trigger: BaseTrigger
    period: float  # seconds between runs (for cron, between the next two), for jitter and backoff
    jitter: float

    def first_run(self, timezone: tzinfo) -> datetime:
        """When to run first after a start or a change: soon, spread a little so that
        accounts do not all connect in the same second."""
        spread = random.uniform(0, min(self.jitter, FIRST_RUN_SPREAD))  # noqa: S311 - not a secret
        return datetime.now(timezone) + timedelta(seconds=spread)


def schedule_for(account: AccountConfig, path: Path, timezone: tzinfo) -> Schedule:
    """The account's trigger: ``cron`` if set, else ``interval``. A crontab that does not
    parse, or never fires, is a ConfigError naming the key."""
    if account.cron is None:
        jitter = jitter_for(account.interval)
        trigger: BaseTrigger = IntervalTrigger(seconds=account.interval, jitter=jitter, timezone=timezone)
        return Schedule(trigger, float(account.interval), jitter)
    key = f'account "{account.name}".cron'
    try:
        cron = CronTrigger.from_crontab(account.cron, timezone=timezone)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(path, key, f'not a crontab schedule ({error}); write e.g. "*/5 * * * *"') from None
    now = datetime.now(timezone)
    first = cron.get_next_fire_time(None, now)
    if first is None:
        raise ConfigError(path, key, "this schedule never fires")
    second = cron.get_next_fire_time(first, first)
    period = (second - first).total_seconds() if second is not None else 365 * 86400.0
    cron.jitter = jitter_for(period)
    return Schedule(cron, period, cron.jitter)


def human(seconds: float) -> str:
    """A delay as a person reads it in a log line: "30 s", "16 min", "1 h"."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:.0f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
