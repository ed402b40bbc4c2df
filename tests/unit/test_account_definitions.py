"""Accounts kept in the state database: `accounts import | list | remove` on both backends,
checked by the config file's own validator, never holding a secret, all or nothing, and
seen by every command beside the config file's accounts."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

import pytest

from mailsyncd.app import load
from mailsyncd.service.wake import RETRY, StateWatch
from mailsyncd.state import db, definitions
from tests.helpers import run_cli, wait_for
from tests.postgres import PostgresCluster
from tests.unit.test_service import job as service_job

CONFIG_ACCOUNT = """
[[account]]
name = "filed"
protocol = "imap"
host = "imap.example.org"
username = "filed@example.org"
password_command = "echo secret"

[account.store]
format = "maildir"
path = "mail/{account}"
"""


def account(name: str, extra: str = "", host: str = "imap.example.org") -> str:
    return f"""
[[account]]
name = "{name}"
protocol = "imap"
host = "{host}"
username = "{name}@example.org"
{extra or 'password_file = "secrets/' + name + '"'}

[account.store]
format = "maildir"
path = "mail/{{account}}"
"""


@pytest.fixture
def config(tmp_path: Path, state_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[general]\nstate = "{state_url}"\n' + CONFIG_ACCOUNT)
    return path


def listed(config: Path) -> dict[str, tuple[str, bool]]:
    done = run_cli(config, "accounts", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {entry["name"]: (entry["source"], entry["shadowed"]) for entry in json.loads(done.stdout)}


def one_error_line(done: object, *parts: str) -> None:
    stderr: str = done.stderr  # type: ignore[attr-defined]
    assert done.returncode == 2, stderr  # type: ignore[attr-defined]
    assert stderr.count("\n") == 1, stderr
    for part in parts:
        assert part in stderr, stderr
    assert "Traceback" not in stderr


def generation(state_url: str) -> int:
    engine = db.create(state_url)
    try:
        return definitions.generation(engine)
    finally:
        engine.dispose()


def test_import_list_remove_round_trip(tmp_path: Path, config: Path, state_url: str) -> None:
    batch = tmp_path / "batch" / "accounts.toml"
    batch.parent.mkdir()
    batch.write_text(account("alpha") + account("beta"))
    dry = run_cli(config, "accounts", "import", str(batch), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "alpha: would be added" in dry.stdout and "nothing was written" in dry.stdout
    assert listed(config) == {"filed": ("file", False)}

    done = run_cli(config, "accounts", "import", str(batch))
    assert done.returncode == 0, done.stderr
    assert "alpha: added (imap, alpha@example.org@imap.example.org)" in done.stdout
    assert listed(config) == {"filed": ("file", False), "alpha": ("database", False), "beta": ("database", False)}
    after_import = generation(state_url)

    again = run_cli(config, "accounts", "import", str(batch))
    assert "alpha: unchanged" in again.stdout, again.stdout
    assert generation(state_url) == after_import  # nothing changed: no reload anywhere
    batch.write_text(account("alpha", host="imap2.example.org"))
    changed = run_cli(config, "accounts", "import", str(batch))
    assert "alpha: updated (imap, alpha@example.org@imap2.example.org)" in changed.stdout, changed.stdout
    assert generation(state_url) == after_import + 1

    # Every command sees them, relative paths counted from the imported file's directory.
    loaded = load(config)
    assert [entry.name for entry in loaded.accounts] == ["filed", "alpha", "beta"]
    assert loaded.account("alpha").store.path == batch.parent / "mail" / "alpha"
    assert loaded.account("alpha").host == "imap2.example.org"
    assert loaded.account("beta").password is not None
    assert loaded.account("beta").password.value == str(batch.parent / "secrets" / "beta")

    removed = run_cli(config, "accounts", "remove", "beta")
    assert removed.returncode == 0, removed.stderr
    assert "its state rows are kept" in removed.stdout and str(batch.parent / "mail" / "beta") in removed.stdout
    assert listed(config) == {"filed": ("file", False), "alpha": ("database", False)}
    gone = run_cli(config, "accounts", "remove", "beta")
    one_error_line(gone, "holds no account named beta; have: alpha")
    in_file = run_cli(config, "accounts", "remove", "filed")
    one_error_line(in_file, f'{config}: account "filed": is defined in this file')


@pytest.mark.parametrize(("extra", "key"), [
    ('password = "hunter2"', 'account "leaky".password'),
    ('auth = "oauth2"\n[account.oauth2]\nprovider = "google"\nclient_id = "id"\nclient_secret = "s3cret"',
     'account "leaky".oauth2.client_secret'),
])
def test_a_secret_in_the_file_is_refused_and_nothing_is_written(
        tmp_path: Path, config: Path, state_url: str, extra: str, key: str) -> None:
    batch = tmp_path / "accounts.toml"
    batch.write_text(account("fine") + account("leaky", extra))
    done = run_cli(config, "accounts", "import", str(batch))
    one_error_line(done, f"{batch}: {key}: a secret is never stored in the state database")
    assert "hunter2" not in done.stderr and "s3cret" not in done.stderr
    assert listed(config) == {"filed": ("file", False)}  # all or nothing: "fine" is not stored either
    assert generation(state_url) == 0


def test_a_bad_account_or_a_clash_with_the_config_file_writes_nothing(tmp_path: Path, config: Path) -> None:
    batch = tmp_path / "accounts.toml"
    batch.write_text(account("fine") + account("typo", 'password_file = "p"\nleave_on_sever = true'))
    # The config file's validator, word for word: the same key, the same suggestion.
    one_error_line(run_cli(config, "accounts", "import", str(batch)),
                   f'{batch}: account "typo".leave_on_sever: unknown key (did you mean "leave_on_server"?)')
    batch.write_text(account("fine") + account("never", 'password_file = "p"\ncron = "0 0 31 2 *"'))
    one_error_line(run_cli(config, "accounts", "import", str(batch)),
                   f'{batch}: account "never".cron: this schedule never fires')
    batch.write_text('[general]\nlog_level = "debug"\n' + account("fine"))
    one_error_line(run_cli(config, "accounts", "import", str(batch)), f"{batch}: general: an account file holds")
    batch.write_text(account("fine") + account("filed"))
    one_error_line(run_cli(config, "accounts", "import", str(batch)),
                   f'{batch}: account "filed".name: {config} defines this account too')
    one_error_line(run_cli(config, "accounts", "import", str(tmp_path / "missing.toml")), "no such file")
    assert listed(config) == {"filed": ("file", False)}


def test_a_name_the_config_file_gains_later_is_the_files(tmp_path: Path, config: Path) -> None:
    batch = tmp_path / "accounts.toml"
    batch.write_text(account("both"))
    assert run_cli(config, "accounts", "import", str(batch)).returncode == 0
    config.write_text(config.read_text() + CONFIG_ACCOUNT.replace('"filed"', '"both"'))
    assert listed(config) == {"filed": ("file", False), "both": ("file", True)}
    shown = run_cli(config, "accounts", "list")
    assert "both  imap  filed@example.org@imap.example.org:993  file (also in the database" in shown.stdout


def test_a_stored_account_that_no_longer_passes_is_left_out_with_one_line(
        tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MAILROOT", str(tmp_path / "mailroot"))
    batch = tmp_path / "accounts.toml"
    batch.write_text(account("moving").replace('"mail/{account}"', '"$MAILROOT/{account}"') + account("steady"))
    assert run_cli(config, "accounts", "import", str(batch)).returncode == 0
    monkeypatch.delenv("MAILROOT")
    with caplog.at_level(logging.ERROR):
        loaded = load(config)
    assert [entry.name for entry in loaded.accounts] == ["filed", "steady"]
    assert 'account "moving".store.path: $MAILROOT is not set' in caplog.text


def test_a_check_of_a_new_config_creates_no_state_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[general]\nstate = "{tmp_path / "state.db"}"\n')
    assert [entry.name for entry in load(config).accounts] == []
    assert not (tmp_path / "state.db").exists()


def test_an_asked_run_is_not_skipped_as_not_due() -> None:
    job = service_job()
    assert job.request(None)
    assert job.take(stopping=False) == () and not job.asked  # the schedule's: may be skipped as not due
    assert not job.request(None, asked=True)  # merged into the running drain
    assert job.take(stopping=False) == () and job.asked
    assert job.take(stopping=False) is None


def test_the_state_watch_hears_changes_and_wake_ups_at_once_on_postgresql(postgres_url: str) -> None:
    """Deterministic: the poll is an hour, so only LISTEN/NOTIFY can be this quick."""
    engine = db.create(postgres_url)
    db.upgrade(engine)
    changes: queue.SimpleQueue[str] = queue.SimpleQueue()
    stop = threading.Event()
    watch = StateWatch(engine, 0, lambda: changes.put("changed"), lambda name: changes.put(f"woken {name}"),
                       stop, poll=3600)
    watch.start()
    try:
        assert wait_for(lambda: definitions.listeners(engine) == 1, 5)
        definitions.save(engine, [definitions.Definition("alpha", {"name": "alpha"}, Path("/"))])
        assert changes.get(timeout=2) == "changed"
        definitions.wake(engine, ["alpha"])
        definitions.wake(engine, [])
        assert [changes.get(timeout=2), changes.get(timeout=2)] == ["woken alpha", "woken None"]
        definitions.save(engine, [definitions.Definition("alpha", {"name": "alpha"}, Path("/"))])  # unchanged
        definitions.wake(engine, ["beta"])
        assert changes.get(timeout=2) == "woken beta"  # and no reload for what did not change
    finally:
        stop.set()
        watch.join(5)
        engine.dispose()
    assert not watch.thread.is_alive()


def test_the_state_watch_polls_the_counter_on_sqlite(tmp_path: Path) -> None:
    engine = db.create(str(tmp_path / "state.db"))
    db.upgrade(engine)
    changed = threading.Event()
    stop = threading.Event()
    watch = StateWatch(engine, 0, changed.set, lambda name: None, stop, poll=0.1)
    watch.start()
    try:
        time.sleep(0.3)
        assert not changed.is_set()
        assert definitions.remove(engine, "nobody") is False  # nothing removed: nothing changed
        time.sleep(0.3)
        assert not changed.is_set()
        definitions.save(engine, [definitions.Definition("alpha", {"name": "alpha"}, Path("/"))])
        assert changed.wait(2)
    finally:
        stop.set()
        watch.join(5)
        engine.dispose()


def test_the_state_watch_listens_again_after_postgresql_restarts(postgres_cluster: PostgresCluster) -> None:
    """A change made while the server was away is caught up when the watch listens again."""
    engine = db.create(postgres_cluster.new_database())
    db.upgrade(engine)
    changed = threading.Event()
    stop = threading.Event()
    watch = StateWatch(engine, 0, changed.set, lambda name: None, stop, poll=3600)
    watch.start()
    try:
        assert wait_for(lambda: definitions.listeners(engine) == 1, 5)
        postgres_cluster.stop()
        postgres_cluster.start()
        definitions.save(engine, [definitions.Definition("alpha", {"name": "alpha"}, Path("/"))])
        assert changed.wait(RETRY + 5)
        assert wait_for(lambda: definitions.listeners(engine) == 1, 5)
        changed.clear()
        definitions.remove(engine, "alpha")
        assert changed.wait(2)  # heard at once again
    finally:
        stop.set()
        watch.join(5)
        engine.dispose()


def test_an_mbox_account_is_refused_into_a_shared_state(tmp_path: Path, postgres_url: str) -> None:
    """The rule of the config file holds for stored accounts: any daemon may sync them."""
    shared = tmp_path / "config.toml"
    shared.write_text(f'[general]\nstate = "{postgres_url}"\n')
    batch = tmp_path / "accounts.toml"
    batch.write_text(account("boxed").replace('format = "maildir"', 'format = "mbox"'))
    one_error_line(run_cli(shared, "accounts", "import", str(batch)),
                   f'{batch}: account "boxed".store.format: "mbox" is refused with a shared (PostgreSQL) state')
    assert listed(shared) == {}
    batch.write_text(account("boxed").replace('format = "maildir"', 'format = "mbox"\nshared_store = false'))
    done = run_cli(shared, "accounts", "import", str(batch))
    assert done.returncode == 0, done.stderr
    assert listed(shared) == {"boxed": ("database", False)}
