"""The daemon against the real Dovecot: `python -m mailsyncd run` as a subprocess, pushed by
IDLE, polling, stopped mid-sync, reloaded, cut off from its server; and the systemd units."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.errors import AccountError
from mailsyncd.secrets import Secret
from mailsyncd.sources import imap
from mailsyncd.state import db
from tests.conftest import DovecotUser, require_dovecot
from tests.crash.test_imap_crash import assert_exactly_once, fill
from tests.helpers import REPO, expected, maildir_contents, run_cli, sync, wait_for
from tests.proxy import CutProxy
from tests.server_helpers import DevServer

INTERVAL = 10  # seconds: the smallest the config allows
JITTER = 1.0  # a tenth of it


def account_toml(server: DevServer, user: str, password: str, name: str, store: Path, extra: str = "") -> str:
    return server.account_toml(user, store, name=name, password=password, extra=extra)


def write_accounts(directory: Path, *accounts: str, general: str = "") -> Path:
    path = directory / "config.toml"
    path.write_text(f'[general]\nstate = "{directory / "state.db"}"\n{general}\n' + "".join(accounts))
    path.chmod(0o600)
    return path


def stored(store: Path) -> int:
    return sum(sum(bag.values()) for bag in maildir_contents(store).values()) if store.exists() else 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what systemd or a user may have set for it."""
    env = {key: value for key, value in os.environ.items() if key not in {
        "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "MAILSYNCD_CONFIG"}}
    env.update(extra)
    return env


class Daemon:
    """`mailsyncd run` in a subprocess, its log in a file the test reads."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, name: str = "daemon") -> None:
        self.log_path = config.parent / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailsyncd", "--config", str(config), "run"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env or clean_env())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        if not wait_for(lambda: self.log().count(text) >= count or self.process.poll() is not None, timeout) \
                or self.log().count(text) < count:
            pytest.fail(f"no {text!r} (x{count}) in the daemon's log within {timeout} s:\n{self.log()}")

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        self.send(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def start(daemons: list[Daemon], config: Path, env: dict[str, str] | None = None) -> Daemon:
    daemon = Daemon(config, env)
    daemons.append(daemon)
    return daemon


def message(subject: str) -> bytes:
    return f"From: a@example.org\r\nSubject: {subject}\r\nMessage-ID: <{secrets.token_hex(8)}@t>\r\n\r\nhi\r\n".encode()


# --- push and poll --------------------------------------------------------------------------------


def test_idle_push_within_seconds_and_polling_within_an_interval(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon]) -> None:
    server = dovecot.server
    store = tmp_path / "store"
    metrics_port = free_port()
    config = write_accounts(tmp_path, account_toml(server, dovecot.user, dovecot.password, "acct", store,
                                                   f'interval = "{INTERVAL}s"\nidle = ["INBOX"]'),
                            general=f"metrics_port = {metrics_port}")
    server.append(dovecot.user, "Lists", message("before the start"))
    daemon = start(daemons, config)
    daemon.wait_log("acct/INBOX: watching with IDLE")
    daemon.wait_log("acct: 6 folders, 1 new")  # the first run at start
    assert stored(store) == 1

    pushed = time.monotonic()
    server.append(dovecot.user, "INBOX", message("pushed"))
    assert wait_for(lambda: stored(store) == 2, timeout=5), daemon.log()
    assert time.monotonic() - pushed < 5

    polled = time.monotonic()
    server.append(dovecot.user, "Lists", message("polled"))
    assert wait_for(lambda: stored(store) == 3, timeout=INTERVAL + JITTER + 3), daemon.log()
    assert time.monotonic() - polled < INTERVAL + JITTER + 3

    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    # Counted once sync_account returns, a moment after the file is in place.
    messages = re.compile(r'^mailsyncd_messages_synced_total\{account="acct"\} 3\.0$', re.M)
    assert wait_for(lambda: bool(messages.search(metrics())), timeout=5), metrics()
    assert re.search(r'^mailsyncd_last_success_timestamp_seconds\{account="acct"\} \d', metrics(), re.M)
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


def test_two_accounts_sync_at_once_on_one_app(tmp_path: Path, dovecot: DovecotUser) -> None:
    """What the daemon does when two accounts' jobs fire together: one engine, two threads."""
    server = dovecot.server
    other = DovecotUser(server, f"{dovecot.user}b", secrets.token_urlsafe(12))
    server.add_user(other.user, other.password)
    users = {"one": dovecot, "two": other}
    for number, user in enumerate(users.values()):
        server.append_many(user.user, "INBOX", [message(f"{number}-{index}") for index in range(60)])
    config = load_config(write_accounts(tmp_path, *(
        account_toml(server, user.user, user.password, name, tmp_path / name) for name, user in users.items())))
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def one_account(name: str) -> None:
        try:
            barrier.wait()
            app.sync_account(config.account(name))
        except BaseException as error:
            failures.append(error)

    with db.instance_lock(config.general.state):
        app = App.open(config)
        try:
            threads = [threading.Thread(target=one_account, args=(name,)) for name in users]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            app.close()
    assert failures == []
    for name, user in users.items():
        assert maildir_contents(tmp_path / name) == {
            "": expected(server.fetch_all(user.user, "INBOX").values(), "maildir")}


# --- stopping -----------------------------------------------------------------------------------


@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_sigterm_in_a_large_sync_exits_at_once_and_loses_nothing(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon], store_format: str) -> None:
    fill(dovecot, 400)
    text = account_toml(dovecot.server, dovecot.user, dovecot.password, "acct", tmp_path / "store-acct")
    config = write_accounts(tmp_path, text.replace('format = "maildir"', f'format = "{store_format}"'))
    daemon = start(daemons, config)
    daemon.wait_log(": fetching 200 messages")  # the first of the two folders: the stop comes at a write
    asked = time.monotonic()
    assert daemon.stop(timeout=10) == 0
    assert time.monotonic() - asked < 10
    log = daemon.log()
    assert "stopped at a safe point" in log, log
    assert "Traceback" not in log
    # A clean stop, not a crash: what was written is recorded stored, and no intent is left
    # for the next run's recovery to sort out.
    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as state:
        states = dict(state.execute("select state, count(*) from messages group by state").fetchall())
    assert "pending" not in states
    assert 0 < states.get("stored", 0) < 400, states
    assert sync(config) == 0
    assert_exactly_once(dovecot, config, store_format)


def test_a_second_daemon_on_the_same_state_refuses(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon]) -> None:
    config = write_accounts(tmp_path, account_toml(dovecot.server, dovecot.user, dovecot.password, "acct",
                                                   tmp_path / "store"))
    daemon = start(daemons, config)
    daemon.wait_log("running: 1 account")
    second = run_cli(config, "run", timeout=30)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"another mailsyncd (pid {daemon.process.pid})" in lines[0]
    assert str(tmp_path / "state.db") in lines[0]
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


