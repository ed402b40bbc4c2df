"""Composition root: config -> state repository, store and source -> executor.

``sync`` on the command line and the daemon's scheduled jobs both call
``App.sync_account``, so they behave the same way; ``status`` and ``check`` get typed
results from here too, and only format them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from mailsyncd.config import AccountConfig, Config, load_config, with_stored_accounts
from mailsyncd.domain import (
    AccountCheck,
    AccountStatus,
    AdoptPreview,
    Expunge,
    FetchParts,
    FolderInfo,
    ImapCheck,
    LargeMessages,
    Mode,
    Policy,
    PopCheck,
    PopPolicy,
    RunResult,
    TwoWayPolicy,
)
from mailsyncd.errors import AccountError, Interrupted, LeaseLost, MailsyncError, StoreUnavailable
from mailsyncd.fsio import STORE_ERRNOS, make_private_dirs, write_refusal
from mailsyncd.oauth2 import log_in, login_good_until
from mailsyncd.progress import Progress
from mailsyncd.secrets import redact
from mailsyncd.sources import imap
from mailsyncd.sources.base import ImapSource
from mailsyncd.sources.imap import ImapSession
from mailsyncd.sources.kept import Kept, KeptSessions
from mailsyncd.state import db, definitions
from mailsyncd.state.leases import Holder, Leases, LocalHostCap, Rules, own_identity
from mailsyncd.state.repo import KnownFolder, StateRepo
from mailsyncd.stores.base import Store
from mailsyncd.stores.maildir import MaildirStore
from mailsyncd.sync.effects import Checkpoint, Counts, no_checkpoint
from mailsyncd.sync.imap import FolderSync, preview_folder, replace_placeholder, sync_folders
from mailsyncd.sync.plan import select_folders
from mailsyncd.sync.recover import recover

log = logging.getLogger(__name__)

# The Checkpoint steps after which the next effect is a store write, and where stopping
# leaves only intents (fetched again) or finishes the batch in store_batch's ``finally``.
BEFORE_WRITES = frozenset({"intent", "write"})


def load(path: Path, engine: Engine | None = None) -> Config:
    """The config file with the accounts kept in its state database after its own: what
    every command and the daemon's reload see, read in this one place. A process with the
    state database open passes its ``engine``: opening the SQLite file again and closing
    it would drop the POSIX locks its connections hold (a close drops all of a process's
    locks on the file), and another process could then reset the WAL under them."""
    config = load_config(path)
    if engine is None:
        stored = definitions.read_state(config.general.state)
    else:
        with db.state_errors(config.general.state):
            stored = definitions.read(engine)
    return with_stored_accounts(config, stored.generation,
                                ((item.name, item.table, item.base) for item in stored.definitions),
                                db.location(config.general.state))


def open_store(account: AccountConfig, create: bool = True) -> Store:
    """The account's store; its root is made unless ``create`` is false (a two-way
    account that has synced before: a missing root is then a disk not mounted, and making
    it would read as "everything was deleted")."""
    if create:
        make_private_dirs(account.store.path)
    if account.store.format == "mbox":
        # Imported here, like the POP3 and two-way code: `mailsyncd sync` runs as a whole
        # process on a timer, and an IMAP pull into a Maildir should not pay for them.
        from mailsyncd.stores.mbox import MboxStore
        return MboxStore(account.store.path, account.store.mbox_status_headers)
    return MaildirStore(account.store.path, account.store.layout)


@contextlib.contextmanager
def _store_faults(account: AccountConfig) -> Iterator[None]:
    """A store the disk will not let us write (full, read-only, a file in the way) stops
    this account with one line; the other accounts go on."""
    try:
        yield
    except OSError as error:
        if error.errno not in STORE_ERRNOS:
            raise
        where = error.filename or account.store.path
        raise StoreUnavailable(f"{account.name}: the store cannot be written: {where}: {error.strerror}") from error


class App:
    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.repo = StateRepo(engine)
        # A server database may be shared by several daemons: each sync then holds the
        # account's lease. SQLite has one writer already (the instance lock).
        self.leases: Leases | None = None
        if engine.dialect.name != "sqlite":
            self.leases = Leases(engine, own_identity(config.general.node), config.general.lease_time)
        self.host_cap = LocalHostCap()  # host_logins where no lease rows are shared
        self.holding: set[str] = set()  # the accounts this process syncs now, for the metrics
        self.kept = KeptSessions()  # the daemon's IMAP sessions between runs (``keep`` runs only)
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # tests move it (delete_after_days)

    @classmethod
    def open(cls, config: Config) -> App:
        """Open the state database and bring its schema to head (the caller holds the
        instance lock, so no two processes migrate at once)."""
        engine = db.create(config.general.state)
        with db.state_errors(config.general.state):
            db.check_writable(engine)
            db.upgrade(engine)
        return cls(config, engine)

    def close(self) -> None:
        self.kept.close()
        self.engine.dispose()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *_: object) -> None:
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
        store, and POP3's QUIT with nothing marked. Raises AccountError as a sync would,
        and StoreUnavailable when the store could not be made or written."""
        refusal = write_refusal(account.store.path)
        if refusal is not None:
            raise StoreUnavailable(f"{account.name}: the store {account.store.path} cannot be written: {refusal}")
        if account.protocol == "pop3":
            from mailsyncd.sources import pop3
            with log_in(account, lambda secret: pop3.connect(account, secret)) as pop_session:
                messages, size = pop_session.stat()
                pop_session.quit()
            return PopCheck(account.name, messages, size, pop_session.login_method)
        with log_in(account, lambda secret: imap.connect(account, secret)) as session:
            listed, selected = _listing(account, session)
        return ImapCheck(account.name, tuple(folder.name for folder in listed),
                         tuple(folder.name for folder in selected))

    def adopt(self, account: AccountConfig, dry_run: bool,
              progress: Progress | None = None) -> tuple[list[AdoptPreview], Counts | None]:
        """Match a store the state database knows nothing of (written by mbsync,
        offlineimap, getmail, or by mailsyncd with a state database since lost) with the
        server: what a sync would adopt, fetch and leave local only, per folder; then,
        unless ``dry_run``, that sync (the same ``sync_account``, whose counts are returned).
        The preview reads only: the store, the state database and the server (EXAMINE)."""
        store = open_store(account, create=not dry_run)
        account_id = self.repo.find_account(account.name)
        known = {folder.name: folder for folder in self.repo.folders(account_id)} if account_id is not None else {}
        previews: list[AdoptPreview] = []
        if account.protocol == "pop3":
            recorded = account_id is not None and bool(self.repo.pop_messages(account_id))
            from mailsyncd.sources import pop3
            from mailsyncd.sync.pop import INBOX
            with log_in(account, lambda secret: pop3.connect(account, secret)) as pop_session:
                listed = len(pop_session.listing().entries)
                pop_session.quit()
            found = 0 if recorded else len(store.index(store.folder_path(INBOX, None)))
            previews.append(AdoptPreview(INBOX, found, 0, listed, found, recorded))
        else:
            policy = Policy(Mode(account.mode), account.max_message_size, LargeMessages(account.large_messages))
            with log_in(account, lambda secret: imap.connect(account, secret)) as session:
                for info in _listing(account, session)[1]:
                    folder = known.get(info.name)
                    if folder is not None and (folder.uidnext is not None or self.repo.folder_has_records(folder.id)):
                        previews.append(AdoptPreview(info.name, 0, recorded=True))
                        continue
                    path = folder.path if folder else store.folder_path(info.name, info.delimiter)
                    previews.append(preview_folder(store, session, info, path, policy))
        if dry_run:
            return previews, None
        return previews, self.sync_account(account, progress=progress)

    def sync_account(self, account: AccountConfig, folders: Sequence[str] = (),
                     progress: Progress | None = None, checkpoint: Checkpoint = no_checkpoint, *,
                     dry_run: bool = False, allow_deletions: Sequence[str] = (), scheduled: bool = False,
                     keep: bool = False) -> Counts:
        """One pass over one account. Raises AccountError (recorded in the database) when
        the account as a whole failed; folder failures are in the returned counts.
        ``dry_run`` (two-way) only plans: the lines are in ``Counts.report``; it changes
        neither side nor the database. ``allow_deletions`` lifts the deletion guard of
        these folders for this pass. On a shared database a ``scheduled`` run skips an
        account synced less than half its interval ago (AccountNotDue), so N daemons do
        not each sync it every interval. ``keep`` (the daemon's runs of IMAP accounts)
        leaves the session logged in for the next run, and takes the one the last run left."""
        with db.state_errors(self.config.general.state, account.name):
            account_id = self.repo.account_id(account.name, account.protocol)
            with self._lease(account, account_id, checkpoint, scheduled) as guarded:
                return self._sync_account(account, account_id, folders, progress or Progress(), guarded, dry_run,
                                          allow_deletions, keep)

    @contextlib.contextmanager
    def _lease(self, account: AccountConfig, account_id: int, checkpoint: Checkpoint,
               scheduled: bool) -> Iterator[Checkpoint]:
        """Hold the account's lease while it syncs (AccountBusy if another daemon has it,
        HostCapped past ``host_logins``, AccountReserved while sticky to another node);
        the checkpoint given back also stops the run before a store write once it ran out."""
        general = self.config.general
        host = account.host.lower()
        if self.leases is None:
            with self.host_cap.slot(account.name, host, general.host_logins), self._holding(account):
                yield checkpoint
            return
        # Sticky: the node's next scheduled run comes within an interval; overdue by half
        # an interval more (at least a lease), it is taken to be gone.
        grace = max(account.interval / 2, general.lease_time)
        sticky_for = timedelta(seconds=account.interval + grace) if account.sticky else None
        rules = Rules(host, general.host_logins, sticky_for)
        with self.leases.held(account.name, account_id, account.interval / 2, scheduled, rules) as lease, \
                self._holding(account):
            def guarded(step: str) -> None:
                checkpoint(step)
                if step in BEFORE_WRITES:
                    lease.check()

            yield guarded

    @contextlib.contextmanager
    def _holding(self, account: AccountConfig) -> Iterator[None]:
        self.holding.add(account.name)
        try:
            yield
        finally:
            self.holding.discard(account.name)

    def holders(self) -> dict[str, Holder]:
        """Which daemon holds which account, on a shared database; nothing on SQLite."""
        return {} if self.leases is None else self.leases.holders()

    def _sync_account(self, account: AccountConfig, account_id: int, folders: Sequence[str], progress: Progress,
                      checkpoint: Checkpoint, dry_run: bool, allow_deletions: Sequence[str], keep: bool) -> Counts:
        started = time.monotonic()
        two_way = Mode(account.mode) == Mode.SYNC and account.protocol == "imap"
        create = not (two_way and self.repo.has_messages(account_id))
        if dry_run:
            counts = Counts()
            with _store_faults(account):
                store = open_store(account, create)
            if two_way:
                self._sync_twoway(account, account_id, store, folders, progress, checkpoint, counts, True,
                                  allow_deletions)
            else:
                self._plan_pull(account, account_id, store, folders, counts)
            return counts
        run_id = self.repo.start_run(account_id)
        counts = Counts()  # ours, so that a run cut short still records what it fetched
        try:
            with _store_faults(account):
                store = open_store(account, create)
                recover(self.repo, store, account_id)
                if two_way:
                    self._sync_twoway(account, account_id, store, folders, progress, checkpoint, counts, False,
                                      allow_deletions, keep)
                else:
                    self._sync(account, account_id, store, folders, progress, checkpoint, counts, keep)
        except Interrupted as error:
            self.repo.finish_run(run_id, RunResult.INTERRUPTED, counts.fetched, counts.fetched_bytes, str(error))
            raise
        except LeaseLost:
            raise  # the account's rows are the new holder's now; not even the run is recorded
        except MailsyncError as error:
            self.repo.finish_run(run_id, RunResult.FAILED, counts.fetched, counts.fetched_bytes, str(error))
            raise
        except Exception as error:  # a bug: the account boundary records it, and the caller goes on
            self.repo.finish_run(run_id, RunResult.FAILED, counts.fetched, counts.fetched_bytes,
                                 redact(f"{account.name}: unexpected {type(error).__name__}: {error}"))
            raise
        self.repo.finish_run(run_id, RunResult.PARTIAL if counts.errors else RunResult.OK, counts.fetched,
                             counts.fetched_bytes, "; ".join(counts.errors) or None)
        log.info("%s: %s in %.1f s", account.name, counts.summary(), time.monotonic() - started)
        return counts

    def _sync(self, account: AccountConfig, account_id: int, store: Store, folders: Sequence[str],
              progress: Progress, checkpoint: Checkpoint, counts: Counts, keep: bool) -> None:
        deadline = None if account.timeout is None else time.monotonic() + account.timeout
        if account.protocol == "pop3":
            from mailsyncd.sources import pop3
            from mailsyncd.sync.pop import sync_pop
            pop_policy = PopPolicy(account.leave_on_server, account.delete_after_days,
                                   account.max_message_size, LargeMessages(account.large_messages))
            with log_in(account, lambda secret: pop3.connect(account, secret, deadline)) as pop_session:
                sync_pop(account.name, account_id, self.repo, store, pop_session, pop_policy, progress,
                         self.clock(), checkpoint, counts=counts)
            return
        policy = Policy(Mode(account.mode), account.max_message_size, LargeMessages(account.large_messages))
        with self._imap_session(account, deadline, keep) as session:
            listed, selected = _listing(account, session, folders)
            sync_folders(account.name, account_id, self.repo, store, session, selected, policy,
                         progress, checkpoint, counts=counts, fetch_parts=FetchParts(account.fetch_parts))
        self.repo.mark_folders_absent(account_id, [folder.name for folder in listed])

    def _plan_pull(self, account: AccountConfig, account_id: int, store: Store, folders: Sequence[str],
                   counts: Counts) -> None:
        """A pull account's dry run: each folder planned from a read-only snapshot."""
        if account.protocol == "pop3":
            counts.report.append("POP3: a dry run plans IMAP accounts only; nothing done")
            return
        known = {folder.name: folder for folder in self.repo.folders(account_id)}
        policy = Policy(Mode(account.mode), account.max_message_size)
        with log_in(account, lambda secret: imap.connect(account, secret)) as session:
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
                     allow_deletions: Sequence[str], keep: bool = False) -> None:
        from mailsyncd.sync.recover import reconcile_pushes
        from mailsyncd.sync.twoway_run import TwoWaySync, create_local_folders
        policy = TwoWayPolicy(Expunge(account.expunge), account.max_deletions, frozenset(allow_deletions))
        deadline = None if account.timeout is None else time.monotonic() + account.timeout
        with self._imap_session(account, deadline, keep) as session:
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

    @contextlib.contextmanager
    def _imap_session(self, account: AccountConfig, deadline: float | None, keep: bool) -> Iterator[ImapSession]:
        """A logged-in session for one run: with ``keep``, the one the last run left if it
        can carry this one (see ``KeptSessions.take``), and given back afterwards unless
        the run ended in an exception (the connection may then be mid-answer)."""
        if not keep:
            self.kept.drop(account.name)  # left by a run before a reload turned keeping off
        kept = self.kept.take(account) if keep else None
        if kept is None:
            session = log_in(account, lambda secret: imap.connect(account, secret, deadline))
            kept = Kept(session, login_good_until(account))
        else:
            kept.session.renew(deadline)
            log.debug("%s: on the connection kept from the last run", account.name)
        before = kept.session.round_trips
        try:
            yield kept.session
        except BaseException:
            kept.session.close()
            raise
        finally:
            log.debug("%s: %d round trips to %s", account.name, kept.session.round_trips - before, account.host)
        if keep:
            self.kept.put(account, kept)
        else:
            kept.session.close()

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
        with log_in(account, lambda secret: imap.connect(account, secret, deadline)) as session:
            done = replace_placeholder(account.name, self.repo, store, session, known, held, progress, checkpoint,
                                       counts=counts)
        if not done:
            reason = "; ".join(counts.errors) or "the server no longer has the message"
            raise AccountError(f"{account.name}: folder {folder!r}: {reason} ({wanted}); the placeholder stays")
        found = self.repo.find_stored(known.id, held.uidvalidity, held.uid)
        return f"{account.store.path / found}" if found else str(account.store.path)

    def _fetch_pop(self, account: AccountConfig, account_id: int, store: Store, folder: str, uid: str | None,
                   message_id: str | None, wanted: str, progress: Progress, checkpoint: Checkpoint) -> str:
        from mailsyncd.sources import pop3
        from mailsyncd.sync.pop import INBOX, replace_pop_placeholder
        if folder != INBOX:
            raise AccountError(f"{account.name}: a POP3 account has only the folder {INBOX}")
        held = self.repo.pop_find_placeholder(account_id, uid, message_id)
        if held is None:
            raise AccountError(f"{account.name}: holds no placeholder with {wanted}")
        uidl, location = held
        counts = Counts()
        deadline = None if account.timeout is None else time.monotonic() + account.timeout
        with log_in(account, lambda secret: pop3.connect(account, secret, deadline)) as session:
            done = replace_pop_placeholder(account.name, account_id, self.repo, store, session, uidl, location,
                                           progress, checkpoint, counts=counts)
        if not done:
            raise AccountError(f"{account.name}: the server no longer has the message ({wanted}); "
                               "the placeholder stays")
        return str(account.store.path / (self.repo.pop_location(account_id, uidl) or ""))


def _selected_names(account: AccountConfig, names: Sequence[str], only: Sequence[str]) -> list[FolderInfo]:
    return select_folders([FolderInfo(name, None) for name in names], account.folders, account.exclude, only)


def _listing(account: AccountConfig, session: ImapSource,
             only: Sequence[str] = ()) -> tuple[list[FolderInfo], list[FolderInfo]]:
    """The server's folders, and those of them the account syncs (narrowed to ``only``)."""
    listed = session.list_folders()
    return listed, select_folders(listed, account.folders, account.exclude, only)
