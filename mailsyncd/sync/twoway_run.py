"""The two-way executor (``mode = "sync"``): carries out what sync/twoway.py planned.

Per pass: every folder's server snapshot (SELECT) and local listing, one plan for the
account (moves are seen across folders), then each folder in the order twoway.py gives:
flags, moves, new messages each way, deletions, the folder's sync point. Every effect on
either side has its intent committed first (``push_intents``; downloads use the pull
path's pending rows), and its outcome is recorded with the intent's end in one
transaction, so recovery at the next start (sync/recover.py) finds each unfinished one.

A base moves only to what the server confirmed: a flag write refused with MODIFIED keeps
the old base, so the next pass merges that message again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from mailsyncd import names
from mailsyncd.domain import (
    HOLDABLE_FLAGS,
    NO_FLAGS,
    Append,
    Download,
    FlagMerge,
    Flags,
    FolderInfo,
    LocalFolderScan,
    LocalMessage,
    LocalMove,
    MessageState,
    RecordedMessage,
    RecordedPair,
    RecordedPairs,
    RemoteMessage,
    SnapshotBase,
    Stored,
    TwoWayFolder,
    TwoWayPlan,
    TwoWayPolicy,
)
from mailsyncd.errors import FolderError, MailsyncError, MessageError
from mailsyncd.message import digest, message_id, server_size, to_lf
from mailsyncd.sources.base import TwoWaySource
from mailsyncd.state.repo import KnownFolder, PushIntent, StateRepo
from mailsyncd.stores.base import FolderWriter, Reservation, Store
from mailsyncd.stores.maildir import MaildirListing, MaildirStore, unique_part
from mailsyncd.sync.batch import FETCH_BUDGET, ContentPool, batches, store_batch
from mailsyncd.sync.effects import Effects
from mailsyncd.sync.twoway import DELETED, canonical, first_base, holdable, needs_content, plan_account

log = logging.getLogger(__name__)

BATCH_MAX_COUNT = 2000


class IntentKind(StrEnum):
    """What an unfinished intent was about to do; recovery settles each kind its own way."""

    FLAGS = "flags"  # UID STORE +/-FLAGS.SILENT and file renames: the next merge settles them
    APPEND = "append"  # APPEND of a local file: searched for on the server before any new APPEND
    MOVE = "move"  # UID MOVE of a paired message to another folder
    RENAME = "rename"  # a file renamed into another folder (a move made on the server)
    DELETE = "delete"  # \Deleted + UID EXPUNGE of a UID whose file was deleted here
    REMOVE = "remove"  # a file removed because the server expunged its UID


@dataclass(frozen=True)
class FlagChange:
    """The flag writes of one message in one pass, as its intent records them: ``add``
    and ``remove`` on the server, ``local`` the file's new flags (None: no rename)."""

    add: Flags = frozenset()
    remove: Flags = frozenset()
    local: Flags | None = None

    def encode(self) -> Flags:
        """As the intent's flag words: +flag, -flag, and = followed by each new local flag."""
        return frozenset({f"+{flag}" for flag in self.add} | {f"-{flag}" for flag in self.remove}
                         | (set() if self.local is None else {"="} | {f"={flag}" for flag in self.local}))

    @classmethod
    def decode(cls, words: Flags) -> FlagChange:
        local = None if "=" not in words else frozenset(word[1:] for word in words if word[:1] == "=" and word[1:])
        return cls(frozenset(word[1:] for word in words if word[:1] == "+"),
                   frozenset(word[1:] for word in words if word[:1] == "-"), local)

    def settled(self, base: Flags, remote: Flags | None, local: Flags | None) -> Flags:
        """The base once the writes that happened are counted, flag by flag: a server
        write where the server shows it (``remote``), the rename's other flags where the
        file shows it (``local``: the file's flags now). A write that did not happen
        leaves its flag's base alone, so the next merge makes it again."""
        new = set(canonical(base))
        if remote is not None:
            remote = canonical(remote)
            new |= self.add & remote
            new -= self.remove - remote
        if self.local is not None and local is not None and holdable(local) == self.local:
            for flag in HOLDABLE_FLAGS - self.add - self.remove:
                (new.add if flag in self.local else new.discard)(flag)
        return frozenset(new)


@dataclass
class Side:
    """One folder as this pass sees it: its record, its server snapshot's plan, its files."""

    known: KnownFolder
    listing: MaildirListing
    pairs: dict[int, RecordedPair]
    locations: dict[int, str]  # uid -> recorded location


