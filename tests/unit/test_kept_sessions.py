"""When a kept IMAP session may carry the next run, and what keep_alive does with the waiting
ones: clocks are the test's, the sessions stand-ins that record what was done to them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import pytest

from mailsyncd.config import AccountConfig, StoreConfig
from mailsyncd.errors import AccountError
from mailsyncd.sources.imap import ImapSession
from mailsyncd.sources.kept import KEEPALIVE, LINGER, Kept, KeptSessions

ACCOUNT = AccountConfig(name="a", protocol="imap", host="imap.example.org", port=993, username="me",
                        password=None, store=StoreConfig(format="maildir", path=Path("/tmp/a")))


class Session:
    """What KeptSessions asks of an ImapSession."""

    def __init__(self, reusable: bool = True, keeps: bool = True, noop_fails: bool = False) -> None:
        self.can_reuse = reusable
        self.keeps = keeps
        self.noop_fails = noop_fails
        self.closed = False
        self.noops = 0

    def keep(self) -> bool:
        return self.keeps

    def reusable(self) -> bool:
        return self.can_reuse

    def noop(self, deadline: float) -> None:
        self.noops += 1
        if self.noop_fails:
            raise AccountError("a: connection to imap.example.org failed: EOF")

    def close(self) -> None:
        self.closed = True


class Clocks:
    def __init__(self) -> None:
        self.monotonic = 1000.0
        self.wall = 1_800_000_000.0

    def pass_(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def kept(clocks: Clocks) -> KeptSessions:
    return KeptSessions(clock=lambda: clocks.monotonic, wall=lambda: clocks.wall)


def _put(kept: KeptSessions, session: Session, account: AccountConfig = ACCOUNT,
         good_until: float = float("inf")) -> Kept:
    entry = Kept(cast(ImapSession, session), good_until)
    kept.put(account, entry)
    return entry


def test_a_session_given_back_carries_the_next_run_once(kept: KeptSessions) -> None:
    session = Session()
    entry = _put(kept, session)
    assert kept.take(ACCOUNT) is entry
    assert kept.take(ACCOUNT) is None  # taken: nobody else gets it
    assert not session.closed


@pytest.mark.parametrize("why", ["settings", "token", "linger", "closed by the server"])
def test_a_session_that_cannot_carry_the_run_is_closed_and_not_given(
        kept: KeptSessions, clocks: Clocks, why: str) -> None:
    session = Session(reusable=why != "closed by the server")
    _put(kept, session, good_until=clocks.wall + 60)
    account = ACCOUNT
    if why == "settings":
        account = dataclasses.replace(ACCOUNT, username="someone else")
    elif why == "token":
        clocks.pass_(60)
    elif why == "linger":
        clocks.monotonic += LINGER
    assert kept.take(account) is None
    assert session.closed


def test_a_session_that_cannot_wait_is_closed_at_once(kept: KeptSessions) -> None:
    session = Session(keeps=False)
    _put(kept, session)
    assert session.closed
    assert kept.take(ACCOUNT) is None


def test_a_newer_session_replaces_a_waiting_one(kept: KeptSessions) -> None:
    old, new = Session(), Session()
    _put(kept, old)
    entry = _put(kept, new)
    assert old.closed and not new.closed
    assert kept.take(ACCOUNT) is entry


def test_keep_alive_noops_quiet_sessions_only_and_counts_quiet_from_the_noop(
        kept: KeptSessions, clocks: Clocks) -> None:
    session = Session()
    _put(kept, session)
    clocks.pass_(KEEPALIVE - 1)
    kept.keep_alive()
    assert session.noops == 0
    clocks.pass_(1)
    kept.keep_alive()
    assert session.noops == 1
    clocks.pass_(KEEPALIVE / 2)
    kept.keep_alive()
    assert session.noops == 1  # quiet since the NOOP, not since the run
    assert kept.take(ACCOUNT) is not None


def test_keep_alive_closes_sessions_that_fail_the_noop_or_waited_too_long(
        kept: KeptSessions, clocks: Clocks) -> None:
    failing = Session(noop_fails=True)
    _put(kept, failing)
    clocks.pass_(KEEPALIVE)
    kept.keep_alive()
    assert failing.closed
    assert kept.take(ACCOUNT) is None

    unused = Session()
    _put(kept, unused)
    for _ in range(int(LINGER // KEEPALIVE) + 1):
        clocks.pass_(KEEPALIVE)
        kept.keep_alive()
    assert unused.closed
    assert kept.take(ACCOUNT) is None


def test_drop_and_close_log_out(kept: KeptSessions) -> None:
    first, second = Session(), Session()
    _put(kept, first)
    _put(kept, second, dataclasses.replace(ACCOUNT, name="b"))
    kept.drop("a")
    assert first.closed and not second.closed
    kept.close()
    assert second.closed


def test_an_oauth2_login_is_good_until_its_token_is_due(tmp_path: Path, monkeypatch: Any) -> None:
    from mailsyncd import oauth2

    assert oauth2.login_good_until(ACCOUNT) == float("inf")
    account = dataclasses.replace(ACCOUNT, auth="oauth2")
    monkeypatch.setattr(oauth2, "load_tokens", lambda _: oauth2.Tokens(access_token="t", refresh_token="r",
                                                                      issued_at=1.0, expires_at=3600.0,
                                                                      renew_at=3000.0))
    assert oauth2.login_good_until(account) == 3000.0
