"""PURE: the two-way plan of an account's folders (``mode = "sync"``). No I/O, no clock.

The rules and the failures of other tools they prevent are in twoway.md; in short:

* A pair is (UID under UIDVALIDITY) <-> (the unique part of a Maildir file name), kept in
  the state database, never in the file name. Content (Message-ID + size, SHA-256) only
  recovers a pairing: a first sync, a UIDVALIDITY change, a move, a rename by a reader.
* Flags merge per flag against the base B recorded at the last sync: local L changed and
  remote R not -> push; R changed and L not -> pull; both changed -> they agree. Only the
  six flags a Maildir can hold (HOLDABLE_FLAGS) are compared; server keywords are never
  removed because a file cannot show them.
* A deletion on one side reaches the other unless the other side changed the message since
  the base: then the message is kept, restored where it was deleted, and reported.
* A folder whose cur/ or new/ is gone, that was emptied, or that would lose more than the
  limit on either side is stopped: planned to do nothing, until the user allows it once.

How a plan is used (the executor, per account): build a ``TwoWayFolder`` per folder from a
server snapshot, a local scan and the recorded pairs (``needs_content`` says which files
the scan must read), then ``plan_account``. It plans each folder (``plan_folder``), pairs
the vanished/appeared candidates across folders (``pair_moves``), turns what no move
claimed into deletions, removals, appends and downloads (``settle``), and applies the
guard (``guard``). Each folder's plan is then carried out in this order, and every effect
has its intent recorded (committed) before it happens, so that recovery at the next start
can finish or undo it:

1. Flags. ``push_flags``: UID STORE +FLAGS.SILENT ``add`` and -FLAGS.SILENT ``remove``
   (with UNCHANGEDSINCE under CONDSTORE; a MODIFIED UID keeps its old base and is merged
   again next pass). ``pull_flags``: rename the file to the new info letters, keeping
   letters mailsyncd does not know. ``rebase``: record the new base of each UID whose
   writes were confirmed. ``relink`` and ``new_pairs`` are records only, made before the
   rebases (which name the new UIDs).
2. Moves. ``local_moves``: intent, UID MOVE (or UID COPY + \\Deleted + UID EXPUNGE of that
   UID), the new UID from COPYUID, flag writes on it, record the pair in the target.
   ``server_moves``: intent, rename the file into the target folder, flag writes, record.
   ``rejoins``: the same from the folder the file is in (no rename when it is the target).
3. New messages each way, downloads first. ``downloads``: the existing fetch path (intent,
   fetch, durable write, record); a download whose bytes hash like a file in
   ``adopt_pool`` records that pair instead of storing (base: ``first_base``, so the next
   pass takes the union of their flags), and that file's append is dropped.
   ``appends``: intent (SHA-256, Message-ID, size, the folder's UIDNEXT) committed, then
   APPEND with the flags and INTERNALDATE = mtime, the UID from APPENDUID, record.
   A restoring download or append moves the conflicted pair to the new file or UID.
4. Deletions. ``push_deletions``: intent, UID STORE +FLAGS.SILENT (\\Deleted), UID EXPUNGE
   of that UID only, remove the trashed file if one is named, forget the pair.
   ``local_removals``: intent, remove the file, forget the pair. ``forget``: record only.
   ``conflicts``: one line each for the user.
5. Record the folder's UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ.

A plan with ``stop`` set changes nothing; its reason is the one line the user sees.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TypeVar

from mailsyncd.domain import (
    HOLDABLE_FLAGS,
    Append,
    Conflict,
    Download,
    Expunge,
    FlagMerge,
    FlagPull,
    FlagPush,
    Flags,
    GuardStop,
    LocalAppeared,
    LocalContent,
    LocalMessage,
    LocalMove,
    LocalRemoval,
    LocalVanished,
    NewPair,
    PushDeletion,
    Rebase,
    RecordedPair,
    Rejoin,
    Relink,
    RemoteMessage,
    ServerAppeared,
    ServerMove,
    ServerVanished,
    TwoWayFolder,
    TwoWayPlan,
    TwoWayPolicy,
)

DELETED = "\\Deleted"
Candidate = TypeVar("Candidate")
_CANONICAL = {flag.lower(): flag for flag in HOLDABLE_FLAGS}


def canonical(flags: Iterable[str]) -> Flags:
    """IMAP flags compare without case: the six holdable ones get one spelling, so that
    "\\SEEN" from a server and "\\Seen" from a file are the same flag."""
    return frozenset(_CANONICAL.get(flag.lower(), flag) for flag in flags)


def holdable(flags: Iterable[str]) -> Flags:
    """The part of ``flags`` a Maildir file name can show."""
    return canonical(flags) & HOLDABLE_FLAGS


def merge_flags(base: Flags, local: Flags, remote: Flags) -> FlagMerge:
    """Per holdable flag: changed locally only -> push; changed on the server only ->
    pull; changed on both -> they agree. Keywords follow the server. ``base`` and
    ``remote`` are whole server flag sets, ``local`` a file's flags."""
    base, local, remote = canonical(base), holdable(local), canonical(remote)
    add = {flag for flag in HOLDABLE_FLAGS if flag in local and flag not in base and flag not in remote}
    remove = {flag for flag in HOLDABLE_FLAGS if flag not in local and flag in base and flag in remote}
    merged = (remote | add) - remove
    new_local = merged & HOLDABLE_FLAGS
    return FlagMerge(frozenset(add), frozenset(remove), None if new_local == local else new_local, merged)