@dataclass
class TwoWaySync(Effects):
    """One account's two-way pass; a dry run plans, puts one line per folder into
    ``counts.report``, and changes nothing."""

    source: TwoWaySource
    policy: TwoWayPolicy
    dry_run: bool = False
    maildir: MaildirStore = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.store, MaildirStore):
            raise TypeError("two-way sync needs a Maildir store")  # config.py refuses it first
        self.maildir = self.store

    def run(self, account_id: int, selected: Sequence[FolderInfo]) -> None:
        known = {folder.name: folder for folder in self.repo.folders(account_id)}
        root_missing = not self.maildir.root.is_dir()
        sides: dict[str, Side] = {}
        folders: list[TwoWayFolder] = []
        for info in selected:
            try:
                folder = self._folder(account_id, info, known.get(info.name), root_missing, sides)
            except FolderError as error:
                self._fail(info.name, str(error), known.get(info.name))
                continue
            folders.append(folder)
        plans = plan_account(folders, self.policy)
        # A message another client moved is claimed by its old folder's plan, which
        # renames the file. Until that is done, the new folder must list it again: its
        # sync point stays below the lowest such UID, or a kill in between would leave the
        # message unseen there and its file removed from the old folder.
        awaited: dict[str, int] = {}
        for plan in plans.values():
            for target, uid in [*((move.target, move.target_uid) for move in plan.server_moves),
                                *((rejoin.target, rejoin.target_uid) for rejoin in plan.rejoins)]:
                awaited[target] = min(uid, awaited.get(target, uid))
        if self.dry_run:
            self.counts.report.extend(describe(plan) for plan in plans.values())
            return
        for name, plan in plans.items():
            side = sides[name]
            if plan.stop is not None:
                # A missing directory is most likely a disk not mounted: the way out is to
                # bring it back, not to let the deletions through.
                hint = ("nothing changes here until it is back" if not side.listing.scan.present else
                        f"run `mailsyncd sync --allow-deletions {name}` once if that is what you want")
                self._fail(name, f"stopped, nothing changed: {plan.stop.reason}; {hint}", side.known)
                continue
            try:
                FolderPass(self, side, plan, sides, awaited.get(name)).execute()
            except MailsyncError as error:
                self._fail(name, str(error), side.known)
            self.counts.folders += 1

    def _fail(self, name: str, error: str, known: KnownFolder | None) -> None:
        log.error("%s/%s: %s", self.account, name, error)
        self.counts.errors.append(f"{name}: {error}")
        if known is not None and known.id > 0 and not self.dry_run:
            self.repo.folder_error(known.id, error)

    def _folder(self, account_id: int, info: FolderInfo, known: KnownFolder | None, root_missing: bool,
                sides: dict[str, Side]) -> TwoWayFolder:
        """Snapshot, pairs and local listing of one folder, with the content the planner
        needs read from the files it names."""
        path = known.path if known else self.store.folder_path(info.name, info.delimiter)
        if known is None or not known.on_server:
            if self.dry_run:
                known = known or KnownFolder(0, info.name, info.delimiter, path, None, None, None, None, True)
            else:
                folder_id = self.repo.upsert_folder(account_id, info, path)
                known = self.repo.folder(folder_id)
        base = None
        if known.uidvalidity is not None and known.uidnext is not None:
            present, _ = self.repo.sync_base(known.id, known.uidvalidity, known.uidnext, None)
            base = SnapshotBase(known.uidvalidity, known.uidnext, known.highestmodseq, present)
        snapshot = self.source.open_writable(info.name, base, readonly=self.dry_run)
        if known.uidvalidity is not None and known.uidvalidity != snapshot.uidvalidity:
            log.warning("%s/%s: UIDVALIDITY changed (%d -> %d); pairing local files with the server by content",
                        self.account, info.name, known.uidvalidity, snapshot.uidvalidity)
        if known.uidvalidity != snapshot.uidvalidity and not self.dry_run:
            # Before any intent: the pairs of the old UIDVALIDITY are over, the files stay.
            self.repo.restart_pairs(known.id, snapshot.uidvalidity)
            known = dataclasses.replace(known, uidvalidity=snapshot.uidvalidity, uidnext=None, highestmodseq=None,
                                        local_mtimes=None)
        recorded = self.repo.recorded_folder(known, None) if known.uidvalidity == snapshot.uidvalidity else None
        rows = [row for row in recorded.messages.values() if row.state == MessageState.STORED and row.location] \
            if recorded else []
        pairs = {row.uid: RecordedPair(row.uid, unique_part(row.location.rsplit("/", 1)[-1]), row.flags, row.size,
                                       row.sha256, row.message_id) for row in rows if row.location}
        locations = {row.uid: row.location for row in rows if row.location}
        if base is not None and base.uidvalidity == snapshot.uidvalidity:
            # ``new`` lists every UID from the base's UIDNEXT on; a pair up there that it
            # does not list (an upload or a move of ours, since expunged) is gone.
            listed = {remote.uid for remote in snapshot.new}
            gone = {uid for uid in pairs if uid >= base.uidnext and uid not in listed}
            if gone:
                snapshot = dataclasses.replace(snapshot, vanished=snapshot.vanished | gone)
        if not pairs and not root_missing and not self.dry_run:
            self.maildir.ensure_folder(known.path)  # a folder first met: made here, never read as emptied
        listing = self._listing(known, pairs, locations, root_missing)
        if not pairs and not root_missing and not listing.scan.present:
            listing = MaildirListing(LocalFolderScan(True), {}, None)  # a dry run's folder it would make
        archived = {unique_part(row.location.rsplit("/", 1)[-1]) for row in (recorded.messages.values() if recorded
                    else ()) if row.state == MessageState.GONE and row.location}
        if archived & listing.scan.messages.keys():
            # Kept here when the server deleted them while the account was an archive:
            # they stay here only, never uploaded again behind the user's back.
            listing = MaildirListing(
                LocalFolderScan(True, {unique: file for unique, file in listing.scan.messages.items()
                                       if unique not in archived}),
                {unique: where for unique, where in listing.locations.items() if unique not in archived},
                listing.mtimes)
        sides[info.name] = Side(known, listing, pairs, locations)
        folder = TwoWayFolder(info.name, snapshot, RecordedPairs(known.uidvalidity if pairs else None, pairs),
                              listing.scan)
        wanted = needs_content(folder)
        if not wanted:
            return folder
        messages = dict(listing.scan.messages)
        for unique in wanted:
            content = self.maildir.read_content(listing.locations[unique])
            if content is None:
                del messages[unique]  # gone since it was listed: the next pass sees that
            else:
                messages[unique] = dataclasses.replace(messages[unique], content=content)
        return dataclasses.replace(folder, local=LocalFolderScan(listing.scan.present, messages))

    def _listing(self, known: KnownFolder, pairs: dict[int, RecordedPair], locations: dict[int, str],
                 root_missing: bool) -> MaildirListing:
        """The folder's files: listed, or, when cur/ and new/ have the mtimes recorded
        after a pass that left every file matching its pair, taken from the pairs."""
        if root_missing:
            return MaildirListing(LocalFolderScan(False), {}, None)
        mtimes = self.maildir.dir_mtimes(known.path)
        if mtimes is not None and known.local_mtimes == mtimes and pairs:
            messages, where = {}, {}
            for uid, pair in pairs.items():
                subdir = locations[uid].rsplit("/", 2)[-2]
                messages[pair.unique] = LocalMessage(pair.unique, subdir, holdable(pair.flags), 0, 0)
                where[pair.unique] = locations[uid]
            return MaildirListing(LocalFolderScan(True, messages), where, mtimes)
        return self.maildir.list_folder(known.path)


