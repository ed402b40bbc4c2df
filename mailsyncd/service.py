"""The daemon, ``mailsyncd run``: scheduled and push (IDLE) syncs, in the foreground.

Shape: one APScheduler job per account (its ``interval`` or ``cron``, a first run at start,
jitter so that accounts do not hit their servers together, ``max_instances=1``,
``coalesce=True``), one thread per folder in ``idle`` holding its own IMAP connection, and
the main thread handling signals, sd_notify and the watchdog. Every sync goes through
``App.sync_account``, as ``mailsyncd sync`` does, on one shared App: one engine, whose
SQLite WAL and BEGIN IMMEDIATE let accounts sync in parallel threads.

Runs of one account never overlap: ``AccountJob`` merges what is asked meanwhile (a
scheduled run, IDLE pushes for some folders) into the next run, so nothing is lost and
nothing runs twice at once. A failing account backs off exponentially without touching the
others; a login refusal backs off to the cap at once, since retrying soon will not help.

Stopping (SIGTERM, SIGINT) must not cut a write in half: the running sync is stopped by
its Checkpoint, which raises Interrupted at a "write" step only. That step lies inside the
executor's try block, whose ``finally`` makes durable and records every message written so
far and forgets the rest of the batch (fetched again next run). Nothing is ever raised
asynchronously into a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import logging
import os
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from mailsyncd.app import App
from mailsyncd.config import AccountConfig, Config, load_config
from mailsyncd.errors import AuthError, ConfigError, Interrupted, MailsyncError
from mailsyncd.secrets import password_for
from mailsyncd.sources import imap
from mailsyncd.state import db
from mailsyncd.sync.run import Counts

log = logging.getLogger(__name__)

JITTER_FRACTION = 0.1  # of the interval, so that accounts drift apart...
JITTER_MAX = 60.0  # ...but a daily sync is not an hour late
FIRST_RUN_SPREAD = 2.0  # seconds over which the first runs at start are spread
BACKOFF_CAP = 3600.0  # a failing account is tried at least hourly (or at its interval, if longer)
RECONNECT_FIRST, RECONNECT_CAP = 1.0, 300.0  # IDLE reconnects: 1 s, 2 s, 4 s ... 5 min
STABLE_CONNECTION = 60.0  # an IDLE connection that lived this long resets the reconnect backoff
IDLE_SLICE = 1.0  # an IDLE thread notices a stop within this many seconds
STOP_TIMEOUT = 15.0  # then the daemon exits even if a sync hangs (systemd's TimeoutStopSec is 30 s)
STOP_POINTS = frozenset({"write"})  # Checkpoint steps inside the executor's try/finally
WORKERS = 32  # threads for syncs; one account never uses more than one


# --- systemd: sd_notify and the watchdog ---------------------------------------------------


def notify(*fields: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send sd_notify fields ("READY=1", "STATUS=...") to $NOTIFY_SOCKET.

    A path or an abstract socket ("@name"). Does nothing without $NOTIFY_SOCKET and never
    raises: a lost status line must not stop mail. True when the datagram was sent.
    """
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a kind we do not speak (vsock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as error:
        log.debug("sd_notify to %s failed: %s", environ["NOTIFY_SOCKET"], error)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 heartbeats (half of $WATCHDOG_USEC, as sd_watchdog_enabled
    advises), or None when systemd asked this process for none."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by a wrapper)
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


# --- schedules, jitter, backoff --------------------------------------------------------------


def jitter_for(period: float) -> float:
    """The most a run may start late, on purpose: 10% of the period, at most 60 s."""
    return max(0.0, min(period * JITTER_FRACTION, JITTER_MAX))


def backoff_delay(period: float, failures: int, auth: bool = False) -> float:
    """Seconds until the next try after ``failures`` failures in a row.

    period * 2^failures, capped at an hour; never sooner than the normal schedule, so an
    account synced daily is not tried hourly. A refused login goes to the cap at once.
    """
    cap = max(BACKOFF_CAP, period)
    if failures <= 0:
        return period
    if auth:
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


def _human(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:.0f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _accounts(count: int) -> str:
    return f"{count} account" if count == 1 else f"{count} accounts"


# --- one account's runs ------------------------------------------------------------------------


class AccountJob:
    """One account's runs: never two at once. What is asked while a run goes on (the
    schedule, IDLE pushes for some folders) is merged into the next run; a run of all
    folders covers any folders asked for."""

    def __init__(self, account: AccountConfig, schedule: Schedule) -> None:
        self.account = account
        self.schedule = schedule
        self.failures = 0
        self.retry_at = 0.0  # monotonic: pushes are ignored until the scheduled retry
        self.watches: list[FolderWatch] = []
        self._guard = threading.Lock()
        self._removed = False
        self._running = False
        self._full = False
        self._folders: set[str] = set()

    def request(self, folders: Collection[str] | None) -> bool:
        """Ask for a run of ``folders`` (None: all of them). True when the caller must now
        call ``drain``; False when a drain that runs already will pick the request up."""
        with self._guard:
            if self._removed:
                return False
            if folders is None:
                self._full = True
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
                self._full = False
                self._folders.clear()
                return None
            folders = () if self._full else tuple(sorted(self._folders))
            self._full = False
            self._folders.clear()
            return folders

    def release(self) -> None:
        """End a drain that failed with an unexpected exception."""
        with self._guard:
            self._running = False

    def remove(self) -> None:
        with self._guard:
            self._removed = True
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
            except AuthError as error:
                failures, delay, reason = failures + 1, BACKOFF_CAP, str(error)
            except MailsyncError as error:
                failures = 1 if time.monotonic() - started > STABLE_CONNECTION else failures + 1
                delay, reason = reconnect_delay(failures), str(error)
            except Exception as error:  # a bug: log it and keep watching (the account boundary)
                log.exception("%s/%s: IDLE failed unexpectedly", self.account.name, self.folder)
                failures, delay, reason = failures + 1, RECONNECT_CAP, type(error).__name__
            if self.halt.is_set():
                return
            reconnect = True
            log.warning("%s (IDLE on %s: next try in %s)", reason, self.folder, _human(delay))
            self.halt.wait(delay)

    def _watch(self, catch_up: bool) -> bool:
        """Watch until halted (True) or until the server turns out to lack IDLE (False)."""
        with imap.watch_folder(self.account, password_for(self.account), self.folder, self.renew) as watcher:
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


# --- metrics ------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in a registry of their own, served on 127.0.0.1 only if asked."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["account"]
        self.messages = Counter("mailsyncd_messages_synced", "Messages stored", labels, registry=self.registry)
        self.bytes = Counter("mailsyncd_bytes_synced", "Bytes of messages stored", labels, registry=self.registry)
        self.errors = Counter("mailsyncd_sync_errors", "Failed account runs and folder errors", labels,
                              registry=self.registry)
        self.last_success = Gauge("mailsyncd_last_success_timestamp_seconds",
                                  "When the account last synced without an account error", labels,
                                  registry=self.registry)
        self.duration = Gauge("mailsyncd_sync_duration_seconds", "How long the account's last run took",
                              labels, registry=self.registry)
        self._server: Any = None

    def serve(self, port: int) -> None:
        try:
            self._server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as error:
            log.error("metrics: cannot listen on 127.0.0.1:%d: %s; going on without metrics", port, error)
            return
        log.info("metrics: serving on http://127.0.0.1:%d/metrics", port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --- the daemon ---------------------------------------------------------------------------------


def run(config: Config, idle_renew: float = imap.IDLE_RENEW) -> int:
    """``mailsyncd run``: holds the single-instance lock (invariant 7) for the daemon's
    life; a second daemon on the same state raises AlreadyRunning (exit 2)."""
    with db.instance_lock(config.general.state):
        return Daemon(config, idle_renew).run()


def _job_id(name: str) -> str:
    return f"sync:{name}"


class Daemon:
    def __init__(self, config: Config, idle_renew: float = imap.IDLE_RENEW) -> None:
        self.config = config
        self.idle_renew = idle_renew
        self.scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(WORKERS)})
        self.timezone: tzinfo = self.scheduler.timezone
        self.metrics = Metrics()
        self.app: App | None = None
        self.jobs: dict[str, AccountJob] = {}
        self._stopping = threading.Event()
        self._busy = threading.Condition()
        self._active = 0  # drains running
        self._syncing: set[str] = set()
        self._signals: list[int] = []  # appended by the handler, consumed by the main loop
        self._wakeup: tuple[int, int] | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def run(self) -> int:
        restore = self._install_signals()
        try:
            schedules = self._schedules(self.config)  # a bad crontab stops us before anything starts
            self.app = App.open(self.config)
            try:
                self._start(schedules)
                self._loop()
            except BaseException:
                self._shutdown()
                raise
            return self._shutdown()
        finally:
            restore()

    def _start(self, schedules: dict[str, Schedule]) -> None:
        if self.config.general.metrics_port is not None:
            self.metrics.serve(self.config.general.metrics_port)
        # The skipped-run warning is the coalescing we asked for; job errors are ours to log.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        self.scheduler.start()
        for account in self.config.accounts:
            self._add(account, schedules[account.name])
        watched = [f"{job.account.name}/{watch.folder}" for job in self.jobs.values() for watch in job.watches]
        log.info("running: %s from %s; IDLE on %s", _accounts(len(self.jobs)), self.config.path,
                 ", ".join(watched) or "no folder")
        notify("READY=1", f"STATUS={self._status()}")

    def _install_signals(self) -> Callable[[], None]:
        """Handlers only note the signal; the main loop acts on it. A handler runs between two
        bytecodes of the main thread and must not take a lock the main thread may hold."""
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = (read_fd, write_fd)
        old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        old = {signum: signal.signal(signum, self._on_signal)
               for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

        def restore() -> None:
            for signum, handler in old.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(old_fd)
            os.close(read_fd)
            os.close(write_fd)
            self._wakeup = None

        return restore

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _wait_signal(self, timeout: float) -> list[int]:
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

    def _loop(self) -> None:
        heartbeat = watchdog_interval()
        tick = min(1.0, heartbeat) if heartbeat else 1.0
        next_beat = 0.0
        shown = ""
        while True:
            for signum in self._wait_signal(tick):
                if signum == signal.SIGHUP:
                    self._reload()
                else:
                    log.info("stopping on %s", signal.Signals(signum).name)
                    return
            if heartbeat and time.monotonic() >= next_beat and self.scheduler.running:
                notify("WATCHDOG=1")
                next_beat = time.monotonic() + heartbeat
            status = self._status()
            if status != shown:
                notify(f"STATUS={status}")
                shown = status

    def _shutdown(self) -> int:
        """Stop scheduling, let running syncs reach a safe point, close connections, exit 0.

        Order matters: the stop flag first, so a running sync stops at its next write step
        while the scheduler stops handing out runs; then wait, bounded by STOP_TIMEOUT.
        """
        notify("STOPPING=1", "STATUS=stopping")
        self._stopping.set()
        for job in self.jobs.values():
            for watch in job.watches:
                watch.halt.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + STOP_TIMEOUT
        with self._busy:
            while self._active and time.monotonic() < deadline:
                self._busy.wait(0.1)
                if any(signum != signal.SIGHUP for signum in self._wait_signal(0)):
                    log.warning("second stop signal: not waiting any longer")
                    break
            hung = sorted(self._syncing) if self._active else []
        for job in self.jobs.values():
            for watch in job.watches:
                watch.join(max(deadline - time.monotonic(), 0.0))
        if hung:
            # A sync stuck in the network. Threads cannot be killed; the process can,
            # and invariant 1 makes that safe: the next run finishes or undoes the work.
            log.warning("%s did not stop within %.0f s; exiting anyway, the next run goes on from here",
                        ", ".join(hung), STOP_TIMEOUT)
            self._close()
            logging.shutdown()
            os._exit(0)
        self._close()
        log.info("stopped")
        return 0

    def _close(self) -> None:
        self.metrics.close()
        if self.app is not None:
            self.app.close()

    # -- accounts: add, change, remove -------------------------------------------------------------

    def _schedules(self, config: Config) -> dict[str, Schedule]:
        return {account.name: schedule_for(account, config.path, self.timezone) for account in config.accounts}

    def _add(self, account: AccountConfig, schedule: Schedule) -> None:
        job = AccountJob(account, schedule)
        self.jobs[account.name] = job
        self._schedule(job)
        self._start_watches(job)

    def _schedule(self, job: AccountJob) -> None:
        spread = random.uniform(0, min(job.schedule.jitter, FIRST_RUN_SPREAD))  # noqa: S311 - not a secret
        first = datetime.now(self.timezone) + timedelta(seconds=spread)
        # misfire_grace_time=None: a run missed while the machine slept still happens at
        # wake-up, however late; coalesce=True makes all the missed runs that one run.
        self.scheduler.add_job(self._scheduled, job.schedule.trigger, args=[job.account.name],
                               id=_job_id(job.account.name), name=job.account.name, replace_existing=True,
                               next_run_time=first, max_instances=1, coalesce=True, misfire_grace_time=None)

    def _start_watches(self, job: AccountJob) -> None:
        if job.account.protocol != "imap":
            return
        for folder in job.account.idle:
            watch = FolderWatch(job.account, folder, functools.partial(self._push, job), self.idle_renew)
            job.watches.append(watch)
            watch.start()

    def _remove(self, name: str) -> None:
        job = self.jobs.pop(name)
        job.remove()
        with contextlib.suppress(JobLookupError):
            self.scheduler.remove_job(_job_id(name))

    def _change(self, account: AccountConfig, schedule: Schedule) -> None:
        job = self.jobs[account.name]
        for watch in job.watches:
            watch.halt.set()
        job.watches = []
        job.account, job.schedule = account, schedule
        job.failures, job.retry_at = 0, 0.0  # a fixed password should not wait out the backoff
        self._schedule(job)
        self._start_watches(job)

    def _reload(self) -> None:
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        old = self.config
        try:
            new = load_config(old.path)
            schedules = self._schedules(new)
        except ConfigError as error:
            log.error("reload failed, still running the previous config: %s", error)
            notify("READY=1")
            return
        if new.general.state != old.general.state:
            log.warning("reload: general.state changed, which takes a restart; still using %s", old.general.state)
            new = dataclasses.replace(new, general=dataclasses.replace(new.general, state=old.general.state))
        if new.general.metrics_port != old.general.metrics_port:
            log.warning("reload: general.metrics_port changed, which takes a restart")
        if new.general.log_level != old.general.log_level:
            logging.getLogger("mailsyncd").setLevel(new.general.log_level.upper())
        before = {account.name: account for account in old.accounts}
        after = {account.name: account for account in new.accounts}
        removed = [name for name in before if name not in after]
        added = [name for name in after if name not in before]
        changed = [name for name in after if name in before and after[name] != before[name]]
        for name in removed:
            self._remove(name)
        for name in added:
            self._add(after[name], schedules[name])
        for name in changed:
            self._change(after[name], schedules[name])
        self.config = new
        if self.app is not None:
            self.app.config = new
        log.info("reloaded %s: %s; added: %s; removed: %s; changed: %s", new.path, _accounts(len(after)),
                 ", ".join(added) or "none", ", ".join(removed) or "none", ", ".join(changed) or "none")
        notify("READY=1", f"STATUS={self._status()}")

    # -- runs --------------------------------------------------------------------------------------

    def _scheduled(self, name: str) -> None:
        """The APScheduler job: runs in the pool, and syncs in place, so max_instances=1
        holds while the sync lasts."""
        job = self.jobs.get(name)
        if job is not None and not self._stopping.is_set() and job.request(None):
            self._drain(job)

    def _push(self, job: AccountJob, folder: str) -> None:
        """From an IDLE thread: sync this folder soon, in the pool, never beside another
        run of the account."""
        if self._stopping.is_set() or not job.request([folder]):
            return
        try:
            self.scheduler.add_job(self._drain, args=[job], name=f"{job.account.name} {folder}",
                                   misfire_grace_time=None)
        except Exception:
            job.release()
            raise

    def _drain(self, job: AccountJob) -> None:
        with self._busy:
            self._active += 1
        try:
            job.drain(self._run_once, self._stopping)
        finally:
            with self._busy:
                self._active -= 1
                self._busy.notify_all()

    def _checkpoint(self, step: str) -> None:
        if step in STOP_POINTS and self._stopping.is_set():
            raise Interrupted("sync interrupted because mailsyncd is stopping; the next run goes on from here")

    def _run_once(self, job: AccountJob, folders: tuple[str, ...]) -> None:
        assert self.app is not None
        account = job.account
        with self._busy:
            self._syncing.add(account.name)
        started = time.monotonic()
        try:
            # Folder names from IDLE are exact names, not globs: "[Gmail]" must not match "G".
            counts = self.app.sync_account(account, [glob.escape(folder) for folder in folders],
                                           checkpoint=self._checkpoint)
        except Interrupted:
            log.info("%s: stopped at a safe point; every message written is stored and recorded", account.name)
            return
        except MailsyncError as error:
            self._failed(job, str(error), isinstance(error, AuthError))
            return
        except Exception as error:  # a bug: log it, back off, keep the other accounts going (rule 7)
            log.exception("%s: sync failed unexpectedly", account.name)
            self._failed(job, f"{account.name}: {type(error).__name__}", False)
            return
        finally:
            self.metrics.duration.labels(account.name).set(time.monotonic() - started)
            with self._busy:
                self._syncing.discard(account.name)
        self._succeeded(job, counts)

    def _succeeded(self, job: AccountJob, counts: Counts) -> None:
        name = job.account.name
        if job.failures:
            log.info("%s: synced again after %d failed runs", name, job.failures)
        job.failures, job.retry_at = 0, 0.0
        self.metrics.messages.labels(name).inc(counts.fetched)
        self.metrics.bytes.labels(name).inc(counts.fetched_bytes)
        if counts.errors:
            self.metrics.errors.labels(name).inc(len(counts.errors))
        self.metrics.last_success.labels(name).set(time.time())

    def _failed(self, job: AccountJob, reason: str, auth: bool) -> None:
        job.failures += 1
        delay = backoff_delay(job.schedule.period, job.failures, auth)
        job.retry_at = time.monotonic() + delay
        self.metrics.errors.labels(job.account.name).inc()
        if not self._stopping.is_set():
            with contextlib.suppress(JobLookupError):  # removed by a reload meanwhile
                self.scheduler.modify_job(_job_id(job.account.name),
                                          next_run_time=datetime.now(self.timezone) + timedelta(seconds=delay))
        runs = "1 failed run" if job.failures == 1 else f"{job.failures} failed runs"
        log.error("%s (%s in a row; next try in %s)", reason, runs, _human(delay))

    def _status(self) -> str:
        """The STATUS= line: what the daemon does right now."""
        with self._busy:
            syncing = sorted(self._syncing)
        if syncing:
            return "syncing " + ", ".join(syncing)
        upcoming = sorted((job.next_run_time, job.name) for job in self.scheduler.get_jobs()
                          if job.id.startswith("sync:") and job.next_run_time is not None)
        text = "idle"
        if upcoming:
            when, name = upcoming[0]
            text += f"; next run {when.astimezone():%H:%M} ({name})"
        failing = sorted(name for name, job in self.jobs.items() if job.failures)
        if failing:
            text += "; failing: " + ", ".join(failing)
        return text