def first_base(local: Flags, remote: Flags) -> Flags:
    """The base a first pairing (no recorded base) is merged against, chosen so the merge
    takes the union of both sides, except that a \\Deleted on one side does not spread
    (it is cleared there instead, so no deletion follows from it). An executor that pairs
    a downloaded message with an existing file by hash records this base too."""
    local, remote = holdable(local), canonical(remote)
    deleted = frozenset({DELETED}) & (local | remote)
    return (remote - HOLDABLE_FLAGS) | (local & remote) | deleted


def needs_content(folder: TwoWayFolder) -> frozenset[str]:
    """The files a scan must read (hash, Message-ID, size): those with no pair, and those
    whose UID the server expunged (they may be moves, or appended again in a conflict)."""
    pairs = _current_pairs(folder)
    remote_flags, _ = _server_flags(folder, pairs)
    known = {pair.unique for uid, pair in pairs.items() if uid in remote_flags}
    return frozenset(unique for unique in folder.local.messages if unique not in known)


def _current_pairs(folder: TwoWayFolder) -> Mapping[int, RecordedPair]:
    """A UIDVALIDITY change voids every pair: the server's UIDs mean nothing any more,
    so the folder is paired again by content as on a first sync (nothing is deleted)."""
    if folder.recorded.uidvalidity != folder.snapshot.uidvalidity:
        return {}
    return folder.recorded.pairs


def _server_flags(folder: TwoWayFolder, pairs: Mapping[int, RecordedPair]
                  ) -> tuple[dict[int, Flags], list[RemoteMessage]]:
    """The server flags of each paired UID still there (an unchanged UID keeps its base),
    and the server messages with no pair."""
    snapshot = folder.snapshot
    listed = {message.uid: message for message in snapshot.new}
    gone = set(snapshot.vanished) & pairs.keys()
    if snapshot.present is not None:  # a complete listing (a full one includes ``new``)
        gone |= {uid for uid in pairs if uid not in snapshot.present and uid not in listed}
    flags: dict[int, Flags] = {}
    for uid, pair in pairs.items():
        if uid in gone:
            continue
        if uid in snapshot.changed_flags:
            flags[uid] = canonical(snapshot.changed_flags[uid])
        elif uid in listed:
            flags[uid] = canonical(listed[uid].flags)
        else:
            flags[uid] = canonical(pair.flags)
    unpaired = [message for uid, message in sorted(listed.items()) if uid not in pairs]
    return flags, unpaired


