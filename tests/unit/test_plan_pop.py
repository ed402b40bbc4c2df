"""plan_pop, the pure POP3 planner, against generated listings and recorded states.

Invariant 4 as properties: DELE goes only to numbers whose identity in this listing is
recorded stored, never to an identity listed twice, never while leave_on_server holds
without delete_after_days, and with delete_after_days exactly when the recorded
first sighting is old enough for the injected ``now``.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsyncd.domain import MessageState, PopListing, PopPolicy, RecordedPop
from mailsyncd.sync.plan import plan_pop

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
UIDLS = [f"uid{index}" for index in range(12)] + ["hdr:" + "a" * 64]
STATES = list(MessageState)


def _listing(entries: list[tuple[str, int]], has_uidl: bool) -> PopListing:
    return PopListing({number: entry for number, entry in enumerate(entries, start=1)}, has_uidl=has_uidl)


def _recorded(rows: list[tuple[str, MessageState, int, bool]]) -> dict[str, RecordedPop]:
    recorded = {}
    for uidl, state, age_hours, naive in rows:
        first_seen = NOW - timedelta(hours=age_hours)
        if naive:  # SQLite hands datetimes back naive
            first_seen = first_seen.replace(tzinfo=None)
        recorded[uidl] = RecordedPop(uidl, state, first_seen, f"new/{uidl}")
    return recorded


listings = st.builds(_listing, st.lists(st.tuples(st.sampled_from(UIDLS), st.integers(1, 5000)), max_size=20),
                     st.booleans())
recordings = st.builds(_recorded, st.lists(
    st.tuples(st.sampled_from(UIDLS), st.sampled_from(STATES), st.integers(0, 24 * 60), st.booleans()),
    unique_by=lambda row: row[0]))


policies = st.builds(
    PopPolicy,
    leave_on_server=st.booleans(),
    delete_after_days=st.one_of(st.none(), st.integers(1, 60)),
    max_message_size=st.one_of(st.none(), st.integers(1, 5000)),
)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@settings(max_examples=120)
@given(listings, recordings, policies)
def test_dele_only_for_stored_unique_identities_of_this_listing(
        listing: PopListing, recorded: dict[str, RecordedPop], policy: PopPolicy) -> None:
    plan = plan_pop(listing, recorded, policy, NOW)
    listed = Counter(uidl for uidl, _ in listing.entries.values())
    for number, uidl in plan.delete:
        assert listing.entries[number][0] == uidl  # the number names that identity in this listing
        assert recorded[uidl].state == MessageState.STORED
        assert listed[uidl] == 1  # an identity listed twice cannot be told apart
    assert len({number for number, _ in plan.delete}) == len(plan.delete)


@settings(max_examples=100)
@given(listings, recordings, st.one_of(st.none(), st.integers(1, 5000)))
def test_leave_on_server_without_days_never_deletes(
        listing: PopListing, recorded: dict[str, RecordedPop], limit: int | None) -> None:
    plan = plan_pop(listing, recorded, PopPolicy(leave_on_server=True, max_message_size=limit), NOW)
    assert plan.delete == ()


@settings(max_examples=100)
@given(listings, recordings, st.integers(1, 60), st.integers(-3 * 24, 3 * 24))
def test_delete_after_days_follows_the_injected_clock(
        listing: PopListing, recorded: dict[str, RecordedPop], days: int, shift_hours: int) -> None:
    now = NOW + timedelta(hours=shift_hours)
    policy = PopPolicy(leave_on_server=True, delete_after_days=days)
    plan = plan_pop(listing, recorded, policy, now)
    listed = Counter(uidl for uidl, _ in listing.entries.values())
    expected = {
        (number, uidl) for number, (uidl, _) in listing.entries.items()
        if uidl in recorded and recorded[uidl].state == MessageState.STORED and listed[uidl] == 1
        and now - _aware(recorded[uidl].first_seen) >= timedelta(days=days)
    }
    assert set(plan.delete) == expected


@settings(max_examples=100)
@given(listings, recordings, policies)
def test_leave_on_server_false_deletes_every_stored_unique_identity(
        listing: PopListing, recorded: dict[str, RecordedPop], policy: PopPolicy) -> None:
    policy = PopPolicy(leave_on_server=False, max_message_size=policy.max_message_size)
    plan = plan_pop(listing, recorded, policy, NOW)
    listed = Counter(uidl for uidl, _ in listing.entries.values())
    assert {uidl for _, uidl in plan.delete} == {
        uidl for uidl, count in listed.items()
        if count == 1 and uidl in recorded and recorded[uidl].state == MessageState.STORED}


@settings(max_examples=120)
@given(listings, recordings, policies)
def test_new_identities_are_fetched_or_skipped_once(
        listing: PopListing, recorded: dict[str, RecordedPop], policy: PopPolicy) -> None:
    plan = plan_pop(listing, recorded, policy, NOW)
    planned = [uidl for _, uidl, _ in plan.fetch + plan.skip]
    assert len(planned) == len(set(planned))  # recording them twice would break a UNIQUE key
    limit = policy.max_message_size
    first = {}  # the first listed copy of each identity decides
    for number in sorted(listing.entries, reverse=True):
        uidl, size = listing.entries[number]
        first[uidl] = size
    new = {uidl for uidl in first if uidl not in recorded or recorded[uidl].state == MessageState.PENDING}
    raised = {uidl for uidl, size in first.items() if uidl in recorded
              and recorded[uidl].state == MessageState.SKIPPED and (limit is None or size <= limit)}
    assert set(planned) == new | raised
    for number, uidl, size in plan.fetch + plan.skip:
        assert listing.entries[number] == (uidl, size)
    assert all(limit is not None and size > limit for _, _, size in plan.skip)
    assert all(limit is None or size <= limit for _, _, size in plan.fetch)
    assert not {uidl for _, uidl in plan.delete} & set(planned)


@settings(max_examples=100)
@given(listings, recordings, policies)
def test_planning_again_after_the_downloads_fetches_nothing(
        listing: PopListing, recorded: dict[str, RecordedPop], policy: PopPolicy) -> None:
    plan = plan_pop(listing, recorded, policy, NOW)
    after = dict(recorded)
    for _, uidl, _ in plan.fetch:
        after[uidl] = RecordedPop(uidl, MessageState.STORED, NOW, f"new/{uidl}")
    for _, uidl, _ in plan.skip:
        after[uidl] = RecordedPop(uidl, MessageState.SKIPPED, NOW)
    again = plan_pop(listing, after, policy, NOW)
    assert again.fetch == () and again.skip == ()
    # What this session stored is deletable in the same session when not left on the server.
    if not policy.leave_on_server:
        listed = Counter(uidl for uidl, _ in listing.entries.values())
        fetched = {uidl for _, uidl, _ in plan.fetch if listed[uidl] == 1}
        assert fetched <= {uidl for _, uidl in again.delete}


def test_duplicate_identity_is_fetched_once_and_never_deleted() -> None:
    listing = PopListing({1: ("same", 10), 2: ("other", 20), 3: ("same", 10)})
    plan = plan_pop(listing, {}, PopPolicy(leave_on_server=False), NOW)
    assert plan.fetch == ((1, "same", 10), (2, "other", 20))
    stored = {uidl: RecordedPop(uidl, MessageState.STORED, NOW) for uidl in ("same", "other")}
    assert plan_pop(listing, stored, PopPolicy(leave_on_server=False), NOW).delete == ((2, "other"),)


def test_duplicate_identity_over_the_limit_is_skipped_once() -> None:
    listing = PopListing({1: ("big", 900), 2: ("big", 900)})
    plan = plan_pop(listing, {}, PopPolicy(max_message_size=100), NOW)
    assert plan.skip == ((1, "big", 900),) and plan.fetch == ()


def test_pending_identity_is_fetched_again_and_not_deleted() -> None:
    listing = PopListing({1: ("u1", 10)})
    recorded = {"u1": RecordedPop("u1", MessageState.PENDING, NOW, "new/x")}
    plan = plan_pop(listing, recorded, PopPolicy(leave_on_server=False), NOW)
    assert plan.fetch == ((1, "u1", 10),) and plan.delete == ()


def test_naive_first_seen_from_sqlite_compares_with_aware_now() -> None:
    first_seen = (NOW - timedelta(days=31)).replace(tzinfo=None)
    recorded = {"u1": RecordedPop("u1", MessageState.STORED, first_seen)}
    policy = PopPolicy(leave_on_server=True, delete_after_days=30)
    assert plan_pop(PopListing({4: ("u1", 10)}), recorded, policy, NOW).delete == ((4, "u1"),)
    assert plan_pop(PopListing({4: ("u1", 10)}), recorded, policy, NOW - timedelta(days=2)).delete == ()


def test_gone_and_skipped_identities_are_left_alone() -> None:
    listing = PopListing({1: ("gone", 10), 2: ("skipped", 10)})
    recorded = {"gone": RecordedPop("gone", MessageState.GONE, NOW),
                "skipped": RecordedPop("skipped", MessageState.SKIPPED, NOW)}
    plan = plan_pop(listing, recorded, PopPolicy(leave_on_server=False, max_message_size=5), NOW)
    assert plan.fetch == () and plan.skip == () and plan.delete == ()
    raised = plan_pop(listing, recorded, PopPolicy(leave_on_server=False, max_message_size=50), NOW)
    assert raised.fetch == ((2, "skipped", 10),) and raised.delete == ()
