"""Composition root: config -> state repository, store and source -> executor.

``sync`` on the command line and the daemon's scheduled jobs both call
``App.sync_account``, so they behave the same way; ``status`` and ``check`` get typed
results from here too, and only format them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType

from sqlalchemy import Engine

from mailsyncd.config import AccountConfig, Config
from mailsyncd.domain import (
    AccountCheck,
    AccountStatus,
    Expunge,
    FolderInfo,
    ImapCheck,
    Mode,
    Policy,
    PopCheck,
    PopPolicy,
    RunResult,
    TwoWayPolicy,
)
from mailsyncd.errors import Interrupted, MailsyncError
from mailsyncd.fsio import make_private_dirs
from mailsyncd.progress import Progress
from mailsyncd.secrets import password_for
from mailsyncd.sources import imap, pop3
from mailsyncd.sources.base import ImapSource
from mailsyncd.state import db
from mailsyncd.state.repo import KnownFolder, StateRepo
from mailsyncd.stores.base import Store
from mailsyncd.stores.maildir import MaildirStore
from mailsyncd.stores.mbox import MboxStore
from mailsyncd.sync.effects import Checkpoint, Counts, no_checkpoint
from mailsyncd.sync.imap import FolderSync, sync_folders
from mailsyncd.sync.plan import select_folders
from mailsyncd.sync.pop import sync_pop
from mailsyncd.sync.recover import reconcile_pushes, recover
from mailsyncd.sync.twoway_run import TwoWaySync, create_local_folders

log = logging.getLogger(__name__)


def open_store(account: AccountConfig, create: bool = True) -> Store:
    """The account's store; its root is made unless ``create`` is false (a two-way
    account that has synced before: a missing root is then a disk not mounted, and making
    it would read as "everything was deleted")."""
    if create:
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
                     progress: Progress | None = None, checkpoint: Checkpoint = no_checkpoint, *,
                     dry_run: bool = False, allow_deletions: Sequence[str] = ()) -> Counts:
        """One pass over one account. Raises AccountError (recorded in the database) when
        the account as a whole failed; folder failures are in the returned counts.
        ``dry_run`` (two-way) only plans: the lines are in ``Counts.report``; it changes
        neither side nor the database. ``allow_deletions`` lifts the deletion guard of
        these folders for this pass."""
        progress = progress or Progress()
        started = time.monotonic()
        account_id = self.repo.account_id(account.name, account.protocol)
        two_way = Mode(account.mode) == Mode.SYNC and account.protocol == "imap"
        store = open_store(account, create=not (two_way and self.repo.has_messages(account_id)))
        if dry_run:
            counts = Counts()
            if two_way:
                self._sync_twoway(account, account_id, store, folders, progress, checkpoint, counts, True,
                                  allow_deletions)
            else:
                self._plan_pull(account, account_id, store, folders, counts)
            return counts
        recover(self.repo, store, account_id)
        run_id = self.repo.start_run(account_id)
        counts = Counts()  # ours, so that a run cut short still records what it fetched
        try:
            if two_way:
                self._sync_twoway(account, account_id, store, folders, progress, checkpoint, counts, False,
                                  allow_deletions)
            else:
                self._sync(account, account_id, store, folders, progress, checkpoint, counts)
        except Interrupted as error:
            self.repo.finish_run(run_id, RunResult.INTERRUPTED, counts.fetched, counts.fetched_bytes, str(error))
            raise
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


    def _plan_pull(self, account: AccountConfig, account_id: int, store: Store, folders: Sequence[str],
                   counts: Counts) -> None:
        """A pull account's dry run: each folder planned from a read-only snapshot."""
        if account.protocol == "pop3":
            counts.report.append("POP3: a dry run plans IMAP accounts only; nothing done")
            return
        known = {folder.name: folder for folder in self.repo.folders(account_id)}
        policy = Policy(Mode(account.mode), account.max_message_size)
        with imap.connect(account, password_for(account)) as session:
            _, selected = _listing(account, session, folders)
            planner = FolderSync(account.name, self.repo, store, Progress(), no_checkpoint, counts, session, policy)
            for info in selected:
                folder = known.get(info.name) or KnownFolder(0, info.name, info.delimiter, "", None, None, None,
                                                             None, True)
                plan = planner.plan(info, folder)
                counts.report.append(f"{info.name}: here: {len(plan.fetch)} downloads, {len(plan.flag_updates)} "
                                     f"flag changes, {len(plan.remove)} removals; to the server: nothing")

    def _sync_twoway(self, account: AccountConfig, account_id: int, store: Store, folders: Sequence[str],
                     progress: Progress, checkpoint: Checkpoint, counts: Counts, dry_run: bool,
                     allow_deletions: Sequence[str]) -> None:
        policy = TwoWayPolicy(Expunge(account.expunge), account.max_deletions, frozenset(allow_deletions))
        deadline = None if account.timeout is None else time.monotonic() + account.timeout
        with imap.connect(account, password_for(account), deadline) as session:
            if policy.expunge == Expunge.OWN and not session.uidplus:
                # Only UID EXPUNGE removes exactly our own: without it, deletions only mark.
                log.warning('%s: %s has no UIDPLUS: expunge = "own" works as "never" (deletions are only '
                            "marked \\Deleted)", account.name, account.host)
                policy = dataclasses.replace(policy, expunge=Expunge.NEVER)
            if not dry_run:
                assert isinstance(store, MaildirStore)  # config.py allows mode = "sync" with Maildir only
                reconcile_pushes(self.repo, store, session, account_id)
            listed, selected = _listing(account, session, folders)
            if not dry_run and create_local_folders(self.repo, store, session, account_id, listed,
                                                    lambda name: bool(_selected_names(account, [name], folders))):
                listed, selected = _listing(account, session, folders)
            TwoWaySync(account.name, self.repo, store, progress, checkpoint, counts, session, policy,
                       dry_run).run(account_id, selected)
        if not dry_run:
            self.repo.mark_folders_absent(account_id, [folder.name for folder in listed])


def _selected_names(account: AccountConfig, names: Sequence[str], only: Sequence[str]) -> list[FolderInfo]:
    return select_folders([FolderInfo(name, None) for name in names], account.folders, account.exclude, only)


def _listing(account: AccountConfig, session: ImapSource,
             only: Sequence[str] = ()) -> tuple[list[FolderInfo], list[FolderInfo]]:
    """The server's folders, and those of them the account syncs (narrowed to ``only``)."""
    listed = session.list_folders()
    return listed, select_folders(listed, account.folders, account.exclude, only)