@dataclass
class FolderPass:
    """One folder's plan carried out, step by step, each step's intent committed first."""

    sync: TwoWaySync
    side: Side
    plan: TwoWayPlan
    sides: dict[str, Side]
    awaited: int | None  # the lowest UID a move from another folder still has to pair here
    modified: frozenset[int] = frozenset()
    pushed: int = 0
    pulled: int = 0

    @property
    def name(self) -> str:
        return self.side.known.name

    @property
    def folder_id(self) -> int:
        return self.side.known.id

    def checkpoint(self, step: str) -> None:
        self.sync.checkpoint(step)

    def intents(self, *intents: PushIntent) -> list[int]:
        ids = self.sync.repo.add_intents(intents)
        self.checkpoint("intent")
        return ids

    def location(self, unique: str) -> str:
        return self.side.listing.locations[unique]

    def execute(self) -> None:
        plan = self.plan
        self.sync.source.select(self.name)
        self._flags()
        for move in plan.local_moves:
            self._local_move(move)
        for server_move in plan.server_moves:
            self._rename_into(server_move.unique, server_move.target, server_move.target_uid, server_move.flags,
                              self.side.pairs[server_move.uid].flags, old_uid=server_move.uid)
        for rejoin in plan.rejoins:
            # The pair was forgotten (gone on both sides here): until its writes are
            # confirmed, the base is that of a first pairing.
            remote = (rejoin.flags.base - rejoin.flags.add) | rejoin.flags.remove
            local = self.side.listing.scan.messages[rejoin.unique].flags
            self._rename_into(rejoin.unique, rejoin.target, rejoin.target_uid, rejoin.flags,
                              first_base(local, remote), old_uid=None)
        claimed = self._downloads(plan.downloads) if plan.downloads else set()
        for append in plan.appends:
            if append.unique not in claimed:
                self._append(append)
        self._deletions()
        for conflict in plan.conflicts:
            log.warning("%s/%s: conflict: %s", self.sync.account, self.name, conflict.note)
        self.sync.counts.pushed += self.pushed
        self.sync.counts.pulled += self.pulled
        uidnext = plan.uidnext if self.awaited is None else min(plan.uidnext, self.awaited)
        self.sync.repo.finish_twoway_folder(self.folder_id, plan.uidvalidity, uidnext, plan.highestmodseq,
                                            self._mtimes_to_keep(), self.pushed, self.pulled)

    # --- 1. flags ------------------------------------------------------------------------

    def _flags(self) -> None:
        plan = self.plan
        if not (plan.push_flags or plan.pull_flags or plan.rebase or plan.relink or plan.new_pairs):
            return
        # One intent per message, naming each write, so that recovery can tell which of
        # them happened: a base not moved past a write that did would later read the
        # user's next change as the other side's (sync/recover.py).
        changes: dict[int, FlagChange] = {}
        for push in plan.push_flags:
            changes[push.uid] = FlagChange(push.add, push.remove)
        renamed = {pull.uid: self.location(pull.unique) for pull in plan.pull_flags}
        for pull in plan.pull_flags:
            changes[pull.uid] = dataclasses.replace(changes.get(pull.uid, FlagChange()), local=pull.flags)
        intent = self.intents(*(PushIntent(self.folder_id, IntentKind.FLAGS, plan.uidvalidity, uid, renamed.get(uid),
                                           flags=change.encode())
                                for uid, change in sorted(changes.items()))) if changes else []
        # One STORE per distinct set of flags: UIDs that gain or lose the same flags go
        # together. Under CONDSTORE the first write to a UID is conditional on the
        # snapshot's modseq; its own second write (removals after additions) cannot be,
        # as the first one moved that modseq.
        additions: dict[Flags, list[int]] = defaultdict(list)
        removals: dict[Flags, list[int]] = defaultdict(list)
        for push in plan.push_flags:
            if push.add:
                additions[push.add].append(push.uid)
            if push.remove:
                removals[push.remove].append(push.uid)
        unchangedsince = plan.highestmodseq if self.sync.source.condstore else None
        modified: set[int] = set()
        added: set[int] = set()
        for flags, uids in sorted(additions.items(), key=lambda item: sorted(item[0])):
            modified |= self.sync.source.store_flags(self.name, uids, flags, True, unchangedsince)
            added.update(uids)
        for flags, uids in sorted(removals.items(), key=lambda item: sorted(item[0])):
            first = [uid for uid in uids if uid not in added]
            modified |= self.sync.source.store_flags(self.name, first, flags, False, unchangedsince)
            again = [uid for uid in uids if uid in added and uid not in modified]
            self.sync.source.store_flags(self.name, again, flags, False, None)
        if plan.push_flags:
            self.pushed += len(plan.push_flags)
            self.checkpoint("store")
        if modified:
            log.info("%s/%s: %d messages changed on the server meanwhile; merged again next pass",
                     self.sync.account, self.name, len(modified))
        self.modified = frozenset(modified)
        moved: dict[str, str] = {}
        for pull in plan.pull_flags:
            moved[pull.unique] = self.sync.store.set_flags(self.location(pull.unique), pull.flags)
            self.side.listing.locations[pull.unique] = moved[pull.unique]
        if plan.pull_flags:
            self.pulled += len(plan.pull_flags)
            self.checkpoint("rename")
        bases = {rebase.uid: rebase.flags for rebase in plan.rebase}
        uniques = {pull.uid: pull.unique for pull in plan.pull_flags}
        uniques.update((pair.uid, pair.unique) for pair in plan.new_pairs)
        uniques.update((relink.uid, relink.unique) for relink in plan.relink)
        new_pairs = [RecordedMessage(pair.uid, plan.uidvalidity, MessageState.STORED, bases.get(pair.uid, frozenset()),
                                     self.location(pair.unique), pair.size, pair.sha256, pair.message_id)
                     for pair in plan.new_pairs if pair.uid not in self.modified]
        new_uids = {pair.uid for pair in plan.new_pairs}
        self.sync.repo.record_pushes(
            self.folder_id, plan.uidvalidity, pairs=new_pairs,
            relinks=[(relink.old_uid, relink.uid, self.location(relink.unique)) for relink in plan.relink],
            rebases=[(uid, flags, self.location(uniques[uid]) if uid in uniques else None)
                     for uid, flags in bases.items() if uid not in self.modified and uid not in new_uids],
            done=intent)
        self.checkpoint("flags recorded")

    # --- 2. moves ------------------------------------------------------------------------

    def _local_move(self, move: LocalMove) -> None:
        """UID MOVE (no upload), then the merged flags written to the new UID and the file;
        the pair goes to the target folder."""
        pair = self.side.pairs[move.uid]
        target_side = self.sides[move.target]
        location = target_side.listing.locations[move.unique]
        [intent] = self.intents(PushIntent(
            self.folder_id, IntentKind.MOVE, self.plan.uidvalidity, move.uid, location, target_side.known.id,
            target_side.known.uidnext or 1, pair.size, pair.sha256, pair.message_id, pair.flags))
        new_uid = self.sync.source.move(self.name, move.uid, move.target)
        self.checkpoint("move")
        self.pushed += 1
        if new_uid is None:
            new_uid = find_uploaded(self.sync.source, move.target, target_side.known.uidnext or 1, pair.message_id,
                                    pair.size or 0, pair.sha256)
        base = pair.flags
        if new_uid is not None:
            base, location = self._write_flags_in(move.target, new_uid, move.flags, pair.flags, location)
        self.sync.source.select(self.name)
        if not self.sync.source.moves_away:
            # The original stays on the server, marked \Deleted: its pair stays too, with
            # that in its base and no file, so it is neither deleted again nor downloaded.
            self.sync.repo.record_pushes(self.folder_id, self.plan.uidvalidity,
                                         rebases=[(move.uid, pair.flags | {DELETED}, None)])
        self._record_move(move.uid if self.sync.source.moves_away else None, target_side, new_uid, base, location,
                          pair, intent)

    def _rename_into(self, unique: str, target: str, target_uid: int, merge: FlagMerge, base: Flags,
                     old_uid: int | None) -> None:
        """A message another client moved on the server: its file follows (no download),
        then the merged flags are written to both."""
        target_side = self.sides[target]
        source_location = self.location(unique)
        [intent] = self.intents(PushIntent(self.folder_id, IntentKind.RENAME, self.plan.uidvalidity, old_uid,
                                           source_location, target_side.known.id))
        location = source_location
        if target_side.known.path != self.side.known.path:
            location = self.sync.maildir.move_into(source_location, target_side.known.path)
            self.pulled += 1
            self.checkpoint("rename")
        base, location = self._write_flags_in(target, target_uid, merge, base, location)
        self.sync.source.select(self.name)
        pair = self.side.pairs.get(old_uid) if old_uid is not None else None
        self._record_move(old_uid, target_side, target_uid, base, location, pair, intent)

    def _write_flags_in(self, folder: str, uid: int, merge: FlagMerge, base: Flags, location: str
                        ) -> tuple[Flags, str]:
        """A moved message's merged flags, written to its UID in ``folder`` (which this
        selects) and to its file; returns the new base (the old one when the server
        refused a write) and the file's location."""
        if merge.add or merge.remove:
            self.sync.source.select(folder)
            for flags, add in ((merge.add, True), (merge.remove, False)):
                if flags and self.sync.source.store_flags(folder, [uid], flags, add, None):
                    return base, location
            self.pushed += 1
            self.checkpoint("store")
        if merge.local is not None:
            location = self.sync.store.set_flags(location, merge.local)
            self.pulled += 1
            self.checkpoint("rename")
        return merge.base, location

    def _record_move(self, old_uid: int | None, target_side: Side, new_uid: int | None, base: Flags, location: str,
                     pair: RecordedPair | None, intent: int) -> None:
        """The pair leaves this folder and is recorded in the target with the intent's
        end; a target UID not known (no COPYUID, not found) is paired by content next pass."""
        if old_uid is not None:
            self.sync.repo.record_pushes(self.folder_id, self.plan.uidvalidity, forget=[old_uid])
        uidvalidity = target_side.known.uidvalidity
        if new_uid is None or uidvalidity is None:
            self.sync.repo.drop_intents([intent])
        else:
            self.sync.repo.record_pushes(target_side.known.id, uidvalidity, pairs=[RecordedMessage(
                new_uid, uidvalidity, MessageState.STORED, base, location, pair.size if pair else None,
                pair.sha256 if pair else None, pair.message_id if pair else None)], done=[intent])
        self.checkpoint("move recorded")

    # --- 3. new messages each way --------------------------------------------------------

    def _downloads(self, downloads: Sequence[Download]) -> set[str]:
        """The pull path's fetch (intent, fetch, durable write, record). A download whose
        bytes are those of a file in ``adopt_pool`` pairs with that file instead; the
        files so claimed are returned, and not appended."""
        restored = [download.remote.uid for download in downloads if download.restores is not None]
        if restored:
            # The pair goes, so the download's intent can take its UID; the folder's sync
            # point goes below it, so a kill before the download cannot hide the message.
            self.sync.repo.record_pushes(self.folder_id, self.plan.uidvalidity, forget=restored,
                                         relist_from=min(restored))
        waiting = {self.location(append.unique): append for append in self.plan.appends
                   if append.unique in self.plan.adopt_pool}
        pool = ContentPool(RecordedMessage(
            0, self.plan.uidvalidity, MessageState.STORED, NO_FLAGS, location, append.content.server_size,
            append.content.sha256, append.content.message_id) for location, append in waiting.items())
        remotes = [download.remote for download in downloads]
        planned = list(batches(remotes, lambda message: message.size, FETCH_BUDGET, BATCH_MAX_COUNT))
        with (self.sync.store.open_folder(self.side.known.path) as writer,
              contextlib.closing(self.sync.source.fetch_ahead(self.name, ([m.uid for m in batch]
                                                                          for batch in planned))) as fetched):
            ledger = TwoWayLedger(self, {location: append.unique for location, append in waiting.items()}, fetched)
            for batch in planned:
                store_batch(self.sync, writer, ledger, batch, pool)
        self.pulled += len(remotes)
        return ledger.claimed

    def _append(self, append: Append) -> None:
        """Intent (hash, Message-ID, size, UIDNEXT) committed, then APPEND with the file's
        flags and INTERNALDATE = its mtime; the UID from APPENDUID, else found by search."""
        location = self.location(append.unique)
        try:
            data = self.sync.maildir.read(location)
        except MailsyncError:
            return  # gone since the listing: the next pass sees what happened
        sha256, size, found_id = digest(data), server_size(data), message_id(data)
        uidnext = self.plan.uidnext
        [intent] = self.intents(PushIntent(self.folder_id, IntentKind.APPEND, self.plan.uidvalidity,
                                           append.restores, location, None, uidnext, size, sha256, found_id,
                                           append.flags))
        when = datetime.fromtimestamp(append.mtime_ns / 1e9, UTC)
        answer = self.sync.source.append(self.name, data, sorted(append.flags), when)
        self.checkpoint("append")
        self.pushed += 1
        uid: int | None
        if answer is None:
            uid = find_uploaded(self.sync.source, self.name, uidnext, found_id, size, sha256)
            self.sync.source.select(self.name)
        elif answer[0] != self.plan.uidvalidity:
            log.warning("%s/%s: UIDVALIDITY changed during the pass; the upload is paired next pass",
                        self.sync.account, self.name)
            self.sync.repo.drop_intents([intent])
            return
        else:
            uid = answer[1]
        if uid is None:
            self.sync.repo.drop_intents([intent])
            return
        self.sync.repo.record_pushes(self.folder_id, self.plan.uidvalidity, pairs=[RecordedMessage(
            uid, self.plan.uidvalidity, MessageState.STORED, append.flags, location, size, sha256, found_id)],
            forget=[append.restores] if append.restores is not None else [], done=[intent])
        self.checkpoint("append recorded")

    # --- 4. deletions --------------------------------------------------------------------

    def _deletions(self) -> None:
        plan = self.plan
        if plan.push_deletions:
            uids = [deletion.uid for deletion in plan.push_deletions]
            ids = self.intents(*(PushIntent(self.folder_id, IntentKind.DELETE, plan.uidvalidity, deletion.uid,
                                            deletion.unique) for deletion in plan.push_deletions))
            self.sync.source.store_flags(self.name, uids, [DELETED], True, None)
            self.checkpoint("store deleted")
            # Exactly the UIDs marked here: a plain EXPUNGE would remove what others marked.
            self.sync.source.expunge_uids(self.name, uids)
            self.checkpoint("expunge")
            for deletion in plan.push_deletions:
                if deletion.unique is not None:
                    self.sync.store.remove(self.location(deletion.unique))
            self.pushed += len(uids)
            self.sync.repo.record_pushes(self.folder_id, plan.uidvalidity, forget=uids, done=ids)
            self.checkpoint("deletions recorded")
        if plan.local_removals:
            ids = self.intents(*(PushIntent(self.folder_id, IntentKind.REMOVE, plan.uidvalidity, removal.uid,
                                            removal.unique) for removal in plan.local_removals))
            for removal in plan.local_removals:
                self.sync.store.remove(self.location(removal.unique))
            self.checkpoint("remove")
            self.pulled += len(plan.local_removals)
            self.sync.counts.removed += len(plan.local_removals)
            self.sync.repo.record_pushes(self.folder_id, plan.uidvalidity,
                                         forget=[removal.uid for removal in plan.local_removals], done=ids)
            self.checkpoint("removals recorded")
        if plan.forget:
            self.sync.repo.record_pushes(self.folder_id, plan.uidvalidity, forget=plan.forget)

    # --- 5. the listing's validity -------------------------------------------------------

    def _mtimes_to_keep(self) -> tuple[int, int] | None:
        """The cur/ and new/ mtimes under which the next pass may skip listing: kept only
        when the listing could be trusted (see ``MaildirStore.list_folder``), this pass
        left the directories as listed, nothing is left to merge again, and every file
        matches its pair."""
        listing = self.side.listing
        if listing.mtimes is None or self.modified or self.plan.conflicts:
            return None
        if self.sync.maildir.dir_mtimes(self.side.known.path) != listing.mtimes:
            return None
        recorded = self.sync.repo.recorded_folder(
            dataclasses.replace(self.side.known, uidvalidity=self.plan.uidvalidity), None)
        files = listing.scan.messages
        stored = [row for row in recorded.messages.values() if row.state == MessageState.STORED and row.location]
        if len(stored) != len(files):
            return None
        for row in stored:
            file = files.get(unique_part((row.location or "").rsplit("/", 1)[-1]))
            if file is None or holdable(file.flags) != holdable(row.flags):
                return None
        return listing.mtimes


