"""Composition root: config -> state repository, store and source -> executor.

``sync`` on the command line and the daemon's scheduled jobs both call
``App.sync_account``, so they behave the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import Engine

from mailsyncd.config import AccountConfig, Config
from mailsyncd.domain import Mode, Policy, PopPolicy
from mailsyncd.errors import Interrupted, MailsyncError
from mailsyncd.fsio import make_private_dirs
from mailsyncd.log import register_secret
from mailsyncd.progress import Progress
from mailsyncd.secrets import resolve_password
from mailsyncd.sources import imap, pop3
from mailsyncd.state import db
from mailsyncd.state.repo import StateRepo
from mailsyncd.stores.base import Store
from mailsyncd.stores.maildir import MaildirStore
from mailsyncd.stores.mbox import MboxStore
from mailsyncd.sync.effects import Checkpoint, Counts, no_checkpoint
from mailsyncd.sync.imap import sync_folders
from mailsyncd.sync.plan import select_folders
from mailsyncd.sync.pop import sync_pop
from mailsyncd.sync.recover import recover

log = logging.getLogger(__name__)


def open_store(account: AccountConfig) -> Store:
    make_private_dirs(account.store.path)
    if account.store.format == "mbox":
        return MboxStore(account.store.path, account.store.mbox_status_headers)
    return MaildirStore(account.store.path, account.store.layout)


class App:
    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.repo = StateRepo(engine)
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # tests move it (delete_after_days)

    @classmethod
    def open(cls, config: Config) -> App:
        """Open the state database and bring its schema to head (the caller holds the
        instance lock, so no two processes migrate at once)."""
        engine = db.create(config.general.state)
        db.upgrade(engine)
        return cls(config, engine)

    def close(self) -> None:
        self.engine.dispose()

    def sync_account(self, account: AccountConfig, folders: Sequence[str] = (),
                     progress: Progress | None = None, checkpoint: Checkpoint = no_checkpoint) -> Counts:
        """One pass over one account. Raises AccountError (recorded in the database) when
        the account as a whole failed; folder failures are in the returned counts."""
        progress = progress or Progress()
        started = time.monotonic()
        account_id = self.repo.account_id(account.name, account.protocol)
        store = open_store(account)
        recover(self.repo, store, account_id)
        run_id = self.repo.start_run(account_id)
        try:
            counts = self._sync(account, account_id, store, folders, progress, checkpoint)
        except Interrupted as error:
            self.repo.finish_run(run_id, "interrupted", 0, 0, str(error))
            raise
        except MailsyncError as error:
            self.repo.finish_run(run_id, "failed", 0, 0, str(error))
            raise
        self.repo.finish_run(run_id, "partial" if counts.errors else "ok", counts.fetched, counts.fetched_bytes,
                             "; ".join(counts.errors) or None)
        log.info("%s: %s in %.1f s", account.name, counts.summary(), time.monotonic() - started)
        return counts

    def _sync(self, account: AccountConfig, account_id: int, store: Store, folders: Sequence[str],
              progress: Progress, checkpoint: Checkpoint) -> Counts:
        password = resolve_password(account.password, account.name, account.username)
        register_secret(password.reveal())
        if account.protocol == "pop3":
            pop_policy = PopPolicy(account.leave_on_server, account.delete_after_days,
                                   account.max_message_size)
            with pop3.connect(account, password) as pop_session:
                return sync_pop(account.name, account_id, self.repo, store, pop_session, pop_policy, progress,
                                self.clock(), checkpoint)
        policy = Policy(Mode(account.mode), account.max_message_size)
        with imap.connect(account, password) as session:
            listed = session.list_folders()
            selected = select_folders(listed, account.folders, account.exclude, folders)
            counts = sync_folders(account.name, account_id, self.repo, store, session, selected, policy,
                                  progress, checkpoint)
        self.repo.mark_folders_absent(account_id, [folder.name for folder in listed])
        return counts
