"""The two-way planner against a model of an account: server folders, Maildir folders and
the recorded pairs, changed at random on both sides and synced by a small executor model.

Properties: applying a pass and planning again gives nothing to do; a flag change on one
side is never lost, and changes to different flags on both sides are both kept; server
keywords survive; a deletion never goes past the guard; a message deleted on one side and
changed on the other is kept; an incremental snapshot plans like a full one.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsyncd.domain import (
    HOLDABLE_FLAGS,
    MAILDIR_LETTERS,
    NO_FLAGS,
    DeletionLimit,
    Expunge,
    Flags,
    FolderSnapshot,
    LocalContent,
    LocalFolderScan,
    LocalMessage,
    RecordedPair,
    RecordedPairs,
    RemoteMessage,
    ServerMove,
    TwoWayFolder,
    TwoWayPlan,
    TwoWayPolicy,
)
from mailsyncd.stores.maildir import flags_from_name, info_letters
from mailsyncd.sync.twoway import (
    DELETED,
    first_base,
    holdable,
    merge_flags,
    needs_content,
    plan_account,
)

UIDVALIDITY = 7
FOLDERS = ("INBOX", "Archive", "Sent")
SERVER_FLAGS = sorted(HOLDABLE_FLAGS | {"$Label", "NonJunk"})
FLAG_SETS = st.frozensets(st.sampled_from(sorted(HOLDABLE_FLAGS)))
OPEN = TwoWayPolicy(allow_deletions=frozenset(FOLDERS))  # no guard: for the merge properties


@dataclasses.dataclass
class World:
    """One account: content by SHA-256, and per folder the server's UIDs, the local files
    and the recorded pairs. Both sides hold (sha256, flags)."""

    contents: dict[str, LocalContent] = dataclasses.field(default_factory=dict)
    server: dict[str, dict[int, tuple[str, Flags]]] = dataclasses.field(
        default_factory=lambda: {name: {} for name in FOLDERS})
    local: dict[str, dict[str, tuple[str, Flags]]] = dataclasses.field(
        default_factory=lambda: {name: {} for name in FOLDERS})
    pairs: dict[str, dict[int, RecordedPair]] = dataclasses.field(
        default_factory=lambda: {name: {} for name in FOLDERS})
    uidvalidity: dict[str, int | None] = dataclasses.field(default_factory=lambda: dict.fromkeys(FOLDERS))
    missing: set[str] = dataclasses.field(default_factory=set)  # folders whose cur/ and new/ are gone
    adopted: int = 0  # downloads paired with a file by hash (their flags merge one pass later)
    next_uid: int = 1
    names: itertools.count[int] = dataclasses.field(default_factory=itertools.count)

    def content(self, text: str, message_id: bool = True, size: int | None = None) -> str:
        sha = hashlib.sha256(text.encode()).hexdigest()
        self.contents[sha] = LocalContent(sha, f"<{sha[:12]}@x>" if message_id else None,
                                          size if size is not None else 100 + len(text))
        return sha

    def uid(self) -> int:
        self.next_uid += 1  # one counter for all folders keeps UIDs unique, and > uidnext
        return self.next_uid

    def unique(self) -> str:
        return f"1700000000.M{next(self.names)}P1.host"

    def add_synced(self, folder: str, sha: str, flags: Flags) -> None:
        uid, unique = self.uid(), self.unique()
        self.server[folder][uid] = (sha, flags)
        self.local[folder][unique] = (sha, holdable(flags))
        meta = self.contents[sha]
        self.pairs[folder][uid] = RecordedPair(uid, unique, flags, meta.server_size, sha, meta.message_id)
        self.uidvalidity[folder] = UIDVALIDITY


def inputs(world: World, incremental: bool = False) -> list[TwoWayFolder]:
    """What a server snapshot and a local scan would show; the scan reads only the files
    ``needs_content`` asks for."""
    folders = []
    for name in FOLDERS:
        server = world.server[name]
        messages = [RemoteMessage(uid, world.contents[sha].server_size, flags,
                                  message_id=world.contents[sha].message_id)
                    for uid, (sha, flags) in sorted(server.items())]
        recorded = RecordedPairs(world.uidvalidity[name], dict(world.pairs[name]))
        uidnext = world.next_uid + 1
        if incremental and recorded.uidvalidity == UIDVALIDITY:
            snapshot = FolderSnapshot(
                UIDVALIDITY, uidnext, None, len(server),
                new=tuple(message for message in messages if message.uid not in recorded.pairs),
                changed_flags={message.uid: message.flags for message in messages
                               if message.uid in recorded.pairs and message.flags != recorded.pairs[message.uid].flags},
                present=frozenset(server))
        else:
            snapshot = FolderSnapshot(UIDVALIDITY, uidnext, None, len(server), new=tuple(messages),
                                      present=frozenset(message.uid for message in messages))
        files = {unique: LocalMessage(unique, "cur", flags, 90, 1_700_000_000 * 10**9)
                 for unique, (_, flags) in world.local[name].items()}
        scan = LocalFolderScan(name not in world.missing, files if name not in world.missing else {})
        wanted = needs_content(TwoWayFolder(name, snapshot, recorded, scan))
        files = {unique: dataclasses.replace(file, content=world.contents[world.local[name][unique][0]])
                 if unique in wanted else file for unique, file in scan.messages.items()}
        folders.append(TwoWayFolder(name, snapshot, recorded, dataclasses.replace(scan, messages=files)))
    return folders


def apply(world: World, plans: dict[str, TwoWayPlan]) -> World:
    """What an executor does, in the documented order, to a copy of the world."""
    world = copy.deepcopy(world)
    for name, plan in plans.items():  # the pairs a move records in a folder are of its UIDVALIDITY
        if plan.stop is None and world.uidvalidity[name] != plan.uidvalidity:
            world.pairs[name].clear()
            world.uidvalidity[name] = plan.uidvalidity
    for name, plan in sorted(plans.items()):
        if plan.stop is not None:
            continue
        server, local, pairs = world.server[name], world.local[name], world.pairs[name]
        # 1. flags and identities
        for relink in plan.relink:
            pairs[relink.uid] = dataclasses.replace(pairs.pop(relink.old_uid), uid=relink.uid, unique=relink.unique)
        for new in plan.new_pairs:
            pairs[new.uid] = RecordedPair(new.uid, new.unique, NO_FLAGS, new.size, new.sha256, new.message_id)
        for push in plan.push_flags:
            sha, flags = server[push.uid]
            assert not push.add & push.remove
            server[push.uid] = (sha, store(flags, push.add, push.remove))
        for pull in plan.pull_flags:
            local[pull.unique] = (local[pull.unique][0], pull.flags)
        for rebase in plan.rebase:
            pairs[rebase.uid] = dataclasses.replace(pairs[rebase.uid], flags=rebase.flags)
        # 2. moves
        for local_move in plan.local_moves:
            sha, flags = server.pop(local_move.uid)
            uid = world.uid()
            world.server[local_move.target][uid] = (sha, store(flags, local_move.flags.add, local_move.flags.remove))
            if local_move.flags.local is not None:
                world.local[local_move.target][local_move.unique] = (sha, local_move.flags.local)
            world.pairs[local_move.target][uid] = dataclasses.replace(
                pairs.pop(local_move.uid), uid=uid, unique=local_move.unique, flags=local_move.flags.base)
        for move in (*plan.server_moves, *plan.rejoins):  # the file follows the server's message
            sha, flags = local.pop(move.unique)
            world.local[move.target][move.unique] = (sha, flags if move.flags.local is None else move.flags.local)
            target_sha, target_flags = world.server[move.target][move.target_uid]
            world.server[move.target][move.target_uid] = (
                target_sha, store(target_flags, move.flags.add, move.flags.remove))
            meta = world.contents[sha]
            if isinstance(move, ServerMove):
                del pairs[move.uid]
            world.pairs[move.target][move.target_uid] = RecordedPair(
                move.target_uid, move.unique, move.flags.base, meta.server_size, sha, meta.message_id)
        # 3. new messages each way, downloads first
        adopted: set[str] = set()
        for download in plan.downloads:
            uid = download.remote.uid
            sha, flags = server[uid]
            meta = world.contents[sha]
            match = next((unique for unique in plan.adopt_pool if unique not in adopted and local[unique][0] == sha),
                         None)
            if match is not None:
                adopted.add(match)
                world.adopted += 1
                pairs[uid] = RecordedPair(uid, match, first_base(local[match][1], flags), meta.server_size, sha,
                                          meta.message_id)
                continue
            unique = world.unique()
            local[unique] = (sha, holdable(flags))
            pairs[uid] = RecordedPair(uid, unique, flags, meta.server_size, sha, meta.message_id)
        for append in plan.appends:
            if append.unique in adopted:
                continue
            uid = world.uid()
            server[uid] = (append.content.sha256, append.flags)
            if append.restores is not None:
                del pairs[append.restores]
            pairs[uid] = RecordedPair(uid, append.unique, append.flags, append.content.server_size,
                                      append.content.sha256, append.content.message_id)
        # 4. deletions
        for deletion in plan.push_deletions:
            del server[deletion.uid]
            if deletion.unique is not None:
                del local[deletion.unique]
            del pairs[deletion.uid]
        for removal in plan.local_removals:
            del local[removal.unique]
            del pairs[removal.uid]
        for uid in plan.forget:
            del pairs[uid]
    return world


def store(flags: Flags, add: Flags, remove: Flags) -> Flags:
    """UID STORE +FLAGS.SILENT then -FLAGS.SILENT: what else the message has stays."""
    return (flags | add) - remove


def sync(world: World, policy: TwoWayPolicy = OPEN) -> tuple[World, dict[str, TwoWayPlan]]:
    plans = plan_account(inputs(world), policy)
    return apply(world, plans), plans


def busy(plans: dict[str, TwoWayPlan]) -> dict[str, dict[str, object]]:
    """What the plans would still do, by folder and field (empty when all is in step)."""
    return {name: {field.name: getattr(plan, field.name) for field in dataclasses.fields(plan)[4:]
                   if getattr(plan, field.name)} for name, plan in plans.items() if not plan.empty}


# --- random worlds ------------------------------------------------------------------------------


@st.composite
def synced_worlds(draw: st.DrawFn, max_size: int = 8) -> World:
    world = World()
    for name in FOLDERS:
        for index in range(draw(st.integers(0, max_size))):
            sha = world.content(f"{name}-{index}", message_id=draw(st.booleans()) or index % 3 != 0)
            world.add_synced(name, sha, draw(st.frozensets(st.sampled_from(SERVER_FLAGS), max_size=3)))
    return world


def mutate(world: World, draw: st.DrawFn) -> World:
    """Random user actions on both sides: flags, deletions, trash, new messages, moves."""
    world = copy.deepcopy(world)
    for step in range(draw(st.integers(0, 12))):
        side = draw(st.sampled_from(["local", "server"]))
        folder, other = draw(st.permutations(FOLDERS))[:2]
        action = draw(st.sampled_from(["flag", "delete", "new", "move", "rename"]))
        if side == "local":
            files = world.local[folder]
            unique = draw(st.sampled_from(sorted(files))) if files else None
            if action == "new" or unique is None:
                sha = world.content(f"local-{step}-{world.next_uid}", message_id=draw(st.booleans()))
                files[world.unique()] = (sha, draw(FLAG_SETS))
            elif action == "flag":
                files[unique] = (files[unique][0], files[unique][1] ^ {draw(st.sampled_from(sorted(HOLDABLE_FLAGS)))})
            elif action == "delete":
                del files[unique]
            elif action == "move":
                world.local[other][draw(st.sampled_from([unique, world.unique()]))] = files.pop(unique)
            else:
                files[world.unique()] = files.pop(unique)
        else:
            messages = world.server[folder]
            uid = draw(st.sampled_from(sorted(messages))) if messages else None
            if action == "new" or uid is None:
                sha = world.content(f"server-{step}-{world.next_uid}", message_id=draw(st.booleans()))
                messages[world.uid()] = (sha, draw(st.frozensets(st.sampled_from(SERVER_FLAGS), max_size=3)))
            elif action == "flag":
                messages[uid] = (messages[uid][0], messages[uid][1] ^ {draw(st.sampled_from(SERVER_FLAGS))})
            elif action == "delete":
                del messages[uid]
            else:  # a move by another client (a rename is the same on a server)
                world.server[other][world.uid()] = messages.pop(uid)
    return world


@st.composite
def changed_worlds(draw: st.DrawFn) -> World:
    return mutate(draw(synced_worlds()), draw)


def holdable_view(world: World) -> tuple[dict[str, list[tuple[str, Flags]]], dict[str, list[tuple[str, Flags]]]]:
    """Both sides as sorted (content, Maildir-holdable flags) lists per folder."""
    server = {name: sorted((sha, holdable(flags)) for sha, flags in world.server[name].values()) for name in FOLDERS}
    local = {name: sorted(world.local[name].values()) for name in FOLDERS}
    return server, local


# --- properties ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(changed_worlds(), st.sampled_from(list(Expunge)))
def test_a_pass_then_another_plans_nothing(world: World, expunge: Expunge) -> None:
    policy = dataclasses.replace(OPEN, expunge=expunge)
    after, _ = sync(world, policy)
    if after.adopted:  # a message without a Message-ID, found on both sides by its hash
        after, _ = sync(after, policy)
    again = plan_account(inputs(after), policy)
    assert busy(again) == {}
    server, local = holdable_view(after)
    if expunge == Expunge.OWN:  # with "never", a file deleted here stays on the server, marked
        assert server == local
    before, now = copies(world), copies(after)
    for sha, (on_server, here) in now.items():  # nothing is copied twice by the pass...
        if world.contents[sha].message_id is None:
            continue  # ...except a message with no Message-ID moved on both sides: the server's copy is new
        assert on_server <= max(before.get(sha, (0, 0))) and here <= max(before.get(sha, (0, 0)))
    for sha, (on_server, here) in copies(world, live=True).items():  # what neither side deleted stays
        if on_server and here:
            assert all(now.get(sha, (0, 0)))


def copies(world: World, live: bool = False) -> dict[str, tuple[int, int]]:
    """Per content: how many copies the server and the Maildir hold, over all folders;
    ``live`` leaves out the copies marked deleted (T, \\Deleted)."""
    server = collections.Counter(sha for name in FOLDERS for sha, flags in world.server[name].values()
                                 if not (live and DELETED in flags))
    local = collections.Counter(sha for name in FOLDERS for sha, flags in world.local[name].values()
                                if not (live and DELETED in flags))
    return {sha: (server[sha], local[sha]) for sha in server | local}


@settings(max_examples=200, deadline=None)
@given(changed_worlds())
def test_an_incremental_snapshot_plans_like_a_full_one(world: World) -> None:
    assert plan_account(inputs(world, incremental=True), OPEN) == plan_account(inputs(world), OPEN)


@settings(max_examples=200, deadline=None)
@given(changed_worlds())
def test_losing_the_state_pairs_by_content_and_converges(world: World) -> None:
    """A lost state database (or a UIDVALIDITY change) deletes nothing and copies only
    what has no counterpart on the other side. A message without a Message-ID is paired
    by hash when it is downloaded; the pass after that takes the union of its flags."""
    lost = copy.deepcopy(world)
    lost.pairs = {name: {} for name in FOLDERS}
    lost.uidvalidity = dict.fromkeys(FOLDERS)
    after, plans = sync(lost)
    assert not any(plan.push_deletions or plan.local_removals for plan in plans.values())
    for name in FOLDERS:
        assert {sha for sha, _ in world.server[name].values()} | {sha for sha, _ in world.local[name].values()} == \
            {sha for sha, _ in after.server[name].values()} == {sha for sha, _ in after.local[name].values()}
    if after.adopted:
        after, plans = sync(after)
        assert not any(plan.downloads or plan.appends or plan.push_deletions for plan in plans.values())
    assert busy(plan_account(inputs(after), OPEN)) == {}


@pytest.mark.parametrize(("letter", "flag"), sorted(MAILDIR_LETTERS.items()))
def test_the_letters_are_the_ones_the_maildir_store_writes(letter: str, flag: str) -> None:
    assert (flags_from_name(f"1.M1P1.host:2,{letter}"), info_letters(frozenset({flag}))) == ({flag}, letter)


@settings(max_examples=300, deadline=None)
@given(synced_worlds(max_size=5), st.data())
def test_flag_changes_on_both_sides_are_all_kept(world: World, data: st.DataObject) -> None:
    """Each message: some flags changed here, other flags changed on the server, some
    changed to the same value on both. After one pass both sides show every change, and
    the server's keywords are untouched."""
    expected: dict[str, tuple[Flags, Flags]] = {}  # sha -> (holdable flags, keywords)
    for name in FOLDERS:
        for uid, pair in world.pairs[name].items():
            sha, remote = world.server[name][uid]
            changes = {flag: data.draw(st.sampled_from(["none", "here", "there", "both"]))
                       for flag in sorted(HOLDABLE_FLAGS - {DELETED})}
            here, there, both = (frozenset(flag for flag, side in changes.items() if side == wanted)
                                 for wanted in ("here", "there", "both"))
            world.local[name][pair.unique] = (sha, holdable(remote) ^ here ^ both)
            world.server[name][uid] = (sha, remote ^ there ^ both)
            expected[sha] = (holdable(remote) ^ here ^ there ^ both, remote - HOLDABLE_FLAGS)
    after, _ = sync(world)
    for name in FOLDERS:
        for sha, flags in after.server[name].values():
            assert (holdable(flags), flags - HOLDABLE_FLAGS) == expected[sha]
        for sha, flags in after.local[name].values():
            assert flags == expected[sha][0]