@dataclass
class TwoWayLedger:
    """The two-way part in ``store_batch`` (see sync/batch.py's Ledger): like the pull
    path's, keyed by UID; a body whose bytes are a file waiting to be appended (found in
    the batch's pool by SHA-256) pairs with that file instead of being stored."""

    folder: FolderPass
    waiting: dict[str, str]  # location -> unique of the files the pool holds
    fetched: Iterator[dict[int, bytes | MessageError]]  # one dict of bodies per planned batch, in order
    claimed: set[str] = field(default_factory=set)
    adopted: list[RecordedMessage] = field(default_factory=list)

    def size(self, message: RemoteMessage) -> int:
        return message.size

    def reserve(self, writer: FolderWriter, message: RemoteMessage) -> Reservation:
        return writer.reserve(message.flags, message.internaldate)

    def record_intents(self, intents: Sequence[tuple[RemoteMessage, str]]) -> None:
        self.folder.sync.repo.record_pending(self.folder.folder_id, self.folder.plan.uidvalidity, intents)

    def bodies(self, messages: Sequence[RemoteMessage]) -> Generator[bytes | None, None, None]:
        bodies = next(self.fetched)
        self.folder.checkpoint("fetched")
        for message in messages:
            raw = bodies.pop(message.uid, None)
            if isinstance(raw, MessageError):
                log.error("%s", raw)
                self.folder.sync.counts.errors.append(str(raw))
                raw = None
            yield None if raw is None else to_lf(raw)

    def adopt(self, message: RemoteMessage, copy: RecordedMessage) -> None:
        unique = self.waiting[copy.location or ""]
        self.claimed.add(unique)
        file = self.folder.side.listing.scan.messages[unique]
        self.adopted.append(RecordedMessage(
            message.uid, self.folder.plan.uidvalidity, MessageState.STORED, first_base(file.flags, message.flags),
            copy.location, message.size, copy.sha256, copy.message_id))

    def finish(self, done: Sequence[tuple[RemoteMessage, Stored, str | None]],
               unfinished: Sequence[tuple[RemoteMessage, str]]) -> None:
        repo, folder_id, uidvalidity = self.folder.sync.repo, self.folder.folder_id, self.folder.plan.uidvalidity
        adopted, self.adopted = self.adopted, []
        repo.finish_batch(folder_id, uidvalidity, done, unfinished, [])
        if adopted:
            # The claimed bodies' intents (pending rows) are replaced by the pairs they proved.
            repo.record_pushes(folder_id, uidvalidity, pairs=adopted)

    def forget(self, unfinished: Sequence[RemoteMessage]) -> None:
        self.folder.sync.repo.forget(self.folder.folder_id, self.folder.plan.uidvalidity,
                                     [message.uid for message in unfinished])