@dataclasses.dataclass
class _Changes:
    """The flag writes and records one folder collects while it is planned."""

    push: list[FlagPush] = dataclasses.field(default_factory=list)
    pull: list[FlagPull] = dataclasses.field(default_factory=list)
    rebase: list[Rebase] = dataclasses.field(default_factory=list)
    relink: list[Relink] = dataclasses.field(default_factory=list)

    def collect(self, uid: int, unique: str, merge: FlagMerge, old_base: Flags | None) -> None:
        if merge.add or merge.remove:
            self.push.append(FlagPush(uid, merge.add, merge.remove))
        if merge.local is not None:
            self.pull.append(FlagPull(uid, unique, merge.local))
        if old_base is None or merge.base != canonical(old_base):
            self.rebase.append(Rebase(uid, merge.base))

    def into(self, plan: TwoWayPlan) -> TwoWayPlan:
        return dataclasses.replace(
            plan, push_flags=plan.push_flags + tuple(self.push), pull_flags=plan.pull_flags + tuple(self.pull),
            rebase=plan.rebase + tuple(self.rebase), relink=plan.relink + tuple(self.relink))


def plan_folder(folder: TwoWayFolder, policy: TwoWayPolicy) -> TwoWayPlan:
    """One folder on its own: flags merged, trash and conflicts decided, first pairings
    made by content, and the messages that vanished or appeared on either side left as
    candidates for ``pair_moves`` (then ``settle``). A folder whose cur/ or new/ is gone,
    or that was emptied on one side, is stopped here, before anything pairs with it."""
    snapshot = folder.snapshot
    plan = TwoWayPlan(folder.name, snapshot.uidvalidity, snapshot.uidnext, snapshot.highestmodseq)
    pairs = _current_pairs(folder)
    remote_flags, unpaired_remote = _server_flags(folder, pairs)
    local = folder.local.messages
    reason = _emptied(folder, pairs, remote_flags)
    if reason and folder.name not in policy.allow_deletions:
        return dataclasses.replace(plan, stop=GuardStop(reason))

    changes = _Changes()
    deletions: list[PushDeletion] = []
    conflicts: list[Conflict] = []
    forget: list[RecordedPair] = []
    local_vanished: list[LocalVanished] = []
    server_vanished: list[ServerVanished] = []
    for uid, pair in sorted(pairs.items()):
        file = local.get(pair.unique)
        remote = remote_flags.get(uid)
        if file is None:
            if remote is None:
                forget.append(pair)
            else:
                local_vanished.append(LocalVanished(pair, remote))
        elif remote is None:
            server_vanished.append(ServerVanished(pair, file))
        elif DELETED in holdable(file.flags) and DELETED not in canonical(pair.flags):
            # Trashed here (T) since the last sync: a deletion, unless the server changed it.
            if _changed_not_deleted(pair.flags, remote):
                conflicts.append(Conflict(uid, pair.unique, "trashed here but changed on the server since the "
                                                            "last sync: kept, and its T flag cleared"))
                merge = merge_flags(pair.flags, file.flags - {DELETED}, remote)
                cleared = merge.base & HOLDABLE_FLAGS
                changes.collect(uid, pair.unique, dataclasses.replace(
                    merge, local=None if cleared == holdable(file.flags) else cleared), pair.flags)
            elif policy.expunge == Expunge.OWN:
                deletions.append(PushDeletion(uid, pair.unique))
            else:
                changes.collect(uid, pair.unique, merge_flags(pair.flags, file.flags, remote), pair.flags)
        else:
            changes.collect(uid, pair.unique, merge_flags(pair.flags, file.flags, remote), pair.flags)

    paired_uniques = {pair.unique for pair in pairs.values()}
    appeared = [LocalAppeared(file, _content(file)) for unique, file in sorted(local.items())
                if unique not in paired_uniques]
    matched, leftover_local, leftover_remote = _pair_by_content(appeared, unpaired_remote)
    for candidate, message in matched:
        base = first_base(candidate.local.flags, message.flags)
        changes.collect(message.uid, candidate.local.unique, merge_flags(base, candidate.local.flags, message.flags),
                        None)
    new_pairs = tuple(NewPair(message.uid, candidate.local.unique, message.size, candidate.content.sha256,
                              message.message_id) for candidate, message in matched)
    return changes.into(dataclasses.replace(
        plan, new_pairs=new_pairs, push_deletions=tuple(deletions), forget=tuple(pair.uid for pair in forget),
        vanished_both=tuple(forget),
        conflicts=tuple(conflicts), local_vanished=tuple(local_vanished), local_appeared=tuple(leftover_local),
        server_vanished=tuple(server_vanished),
        server_appeared=tuple(ServerAppeared(message) for message in leftover_remote)))