@given(st.frozensets(st.sampled_from(SERVER_FLAGS)), st.frozensets(st.sampled_from(sorted(HOLDABLE_FLAGS))),
       st.frozensets(st.sampled_from(SERVER_FLAGS)))
def test_merge_pushes_and_pulls_per_flag(base: Flags, local: Flags, remote: Flags) -> None:
    merge = merge_flags(base, local, remote)
    for flag in HOLDABLE_FLAGS:
        changed_here, changed_there = (flag in local) != (flag in base), (flag in remote) != (flag in base)
        want = (flag in local) if changed_here else (flag in remote)
        assert (flag in merge.base) == want
        assert (flag in merge.add | merge.remove) == (changed_here and not changed_there)
    assert merge.base - HOLDABLE_FLAGS == remote - HOLDABLE_FLAGS  # keywords: the server's, never removed
    assert not merge.remove - HOLDABLE_FLAGS
    assert (merge.local if merge.local is not None else local) == merge.base & HOLDABLE_FLAGS


@given(st.frozensets(st.sampled_from(sorted(HOLDABLE_FLAGS))), st.frozensets(st.sampled_from(SERVER_FLAGS)))
def test_first_pairing_takes_the_union_except_deletions(local: Flags, remote: Flags) -> None:
    merged = merge_flags(first_base(local, remote), local, remote).base
    both_deleted = DELETED in local and DELETED in remote
    assert merged == (local | remote) - (set() if both_deleted else {DELETED})


