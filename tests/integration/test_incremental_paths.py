"""Incremental sync on each path the source can take, against a real Dovecot that hides
capabilities: QRESYNC (flags and VANISHED in EXAMINE's answer), CONDSTORE only
(CHANGEDSINCE), neither (a FLAGS listing of every older UID), each with and without
LIST-STATUS (new mail fetched ahead of EXAMINE's answer, or after it).

Another IMAP client changes the server between passes; after every pass the Maildir and
the state database must hold exactly what the server holds (and, in archive mode, what
it expunged), and the wire must show only EXAMINE and BODY.PEEK.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailsyncd.config import load_config
from mailsyncd.stores.maildir import flags_from_name
from mailsyncd.testing.fill import check
from tests.conftest import capabilities_without
from tests.helpers import assert_read_only, normalize, round_trips, sync, write_config
from tests.server_helpers import DevServer
from tests.twoway_helpers import message

# The capability sets, each with LIST-STATUS and without: what the server hides.
PATHS = {
    "qresync": frozenset(),
    "condstore": frozenset({"QRESYNC"}),
    "neither": frozenset({"QRESYNC", "CONDSTORE"}),
}
CASES = [pytest.param(PATHS[path] | listing, path, id=f"{path}{'-no-list-status' if listing else ''}")
         for path in PATHS for listing in (frozenset(), frozenset({"LIST-STATUS"}))]
FOLDERS = ("INBOX", "Lists")


def subject(data: bytes) -> str:
    found = re.search(rb"^Subject: ([^\r\n]*)", data, re.MULTILINE)
    assert found is not None
    return found.group(1).decode()


@dataclass(frozen=True)
class View:
    """One folder as the server shows it: its UIDVALIDITY, and UID -> (subject, bytes as
    stored locally, flags)."""

    uidvalidity: int
    messages: dict[int, tuple[str, bytes, frozenset[str]]]

    def by_subject(self) -> dict[str, tuple[bytes, frozenset[str]]]:
        return {name: (data, flags) for name, data, flags in self.messages.values()}


@dataclass
class Server:
    """The test's user on a server, changed by another client; what a sync saw there, and
    what it expunged."""

    server: DevServer
    user: str
    seen: dict[str, set[str]] = field(default_factory=lambda: {folder: set() for folder in FOLDERS})
    expunged: dict[str, set[str]] = field(default_factory=lambda: {folder: set() for folder in FOLDERS})
    numbers: int = 0

    def add(self, folder: str, count: int, flags: tuple[str, ...] = ()) -> None:
        self.numbers += count
        uids = self.server.append_many(self.user, folder, [message(number, folder) for number in
                                                           range(self.numbers - count + 1, self.numbers + 1)])
        if flags:
            self.server.add_flags(self.user, folder, uids, flags)

    def uids(self, folder: str) -> list[int]:
        return self.server.uids(self.user, folder)

    def expunge(self, folder: str, uids: list[int]) -> None:
        self.expunged[folder] |= {self.view(folder).messages[uid][0] for uid in uids}
        self.server.expunge(self.user, folder, uids)

    def view(self, folder: str) -> View:
        """The folder read back in one read-only session (EXAMINE, BODY.PEEK)."""
        messages: dict[int, tuple[str, bytes, frozenset[str]]] = {}
        with self.server.session(self.user, folder, readonly=True) as conn:
            uidvalidity = int(conn.untagged_responses["UIDVALIDITY"][-1])
            empty = conn.untagged_responses.get("EXISTS", [b"0"])[-1] == b"0"
            for item in [] if empty else check(conn.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])"), "UID FETCH"):
                if isinstance(item, tuple):
                    found = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", item[0])
                    assert found is not None, item[0]
                    flags = frozenset(found.group(2).decode().split()) - {"\\Recent"}
                    messages[int(found.group(1))] = (subject(item[1]), normalize(item[1]), flags)
        return View(uidvalidity, messages)

    def views(self) -> dict[str, View]:
        """Every folder read back, and noted as seen by a sync."""
        views = {folder: self.view(folder) for folder in FOLDERS}
        for folder, view in views.items():
            self.seen[folder] |= set(view.by_subject())
        return views


def local(root: Path) -> dict[str, tuple[bytes, frozenset[str]]]:
    """Subject -> (bytes, flags from the file name) of every file; each subject once."""
    found: dict[str, tuple[bytes, frozenset[str]]] = {}
    for path in [*root.glob("new/*"), *root.glob("cur/*")]:
        data = path.read_bytes()
        assert subject(data) not in found, f"{subject(data)} stored twice in {root}"
        found[subject(data)] = (data, frozenset(flags_from_name(path.name)))
    return found


def recorded(state: Path, folder: str) -> tuple[int, dict[int, tuple[str, frozenset[str]]], list[str]]:
    """The folder's recorded UIDVALIDITY; its rows of that UIDVALIDITY, UID -> (state,
    flags); and the locations of every row that holds a local copy."""
    db = sqlite3.connect(state)
    try:
        folder_id, uidvalidity = db.execute("select id, uidvalidity from folders where name = ?", (folder,)).fetchone()
        rows = {uid: (row_state, frozenset(flags.split())) for uid, row_state, flags in db.execute(
            "select uid, state, flags from messages where folder_id = ? and uidvalidity = ?", (folder_id, uidvalidity))}
        locations = [location for (location,) in db.execute(
            "select location from messages where folder_id = ? and state in ('stored', 'gone', 'retired')",
            (folder_id,))]
    finally:
        db.close()
    return uidvalidity, rows, locations


def assert_mirrors(config: Path, mode: str, server: Server, views: dict[str, View]) -> None:
    """The store and the state database hold every server message once, with its flags;
    in mirror mode nothing else, in archive mode also every message it expunged after a
    sync had seen it."""
    root = load_config(config).accounts[0].store.path
    for folder, view in views.items():
        there = view.by_subject()
        here = local(root if folder == "INBOX" else root / f".{folder}")
        assert {name: here[name] for name in there if name in here} == there, folder
        kept = server.expunged[folder] & server.seen[folder] if mode == "archive" else set()
        assert set(here) == set(there) | kept, (folder, sorted(set(here) ^ set(there)))
        uidvalidity, rows, locations = recorded(config.parent / "state.db", folder)
        assert uidvalidity == view.uidvalidity
        assert {uid: row_flags for uid, (row_state, row_flags) in rows.items() if row_state == "stored"} == \
            {uid: flags for uid, (_, _, flags) in view.messages.items()}, folder
        assert {row_state for uid, (row_state, _) in rows.items() if uid not in view.messages} <= \
            ({"gone"} if mode == "archive" else {"removed"}), folder
        assert len(locations) == len(set(locations)) == len(here), folder


@pytest.mark.parametrize(("hidden", "path"), CASES)
def test_every_incremental_path_ends_equal_to_the_server(
        tmp_path: Path, server_without: Callable[[frozenset[str]], DevServer], sent_commands: list[bytes],
        hidden: frozenset[str], path: str) -> None:
    dev = server_without(hidden)
    user = f"paths-{path}-{len(hidden)}"
    dev.add_user(user, "pw")
    server = Server(dev, user)
    configs = {}
    for mode in ("archive", "mirror"):
        (tmp_path / mode).mkdir()
        configs[mode] = write_config(tmp_path / mode, dev, user, "pw",
                                     extra=f'mode = "{mode}"\nfolders = ["INBOX", "Lists"]')
    ours: list[bytes] = []

    def sync_both() -> None:
        for config in configs.values():
            sent_commands.clear()
            assert sync(config) == 0
            ours.extend(sent_commands)
        views = server.views()
        for mode, config in configs.items():
            assert_mirrors(config, mode, server, views)

    server.add("INBOX", 8)
    server.add("INBOX", 2, ("\\Flagged",))
    server.add("Lists", 3, ("\\Seen",))
    sync_both()  # the first sync
    inbox = server.uids("INBOX")

    with round_trips() as trips:  # nothing changed: LIST, and EXAMINE where LIST-STATUS cannot tell
        sync_both()
    opened = 0 if path != "neither" and "LIST-STATUS" not in hidden else len(FOLDERS)
    assert trips == [1 + opened] * 2, trips

    server.add("INBOX", 2)  # new mail, and flags changed on older messages
    dev.add_flags(user, "INBOX", inbox[1:3], ["\\Seen"])
    dev.remove_flags(user, "INBOX", inbox[8:9], ["\\Flagged"])
    sync_both()
    inbox = server.uids("INBOX")

    server.expunge("INBOX", [inbox[3], inbox[-1]])  # in the middle and at the end
    dev.add_flags(user, "INBOX", inbox[:1], ["\\Answered"])
    sync_both()
    inbox = server.uids("INBOX")

    server.expunge("INBOX", inbox[4:5])  # one gone and one come: the count stays
    server.add("INBOX", 1)
    dev.add_flags(user, "INBOX", inbox[5:6], ["\\Flagged"])
    server.add("Lists", 1)
    server.expunge("Lists", server.uids("Lists"))  # a folder emptied, its UIDNEXT past the last sync's
    sync_both()

    dev.change_uidvalidity(user, "INBOX")
    server.add("INBOX", 1)
    sync_both()
    inbox = server.uids("INBOX")

    server.expunge("INBOX", inbox[:1])  # incremental again, from the new UIDVALIDITY
    dev.add_flags(user, "INBOX", inbox[1:2], ["\\Flagged"])
    server.add("Lists", 1)
    sync_both()

    commands = assert_read_only(ours)
    wire = b"\n".join(commands)
    assert (b"(QRESYNC (" in wire) == (path == "qresync")
    assert (b"CHANGEDSINCE" in wire) == (path == "condstore")
    assert (re.search(rb"UID FETCH 1:\d+ \(UID FLAGS\)\n", wire + b"\n") is not None) == (path == "neither")
    assert (b"RETURN (STATUS" in wire) == ("LIST-STATUS" not in hidden)
    # Only CONDSTORE alone has to search for expunges: QRESYNC names them, the listing shows them.
    assert (b" UID SEARCH " in wire) == (path == "condstore")


@pytest.mark.parametrize("path", list(PATHS))
def test_a_count_balanced_by_an_unrecorded_message_deletes_nothing_by_mistake(
        tmp_path: Path, server_without: Callable[[frozenset[str]], DevServer], path: str) -> None:
    """The count check's blind spot: a message below the recorded UIDNEXT that the state
    database does not know (its row lost, say) and an expunged recorded message make the
    count add up. QRESYNC names the expunge and the listing without CONDSTORE shows it;
    CONDSTORE alone misses it until the count differs. Whatever the path, no local copy of
    a message the server still has is ever removed, and the unknown one is left alone."""
    dev = server_without(PATHS[path])
    user = f"balanced-{path}"
    dev.add_user(user, "pw")
    server = Server(dev, user)
    config = write_config(tmp_path, dev, user, "pw", extra='mode = "mirror"\nfolders = ["INBOX"]')
    server.add("INBOX", 6)
    assert sync(config) == 0
    uids = server.uids("INBOX")
    db = sqlite3.connect(tmp_path / "state.db")
    with db:
        db.execute("delete from messages where uid = ?", (uids[2],))  # message 3: on the server, recorded no more
    db.close()
    server.expunge("INBOX", uids[4:5])  # message 5: recorded, expunged; the count still adds up
    assert sync(config) == 0
    stored = set(local(load_config(config).accounts[0].store.path))
    assert stored >= set(server.view("INBOX").by_subject()), "a message still on the server was removed"
    assert ("message 5 in INBOX" in stored) == (path == "condstore"), "CONDSTORE alone misses it"

    server.expunge("INBOX", uids[5:6])  # message 6: now the count differs, and a UID SEARCH tells both
    assert sync(config) == 0
    assert set(local(load_config(config).accounts[0].store.path)) == {f"message {n} in INBOX" for n in (1, 2, 3, 4)}
    _, rows, _ = recorded(tmp_path / "state.db", "INBOX")
    assert {uid: row_state for uid, (row_state, _) in rows.items()} == {
        uids[0]: "stored", uids[1]: "stored", uids[3]: "stored", uids[4]: "removed", uids[5]: "removed"}


def test_the_server_changing_its_capabilities_between_runs(
        tmp_path: Path, announced: tuple[str, ...], sent_commands: list[bytes]) -> None:
    """A base recorded on one path is read on another: a HIGHESTMODSEQ recorded under
    QRESYNC meets a server without CONDSTORE, a base without one meets QRESYNC again, and
    CONDSTORE alone takes over a QRESYNC base. Every run still ends equal to the server."""
    with DevServer(tmp_path / "dovecot", users=(("moving", "pw"),)) as dev:
        server = Server(dev, "moving")
        config = write_config(tmp_path, dev, "moving", "pw", extra='mode = "mirror"\nfolders = ["INBOX", "Lists"]')
        server.add("INBOX", 6)
        server.add("Lists", 2)
        for hidden in [PATHS["qresync"], PATHS["neither"] | {"LIST-STATUS"}, PATHS["qresync"],
                       PATHS["condstore"] | {"LIST-STATUS"}]:
            if dev.imap_capability != capabilities_without(announced, hidden):
                dev.imap_capability = capabilities_without(announced, hidden)
                dev.restart()
            sent_commands.clear()
            assert sync(config) == 0
            wire = b"\n".join(assert_read_only(sent_commands))
            assert (b" ENABLE " in wire) == ("CONDSTORE" not in hidden)
            assert (b"RETURN (STATUS" in wire) == ("LIST-STATUS" not in hidden)
            assert_mirrors(config, "mirror", server, server.views())
            inbox = server.uids("INBOX")
            server.expunge("INBOX", inbox[1:2])
            dev.add_flags("moving", "INBOX", inbox[-1:], ["\\Seen"])
            server.add("INBOX", 1)
            server.expunge("Lists", server.uids("Lists")[:1])
            server.add("Lists", 1)