def _emptied(folder: TwoWayFolder, pairs: Mapping[int, RecordedPair], remote_flags: Mapping[int, Flags]
             ) -> str | None:
    """Why a folder must not be read as "everything was deleted", or None. One message
    gone from a one-message folder is an ordinary deletion; more is what an unmounted
    disk, a deleted directory or a wiped server folder looks like."""
    if not folder.local.present:
        return "its cur/ or new/ directory is missing (or the store is not mounted)"
    if len(pairs) > 1 and not any(pair.unique in folder.local.messages for pair in pairs.values()):
        return f"all {len(pairs)} of its messages are gone locally"
    if len(pairs) > 1 and not remote_flags:
        return f"all {len(pairs)} of its messages are gone from the server"
    return None


def _changed_not_deleted(base: Flags, flags: Flags) -> bool:
    """Did one side change a message since the base without deleting it too? Only such
    a change keeps a message the other side deleted (deleted on both sides is no conflict)."""
    base, flags = canonical(base), canonical(flags)
    return DELETED not in flags and flags != base - {DELETED}


def _content(file: LocalMessage) -> LocalContent:
    if file.content is None:
        raise ValueError(f"the scan did not read {file.unique}; needs_content() lists it")
    return file.content


def _pair_by_content(appeared: list[LocalAppeared], remote: list[RemoteMessage]
                     ) -> tuple[list[tuple[LocalAppeared, RemoteMessage]], list[LocalAppeared], list[RemoteMessage]]:
    """Unpaired files and unpaired server messages with the same Message-ID and size
    (the server's size of the file's bytes) are one message; each is claimed once."""
    by_key: dict[tuple[str, int], list[LocalAppeared]] = defaultdict(list)
    for candidate in appeared:
        if candidate.content.message_id:
            by_key[(candidate.content.message_id, candidate.content.server_size)].append(candidate)
    matched: list[tuple[LocalAppeared, RemoteMessage]] = []
    leftover_remote: list[RemoteMessage] = []
    for message in remote:
        candidates = by_key.get((message.message_id, message.size)) if message.message_id else None
        if candidates:
            matched.append((candidates.pop(0), message))
        else:
            leftover_remote.append(message)
    claimed = {id(candidate) for candidate, _ in matched}
    return matched, [candidate for candidate in appeared if id(candidate) not in claimed], leftover_remote