@settings(max_examples=300, deadline=None)
@given(changed_worlds(), st.sampled_from([DeletionLimit(0, 0), DeletionLimit(1, 0), DeletionLimit(2, 25)]))
def test_deletions_never_go_past_the_guard(world: World, limit: DeletionLimit) -> None:
    policy = TwoWayPolicy(max_deletions=limit)
    after, plans = sync(world, policy)
    for name, plan in plans.items():
        size = len(world.pairs[name])
        if plan.stop is not None:
            assert plan == TwoWayPlan(name, plan.uidvalidity, plan.uidnext, plan.highestmodseq, stop=plan.stop)
            assert (after.server[name], after.local[name], after.pairs[name]) == (
                world.server[name], world.local[name], world.pairs[name])
            continue
        marked = sum(1 for push in plan.push_flags if DELETED in push.add)
        assert limit.allows(len(plan.push_deletions) + marked, size)
        assert limit.allows(len(plan.local_removals), size)
        assert not {move.target for move in plan.local_moves + plan.server_moves} & {
            other for other, stopped in plans.items() if stopped.stop is not None}


# --- examples -----------------------------------------------------------------------------------


def synced(*folders: tuple[str, int]) -> World:
    world = World()
    for name, count in folders:
        for index in range(count):
            world.add_synced(name, world.content(f"{name}-{index}"), frozenset({"\\Seen"}))
    return world


