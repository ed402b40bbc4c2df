"""``batches``: how a fetch is cut into intent/commit batches, for every protocol."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from mailsyncd.domain import RemoteMessage
from mailsyncd.sync.batch import batches


@given(sizes=st.lists(st.integers(1, 5000), max_size=60), budget=st.integers(1, 8000))
def test_batches_respect_the_byte_budget_and_keep_order(sizes: list[int], budget: int) -> None:
    messages = [RemoteMessage(index + 1, size) for index, size in enumerate(sizes)]
    out = list(batches(messages, lambda message: message.size, budget, 2000))
    assert [m for batch in out for m in batch] == messages
    for batch in out:
        assert len(batch) == 1 or sum(m.size for m in batch) <= budget


@given(sizes=st.lists(st.integers(0, 300), max_size=80), budget=st.integers(1, 1000), max_count=st.integers(1, 12))
def test_every_item_is_in_exactly_one_batch_in_order_within_both_limits(sizes: list[int], budget: int,
                                                                       max_count: int) -> None:
    items = list(enumerate(sizes))  # (position, size): equal sizes stay distinguishable
    out = list(batches(items, lambda item: item[1], budget, max_count))
    assert [item for batch in out for item in batch] == items
    assert all(batch for batch in out)
    for batch in out:
        assert len(batch) <= max_count
        total = sum(size for _, size in batch)
        assert total <= budget or (len(batch) == 1 and total > budget)


@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=80), budget=st.integers(1, 1000),
       max_count=st.integers(1, 12))
def test_a_batch_is_cut_only_when_the_next_item_would_break_a_limit(sizes: list[int], budget: int,
                                                                   max_count: int) -> None:
    """Batches are as full as the limits allow, so a large fetch takes few round trips."""
    out = list(batches(sizes, lambda size: size, budget, max_count))
    for batch, following in itertools.pairwise(out):
        assert len(batch) == max_count or sum(batch) + following[0] > budget


def test_the_limits_each_callers_uses() -> None:
    out = list(batches([1] * 5000, lambda size: size, 3 * 1024 * 1024, 2000))
    assert [len(batch) for batch in out] == [2000, 2000, 1000]
    assert [len(batch) for batch in batches([4] * 3, lambda size: size, 10, 1000)] == [2, 1]
    assert list(batches([], lambda size: size, 10, 5)) == []
    assert list(batches([50, 1], lambda size: size, 10, 5)) == [[50], [1]]  # oversized goes alone