# --- reload -------------------------------------------------------------------------------------


def test_sighup_starts_an_added_account_and_keeps_the_old_config_when_broken(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon]) -> None:
    server = dovecot.server
    other = DovecotUser(server, f"{dovecot.user}b", secrets.token_urlsafe(12))
    server.add_user(other.user, other.password)
    first = account_toml(server, dovecot.user, dovecot.password, "first", tmp_path / "first",
                         'idle = ["INBOX"]\ninterval = "1h"')
    second = account_toml(server, other.user, other.password, "second", tmp_path / "second", 'interval = "1h"')
    config = write_accounts(tmp_path, first)
    server.append(other.user, "INBOX", message("for the second account"))
    daemon = start(daemons, config)
    daemon.wait_log("first/INBOX: watching with IDLE")

    write_accounts(tmp_path, first, second)
    daemon.send(signal.SIGHUP)
    daemon.wait_log("added: second")
    assert wait_for(lambda: stored(tmp_path / "second") == 1, timeout=10), daemon.log()

    write_accounts(tmp_path, first.replace('interval = "1h"', 'interval = "5s"'), second)
    daemon.send(signal.SIGHUP)
    daemon.wait_log("reload failed")
    [line] = [line for line in daemon.log().splitlines() if "reload failed" in line]
    assert 'account "first".interval: must be at least 10s' in line
    assert "still running the previous config" in line
    # The old config goes on: its IDLE watch still pushes.
    server.append(dovecot.user, "INBOX", message("after the broken reload"))
    assert wait_for(lambda: stored(tmp_path / "first") == 1, timeout=5), daemon.log()

    # Remove "first", change "second": first's IDLE watch ends; second runs at once.
    server.append(other.user, "INBOX", message("waiting for the changed account"))
    write_accounts(tmp_path, second.replace('interval = "1h"', 'interval = "30m"'))
    daemon.send(signal.SIGHUP)
    daemon.wait_log("removed: first; changed: second")
    assert wait_for(lambda: stored(tmp_path / "second") == 2, timeout=5), daemon.log()
    server.append(dovecot.user, "INBOX", message("for a removed account"))
    time.sleep(1.5)
    assert stored(tmp_path / "first") == 1
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


