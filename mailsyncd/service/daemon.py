"""The daemon's life: start, the main loop, reload, stop, and the bookkeeping of runs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import logging
import os
import signal
import threading
import time
from datetime import datetime, timedelta, tzinfo

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from mailsyncd.app import App, load
from mailsyncd.config import AccountConfig, Config
from mailsyncd.errors import (
    AccountBusy,
    AccountNotDue,
    AccountReserved,
    ConfigError,
    HostCapped,
    Interrupted,
    LeaseLost,
    MailsyncError,
    Retry,
    StateError,
)
from mailsyncd.service.jobs import AccountJob
from mailsyncd.service.metrics import Metrics
from mailsyncd.service.schedule import Schedule, backoff_delay, human, schedule_for
from mailsyncd.service.signals import RELOAD, STOP, SYNC_NOW, SignalInbox
from mailsyncd.service.systemd import notify, watchdog_interval
from mailsyncd.service.wake import StateWatch
from mailsyncd.service.watch import FolderWatch, LocalWatch
from mailsyncd.sources import imap
from mailsyncd.sources.kept import LINGER
from mailsyncd.state import db
from mailsyncd.state.leases import own_identity
from mailsyncd.sync.effects import Counts

log = logging.getLogger(__name__)

STOP_TIMEOUT = 15.0  # then the daemon exits even if a sync hangs (systemd's TimeoutStopSec is 30 s)
STOP_POINTS = frozenset({"write"})  # Checkpoint steps inside the executor's try/finally
WORKERS = 32  # threads for syncs; one account never uses more than one


def run(config: Config, idle_renew: float = imap.IDLE_RENEW) -> int:
    """``mailsyncd run``: holds the single-instance lock (invariant 7) for the daemon's
    life; a second daemon on the same state raises AlreadyRunning (exit 2)."""
    # The lock names us a daemon, and `mailsyncd sync` then sends SYNC_NOW, whose default
    # action would end us until the signal inbox is in place; the first runs at start
    # answer a request made meanwhile.
    signal.signal(SYNC_NOW, signal.SIG_IGN)
    with db.instance_lock(config.general.state, daemon=True):
        return Daemon(config, idle_renew).run()


def _job_id(name: str) -> str:
    return f"sync:{name}"


def _accounts(count: int) -> str:
    return f"{count} account" if count == 1 else f"{count} accounts"


class Daemon:
    def __init__(self, config: Config, idle_renew: float = imap.IDLE_RENEW) -> None:
        self.config = config
        self.idle_renew = idle_renew
        self.scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(WORKERS)})
        self.timezone: tzinfo = self.scheduler.timezone
        self.metrics = Metrics(own_identity(config.general.node))
        self.app: App | None = None
        self.jobs: dict[str, AccountJob] = {}
        self.inbox = SignalInbox()
        self._stopping = threading.Event()
        self._busy = threading.Condition()
        self._active = 0  # drains running
        self._syncing: set[str] = set()
        self._state_watch: StateWatch | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def run(self) -> int:
        with self.inbox:
            schedules = self._schedules(self.config)  # a bad crontab stops us before anything starts
            self.app = App.open(self.config)
            self.metrics.count_holding(functools.partial(len, self.app.holding))
            try:
                self._start(schedules)
                self._state_watch = StateWatch(self.app.engine, self.config.generation,
                                               lambda: self.inbox.post(RELOAD), self._woken, self._stopping)
                self._state_watch.start()
                self._loop()
            except BaseException:
                self._shutdown()
                raise
            return self._shutdown()

    def _start(self, schedules: dict[str, Schedule]) -> None:
        if self.config.general.metrics_port is not None:
            self.metrics.serve(self.config.general.metrics_port)
        # The skipped-run warning is the coalescing we asked for; job errors are ours to log.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        self.scheduler.start()
        assert self.app is not None
        self.scheduler.add_job(self.app.kept.keep_alive, "interval", seconds=60, id="keepalive",
                               name="keep connections alive", coalesce=True, max_instances=1)
        for account in self.config.accounts:
            self._add(account, schedules[account.name])
        watched = [f"{job.account.name}/{watch.folder}" for job in self.jobs.values() for watch in job.watches]
        log.info("running: %s from %s; IDLE on %s", _accounts(len(self.jobs)), self.config.path,
                 ", ".join(watched) or "no folder")
        notify("READY=1", f"STATUS={self._status()}")

    def _loop(self) -> None:
        heartbeat = watchdog_interval()
        tick = min(1.0, heartbeat) if heartbeat else 1.0
        next_beat = 0.0
        shown = ""
        while True:
            for signum in self.inbox.wait(tick):
                if signum == RELOAD:
                    self._reload()
                elif signum == SYNC_NOW:
                    self._sync_now()
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
            job.halt_watches()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + STOP_TIMEOUT
        with self._busy:
            while self._active and time.monotonic() < deadline:
                self._busy.wait(0.1)
                if any(signum in STOP for signum in self.inbox.wait(0)):
                    log.warning("second stop signal: not waiting any longer")
                    break
            hung = sorted(self._syncing) if self._active else []
        for job in self.jobs.values():
            for watch in job.watches:
                watch.join(max(deadline - time.monotonic(), 0.0))
        if self._state_watch is not None:
            self._state_watch.join(max(deadline - time.monotonic(), 0.0))
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
        self.metrics.known(account.name)
        self._schedule(job)
        self._start_watches(job)

    def _schedule(self, job: AccountJob) -> None:
        # misfire_grace_time=None: a run missed while the machine slept still happens at
        # wake-up, however late; coalesce=True makes all the missed runs that one run.
        self.scheduler.add_job(self._scheduled, job.schedule.trigger, args=[job.account.name],
                               id=_job_id(job.account.name), name=job.account.name, replace_existing=True,
                               next_run_time=job.schedule.first_run(self.timezone), max_instances=1,
                               coalesce=True, misfire_grace_time=None)

    def _start_watches(self, job: AccountJob) -> None:
        if job.account.protocol != "imap":
            return
        watches: list[FolderWatch | LocalWatch] = [
            FolderWatch(job.account, folder, functools.partial(self._push, job), self.idle_renew)
            for folder in job.account.idle]
        if job.account.mode == "sync":
            watches.append(LocalWatch(job.account, functools.partial(self._push_all, job)))
        for watch in watches:
            job.watches.append(watch)
            watch.start()

    def _remove(self, name: str) -> None:
        job = self.jobs.pop(name)
        job.remove()
        if self.app is not None:
            self.app.kept.drop(name)
        self.metrics.forget(name)
        with contextlib.suppress(JobLookupError):
            self.scheduler.remove_job(_job_id(name))

    def _change(self, account: AccountConfig, schedule: Schedule) -> None:
        job = self.jobs[account.name]
        job.halt_watches()
        job.watches = []
        if self.app is not None:
            self.app.kept.drop(account.name)
        job.account, job.schedule = account, schedule
        job.failures, job.retry_at = 0, 0.0  # a fixed password should not wait out the backoff
        self._schedule(job)
        self._start_watches(job)

    def _reload(self) -> None:
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        old = self.config
        try:
            new = load(old.path, self.app.engine if self.app else None)  # the file's and the database's accounts
            schedules = self._schedules(new)
        except (ConfigError, StateError) as error:
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
        if not self._stopping.is_set() and job.request([folder]):
            self._submit(job, folder)

    def _push_all(self, job: AccountJob) -> None:
        """From a Maildir watch: a pass of the whole account soon (a move spans folders)."""
        if not self._stopping.is_set() and job.request(None):
            self._submit(job, "local change")

    def _sync_now(self) -> None:
        """SYNC_NOW, from `mailsyncd sync`: every account, at once or right after its running
        sync; an account that backs off is tried too, since a user asked."""
        log.info("sync of every account asked for")
        for job in self.jobs.values():
            if job.request(None, asked=True):
                self._submit(job, "now")

    def _woken(self, name: str | None) -> None:
        """From the state watch (`mailsyncd wake`): a run of one account now, or of all
        through the main loop, like SYNC_NOW. Whichever daemon claims it first syncs it."""
        if name is None:
            self.inbox.post(SYNC_NOW)
            return
        job = self.jobs.get(name)
        if job is None:
            log.debug("wake-up for %s, which this daemon does not have", name)
        elif not self._stopping.is_set() and job.request(None, asked=True):
            log.info("%s: sync asked for through the state database", name)
            self._submit(job, "woken")

    def _submit(self, job: AccountJob, why: str) -> None:
        """Drain the job in the pool; call only after ``job.request`` said True."""
        try:
            self.scheduler.add_job(self._drain, args=[job], name=f"{job.account.name} {why}",
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
                                           checkpoint=self._checkpoint, scheduled=not folders and not job.asked,
                                           keep=self._keeps(job))
        except Interrupted:
            log.info("%s: stopped at a safe point; every message written is stored and recorded", account.name)
            return
        except (AccountNotDue, AccountReserved) as elsewhere:
            log.debug("%s", elsewhere)  # synced lately, or another node's: the common case with several
            return
        except HostCapped as capped:
            log.info("%s", capped)  # not a failure, no backoff: the next run tries again
            self.metrics.capped()
            return
        except AccountBusy as busy:
            log.info("%s", busy)  # another daemon syncs it now: not a failure, no backoff
            self.metrics.busy()
            return
        except LeaseLost as lost:
            log.warning("%s", lost)  # stalled past the lease: the account is another daemon's now, no backoff
            return
        except MailsyncError as error:
            self._failed(job, str(error), error.retry)
            return
        except Exception as error:  # a bug: log it, back off, keep the other accounts going (rule 7)
            log.exception("%s: sync failed unexpectedly", account.name)
            self._failed(job, f"{account.name}: {type(error).__name__}", Retry.TEMPORARY)
            return
        finally:
            self.metrics.ran(account.name, time.monotonic() - started)
            with self._busy:
                self._syncing.discard(account.name)
        self._succeeded(job, counts)

    def _keeps(self, job: AccountJob) -> bool:
        """Whether the account's IMAP session waits, logged in, for its next run. Not where
        it would be a login nobody counts (``host_logins``), nor where the next run may be
        another daemon's (a shared state, unless sticky), nor for rare runs."""
        account, general = job.account, self.config.general
        return (account.protocol == "imap" and account.keep_connection and general.host_logins is None
                and (account.sticky or not general.shared) and job.schedule.period <= LINGER)

    def _succeeded(self, job: AccountJob, counts: Counts) -> None:
        if job.failures:
            log.info("%s: synced again after %d failed runs", job.account.name, job.failures)
        job.failures, job.retry_at = 0, 0.0
        self.metrics.succeeded(job.account.name, counts)

    def _failed(self, job: AccountJob, reason: str, retry: Retry) -> None:
        job.failures += 1
        delay = backoff_delay(job.schedule.period, job.failures, retry)
        job.retry_at = time.monotonic() + delay
        self.metrics.failed(job.account.name)
        if not self._stopping.is_set():
            with contextlib.suppress(JobLookupError):  # removed by a reload meanwhile
                self.scheduler.modify_job(_job_id(job.account.name),
                                          next_run_time=datetime.now(self.timezone) + timedelta(seconds=delay))
        runs = "1 failed run" if job.failures == 1 else f"{job.failures} failed runs"
        log.error("%s (%s in a row; next try in %s)", reason, runs, human(delay))

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
