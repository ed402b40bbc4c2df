"""What a run records in the state database, also when it is cut short: an interrupted or
failed run keeps the counts of what it did fetch (``status`` shows them). On SQLite and on
PostgreSQL alike (``state_url``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.domain import AccountStatus, RunResult
from mailsyncd.errors import AccountError, Interrupted, MailsyncError
from mailsyncd.sync.effects import Checkpoint
from tests.conftest import DovecotUser
from tests.helpers import corpus_messages, write_config


def raise_at_write(error: MailsyncError, times: int) -> Checkpoint:
    """A checkpoint that raises ``error`` the ``times``-th time a message was written."""
    seen = Counter[str]()

    def checkpoint(step: str) -> None:
        seen[step] += 1
        if step == "write" and seen[step] == times:
            raise error

    return checkpoint


def run_and_report(config: Path, checkpoint: Checkpoint, raised: type[MailsyncError]) -> AccountStatus:
    loaded = load_config(config)
    with App.open(loaded) as app:
        with pytest.raises(raised):
            app.sync_account(loaded.accounts[0], checkpoint=checkpoint)
        [report] = app.status()
    return report


def test_an_interrupted_imap_run_records_what_it_fetched(tmp_path: Path, dovecot: DovecotUser, state_url: str) -> None:
    bodies = [path.read_bytes() for path in corpus_messages(6)]
    dovecot.server.append_many(dovecot.user, "INBOX", bodies)
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password, state=state_url)
    report = run_and_report(config, raise_at_write(Interrupted("stopping"), 4), Interrupted)
    assert report.last_run is not None
    assert report.last_run.result is RunResult.INTERRUPTED
    assert report.last_run.error == "stopping"
    inbox = next(folder for folder in report.folders if folder.name == "INBOX")
    assert report.last_run.fetched == inbox.messages["stored"] == 4
    on_server = dovecot.server.fetch_all(dovecot.user, "INBOX")
    assert report.last_run.fetched_bytes == sum(len(on_server[uid]) for uid in sorted(on_server)[:4])


def test_a_failed_pop3_run_records_what_it_fetched(tmp_path: Path, dovecot: DovecotUser, state_url: str) -> None:
    bodies = [path.read_bytes() for path in corpus_messages(5)]
    dovecot.server.append_many(dovecot.user, "INBOX", bodies)
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password, protocol="pop3",
                          state=state_url)
    report = run_and_report(config, raise_at_write(AccountError("connection lost"), 3), AccountError)
    assert report.last_run is not None
    assert report.last_run.result is RunResult.FAILED
    assert report.last_run.fetched == report.pop_messages["stored"] == 3
    on_server = dovecot.server.fetch_all(dovecot.user, "INBOX")
    assert report.last_run.fetched_bytes == sum(len(on_server[uid]) for uid in sorted(on_server)[:3])
    assert report.configured and report.schedule is not None