# --- a server that goes away, a password that is wrong -----------------------------------------


def test_the_daemon_rides_out_a_server_restart_and_backs_off_a_wrong_password(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    require_dovecot()
    with DevServer(tmp_path / "dovecot", users=[("good", "good-pw"), ("bad", "bad-pw")]) as server:
        good, bad = tmp_path / "good", tmp_path / "bad"
        config = write_accounts(
            tmp_path,
            account_toml(server, "good", "good-pw", "good", good, f'interval = "{INTERVAL}s"\nidle = ["INBOX"]'),
            account_toml(server, "bad", "not-the-password", "bad", bad, f'interval = "{INTERVAL}s"'))
        daemon = start(daemons, config)
        daemon.wait_log("good/INBOX: watching with IDLE")
        daemon.wait_log("good: 5 folders")
        daemon.wait_log("bad: login refused")
        assert "(1 failed run in a row; next try in 1 h)" in daemon.log()

        server.restart()
        daemon.wait_log("good/INBOX: watching with IDLE", count=2, timeout=15)  # reconnected
        server.append("good", "INBOX", message("pushed after the restart"))
        assert wait_for(lambda: stored(good) == 1, timeout=5), daemon.log()
        server.append("good", "Polled", message("polled after the restart"))
        assert wait_for(lambda: stored(good) == 2, timeout=INTERVAL + JITTER + 3), daemon.log()

        log = daemon.log()
        assert log.count("bad: login refused") == 1, log  # backed off for an hour, not retried
        assert stored(bad) == 0
        assert daemon.stop() == 0


def test_idle_watcher_renews_quietly_and_reports_a_cut(tmp_path: Path, dovecot: DovecotUser) -> None:
    server = dovecot.server
    config = load_config(write_accounts(tmp_path, account_toml(server, dovecot.user, dovecot.password, "acct",
                                                               tmp_path / "store")))
    account = config.accounts[0]
    with imap.watch_folder(account, Secret(dovecot.password), "INBOX", renew=0.3) as watcher:
        assert watcher.supports_idle
        quiet_until = time.monotonic() + 1.5  # five renewals (DONE, IDLE) with nothing to report
        while time.monotonic() < quiet_until:
            assert not watcher.wait(0.2)
        server.append(dovecot.user, "INBOX", message("seen by IDLE"))
        assert wait_for(lambda: watcher.wait(0.5), timeout=5)
    with CutProxy(server.host, server.imaps_port) as proxy:
        cut_off = replace(account, port=proxy.port)
        with imap.watch_folder(cut_off, Secret(dovecot.password), "INBOX") as watcher:
            assert not watcher.wait(0.2)
            proxy.cut_all()
            with pytest.raises(AccountError, match=r"connection to 127\.0\.0\.1 failed"):
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    watcher.wait(0.2)


# --- systemd ------------------------------------------------------------------------------------


def test_sd_notify_ready_status_watchdog_reloading_stopping(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon]) -> None:
    config = write_accounts(tmp_path, account_toml(dovecot.server, dovecot.user, dovecot.password, "acct",
                                                   tmp_path / "store", 'interval = "1h"'))
    name = f"mailsyncd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        received: list[str] = []

        def until(field: str) -> None:
            while not any(line == field or line.startswith(field) for line in received):
                try:
                    received.extend(sock.recv(4096).decode().splitlines())
                except TimeoutError:
                    pytest.fail(f"no {field} from the daemon; got {received}:\n{daemon.log()}")

        daemon = start(daemons, config, clean_env(NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="200000"))
        until("READY=1")
        assert any(line.startswith("STATUS=") for line in received)
        until("STATUS=idle; next run ")
        received.clear()
        time.sleep(1)
        sock.settimeout(0.01)
        with contextlib.suppress(TimeoutError):
            while True:
                received.extend(sock.recv(4096).decode().splitlines())
        sock.settimeout(10)
        assert received.count("WATCHDOG=1") >= 5  # every 0.1 s for a second
        received.clear()
        daemon.send(signal.SIGHUP)
        until("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in received)
        until("READY=1")
        daemon.send(signal.SIGTERM)
        until("STOPPING=1")
        assert daemon.process.wait(10) == 0


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verified in a scratch root holding stand-ins for the programs the units run (verify
    checks that ExecStart= is executable) and the host's own units (sysinit.target...)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing; install the Debian package `systemd` (scripts/test does)",
                    pytrace=False)
    units = sorted((REPO / "systemd").glob("mailsyncd*.[st]*"))
    assert {unit.name for unit in units} == {"mailsyncd.service", "mailsyncd-user.service",
                                             "mailsyncd-sync.service", "mailsyncd-sync.timer"}
    root = tmp_path / "root"
    stub = "#!/bin/sh\nexit 0\n"
    # The user unit runs %h/.local/bin/mailsyncd, where pipx puts it; %h is $HOME.
    for program in ("usr/bin/mailsyncd", "home/user/.local/bin/mailsyncd", "bin/kill"):
        (root / program).parent.mkdir(parents=True, exist_ok=True)
        (root / program).write_text(stub)
        (root / program).chmod(0o755)
    system_units = next(path for path in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                        if path.is_dir())
    # A copy, not a symlink: the units' own relative symlinks must resolve inside the root.
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in units:
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for unit in units:
        done = subprocess.run([analyze, "verify", f"--root={root}", "--man=no", "--generators=no",
                               f"/etc/systemd/system/{unit.name}"], capture_output=True, text=True, check=False,
                              env=clean_env(HOME="/home/user"))
        assert (done.returncode, done.stdout + done.stderr) == (0, ""), unit.name
    # The user unit once more in the scope it is meant for (--user takes no --root, so the
    # programs it runs point at the stand-ins).
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    user_unit = tmp_path / "user" / "mailsyncd.service"
    user_unit.parent.mkdir()
    user_unit.write_text((REPO / "systemd" / "mailsyncd-user.service").read_text()
                         .replace("=/bin/kill ", f"={root}/bin/kill "))
    done = subprocess.run([analyze, "--user", "verify", "--man=no", "--generators=no", str(user_unit)],
                          capture_output=True, text=True, check=False,
                          env=clean_env(XDG_RUNTIME_DIR=str(runtime), HOME=str(root / "home/user")))
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# --- `mailsyncd sync` while the daemon runs ------------------------------------------------------