def only(world: World, folder: str = "INBOX") -> tuple[int, str, str]:
    ((uid, (sha, _)),) = world.server[folder].items()
    return uid, world.pairs[folder][uid].unique, sha


def test_a_message_read_here_is_seen_on_the_server() -> None:
    world = World()
    world.add_synced("INBOX", world.content("a"), frozenset({"$Label"}))
    uid, unique, sha = only(world)
    world.local["INBOX"][unique] = (sha, frozenset({"\\Seen"}))
    after, plans = sync(world)
    assert [(push.uid, push.add, push.remove) for push in plans["INBOX"].push_flags] == [
        (uid, {"\\Seen"}, frozenset())]
    assert after.server["INBOX"][uid][1] == {"\\Seen", "$Label"}


def test_a_deletion_here_is_marked_and_expunged_by_uid() -> None:
    world = synced(("INBOX", 2))
    uid, unique = next(iter(world.pairs["INBOX"].items()))[0], next(iter(world.pairs["INBOX"].values())).unique
    del world.local["INBOX"][unique]
    own = plan_account(inputs(world), OPEN)["INBOX"]
    never = plan_account(inputs(world), dataclasses.replace(OPEN, expunge=Expunge.NEVER))["INBOX"]
    assert [(deletion.uid, deletion.unique) for deletion in own.push_deletions] == [(uid, None)]
    assert (never.push_deletions, [(push.uid, push.add) for push in never.push_flags]) == ((), [(uid, {DELETED})])
    after, _ = sync(world, dataclasses.replace(OPEN, expunge=Expunge.NEVER))
    assert DELETED in after.server["INBOX"][uid][1]
    assert busy(plan_account(inputs(after), dataclasses.replace(OPEN, expunge=Expunge.NEVER))) == {}


