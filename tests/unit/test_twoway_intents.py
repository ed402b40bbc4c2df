"""How a two-way flag intent is written down and settled after a crash: each write that
happened moves the base, each that did not leaves its flag to the next merge."""

from __future__ import annotations

from mailsyncd.sync.twoway_run import FlagChange

SEEN, FLAGGED, ANSWERED = "\\Seen", "\\Flagged", "\\Answered"


def test_an_intent_reads_back_as_written() -> None:
    for change in (FlagChange(frozenset({SEEN}), frozenset({FLAGGED})), FlagChange(local=frozenset()),
                   FlagChange(frozenset({"$Label1"}), local=frozenset({SEEN, ANSWERED}))):
        assert FlagChange.decode(change.encode()) == change


def test_writes_that_happened_move_the_base_flag_by_flag() -> None:
    # Here: +Seen -Flagged for the server, and the file renamed to show Answered (pulled).
    change = FlagChange(frozenset({SEEN}), frozenset({FLAGGED}), frozenset({SEEN, ANSWERED}))
    base = frozenset({FLAGGED, "$Label1"})
    # Nothing happened: the base stays.
    assert change.settled(base, remote=frozenset({FLAGGED, ANSWERED, "$Label1"}),
                          local=frozenset({SEEN})) == base
    # The STORE of +Seen landed, -Flagged did not; the rename did.
    assert change.settled(base, remote=frozenset({FLAGGED, SEEN, ANSWERED, "$Label1"}),
                          local=frozenset({SEEN, ANSWERED})) == {FLAGGED, SEEN, ANSWERED, "$Label1"}
    # Everything landed; the message is gone from the server meanwhile: only the file counts.
    assert change.settled(base, remote=None, local=frozenset({SEEN, ANSWERED})) == {FLAGGED, ANSWERED, "$Label1"}


def test_a_rename_does_not_count_for_flags_the_server_still_has_to_take() -> None:
    """The file shows +Seen (the user's own, to be pushed): the STORE did not happen, so
    the base must not gain Seen, or the next merge would take it off the file again."""
    change = FlagChange(frozenset({SEEN}), local=frozenset({SEEN, FLAGGED}))
    assert change.settled(frozenset(), remote=frozenset({FLAGGED}), local=frozenset({SEEN, FLAGGED})) == {FLAGGED}
