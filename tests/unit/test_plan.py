"""The IMAP planner against a model of a server and of the state database.

Properties from mbsync's checks: applying a plan and planning again gives an empty plan;
no action names a UID the server did not show; archive mode never removes a local copy;
a UIDVALIDITY change never removes or forgets one; an incremental snapshot leads to the
same result as a full one.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsyncd.domain import (
    FolderSnapshot,
    LargeMessages,
    MessageState,
    Mode,
    Policy,
    RecordedFolder,
    RecordedMessage,
    RemoteMessage,
)
from mailsyncd.sync.plan import plan_folder

FLAGS = st.frozensets(st.sampled_from(["\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$Label"]), max_size=3)


@st.composite
def servers(draw: st.DrawFn) -> dict[int, RemoteMessage]:
    uids = draw(st.lists(st.integers(1, 60), unique=True, max_size=25))
    return {uid: RemoteMessage(uid, draw(st.integers(1, 5000)), draw(FLAGS),
                               message_id=draw(st.sampled_from([None, "<a@x>", "<b@x>", f"<{uid}@x>"])))
            for uid in uids}


def full_snapshot(uidvalidity: int, server: dict[int, RemoteMessage]) -> FolderSnapshot:
    new = tuple(server[uid] for uid in sorted(server))
    return FolderSnapshot(uidvalidity, max(server, default=0) + 1, None, len(server), new=new,
                          present=frozenset(server))


def apply(plan_uidvalidity: int, recorded: dict[tuple[int, int], RecordedMessage], plan: object
          ) -> dict[tuple[int, int], RecordedMessage]:
    """What the executor does to the state, in a dict keyed by (uidvalidity, uid)."""
    from mailsyncd.domain import Plan

    assert isinstance(plan, Plan)
    state = dict(recorded)
    if plan.retire is not None:
        for key, message in list(state.items()):
            if key[0] == plan.retire and message.state in (MessageState.STORED, MessageState.GONE):
                state[key] = dataclasses.replace(message, state=MessageState.RETIRED)
            elif key[0] == plan.retire:
                del state[key]
    for adoption in plan.adopt:
        old_key = (adoption.copy.uidvalidity, adoption.copy.uid)
        del state[old_key]
        state[(plan_uidvalidity, adoption.uid)] = dataclasses.replace(
            adoption.copy, uid=adoption.uid, uidvalidity=plan_uidvalidity, state=MessageState.STORED,
            flags=adoption.remote.flags, size=adoption.remote.size)
    for message in plan.fetch:
        state[(plan_uidvalidity, message.uid)] = RecordedMessage(
            message.uid, plan_uidvalidity, MessageState.STORED, message.flags, f"loc{plan_uidvalidity}-{message.uid}",
            message.size, f"sha{message.uid}", message.message_id)
    for message in plan.skip:
        state[(plan_uidvalidity, message.uid)] = RecordedMessage(message.uid, plan_uidvalidity, MessageState.SKIPPED,
                                                                 message.flags, size=message.size)
    for update in plan.flag_updates:
        key = (plan_uidvalidity, update.uid)
        state[key] = dataclasses.replace(state[key], flags=update.flags)
    for message in plan.gone:
        state[(plan_uidvalidity, message.uid)] = dataclasses.replace(message, state=MessageState.GONE)
    for message in plan.remove:
        state[(plan_uidvalidity, message.uid)] = dataclasses.replace(message, state=MessageState.REMOVED)
    return state


def as_recorded(uidvalidity: int | None, uidnext: int | None, state: dict[tuple[int, int], RecordedMessage]
                ) -> RecordedFolder:
    current = {uid: message for (validity, uid), message in state.items() if validity == uidvalidity}
    retired = tuple(message for message in state.values() if message.state == MessageState.RETIRED)
    return RecordedFolder(uidvalidity, uidnext, None, current, complete=True, retired=retired)


def copies(state: dict[tuple[int, int], RecordedMessage]) -> set[str]:
    return {message.location for message in state.values()
            if message.location and message.state != MessageState.REMOVED}


POLICIES = st.builds(Policy, st.sampled_from(list(Mode)), st.sampled_from([None, 1000, 4000]))


@given(before=servers(), after=servers(), policy=POLICIES, change_validity=st.booleans())
@settings(max_examples=300)
def test_plan_then_replan_is_empty_and_keeps_its_promises(
        before: dict[int, RemoteMessage], after: dict[int, RemoteMessage], policy: Policy,
        change_validity: bool) -> None:
    state = apply(1, {}, plan_folder(full_snapshot(1, before), as_recorded(None, None, {}), policy))
    validity = 2 if change_validity else 1
    if not change_validity:
        # Without a UIDVALIDITY change UIDs are never reused: the later server holds
        # old UIDs (with any flags) and fresh UIDs above every old one.
        # Kept messages take the later draw's flags.
        top = max(before, default=0)
        kept = {uid: dataclasses.replace(message, flags=after[uid].flags)
                for uid, message in before.items() if uid in after}
        fresh = {top + uid: dataclasses.replace(message, uid=top + uid) for uid, message in after.items()}
        after = kept | fresh
    snapshot = full_snapshot(validity, after)
    recorded = as_recorded(1, max(before, default=0) + 1, state)
    plan = plan_folder(snapshot, recorded, policy)

    shown = set(after)
    assert {m.uid for m in plan.fetch} | {m.uid for m in plan.skip} | {u.uid for u in plan.flag_updates} <= shown
    assert {m.uid for m in plan.gone} | {m.uid for m in plan.remove} <= {uid for v, uid in state if v == 1}
    assert not ({m.uid for m in plan.gone + plan.remove} & shown) or change_validity
    if policy.mode == Mode.ARCHIVE or change_validity:
        assert not plan.remove
    if change_validity:
        assert plan.retire == 1 and not plan.gone
        claimed = [adoption.copy.row_id or (adoption.copy.uidvalidity, adoption.copy.uid) for adoption in plan.adopt]
        assert len(claimed) == len(set(claimed))

    after_state = apply(validity, state, plan)
    if policy.mode == Mode.ARCHIVE or change_validity:
        assert copies(state) <= copies(after_state)  # no local copy is ever lost
    again = plan_folder(snapshot, as_recorded(validity, snapshot.uidnext, after_state), policy)
    assert again.empty, again


@given(server=servers(), policy=POLICIES)
def test_incremental_snapshot_plans_like_a_full_one(server: dict[int, RemoteMessage], policy: Policy) -> None:
    """The source may send only what changed; the plan must not depend on how much."""
    half = {uid: message for uid, message in server.items() if uid <= 30}
    state = apply(1, {}, plan_folder(full_snapshot(1, half), as_recorded(None, None, {}), policy))
    later = {uid: dataclasses.replace(message, flags=message.flags | {"\\Seen"}) for uid, message in server.items()
             if uid % 3}  # some expunged, all seen
    full = plan_folder(full_snapshot(1, later), as_recorded(1, 31, state), policy)
    incremental_snapshot = FolderSnapshot(
        1, max(later, default=0) + 1, None, len(later),
        new=tuple(later[uid] for uid in sorted(later) if uid >= 31),
        changed_flags={uid: message.flags for uid, message in later.items() if uid < 31},
        present=frozenset(uid for uid in later if uid < 31))
    incremental = plan_folder(incremental_snapshot, as_recorded(1, 31, state), policy)
    assert apply(1, state, full) == apply(1, state, incremental)


def test_new_uidvalidity_adopts_by_message_id_and_size_once_each() -> None:
    old = {
        (1, 1): RecordedMessage(1, 1, MessageState.STORED, location="a", size=10, message_id="<m@x>", row_id=1),
        (1, 2): RecordedMessage(2, 1, MessageState.STORED, location="b", size=10, message_id="<m@x>", row_id=2),
        (1, 3): RecordedMessage(3, 1, MessageState.STORED, location="c", size=20, message_id=None, row_id=3,
                                sha256="s"),
    }
    server = {uid: RemoteMessage(uid, 10, message_id="<m@x>") for uid in (7, 8, 9)}
    server[10] = RemoteMessage(10, 20)
    plan = plan_folder(full_snapshot(5, server), as_recorded(1, 4, old), Policy())
    assert plan.retire == 1
    assert [(adoption.uid, adoption.copy.location) for adoption in plan.adopt] == [(7, "a"), (8, "b")]
    assert [message.uid for message in plan.fetch] == [9, 10]
    assert [copy.location for copy in plan.adopt_pool] == ["c"]  # may still match by hash after fetch
    assert not plan.gone and not plan.remove


def test_mirror_removes_and_archive_keeps_what_vanished() -> None:
    state = {(1, uid): RecordedMessage(uid, 1, MessageState.STORED, location=f"l{uid}") for uid in (1, 2, 3)}
    snapshot = FolderSnapshot(1, 4, None, 2, present=frozenset({1, 3}))
    archive = plan_folder(snapshot, as_recorded(1, 4, state), Policy(Mode.ARCHIVE))
    mirror = plan_folder(snapshot, as_recorded(1, 4, state), Policy(Mode.MIRROR))
    assert [m.uid for m in archive.gone] == [2] and not archive.remove
    assert [m.uid for m in mirror.remove] == [2] and not mirror.gone


def test_oversize_messages_are_skipped_and_fetched_once_the_limit_allows() -> None:
    snapshot = full_snapshot(1, {1: RemoteMessage(1, 500), 2: RemoteMessage(2, 5000)})
    plan = plan_folder(snapshot, as_recorded(None, None, {}), Policy(max_message_size=1000))
    assert [m.uid for m in plan.fetch] == [1] and [m.uid for m in plan.skip] == [2]
    state = apply(1, {}, plan)
    assert plan_folder(snapshot, as_recorded(1, 3, state), Policy(max_message_size=1000)).empty
    raised = plan_folder(snapshot, as_recorded(1, 3, state), Policy(max_message_size=10_000))
    assert [m.uid for m in raised.fetch] == [2]


def test_a_first_sync_over_found_copies_adopts_them_and_fetches_only_the_rest() -> None:
    """A state database that knows nothing of the store: the copies indexing found are
    matched by Message-ID and size, each once; too large ones that match are adopted, not
    skipped; nothing is retired, nothing removed."""
    found = tuple(RecordedMessage(number, -1, MessageState.RETIRED, location=f"cur/{number}", size=size,
                                  message_id=mid, sha256=f"s{number}", row_id=number)
                  for number, (mid, size) in enumerate([("<a@x>", 10), ("<b@x>", 900), ("<a@x>", 10), (None, 5)], 1))
    server = {1: RemoteMessage(1, 10, message_id="<a@x>"), 2: RemoteMessage(2, 900, message_id="<b@x>"),
              3: RemoteMessage(3, 11, message_id="<a@x>"), 4: RemoteMessage(4, 5)}
    plan = plan_folder(full_snapshot(9, server), RecordedFolder(None, None, None, retired=found),
                       Policy(Mode.MIRROR, max_message_size=100))
    assert plan.retire is None
    assert [(adoption.uid, adoption.copy.location) for adoption in plan.adopt] == [(1, "cur/1"), (2, "cur/2")]
    assert [message.uid for message in plan.fetch] == [3, 4]
    assert sorted(copy.location or "" for copy in plan.adopt_pool) == ["cur/3", "cur/4"]
    assert not plan.skip and not plan.gone and not plan.remove


# --- placeholders ------------------------------------------------------------------------

HEADERS = Policy(max_message_size=1000, large_messages=LargeMessages.HEADERS)


def test_large_messages_become_placeholders_or_are_skipped() -> None:
    snapshot = full_snapshot(7, {1: RemoteMessage(1, 500), 2: RemoteMessage(2, 5000)})
    empty = RecordedFolder(None, None, None)
    plan = plan_folder(snapshot, empty, HEADERS)
    assert [m.uid for m in plan.fetch] == [1] and [m.uid for m in plan.placeholders] == [2] and not plan.skip
    plan = plan_folder(snapshot, empty, dataclasses.replace(HEADERS, large_messages=LargeMessages.SKIP))
    assert [m.uid for m in plan.skip] == [2] and not plan.placeholders


def test_a_placeholder_follows_the_server_and_is_replaced_once_it_fits() -> None:
    held = RecordedMessage(2, 7, MessageState.PLACEHOLDER, location="cur/x:2,", size=5000)
    skipped = RecordedMessage(3, 7, MessageState.SKIPPED, size=5000)
    recorded = RecordedFolder(7, 4, None, {2: held, 3: skipped})
    server = {2: RemoteMessage(2, 5000, frozenset({"\\Seen"})), 3: RemoteMessage(3, 5000)}
    plan = plan_folder(full_snapshot(7, server), recorded, HEADERS)
    assert [update.uid for update in plan.flag_updates] == [2]  # its flags follow the server's
    assert [m.uid for m in plan.placeholders] == [3]  # skipped before placeholders were asked for
    assert not plan.replace and not plan.fetch
    raised = plan_folder(full_snapshot(7, server), recorded, dataclasses.replace(HEADERS, max_message_size=10**6))
    assert raised.replace == (held,) and [m.uid for m in raised.fetch] == [3]
    gone = plan_folder(full_snapshot(7, {}), recorded, dataclasses.replace(HEADERS, mode=Mode.MIRROR))
    assert held in gone.remove  # mirror mode removes a placeholder like any copy
