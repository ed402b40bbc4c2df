"""Composition root: config -> state repository, store and source -> executor.

``sync`` on the command line and the daemon's scheduled jobs both call
``App.sync_account``, so they behave the same way; ``status`` and ``check`` get typed
results from here too, and only format them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from types import TracebackType

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from mailsyncd.config import AccountConfig, Config
from mailsyncd.domain import (
    AccountCheck,
    AccountStatus,
    FolderInfo,
    ImapCheck,
    Mode,
    Policy,
    PopCheck,
    PopPolicy,
    RunResult,
)
from mailsyncd.errors import AccountError, Interrupted, LeaseLost, MailsyncError
from mailsyncd.fsio import make_private_dirs
from mailsyncd.progress import Progress
from mailsyncd.secrets import password_for
from mailsyncd.sources import imap, pop3
from mailsyncd.sources.base import ImapSource
from mailsyncd.state import db
from mailsyncd.state.leases import Holder, Leases, node_identity
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

# The Checkpoint steps after which the next effect is a store write, and where stopping
# leaves only intents (fetched again) or finishes the batch in store_batch's ``finally``.
BEFORE_WRITES = frozenset({"intent", "write"})


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
        # A server database may be shared by several daemons: each sync then holds the
        # account's lease. SQLite has one writer already (the instance lock).
        self.leases: Leases | None = None
        if engine.dialect.name != "sqlite":
            node = config.general.node or str(os.getpid())
            self.leases = Leases(engine, node_identity(socket.gethostname(), node), config.general.lease_time)
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

    def __enter__(self) -> App:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def status(self) -> list[AccountStatus]:
        """What the state database knows of each account, with its schedule when the config
        still has it (an account removed from the config keeps its history)."""
        configured = {account.name: account for account in self.config.accounts}
        report = []
        for entry in self.repo.status():
            account = configured.get(entry.account)
            if account is not None:
                entry = dataclasses.replace(entry, configured=True,
                                            schedule=account.cron or f"every {account.interval} s")
            report.append(entry)
        return report

    @staticmethod
    def check(account: AccountConfig) -> AccountCheck:
        """Connect and log in as a sync would, and change nothing: no state database, no
        store, and POP3's QUIT with nothing marked. Raises AccountError as a sync would."""
        password = password_for(account)
        if account.protocol == "pop3":
            with pop3.connect(account, password) as pop_session:
                messages, size = pop_session.stat()
                pop_session.quit()
            return PopCheck(account.name, messages, size, pop_session.login_method)
        with imap.connect(account, password) as session:
            listed, selected = _listing(account, session)
        return ImapCheck(account.name, tuple(folder.name for folder in listed),
                         tuple(folder.name for folder in selected))

    def sync_account(self, account: AccountConfig, folders: Sequence[str] = (),
                     progress: Progress | None = None, checkpoint: Checkpoint = no_checkpoint,
                     scheduled: bool = False) -> Counts:
        """One pass over one account. Raises AccountError (recorded in the database) when
        the account as a whole failed; folder failures are in the returned counts. On a
        shared database a ``scheduled`` run skips an account synced less than half its
        interval ago (AccountNotDue), so N daemons do not each sync it every interval."""
        account_id = self.repo.account_id(account.name, account.protocol)
        try:
            with self._lease(account, account_id, checkpoint, scheduled) as guarded:
                return self._run(account, account_id, folders, progress or Progress(), guarded)
        except DBAPIError as error:  # the database went away mid-run: this account's fault line
            raise AccountError(f"{account.name}: state database error: {type(error.orig).__name__}; "
                               "the next run goes on from here") from error

    @contextlib.contextmanager
    def _lease(self, account: AccountConfig, account_id: int, checkpoint: Checkpoint,
               scheduled: bool) -> Iterator[Checkpoint]:
        """Hold the account's lease while it syncs (AccountBusy if another daemon has it);
        the checkpoint given back also stops the run before a store write once it ran out."""
        if self.leases is None:
            yield checkpoint
            return
        with self.leases.held(account.name, account_id, account.interval / 2, scheduled) as lease:
            def guarded(step: str) -> None:
                checkpoint(step)
                if step in BEFORE_WRITES:
                    lease.check()

            yield guarded

    def holders(self) -> dict[str, Holder]:
        """Which daemon holds which account, on a shared database; nothing on SQLite."""
        return {} if self.leases is None else self.leases.holders()

    def _run(self, account: AccountConfig, account_id: int, folders: Sequence[str], progress: Progress,
             checkpoint: Checkpoint) -> Counts:
        started = time.monotonic()
        store = open_store(account)
        recover(self.repo, store, account_id)
        run_id = self.repo.start_run(account_id)
        counts = Counts()  # ours, so that a run cut short still records what it fetched
        try:
            self._sync(account, account_id, store, folders, progress, checkpoint, counts)
        except Interrupted as error:
            self.repo.finish_run(run_id, RunResult.INTERRUPTED, counts.fetched, counts.fetched_bytes, str(error))
            raise
        except LeaseLost:
            raise  # the account's rows are the new holder's now; not even the run is recorded
        except MailsyncError as error:
            self.repo.finish_run(run_id, RunResult.FAILED, counts.fetched, counts.fetched_bytes, str(error))
            raise
        self.repo.finish_run(run_id, RunResult.PARTIAL if counts.errors else RunResult.OK, counts.fetched,
                             counts.fetched_bytes, "; ".join(counts.errors) or None)
        log.info("%s: %s in %.1f s", account.name, counts.summary(), time.monotonic() - started)
        return counts

    def _sync(self, account: AccountConfig, account_id: int, store: Store, folders: Sequence[str],
              progress: Progress, checkpoint: Checkpoint, counts: Counts) -> None:
        password = password_for(account)
        deadline = None if account.timeout is None else time.monotonic() + account.timeout
        if account.protocol == "pop3":
            pop_policy = PopPolicy(account.leave_on_server, account.delete_after_days,
                                   account.max_message_size)
            with pop3.connect(account, password, deadline) as pop_session:
                sync_pop(account.name, account_id, self.repo, store, pop_session, pop_policy, progress,
                         self.clock(), checkpoint, counts=counts)
            return
        policy = Policy(Mode(account.mode), account.max_message_size)
        with imap.connect(account, password, deadline) as session:
            listed, selected = _listing(account, session, folders)
            sync_folders(account.name, account_id, self.repo, store, session, selected, policy,
                         progress, checkpoint, counts=counts)
        self.repo.mark_folders_absent(account_id, [folder.name for folder in listed])


def _listing(account: AccountConfig, session: ImapSource,
             only: Sequence[str] = ()) -> tuple[list[FolderInfo], list[FolderInfo]]:
    """The server's folders, and those of them the account syncs (narrowed to ``only``)."""
    listed = session.list_folders()
    return listed, select_folders(listed, account.folders, account.exclude, only)