def test_a_deleted_mark_from_another_client_is_only_a_flag_here() -> None:
    world = synced(("INBOX", 1))
    uid, unique, sha = only(world)
    world.server["INBOX"][uid] = (sha, frozenset({"\\Seen", DELETED}))
    after, plans = sync(world)
    assert not plans["INBOX"].push_deletions
    assert after.local["INBOX"][unique][1] == {"\\Seen", DELETED} and uid in after.server["INBOX"]


def test_trashed_here_is_a_deletion() -> None:
    world = synced(("INBOX", 1))
    uid, unique, sha = only(world)
    world.local["INBOX"][unique] = (sha, frozenset({"\\Seen", DELETED}))
    after, plans = sync(world)
    assert [(deletion.uid, deletion.unique) for deletion in plans["INBOX"].push_deletions] == [(uid, unique)]
    assert after.server["INBOX"] == {} and after.local["INBOX"] == {} and after.pairs["INBOX"] == {}


def test_a_server_expunge_removes_the_file() -> None:
    world = synced(("INBOX", 1))
    uid, unique, _ = only(world)
    del world.server["INBOX"][uid]
    after, plans = sync(world)
    assert [(removal.uid, removal.unique) for removal in plans["INBOX"].local_removals] == [(uid, unique)]
    assert after.local["INBOX"] == {}