def pair_moves(plans: Mapping[str, TwoWayPlan]) -> dict[str, TwoWayPlan]:
    """Pair what vanished in one folder with what appeared in another (or the same) folder
    of the account, so a move is moved instead of deleted and copied again.

    Local side: a vanished pair and a new file with the same SHA-256 (byte-identical) are
    a ``LocalMove`` (UID MOVE), or a ``Relink`` when both are in one folder (a reader
    renamed the file). Server side: an expunged UID whose file is still here and a new
    server message with the same Message-ID and size are a ``ServerMove`` (rename the
    file), or a ``Relink`` in one folder. The same folder is preferred; flags are merged
    against the pair's base as for any other message. A message moved on both sides into
    two different folders is a ``Rejoin``: the server's folder wins, and nothing is copied.
    (Moved on both sides into one folder, ``plan_folder`` already paired it there by
    content, as on a first sync.)"""
    changes = {name: _Changes() for name in plans}
    local_moves: dict[str, list[LocalMove]] = defaultdict(list)
    server_moves: dict[str, list[ServerMove]] = defaultdict(list)
    rejoins: dict[str, list[Rejoin]] = defaultdict(list)
    claimed: set[int] = set()  # id() of the candidates a move used, on both ends

    files: dict[str, list[tuple[str, LocalAppeared]]] = defaultdict(list)
    arrivals: dict[tuple[str, int] | None, list[tuple[str, ServerAppeared]]] = defaultdict(list)
    for name in sorted(plans):
        for appeared in plans[name].local_appeared:
            files[appeared.content.sha256].append((name, appeared))
        for arrived in plans[name].server_appeared:
            if arrived.remote.message_id:
                arrivals[(arrived.remote.message_id, arrived.remote.size)].append((name, arrived))

    # A message moved on both sides: found again by hash here and by Message-ID there.
    for name in sorted(plans):
        for pair in plans[name].vanished_both:
            free_files = _free(files.get(pair.sha256 or "", []), claimed)
            free_arrivals = _free(arrivals.get(_server_key(pair), []), claimed)
            if not (free_files and free_arrivals):
                continue
            (here, appeared), (target, arrived) = free_files[0], free_arrivals[0]
            claimed.update((id(appeared), id(arrived)))
            merge = merge_flags(pair.flags, appeared.local.flags, arrived.remote.flags)
            rejoins[here].append(Rejoin(appeared.local.unique, target, arrived.remote.uid, merge))

    for name in sorted(plans):
        for vanished in plans[name].local_vanished:
            pair = vanished.pair
            found = _take(files.get(pair.sha256 or "", []), name, claimed)
            if found is None:
                continue
            target, appeared = found
            claimed.add(id(vanished))
            merge = merge_flags(pair.flags, appeared.local.flags, vanished.remote_flags)
            if target == name:
                changes[name].relink.append(Relink(pair.uid, pair.uid, appeared.local.unique))
                changes[name].collect(pair.uid, appeared.local.unique, merge, pair.flags)
            else:
                local_moves[name].append(LocalMove(pair.uid, target, appeared.local.unique, merge))
        for expunged in plans[name].server_vanished:
            pair = expunged.pair
            arrival = _take(arrivals.get(_server_key(pair), []), name, claimed)
            if arrival is None:
                continue
            target, arrived = arrival
            claimed.add(id(expunged))
            merge = merge_flags(pair.flags, expunged.local.flags, arrived.remote.flags)
            if target == name:
                changes[name].relink.append(Relink(pair.uid, arrived.remote.uid, pair.unique))
                changes[name].collect(arrived.remote.uid, pair.unique, merge, pair.flags)
            else:
                server_moves[name].append(ServerMove(pair.uid, pair.unique, target, arrived.remote.uid, merge))

    def unclaimed(candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        return tuple(candidate for candidate in candidates if id(candidate) not in claimed)

    return {name: changes[name].into(dataclasses.replace(
        plan, local_moves=plan.local_moves + tuple(local_moves[name]),
        server_moves=plan.server_moves + tuple(server_moves[name]), rejoins=plan.rejoins + tuple(rejoins[name]),
        local_vanished=unclaimed(plan.local_vanished), local_appeared=unclaimed(plan.local_appeared),
        server_vanished=unclaimed(plan.server_vanished), server_appeared=unclaimed(plan.server_appeared),
    )) for name, plan in plans.items()}


def _server_key(pair: RecordedPair) -> tuple[str, int] | None:
    """How a server message is recognised without its bytes: Message-ID and size."""
    return (pair.message_id, pair.size) if pair.message_id and pair.size is not None else None


def _free(candidates: list[tuple[str, Candidate]], claimed: set[int]) -> list[tuple[str, Candidate]]:
    return [(name, candidate) for name, candidate in candidates if id(candidate) not in claimed]


def _take(candidates: list[tuple[str, Candidate]], folder: str, claimed: set[int]) -> tuple[str, Candidate] | None:
    """The first unclaimed candidate, one in ``folder`` first; it is marked claimed."""
    free = _free(candidates, claimed)
    chosen = next((entry for entry in free if entry[0] == folder), free[0] if free else None)
    if chosen is not None:
        claimed.add(id(chosen[1]))
    return chosen


def settle(plan: TwoWayPlan, policy: TwoWayPolicy) -> TwoWayPlan:
    """The candidates no move claimed, made into what they are on their own: a file gone
    here is a deletion on the server, a UID gone there a local removal, a new file an
    APPEND and a new server message a download, except where the other side changed the
    message since the base: then it is kept, restored where it was deleted, and reported."""
    changes = _Changes()
    deletions: list[PushDeletion] = []
    removals: list[LocalRemoval] = []
    downloads: list[Download] = []
    appends: list[Append] = []
    conflicts: list[Conflict] = []
    for vanished in plan.local_vanished:
        pair, remote = vanished.pair, vanished.remote_flags
        if _changed_not_deleted(pair.flags, remote):
            conflicts.append(Conflict(pair.uid, pair.unique, "deleted here but changed on the server since the "
                                                             "last sync: downloaded again"))
            downloads.append(Download(RemoteMessage(pair.uid, pair.size or 0, remote, message_id=pair.message_id),
                                      restores=pair.unique))
        elif policy.expunge == Expunge.OWN:
            deletions.append(PushDeletion(pair.uid))
        else:
            # Only marked: the pair stays, with \Deleted in its base, so this is done once.
            changes.collect(pair.uid, pair.unique, FlagMerge(frozenset({DELETED} - remote), frozenset(), None,
                                                             remote | {DELETED}), pair.flags)
    for expunged in plan.server_vanished:
        pair, file = expunged.pair, expunged.local
        if _changed_not_deleted(holdable(pair.flags), file.flags):
            conflicts.append(Conflict(pair.uid, pair.unique, "expunged on the server but changed here since "
                                                             "the last sync: uploaded again"))
            appends.append(Append(file.unique, holdable(file.flags), file.mtime_ns, _content(file),
                                  restores=pair.uid))
        else:
            removals.append(LocalRemoval(pair.uid, pair.unique))
    appends += [Append(appeared.local.unique, holdable(appeared.local.flags), appeared.local.mtime_ns,
                       appeared.content) for appeared in plan.local_appeared]
    downloads += [Download(arrived.remote) for arrived in plan.server_appeared]
    # A message without a Message-ID cannot be matched before its bytes are seen: the
    # download of a same-sized one may prove a new file to be that message.
    sizes = {download.remote.size for download in downloads if not download.remote.message_id}
    pool = tuple(append.unique for append in appends
                 if append.restores is None and not append.content.message_id and append.content.server_size in sizes)
    return changes.into(dataclasses.replace(
        plan, downloads=plan.downloads + tuple(downloads), appends=plan.appends + tuple(appends),
        adopt_pool=plan.adopt_pool + pool, push_deletions=plan.push_deletions + tuple(deletions),
        local_removals=plan.local_removals + tuple(removals), conflicts=plan.conflicts + tuple(conflicts),
        local_vanished=(), local_appeared=(), server_vanished=(), server_appeared=(), vanished_both=()))


def guard(plan: TwoWayPlan, folder_size: int, policy: TwoWayPolicy) -> TwoWayPlan:
    """The mass-deletion guard: a plan that would delete more than ``max_deletions``
    allows on either side (of a folder of ``folder_size`` recorded messages) is replaced
    by a stop, unless the user allowed deletions in this folder for this pass."""
    if plan.stop is not None or plan.folder in policy.allow_deletions:
        return plan
    on_server = len(plan.push_deletions) + sum(1 for push in plan.push_flags if DELETED in push.add)
    here = len(plan.local_removals)
    for count, side in ((on_server, "on the server"), (here, "locally")):
        if not policy.max_deletions.allows(count, folder_size):
            return _stopped(plan, f"the pass would delete {count} of its {folder_size} messages {side}, "
                                  "more than max_deletions allows")
    return plan


def _stopped(plan: TwoWayPlan, reason: str) -> TwoWayPlan:
    return TwoWayPlan(plan.folder, plan.uidvalidity, plan.uidnext, plan.highestmodseq, stop=GuardStop(reason))


def plan_account(folders: Iterable[TwoWayFolder], policy: TwoWayPolicy) -> dict[str, TwoWayPlan]:
    """Every folder of an account, planned together so moves between folders are seen.
    A move into a folder the guard stopped waits too: a stopped folder changes nothing."""
    folders = list(folders)
    plans = pair_moves({folder.name: plan_folder(folder, policy) for folder in folders})
    sizes = {folder.name: len(_current_pairs(folder)) for folder in folders}
    plans = {name: guard(settle(plan, policy), sizes[name], policy) for name, plan in plans.items()}
    stopped = {name for name, plan in plans.items() if plan.stop is not None}
    return {name: dataclasses.replace(
        plan, local_moves=tuple(move for move in plan.local_moves if move.target not in stopped),
        server_moves=tuple(move for move in plan.server_moves if move.target not in stopped),
        rejoins=tuple(rejoin for rejoin in plan.rejoins if rejoin.target not in stopped),
    ) for name, plan in plans.items()}
