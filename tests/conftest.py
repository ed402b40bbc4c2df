"""Shared fixtures: the private Dovecot server.

One Dovecot per test session (``dovecot_server``), and a fresh, empty user per test (``dovecot``):
starting a server per test would cost a start and a stop each time, while a new user costs one
small file. Tests that restart or reconfigure a server build their own ``DevServer``.
"""

from __future__ import annotations

import imaplib
import itertools
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailsyncd.testing import find_dovecot
from mailsyncd.testing.fill import check
from tests.postgres import PostgresCluster, private_cluster
from tests.server_helpers import DevServer

_user_numbers = itertools.count(1)


@dataclass(frozen=True)
class DovecotUser:
    """A test's own account on the session server; its mailbox starts empty but for the
    special-use folders (Drafts, Junk, Sent, Trash) that Dovecot creates at first login."""

    server: DevServer
    user: str
    password: str


def require_dovecot() -> None:
    """Fail, never skip: a skipped integration suite would pass CI without testing anything."""
    if find_dovecot() is None:
        pytest.fail("dovecot is not installed; run scripts/test which installs it", pytrace=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the Dovecot fixtures, so ``-m "not dovecot"`` deselects them."""
    for item in items:
        if {"dovecot", "dovecot_server", "plain_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.dovecot)


@pytest.fixture(scope="session")
def dovecot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    require_dovecot()
    with DevServer(tmp_path_factory.mktemp("dovecot"), users=()) as server:
        yield server


# What a server without UIDPLUS, MOVE and CONDSTORE announces after login.
PLAIN_IMAP = "IMAP4rev1 LITERAL+ SASL-IR LOGIN-REFERRALS ID ENABLE IDLE"


@pytest.fixture(scope="session")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """A second Dovecot that offers none of UIDPLUS, MOVE and CONDSTORE, for the fallbacks."""
    require_dovecot()
    with DevServer(tmp_path_factory.mktemp("dovecot-plain"), users=(), imap_capability=PLAIN_IMAP) as server:
        yield server


@pytest.fixture(scope="session")
def announced(dovecot_server: DevServer) -> tuple[str, ...]:
    """What the session server announces after login (CAPABILITY)."""
    dovecot_server.add_user("capabilities", secrets.token_urlsafe(12))
    with dovecot_server.session("capabilities") as conn:
        return tuple(str(check(conn.capability(), "CAPABILITY")[0], "ascii").split())


def capabilities_without(announced: tuple[str, ...], hidden: frozenset[str]) -> str:
    """An ``imap_capability`` setting: ``announced`` less the capabilities in ``hidden``."""
    return " ".join(word for word in announced if word.upper() not in hidden)


@pytest.fixture(scope="session")
def server_without(dovecot_server: DevServer, announced: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Callable[[frozenset[str]], DevServer]]:
    """``server_without(hidden)``: a Dovecot that announces, after login, what the session
    server announces less the capabilities in ``hidden`` (its ``imap_capability``, as for
    ``plain_server``); started at its first use, one per set. Nothing hidden is the session
    server itself."""
    started: dict[frozenset[str], DevServer] = {frozenset(): dovecot_server}

    def server(hidden: frozenset[str]) -> DevServer:
        if hidden not in started:
            workdir = tmp_path_factory.mktemp("dovecot-without-" + "-".join(sorted(hidden)).lower())
            started[hidden] = DevServer(workdir, users=(), imap_capability=capabilities_without(announced, hidden))
            started[hidden].start()
        return started[hidden]

    try:
        yield server
    finally:
        for hidden, running in started.items():
            if hidden:
                running.stop()


@pytest.fixture
def dovecot(dovecot_server: DevServer) -> DovecotUser:
    user = f"user{next(_user_numbers)}"
    password = secrets.token_urlsafe(12)
    dovecot_server.add_user(user, password)
    return DovecotUser(dovecot_server, user, password)


@pytest.fixture
def sent_commands(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every command line the IMAP client puts on the wire, in this process (the test
    server's own helpers speak imaplib too: clear it before the part that counts)."""
    sent: list[bytes] = []
    original = imaplib.IMAP4.send

    def recording(self: imaplib.IMAP4, data: bytes) -> None:
        sent.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(imaplib.IMAP4, "send", recording)
    return sent


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty PostgreSQL database of this test's own."""
    return postgres_cluster.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The state database on each backend in turn: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.new_database()
