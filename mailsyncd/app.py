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
    FetchParts,
    FolderInfo,
    ImapCheck,
    LargeMessages,
    Mode,
    Policy,
    PopCheck,
    PopPolicy,
    RunResult,
)
from mailsyncd.errors import AccountError, Interrupted, MailsyncError
from mailsyncd.fsio import make_private_dirs
from mailsyncd.progress import Progress
from mailsyncd.secrets import password_for
from mailsyncd.sources import imap, pop3
from mailsyncd.sources.base import ImapSource
from mailsyncd.state import db
from mailsyncd.state.repo import StateRepo
from mailsyncd.stores.base import Store
from mailsyncd.stores.maildir import MaildirStore
from mailsyncd.stores.mbox import MboxStore
from mailsyncd.sync.effects import Checkpoint, Counts, no_checkpoint
from mailsyncd.sync.imap import replace_placeholder, sync_folders
from mailsyncd.sync.plan import select_folders
from mailsyncd.sync.pop import INBOX, replace_pop_placeholder, sync_pop
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
                     progress: Progress | None = None, checkpoint: Checkpoint = no_checkpoint) -> Counts:
        """One pass over one account. Raises AccountError (recorded in the database) when
        the account as a whole failed; folder failures are in the returned counts."""
        progress = progress or Progress()
        started = time.monotonic()
        account_id = self.repo.account_id(account.name, account.protocol)
        store = open_store(account)
        recover(self.repo, store, account_id)
        run_id = self.repo.start_run(account_id)
        counts = Counts()  # ours, so that a run cut short still records what it fetched
        try:
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
                                   account.max_message_size, LargeMessages(account.large_messages))
            with pop3.connect(account, password, deadline) as pop_session:
                sync_pop(account.name, account_id, self.repo, store, pop_session, pop_policy, progress,
                         self.clock(), checkpoint, counts=counts)
            return
        policy = Policy(Mode(account.mode), account.max_message_size, LargeMessages(account.large_messages))
        with imap.connect(account, password, deadline) as session:
            listed, selected = _listing(account, session, folders)
            sync_folders(account.name, account_id, self.repo, store, session, selected, policy,
                         progress, checkpoint, counts=counts, fetch_parts=FetchParts(account.fetch_parts))
        self.repo.mark_folders_absent(account_id, [folder.name for folder in listed])


    def fetch_whole(self, account: AccountConfig, folder: str, uid: str | None, message_id: str | None,
                    progress: Progress | None = None, checkpoint: Checkpoint = no_checkpoint) -> str:
        """Replace one placeholder by its whole message (by UID, or UIDL for POP3, or by
        Message-ID); returns where it is stored now. Raises AccountError, in one line,
        when there is no such placeholder or the server no longer has the message."""
        progress = progress or Progress()
        account_id = self.repo.account_id(account.name, account.protocol)
        store = open_store(account)
        recover(self.repo, store, account_id)
        wanted = f"UID {uid}" if uid is not None else f"Message-ID {message_id}"
        if account.protocol == "pop3":
            return self._fetch_pop(account, account_id, store, folder, uid, message_id, wanted, progress, checkpoint)
        known = next((entry for entry in self.repo.folders(account_id) if entry.name == folder), None)
        if known is None:
            raise AccountError(f"{account.name}: no folder {folder!r} has been synced")
        if uid is not None and not uid.isdigit():
            raise AccountError(f"{account.name}: --uid takes a number for IMAP, got {uid!r}")
        held = self.repo.find_placeholder(known.id, None if uid is None else int(uid), message_id)
        if held is None:
            raise AccountError(f"{account.name}: folder {folder!r} holds no placeholder with {wanted}")
        counts = Counts()
        deadline = None if account.timeout is None else time.monotonic() + account.timeout
        with imap.connect(account, password_for(account), deadline) as session:
            done = replace_placeholder(account.name, self.repo, store, session, known, held, progress, checkpoint,
                                       counts=counts)
        if not done:
            reason = "; ".join(counts.errors) or "the server no longer has the message"
            raise AccountError(f"{account.name}: folder {folder!r}: {reason} ({wanted}); the placeholder stays")
        found = self.repo.find_stored(known.id, held.uidvalidity, held.uid)
        return f"{account.store.path / found}" if found else str(account.store.path)


    def _fetch_pop(self, account: AccountConfig, account_id: int, store: Store, folder: str, uid: str | None,
                   message_id: str | None, wanted: str, progress: Progress, checkpoint: Checkpoint) -> str:
        if folder != INBOX:
            raise AccountError(f"{account.name}: a POP3 account has only the folder {INBOX}")
        held = self.repo.pop_find_placeholder(account_id, uid, message_id)
        if held is None:
            raise AccountError(f"{account.name}: holds no placeholder with {wanted}")
        uidl, location = held
        counts = Counts()
        deadline = None if account.timeout is None else time.monotonic() + account.timeout
        with pop3.connect(account, password_for(account), deadline) as session:
            done = replace_pop_placeholder(account.name, account_id, self.repo, store, session, uidl, location,
                                           progress, checkpoint, counts=counts)
        if not done:
            raise AccountError(f"{account.name}: the server no longer has the message ({wanted}); "
                               "the placeholder stays")
        return str(account.store.path / (self.repo.pop_location(account_id, uidl) or ""))


def _listing(account: AccountConfig, session: ImapSource,
             only: Sequence[str] = ()) -> tuple[list[FolderInfo], list[FolderInfo]]:
    """The server's folders, and those of them the account syncs (narrowed to ``only``)."""
    listed = session.list_folders()
    return listed, select_folders(listed, account.folders, account.exclude, only)