def test_deleted_here_but_flagged_on_the_server_is_downloaded_again() -> None:
    world = synced(("INBOX", 1))
    uid, unique, sha = only(world)
    del world.local["INBOX"][unique]
    world.server["INBOX"][uid] = (sha, frozenset({"\\Seen", "\\Flagged"}))
    after, plans = sync(world)
    plan = plans["INBOX"]
    assert [conflict.uid for conflict in plan.conflicts] == [uid] and not plan.push_deletions
    assert [(download.remote.uid, download.restores) for download in plan.downloads] == [(uid, unique)]
    assert list(after.local["INBOX"].values()) == [(sha, {"\\Seen", "\\Flagged"})]
    assert busy(plan_account(inputs(after), OPEN)) == {}


def test_flagged_here_but_expunged_on_the_server_is_uploaded_again() -> None:
    world = synced(("INBOX", 1))
    uid, unique, sha = only(world)
    del world.server["INBOX"][uid]
    world.local["INBOX"][unique] = (sha, frozenset({"\\Seen", "\\Flagged"}))
    after, plans = sync(world)
    plan = plans["INBOX"]
    assert [conflict.uid for conflict in plan.conflicts] == [uid] and not plan.local_removals
    assert [(append.unique, append.restores, append.flags) for append in plan.appends] == [
        (unique, uid, {"\\Seen", "\\Flagged"})]
    assert list(after.server["INBOX"].values()) == [(sha, {"\\Seen", "\\Flagged"})]


