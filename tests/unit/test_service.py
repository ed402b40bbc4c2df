"""The daemon's arithmetic and plumbing without a server: backoff, jitter, schedules,
sd_notify, the per-account run merging, the stop checkpoint and the IDLE fallback."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from mailsyncd.config import AccountConfig, parse_config
from mailsyncd.errors import AccountError, AuthError, ConfigError, Interrupted, Retry
from mailsyncd.service import schedule
from mailsyncd.service.daemon import Daemon
from mailsyncd.service.jobs import AccountJob
from mailsyncd.service.metrics import Metrics
from mailsyncd.service.schedule import BACKOFF_CAP, backoff_delay, jitter_for, reconnect_delay, schedule_for
from mailsyncd.service.systemd import notify, watchdog_interval
from mailsyncd.service.watch import FolderWatch
from mailsyncd.sources import imap

CONFIG = Path("/etc/mailsyncd/config.toml")


def account(extra: str = "") -> AccountConfig:
    text = f"""
[general]
state = "/nonexistent/state.db"

[[account]]
name = "work"
protocol = "imap"
host = "imap.example.org"
username = "me"
password = "secret"
idle = ["INBOX"]
{extra}

[account.store]
format = "maildir"
path = "/nonexistent/mail"
"""
    return parse_config(text, CONFIG).accounts[0]


# --- backoff and jitter -------------------------------------------------------------------------


def test_backoff_doubles_per_failure_and_stops_at_an_hour() -> None:
    assert [backoff_delay(60, failures) for failures in range(7)] == [60, 120, 240, 480, 960, 1920, 3600]
    assert backoff_delay(10, 1) == 20
    assert backoff_delay(10, 8) == 2560
    assert backoff_delay(10, 9) == BACKOFF_CAP == 3600
    assert backoff_delay(10, 10_000) == BACKOFF_CAP  # no float overflow after days of failures


def test_a_refused_login_backs_off_to_the_cap_at_once() -> None:
    assert backoff_delay(10, 1, retry=Retry.WAIT) == BACKOFF_CAP
    assert backoff_delay(300, 1, retry=Retry.WAIT) == BACKOFF_CAP


def test_backoff_never_comes_sooner_than_the_schedule() -> None:
    daily = 86400
    assert backoff_delay(daily, 1) == daily
    assert backoff_delay(daily, 1, retry=Retry.WAIT) == daily
    assert all(backoff_delay(600, n) >= 600 for n in range(0, 50))


def test_reconnects_start_fast_and_cap_at_five_minutes() -> None:
    assert [reconnect_delay(n) for n in range(1, 6)] == [1, 2, 4, 8, 16]
    assert reconnect_delay(9) == 256
    assert reconnect_delay(10) == reconnect_delay(10_000) == 300


@pytest.mark.parametrize(("period", "jitter"), [(10, 1), (300, 30), (599, 59.9), (600, 60), (86400, 60)])
def test_jitter_is_a_tenth_of_the_period_at_most_a_minute(period: float, jitter: float) -> None:
    assert jitter_for(period) == pytest.approx(jitter)


@pytest.mark.parametrize("interval", [10, 300, 7200])
def test_interval_runs_come_late_by_at_most_the_jitter(interval: int) -> None:
    schedule = schedule_for(account(f'interval = "{interval}s"'), CONFIG, UTC)
    assert schedule.period == interval
    assert schedule.jitter == jitter_for(interval)
    now = datetime(2025, 1, 1, tzinfo=UTC)
    previous = now
    lateness = []
    for _ in range(300):
        fire = schedule.trigger.get_next_fire_time(previous, now)
        assert fire is not None
        lateness.append((fire - previous).total_seconds() - interval)
        previous = fire
    assert min(lateness) >= 0
    assert max(lateness) <= schedule.jitter
    assert max(lateness) > schedule.jitter / 2  # the jitter is really applied


def test_cron_gets_jitter_from_its_period() -> None:
    schedule = schedule_for(account('cron = "*/5 * * * *"'), CONFIG, UTC)
    assert schedule.period == 300
    assert schedule.jitter == 30
    now = datetime(2025, 1, 1, 12, 1, tzinfo=UTC)
    fire = schedule.trigger.get_next_fire_time(None, now)
    assert fire is not None
    assert timedelta(minutes=4) <= fire - now <= timedelta(minutes=4, seconds=30)


@pytest.mark.parametrize(("cron", "problem"), [("61 * * * *", "not a crontab"),
                                               ("* * * * mon-someday", "not a crontab"),
                                               ("0 0 31 2 *", "never fires")])
def test_a_bad_crontab_is_a_config_error_naming_the_key(cron: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        schedule_for(account(f'cron = "{cron}"'), CONFIG, UTC)
    assert caught.value.key == 'account "work".cron'
    assert str(CONFIG) in str(caught.value)


# --- sd_notify and the watchdog ----------------------------------------------------------------


def receive(sock: socket.socket) -> str:
    sock.settimeout(2)
    return sock.recv(4096).decode()


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"mailsyncd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify("READY=1", "STATUS=idle", environ={"NOTIFY_SOCKET": "@" + name})
        assert receive(sock) == "READY=1\nSTATUS=idle"


def test_notify_reaches_a_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": str(path)})
        assert receive(sock) == "WATCHDOG=1"


def test_notify_without_systemd_does_nothing_and_never_raises(tmp_path: Path) -> None:
    assert not notify("READY=1", environ={})
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}) == 0.1
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None  # not for us
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


# --- one account's runs --------------------------------------------------------------------------


def job() -> AccountJob:
    return AccountJob(account(), schedule_for(account(), CONFIG, UTC))


def test_requests_during_a_run_merge_into_one_next_run() -> None:
    runs = job()
    assert runs.request(["INBOX"])  # the caller drains
    assert runs.take(stopping=False) == ("INBOX",)
    assert not runs.request(["Lists"])  # a drain is running: it picks these up
    assert not runs.request(["INBOX"])
    assert not runs.request(["Lists"])
    assert runs.take(stopping=False) == ("INBOX", "Lists")
    assert not runs.request(["INBOX"])
    assert not runs.request(None)  # a run of every folder covers the folders asked for
    assert runs.take(stopping=False) == ()
    assert runs.take(stopping=False) is None  # nothing left: the drain ends...
    assert runs.request(None)  # ...and the next request starts one


def test_a_stop_drops_what_was_asked() -> None:
    runs = job()
    assert runs.request(None)
    assert runs.take(stopping=True) is None
    assert runs.request(["INBOX"])


def test_pushes_wait_for_the_backoff_but_scheduled_runs_do_not() -> None:
    runs = job()
    runs.retry_at = time.monotonic() + 60
    assert not runs.request(["INBOX"])
    assert runs.request(None)
    assert runs.take(stopping=False) == ()


def test_a_removed_account_runs_no_more() -> None:
    runs = job()
    runs.remove()
    assert not runs.request(None)
    assert not runs.request(["INBOX"])


def test_never_two_runs_of_one_account_at_once_and_no_request_lost() -> None:
    runs = job()
    stopping = threading.Event()
    lock = threading.Lock()
    inside = 0
    most = 0
    synced: set[str] = set()

    def run_once(_job: AccountJob, folders: tuple[str, ...]) -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.002)
        with lock:
            inside -= 1
            synced.update(folders)

    def pusher(start: int) -> None:
        for number in range(start, start + 50):
            if runs.request([f"F{number}"]):
                runs.drain(run_once, stopping)

    threads = [threading.Thread(target=pusher, args=(start,)) for start in range(0, 400, 50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1
    assert synced == {f"F{number}" for number in range(400)}


def test_a_drain_that_blows_up_lets_the_next_request_run() -> None:
    runs = job()

    def broken(_job: AccountJob, _folders: tuple[str, ...]) -> None:
        raise RuntimeError("bug")

    assert runs.request(None)
    with pytest.raises(RuntimeError):
        runs.drain(broken, threading.Event())
    assert runs.request(None)


# --- stopping at a safe point -------------------------------------------------------------------


def test_the_checkpoint_stops_only_at_a_write_and_only_when_stopping(tmp_path: Path) -> None:
    config = parse_config(f'[general]\nstate = "{tmp_path / "state.db"}"\n', tmp_path / "config.toml")
    daemon = Daemon(config)
    for step in ("intent", "fetched", "write", "commit", "recorded", "flags", "remove"):
        daemon._checkpoint(step)  # not stopping: never raises
    daemon._stopping.set()
    for step in ("intent", "fetched", "commit", "recorded", "remove"):
        daemon._checkpoint(step)  # outside the executor's try/finally: raising there would leave work
    with pytest.raises(Interrupted):
        daemon._checkpoint("write")


# --- IDLE threads --------------------------------------------------------------------------------


class FakeWatcher:
    def __init__(self, supports_idle: bool, changes: list[bool]) -> None:
        self.supports_idle = supports_idle
        self.changes = changes

    def __enter__(self) -> FakeWatcher:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def wait(self, timeout: float) -> bool:
        if self.changes:
            return self.changes.pop(0)
        time.sleep(min(timeout, 0.01))
        return False


def test_without_idle_the_folder_is_left_to_polling(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(imap, "watch_folder", lambda *_args: FakeWatcher(False, [True]))
    pushed: list[str] = []
    watch = FolderWatch(account(), "INBOX", pushed.append, 1.0)
    watch.start()
    watch.join(timeout=5)
    assert not watch.is_alive()
    assert pushed == []
    assert "does not support IDLE; INBOX is polled" in caplog.text


def test_a_lost_idle_connection_reconnects_and_catches_up(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(schedule, "RECONNECT_FIRST", 0.01)
    attempts: list[int] = []

    def watch_folder(*_args: Any) -> FakeWatcher:
        attempts.append(1)
        if len(attempts) <= 2:
            raise AccountError("work: connection to imap.example.org failed: refused")
        return FakeWatcher(True, [False, True])

    monkeypatch.setattr(imap, "watch_folder", watch_folder)
    pushed: list[str] = []
    watch = FolderWatch(account(), "INBOX", pushed.append, 1.0)
    watch.start()
    try:
        deadline = time.monotonic() + 5
        while len(pushed) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watch.halt.set()
        watch.join(timeout=5)
    assert len(attempts) == 3
    assert pushed == ["INBOX", "INBOX"]  # the catch-up after the reconnect, then the change
    assert caplog.text.count("(IDLE on INBOX: next try in") == 2


def test_pushes_queued_during_a_failed_run_wait_for_the_retry() -> None:
    runs = job()
    assert runs.request(["INBOX"])
    assert runs.take(stopping=False) == ("INBOX",)
    assert not runs.request(["Lists"])  # arrives while the run goes on...
    runs.retry_at = time.monotonic() + 60  # ...and the run fails
    assert runs.take(stopping=False) is None
    assert runs.request(None)  # the scheduled retry still runs


def test_each_error_class_says_how_soon_a_retry_helps() -> None:
    assert AccountError("connection refused").retry is Retry.TEMPORARY
    assert AuthError("login refused").retry is Retry.WAIT
    assert ConfigError(CONFIG, "account.password_file", "missing").retry is Retry.FINAL
    assert backoff_delay(60, 1, AccountError("x").retry) == 120
    assert backoff_delay(60, 1, AuthError("x").retry) == backoff_delay(60, 1, Retry.FINAL) == BACKOFF_CAP


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_start_at_zero_time_runs_and_include_the_process() -> None:
    metrics = Metrics("host:a")
    metrics.known("acct")
    text = generate_latest(metrics.registry).decode()
    for series in ("mailsyncd_messages_synced_total", "mailsyncd_bytes_synced_total", "mailsyncd_sync_errors_total"):
        assert f'{series}{{account="acct"}} 0.0' in text.splitlines()
    assert 'mailsyncd_sync_duration_seconds_count{account="acct"} 0.0' in text
    assert "process_resident_memory_bytes" in text and "python_info" in text
    metrics.ran("acct", 7.0)
    text = generate_latest(metrics.registry).decode()
    assert 'mailsyncd_sync_duration_seconds_bucket{account="acct",le="5.0"} 0.0' in text
    assert 'mailsyncd_sync_duration_seconds_bucket{account="acct",le="15.0"} 1.0' in text
    metrics.forget("acct")
    assert 'account="acct"' not in generate_latest(metrics.registry).decode()
