"""The three ways the IMAP source builds an incremental snapshot, modelled in plain data,
against the planner: for any server history since a recorded base, each leads to the
same result as a full listing; and where the base is wrong (a message below its UIDNEXT
that nothing records) so that the count balances by accident, none removes or marks gone
a message the server still has.

The model follows ``ImapSession._changes``: QRESYNC reports changed flags and VANISHED
UIDs (perhaps also some expunged before the base, as RFC 7162 allows), CONDSTORE alone
reports changed flags, neither lists every older UID with its flags; a UID listing of the
older UIDs is taken only when ``SnapshotBase.accounts_for`` says the count does not add up.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsyncd.domain import (
    FolderSnapshot,
    MessageState,
    Mode,
    Policy,
    RecordedFolder,
    RecordedMessage,
    RemoteMessage,
    SnapshotBase,
)
from mailsyncd.sync.plan import plan_folder
from tests.unit.test_plan import FLAGS, apply

BASE_MODSEQ = 100
PATHS = ("qresync", "condstore", "neither")


@dataclass
class History:
    """A folder at its recorded base and after what other clients did since."""

    base: SnapshotBase
    state: dict[tuple[int, int], RecordedMessage]  # the state database, by (uidvalidity, uid)
    server: dict[int, RemoteMessage]  # now
    changed: dict[int, int]  # UID -> MODSEQ of its last change since the base
    expunged: set[int]  # UIDs expunged since the base
    before: set[int]  # UIDs below the base's UIDNEXT expunged before it
    lost: set[int]  # on the server below the base's UIDNEXT, recorded nowhere
    modseq: int


@st.composite
def histories(draw: st.DrawFn, lose: bool) -> History:
    at_base = draw(st.lists(st.integers(1, 40), unique=True, max_size=20))
    uidnext = max(at_base, default=0) + 1 + draw(st.integers(0, 3))
    before = set(range(1, uidnext)) - set(at_base)
    server = {uid: RemoteMessage(uid, 100 + uid, draw(FLAGS), message_id=f"<{uid}@x>") for uid in at_base}
    lost = set(draw(st.sets(st.sampled_from(sorted(at_base)), min_size=1))) if lose and at_base else set()
    state = {(1, uid): RecordedMessage(uid, 1, MessageState.STORED, message.flags, f"loc{uid}", message.size,
                                       f"sha{uid}", message.message_id)
             for uid, message in server.items() if uid not in lost}
    gone_before = draw(st.sets(st.sampled_from(sorted(before)))) if before else set()
    state |= {(1, uid): RecordedMessage(uid, 1, MessageState.GONE, location=f"loc{uid}") for uid in gone_before}
    base = SnapshotBase(1, uidnext, BASE_MODSEQ, len(at_base) - len(lost))
    modseq, nextuid = BASE_MODSEQ, uidnext
    changed: dict[int, int] = {}
    expunged: set[int] = set()
    for kind, pick, flags in draw(st.lists(st.tuples(st.sampled_from(["append", "expunge", "flags"]),
                                                     st.integers(0, 1000), FLAGS), max_size=12)):
        modseq += 1
        if kind == "append":
            server[nextuid] = RemoteMessage(nextuid, 100 + nextuid, flags, message_id=f"<{nextuid}@x>")
            changed[nextuid] = modseq
            nextuid += 1
        elif server:
            uid = sorted(server)[pick % len(server)]
            if kind == "expunge":
                del server[uid]
                changed.pop(uid, None)
                expunged.add(uid)
            else:
                server[uid] = RemoteMessage(uid, server[uid].size, flags, message_id=server[uid].message_id)
                changed[uid] = modseq
    return History(base, state, server, changed, expunged, before, lost, modseq if changed or expunged else
                   BASE_MODSEQ)


def full_listing(history: History) -> FolderSnapshot:
    server = history.server
    return FolderSnapshot(1, _uidnext(history), history.modseq, len(server),
                          new=tuple(server[uid] for uid in sorted(server)), present=frozenset(server))


def _uidnext(history: History) -> int:
    return max([history.base.uidnext, *(uid + 1 for uid in history.server), *(uid + 1 for uid in history.expunged)])


def incremental(history: History, path: str, superset: bool) -> FolderSnapshot:
    """What ``ImapSession._changes`` returns on ``path`` (``superset``: QRESYNC's VANISHED
    also names UIDs expunged before the base)."""
    base, server = history.base, history.server
    older = {uid for uid in server if uid < base.uidnext}
    exists, uidnext = len(server), _uidnext(history)
    if (history.modseq == base.highestmodseq and uidnext == base.uidnext and exists == base.present_count
            and path != "neither"):
        return FolderSnapshot(1, uidnext, history.modseq, exists)  # the server says nothing changed
    new = tuple(server[uid] for uid in sorted(server) if uid >= base.uidnext)
    vanished: frozenset[int] = frozenset()
    if path == "neither":
        changed_flags = {uid: server[uid].flags for uid in older}
    else:
        changed_flags = {uid: server[uid].flags for uid in older if history.changed.get(uid, 0) > BASE_MODSEQ}
    if path == "qresync":
        vanished = frozenset(uid for uid in history.expunged if uid < base.uidnext)
        vanished |= history.before if superset else frozenset()
    present = None
    if path == "neither" or not base.accounts_for(exists, len(new), len(vanished)):
        present = frozenset(older)
    return FolderSnapshot(1, uidnext, history.modseq, exists, new=new, changed_flags=changed_flags,
                          present=present, vanished=vanished)


def recorded_for(snapshot: FolderSnapshot, history: History) -> RecordedFolder:
    """What the executor reads (sync/imap.py ``plan``): every row for a listing, else only
    the rows of the UIDs the snapshot mentions."""
    rows = {uid: message for (_, uid), message in history.state.items()}
    if snapshot.present is not None:
        return RecordedFolder(1, history.base.uidnext, BASE_MODSEQ, rows)
    mentioned = {message.uid for message in snapshot.new} | set(snapshot.changed_flags) | set(snapshot.vanished)
    return RecordedFolder(1, history.base.uidnext, BASE_MODSEQ,
                          {uid: rows[uid] for uid in mentioned if uid in rows}, complete=False)


MODES = st.sampled_from([Mode.ARCHIVE, Mode.MIRROR])


@given(history=histories(lose=False), path=st.sampled_from(PATHS), superset=st.booleans(), mode=MODES)
@settings(max_examples=200)
def test_each_path_plans_like_a_full_listing(history: History, path: str, superset: bool, mode: Mode) -> None:
    policy = Policy(mode)
    snapshot = incremental(history, path, superset)
    full = full_listing(history)
    by_path = plan_folder(snapshot, recorded_for(snapshot, history), policy)
    by_listing = plan_folder(full, recorded_for(full, history), policy)
    assert apply(1, history.state, by_path) == apply(1, history.state, by_listing)


@given(history=histories(lose=True), path=st.sampled_from(PATHS), superset=st.booleans(), mode=MODES)
@settings(max_examples=200)
def test_a_count_balanced_by_accident_never_deletes_what_the_server_has(
        history: History, path: str, superset: bool, mode: Mode) -> None:
    policy = Policy(mode)
    snapshot = incremental(history, path, superset)
    full = full_listing(history)
    by_path = plan_folder(snapshot, recorded_for(snapshot, history), policy)
    by_listing = plan_folder(full, recorded_for(full, history), policy)
    deleted = {message.uid for message in (*by_path.gone, *by_path.remove)}
    assert not deleted & set(history.server), "a message the server still has was deleted or marked gone"
    assert deleted <= {message.uid for message in (*by_listing.gone, *by_listing.remove)}
    assert by_path.flag_updates == by_listing.flag_updates
    # The message nothing records is not fetched again below the base's UIDNEXT; the rest is.
    assert {message.uid for message in by_path.fetch} == {message.uid for message in by_listing.fetch} - history.lost


@given(history=histories(lose=False), superset=st.booleans())
@settings(max_examples=150)
def test_the_count_adds_up_exactly_when_nothing_unreported_vanished(history: History, superset: bool) -> None:
    """``accounts_for`` on a true base: without a report it adds up exactly when no
    recorded older message was expunged; with QRESYNC's report it adds up exactly when
    the report names no UID expunged before the base."""
    base, server = history.base, history.server
    new = sum(1 for uid in server if uid >= base.uidnext)
    gone = {uid for uid in history.expunged if uid < base.uidnext}
    assert base.accounts_for(len(server), new) == (not gone)
    reported = gone | (history.before if superset else set())
    assert base.accounts_for(len(server), new, len(reported)) == (reported == gone)