def create_local_folders(repo: StateRepo, store: Store, source: TwoWaySource, account_id: int,
                         listed: Sequence[FolderInfo], wanted: Callable[[str], bool]) -> list[str]:
    """CREATE on the server each folder made in the Maildir that the server does not list,
    that the account's globs select, and that was never synced: a folder the state knows
    was deleted on the server and is not made again (a deletion on either side is never
    repeated on the other; it is reported). Returns the names created."""
    if not isinstance(store, MaildirStore):
        return []
    delimiter = next((folder.delimiter for folder in listed if folder.delimiter), None)
    known = {folder.path for folder in repo.folders(account_id)}
    on_server = {store.folder_path(folder.name, folder.delimiter) for folder in listed}
    created = []
    here = store.local_folders()
    for path in here:
        if path in on_server or path in known:
            continue
        name = names.folder_name(path, delimiter, store.layout)
        if name is None or not wanted(name):
            continue
        source.create_folder(name)
        log.info("folder %r made here: created on the server", name)
        created.append(name)
    for folder in repo.folders(account_id):
        if not folder.on_server and folder.path in here:
            log.warning("folder %r is gone from the server; its local copy stays and is not synced", folder.name)
    return created


def find_uploaded(source: TwoWaySource, name: str, since_uid: int, found_id: str | None, size: int,
                  sha256: str | None) -> int | None:
    """The UID of a message we uploaded (or moved) into ``name``, found without APPENDUID
    or COPYUID: at or above the UIDNEXT saved before, same Message-ID and size, and the
    same bytes. Several: one is adopted and the rest reported, never uploaded again."""
    candidates = source.find_uploaded(name, since_uid, found_id, size)
    if not candidates:
        return None
    if sha256 is not None:
        bodies = source.fetch(name, candidates)
        candidates = [uid for uid in candidates
                      if isinstance(body := bodies.get(uid), bytes) and digest(to_lf(body)) == sha256]
    if len(candidates) > 1:
        log.warning("folder %r: %d copies of one uploaded message on the server (UIDs %s); keeping UID %d paired",
                    name, len(candidates), ", ".join(map(str, candidates)), candidates[0])
    return candidates[0] if candidates else None


def describe(plan: TwoWayPlan) -> str:
    """One line per folder for ``sync --dry-run``: what the pass would do each way."""
    if plan.stop is not None:
        return f"{plan.folder}: would stop, nothing changed: {plan.stop.reason}"
    to_server = {
        "flag writes": len(plan.push_flags), "uploads": len(plan.appends), "moves": len(plan.local_moves),
        "deletions": len(plan.push_deletions)}
    to_local = {
        "flag renames": len(plan.pull_flags), "downloads": len(plan.downloads),
        "moves": len(plan.server_moves) + len(plan.rejoins), "removals": len(plan.local_removals)}

    def counted(counts: dict[str, int]) -> str:
        return ", ".join(f"{count} {what}" for what, count in counts.items() if count) or "nothing"

    line = f"{plan.folder}: to the server: {counted(to_server)}; here: {counted(to_local)}"
    if plan.new_pairs:
        line += f"; {len(plan.new_pairs)} paired by content"
    for conflict in plan.conflicts:
        line += f"; conflict: {conflict.note}"
    return line