def test_trashed_here_but_changed_on_the_server_is_kept_and_untrashed() -> None:
    world = synced(("INBOX", 1))
    uid, unique, sha = only(world)
    world.local["INBOX"][unique] = (sha, frozenset({"\\Seen", DELETED}))
    world.server["INBOX"][uid] = (sha, frozenset({"\\Seen", "\\Answered"}))
    after, plans = sync(world)
    assert [conflict.uid for conflict in plans["INBOX"].conflicts] == [uid]
    assert after.local["INBOX"][unique] == (sha, {"\\Seen", "\\Answered"})
    assert after.server["INBOX"][uid] == (sha, {"\\Seen", "\\Answered"})


def test_deleted_on_both_sides_is_forgotten() -> None:
    world = synced(("INBOX", 1))
    uid, unique, _ = only(world)
    del world.server["INBOX"][uid], world.local["INBOX"][unique]
    _, plans = sync(world)
    assert plans["INBOX"].forget == (uid,) and not plans["INBOX"].conflicts


def test_a_new_file_is_appended_with_its_flags_and_mtime() -> None:
    world = World()
    sha = world.content("draft")
    world.local["Sent"]["draft.1"] = (sha, frozenset({"\\Draft", "\\Seen"}))
    after, plans = sync(world)
    (append,) = plans["Sent"].appends
    assert (append.unique, append.flags, append.mtime_ns, append.content) == (
        "draft.1", {"\\Draft", "\\Seen"}, 1_700_000_000 * 10**9, world.contents[sha])
    assert list(after.server["Sent"].values()) == [(sha, {"\\Draft", "\\Seen"})]


def test_a_file_moved_between_folders_is_moved_on_the_server_not_uploaded() -> None:
    world = synced(("INBOX", 3))
    uid, pair = next(iter(world.pairs["INBOX"].items()))
    world.local["Archive"]["moved.1"] = world.local["INBOX"].pop(pair.unique)
    after, plans = sync(world)
    (move,) = plans["INBOX"].local_moves
    assert (move.uid, move.target, move.unique) == (uid, "Archive", "moved.1")
    assert not any(plan.appends or plan.push_deletions or plan.downloads for plan in plans.values())
    assert [pair.unique for pair in after.pairs["Archive"].values()] == ["moved.1"]


def test_a_message_moved_on_the_server_is_renamed_here_not_downloaded() -> None:
    world = synced(("INBOX", 3))
    uid, pair = next(iter(world.pairs["INBOX"].items()))
    world.server["Archive"][world.uid()] = world.server["INBOX"].pop(uid)
    after, plans = sync(world)
    (move,) = plans["INBOX"].server_moves
    assert (move.uid, move.unique, move.target) == (uid, pair.unique, "Archive")
    assert not any(plan.downloads or plan.local_removals or plan.appends for plan in plans.values())
    assert pair.unique in after.local["Archive"] and pair.unique not in after.local["INBOX"]


@pytest.mark.parametrize("server_folder", ["Archive", "Sent"])
def test_a_message_moved_on_both_sides_ends_in_the_servers_folder_once(server_folder: str) -> None:
    world = synced(("INBOX", 3))
    uid, pair = next(iter(world.pairs["INBOX"].items()))
    sha, _ = world.local["INBOX"].pop(pair.unique)
    world.local["Archive"]["moved.1"] = (sha, frozenset({"\\Seen", "\\Flagged"}))
    new_uid = world.uid()
    world.server[server_folder][new_uid] = (world.server["INBOX"].pop(uid)[0], frozenset({"\\Seen", "$Label"}))
    after, plans = sync(world)
    if server_folder == "Archive":  # one folder: paired there by content, as on a first sync
        assert [(new.uid, new.unique) for new in plans["Archive"].new_pairs] == [(new_uid, "moved.1")]
    else:
        (rejoin,) = plans["Archive"].rejoins
        assert (rejoin.unique, rejoin.target, rejoin.target_uid) == ("moved.1", server_folder, new_uid)
    assert not any(plan.downloads or plan.appends or plan.push_deletions or plan.local_removals
                   for plan in plans.values())
    expected = {"\\Seen", "\\Flagged"}
    assert after.local[server_folder]["moved.1"] == (sha, expected)
    assert after.server[server_folder][new_uid] == (sha, expected | {"$Label"})
    assert [pair.unique for pair in after.pairs[server_folder].values()] == ["moved.1"]
    assert busy(plan_account(inputs(after), OPEN)) == {}