def test_sync_while_the_daemon_runs_asks_it_and_reports_its_runs(
        tmp_path: Path, dovecot: DovecotUser, daemons: list[Daemon]) -> None:
    server = dovecot.server
    store = tmp_path / "store"
    config = write_accounts(
        tmp_path,
        account_toml(server, dovecot.user, dovecot.password, "acct", store, 'interval = "1h"'),
        account_toml(server, dovecot.user, "not-the-password", "bad", tmp_path / "bad", 'interval = "1h"'))
    server.append(dovecot.user, "INBOX", message("before the start"))
    daemon = start(daemons, config)
    daemon.wait_log("acct: 5 folders, 1 new")  # the first runs at start; the next in an hour
    daemon.wait_log("bad: login refused")
    server.append_many(dovecot.user, "INBOX", [message("asked for"), message("asked for too")])

    asked = run_cli(config, "sync", "--account", "acct", timeout=60)
    assert asked.returncode == 0, asked.stderr
    assert "synced by the daemon: 2 new" in asked.stderr
    assert stored(store) == 3  # stored by the daemon, before `sync` returned
    daemon.wait_log("sync of every account asked for")

    both = run_cli(config, "sync", timeout=60)
    assert both.returncode == 1
    errors = [line for line in both.stderr.splitlines() if "ERROR" in line.split()]
    assert len(errors) == 1 and "bad: login refused" in errors[0], both.stderr  # tried again, though backing off
    assert "acct: synced by the daemon: 0 new" in both.stderr

    one_folder = run_cli(config, "sync", "--folder", "INBOX", timeout=30)
    assert one_folder.returncode == 2  # the daemon syncs whole accounts only
    assert f"another mailsyncd (pid {daemon.process.pid})" in one_folder.stderr
    assert daemon.process.poll() is None
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()
