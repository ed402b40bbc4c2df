"""PURE: what to do to one folder (or one POP mailbox), from what the server shows,
what the state database recorded and the account's policy. No I/O, no clock.

The executors (sync/imap.py, sync/pop.py) carry a plan out; because this module decides everything,
its rules can be checked with plain data and property tests: planning again after the
plan was applied gives an empty plan, no action names a UID the server did not show,
archive mode never removes a local copy, and a UIDVALIDITY change never removes one.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from mailsyncd.domain import (
    Adoption,
    FlagUpdate,
    FolderInfo,
    FolderSnapshot,
    LargeMessages,
    MessageState,
    Mode,
    Plan,
    Policy,
    PopListing,
    PopPlan,
    PopPolicy,
    RecordedFolder,
    RecordedMessage,
    RecordedPop,
    RemoteMessage,
)

_ON_SERVER = (MessageState.STORED, MessageState.SKIPPED, MessageState.PLACEHOLDER)
_SHOWN = (MessageState.STORED, MessageState.PLACEHOLDER)  # a local file whose flags follow the server's
_HAS_COPY = (MessageState.STORED, MessageState.GONE, MessageState.RETIRED)


def select_folders(folders: Sequence[FolderInfo], include: Sequence[str], exclude: Sequence[str],
                   only: Sequence[str] = ()) -> list[FolderInfo]:
    """The selectable folders whose decoded names match ``include`` and not ``exclude``
    (the account's globs), narrowed to ``only`` when the user named folders."""
    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    return [folder for folder in folders if folder.selectable and matches(folder.name, include)
            and not matches(folder.name, exclude) and (not only or matches(folder.name, only))]


def _too_large(message: RemoteMessage, policy: Policy) -> bool:
    return policy.max_message_size is not None and message.size > policy.max_message_size


def _large(policy: Policy, placeholders: list[RemoteMessage], skip: list[RemoteMessage]) -> list[RemoteMessage]:
    """Where a message over the limit goes: a placeholder, or nothing."""
    return placeholders if policy.large_messages == LargeMessages.HEADERS else skip


def plan_folder(snapshot: FolderSnapshot, recorded: RecordedFolder, policy: Policy) -> Plan:
    if recorded.uidvalidity is not None and snapshot.uidvalidity != recorded.uidvalidity:
        return _plan_new_uidvalidity(snapshot, recorded, policy)

    unknown: list[RemoteMessage] = []
    fetch: list[RemoteMessage] = []
    placeholders: list[RemoteMessage] = []
    replace: list[RecordedMessage] = []
    flag_updates: dict[int, FlagUpdate] = {}
    for message in snapshot.new:
        known = recorded.messages.get(message.uid)
        if known is None or known.state == MessageState.PENDING:
            unknown.append(message)
        elif known.state == MessageState.SKIPPED:
            if not _too_large(message, policy):  # the limit was raised since
                fetch.append(message)
            elif policy.large_messages == LargeMessages.HEADERS:  # placeholders were asked for since
                placeholders.append(message)
        elif known.state == MessageState.PLACEHOLDER and not _too_large(message, policy) and known.location:
            replace.append(known)  # the limit was raised since; its flags come with the whole message
        elif known.state in _SHOWN and known.flags != message.flags and known.location:
            flag_updates[message.uid] = FlagUpdate(message.uid, known.location, message.flags)
    # Local copies no UID claims yet (found by indexing the store) are matched first.
    adopt, pool, more, skip, large = _match(unknown, recorded.retired, policy)
    fetch += more
    placeholders += large

    for uid, flags in snapshot.changed_flags.items():
        known = recorded.messages.get(uid)
        if known is not None and known.state in _SHOWN and known.flags != flags and known.location:
            flag_updates[uid] = FlagUpdate(uid, known.location, flags)

    vanished = _vanished(snapshot, recorded)
    vanished_uids = {message.uid for message in vanished}
    gone = tuple(message for message in vanished if policy.mode == Mode.ARCHIVE)
    remove = tuple(message for message in vanished if policy.mode == Mode.MIRROR)
    return Plan(
        uidvalidity=snapshot.uidvalidity, uidnext=snapshot.uidnext, highestmodseq=snapshot.highestmodseq,
        adopt=adopt, adopt_pool=pool, fetch=tuple(sorted(fetch, key=lambda message: message.uid)), skip=skip,
        placeholders=tuple(sorted(placeholders, key=lambda message: message.uid)),
        replace=tuple(known for known in replace if known not in vanished),
        flag_updates=tuple(update for uid, update in sorted(flag_updates.items()) if uid not in vanished_uids),
        gone=gone, remove=remove,
    )


def _vanished(snapshot: FolderSnapshot, recorded: RecordedFolder) -> list[RecordedMessage]:
    """Recorded messages the server no longer has, told either by a complete listing
    (``present`` plus ``new``) or by an explicit VANISHED set."""
    gone_uids = set(snapshot.vanished)
    if snapshot.present is not None:
        # Every recorded message not listed is gone: only true of a complete record.
        # Only the few recorded UIDs missing from ``present`` are collected and then
        # struck off by ``new``; no set of every listed UID is built.
        assert recorded.complete, "a complete listing is compared with an incomplete record"
        unlisted = {uid for uid in recorded.messages if uid not in snapshot.present}
        unlisted.difference_update(message.uid for message in snapshot.new)
        gone_uids |= unlisted
    return [recorded.messages[uid] for uid in sorted(gone_uids)
            if uid in recorded.messages and recorded.messages[uid].state in _ON_SERVER]


def _plan_new_uidvalidity(snapshot: FolderSnapshot, recorded: RecordedFolder, policy: Policy) -> Plan:
    """Invariant 5: every old UID is retired and its copy matched again; nothing is removed."""
    old = [message for message in recorded.messages.values() if message.state in _HAS_COPY]
    adopt, pool, fetch, skip, placeholders = _match(snapshot.new, [*recorded.retired, *old], policy)
    return Plan(
        uidvalidity=snapshot.uidvalidity, uidnext=snapshot.uidnext, highestmodseq=snapshot.highestmodseq,
        retire=recorded.uidvalidity, adopt=adopt, adopt_pool=pool, fetch=fetch, skip=skip,
        placeholders=placeholders,
    )


def _match(messages: Sequence[RemoteMessage], copies: Sequence[RecordedMessage], policy: Policy
           ) -> tuple[tuple[Adoption, ...], tuple[RecordedMessage, ...], tuple[RemoteMessage, ...],
                      tuple[RemoteMessage, ...], tuple[RemoteMessage, ...]]:
    """(adopt, adopt_pool, fetch, skip, placeholders): server messages no UID of ours holds, matched to
    local copies no UID claims (retired ones, or found by indexing the store) by
    (Message-ID, size), each copy claimed at most once; the rest is fetched (or, too large,
    skipped or kept as a placeholder), and may still turn out, by content hash, to be one of ``adopt_pool``:
    the copies left unclaimed. Nothing is removed."""
    candidates: dict[tuple[str, int], list[RecordedMessage]] = defaultdict(list)
    unkeyed: list[RecordedMessage] = []
    for copy in sorted(copies, key=lambda message: (message.uidvalidity, message.uid)):
        if not copy.location:
            continue
        if copy.message_id and copy.size is not None:
            candidates[(copy.message_id, copy.size)].append(copy)
        else:
            unkeyed.append(copy)

    adopt: list[Adoption] = []
    fetch: list[RemoteMessage] = []
    skip: list[RemoteMessage] = []
    placeholders: list[RemoteMessage] = []
    for message in sorted(messages, key=lambda message: message.uid):
        matches = candidates.get((message.message_id, message.size)) if message.message_id else None
        if matches:
            adopt.append(Adoption(message.uid, message, matches.pop(0)))
        elif _too_large(message, policy):
            _large(policy, placeholders, skip).append(message)
        else:
            fetch.append(message)
    pool = tuple(unkeyed) + tuple(copy for copies in candidates.values() for copy in copies)
    return tuple(adopt), pool, tuple(fetch), tuple(skip), tuple(placeholders)


# --- POP3 -------------------------------------------------------------------------------


def plan_pop(listing: PopListing, recorded: Mapping[str, RecordedPop], policy: PopPolicy,
             now: datetime) -> PopPlan:
    """Invariant 4: DELE goes only to numbers whose identity, from this very listing, is
    recorded as stored, and only when the policy asks. A listing in which an identity
    appears twice cannot tell the two apart, so neither copy is deleted."""
    counts: dict[str, int] = defaultdict(int)
    for uidl, _ in listing.entries.values():
        counts[uidl] += 1
    fetch: list[tuple[int, str, int]] = []
    skip: list[tuple[int, str, int]] = []
    placeholders: list[tuple[int, str, int]] = []
    replace: list[tuple[int, str, int]] = []
    delete: list[tuple[int, str]] = []
    planned: set[str] = set()
    large = placeholders if policy.large_messages == LargeMessages.HEADERS else skip
    for number in sorted(listing.entries):
        uidl, size = listing.entries[number]
        known = recorded.get(uidl)
        too_large = policy.max_message_size is not None and size > policy.max_message_size
        if known is None or known.state in (MessageState.PENDING, MessageState.SKIPPED):
            if uidl in planned:
                continue  # the first copy of an ambiguous identity decides (fetched or skipped)
            planned.add(uidl)
            if known is None or known.state == MessageState.PENDING:
                (large if too_large else fetch).append((number, uidl, size))
            elif not too_large:
                fetch.append((number, uidl, size))  # skipped before; the limit was raised since
            elif large is placeholders:
                placeholders.append((number, uidl, size))  # placeholders were asked for since
        elif known.state == MessageState.PLACEHOLDER and not too_large and counts[uidl] == 1:
            replace.append((number, uidl, size))  # the limit was raised since
        elif known.state == MessageState.STORED and counts[uidl] == 1 and _pop_due(known, policy, now):
            delete.append((number, uidl))
    return PopPlan(fetch=tuple(fetch), skip=tuple(skip), placeholders=tuple(placeholders),
                   replace=tuple(replace), delete=tuple(delete))


def _pop_due(known: RecordedPop, policy: PopPolicy, now: datetime) -> bool:
    if not policy.leave_on_server:
        return True
    if policy.delete_after_days is None:
        return False
    return _utc(now) - _utc(known.first_seen) >= timedelta(days=policy.delete_after_days)


def _utc(when: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC); comparing one with an aware
    ``now`` would raise, so naive values are read as UTC."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when