def test_a_file_renamed_by_a_reader_is_the_same_message() -> None:
    world = synced(("INBOX", 1))
    uid, unique, sha = only(world)
    del world.local["INBOX"][unique]
    world.local["INBOX"]["renamed.1"] = (sha, frozenset({"\\Seen", "\\Answered"}))
    _, plans = sync(world)
    plan = plans["INBOX"]
    assert [(relink.uid, relink.unique) for relink in plan.relink] == [(uid, "renamed.1")]
    assert [(push.uid, push.add) for push in plan.push_flags] == [(uid, {"\\Answered"})]
    assert not (plan.appends or plan.push_deletions)


def test_without_a_message_id_a_download_may_adopt_a_file_of_the_same_size() -> None:
    world = World()
    sha = world.content("no id", message_id=False)
    world.server["INBOX"][world.uid()] = (sha, frozenset({"\\Seen"}))
    world.local["INBOX"]["same.1"] = (sha, frozenset({"\\Flagged"}))
    after, plans = sync(world)
    assert plans["INBOX"].adopt_pool == ("same.1",)
    assert list(after.local["INBOX"]) == ["same.1"] and len(after.server["INBOX"]) == 1
    after, _ = sync(after)
    assert list(after.local["INBOX"].values()) == [(sha, {"\\Seen", "\\Flagged"})]


@pytest.mark.parametrize(("change", "reason"), [
    (lambda world: world.missing.add("INBOX"), "cur/ or new/ directory is missing"),
    (lambda world: world.local["INBOX"].clear(), "all 4 of its messages are gone locally"),
    (lambda world: world.server["INBOX"].clear(), "all 4 of its messages are gone from the server"),
])
def test_a_vanished_or_emptied_folder_stops_until_allowed(change: object, reason: str) -> None:
    world = synced(("INBOX", 4), ("Archive", 2))
    assert callable(change)
    change(world)
    after, plans = sync(world, TwoWayPolicy())
    assert plans["INBOX"].stop is not None and reason in plans["INBOX"].stop.reason
    assert (after.server["INBOX"], after.local["INBOX"]) == (world.server["INBOX"], world.local["INBOX"])
    assert plans["Archive"].stop is None
    allowed, plans = sync(world, TwoWayPolicy(allow_deletions=frozenset({"INBOX"})))
    assert plans["INBOX"].stop is None and allowed.pairs["INBOX"] == {}
    assert {} in (allowed.server["INBOX"], allowed.local["INBOX"])  # the side still there followed


def test_more_deletions_than_the_limit_stop_the_folder() -> None:
    world = synced(("INBOX", 10))
    for unique in sorted(world.local["INBOX"])[:3]:
        del world.local["INBOX"][unique]
    _, plans = sync(world, TwoWayPolicy(max_deletions=DeletionLimit(2, 25)))
    assert plans["INBOX"].stop is not None and "delete 3 of its 10 messages on the server" in plans["INBOX"].stop.reason
    _, plans = sync(world, TwoWayPolicy(max_deletions=DeletionLimit(3, 0)))
    assert plans["INBOX"].stop is None and len(plans["INBOX"].push_deletions) == 3


def test_a_uidvalidity_change_pairs_again_by_content_and_deletes_nothing() -> None:
    world = synced(("INBOX", 3))
    world.uidvalidity["INBOX"] = UIDVALIDITY - 1
    new_uids = {world.uid(): message for message in world.server["INBOX"].values()}
    world.server["INBOX"] = new_uids
    after, plans = sync(world)
    plan = plans["INBOX"]
    assert {new.uid for new in plan.new_pairs} == set(new_uids)
    assert not (plan.downloads or plan.appends or plan.push_deletions or plan.local_removals)
    assert set(after.pairs["INBOX"]) == set(new_uids)


def test_a_scan_that_did_not_read_an_unpaired_file_is_refused() -> None:
    world = World()
    world.local["INBOX"]["new.1"] = (world.content("x"), NO_FLAGS)
    (inbox, *rest) = inputs(world)
    unread = dataclasses.replace(inbox, local=LocalFolderScan(True, {"new.1": LocalMessage("new.1", "new", NO_FLAGS,
                                                                                         1, 0)}))
    with pytest.raises(ValueError, match="needs_content"):
        plan_account([unread, *rest], OPEN)
