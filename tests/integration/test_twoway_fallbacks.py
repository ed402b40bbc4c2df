"""Two-way sync against a server that offers neither UIDPLUS, MOVE nor CONDSTORE: the
fallbacks keep the rules. Uploads are found again by search (no APPENDUID), moves are
COPY + \\Deleted, and with no UID EXPUNGE nothing is ever expunged: deletions stay marked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailsyncd.stores.maildir import INFO
from tests.conftest import DovecotUser
from tests.helpers import crash_at_step, normalize
from tests.server_helpers import DevServer
from tests.twoway_helpers import machine, message, server_flags, server_subjects


@pytest.fixture
def plain(plain_server: DevServer) -> DovecotUser:
    user = DovecotUser(plain_server, "plain", "plain-pw")
    plain_server.add_user(user.user, user.password)
    plain_server.create_folder(user.user, "Archive")
    plain_server.append_many(user.user, "INBOX", [message(number) for number in range(1, 5)])
    return user


def test_without_uidplus_move_or_condstore(tmp_path: Path, plain: DovecotUser) -> None:
    with plain.server.session(plain.user) as conn:
        capabilities = set(conn.capabilities)
    assert not {"UIDPLUS", "MOVE", "CONDSTORE"} & capabilities
    first, second = machine(tmp_path, plain, "a"), machine(tmp_path, plain, "b")
    assert first.sync() == 0 and second.sync() == 0

    # Flags both ways, without UNCHANGEDSINCE.
    first.set_letters("message 1 in INBOX", "S")
    plain.server.add_flags(plain.user, "INBOX", [plain.server.uids(plain.user, "INBOX")[1]], ["\\Flagged"])
    assert first.sync() == 0
    assert server_flags(plain)["message 1 in INBOX"] == {"\\Seen"}
    assert first.letters()["message 2 in INBOX"] == "F"

    # An upload cut short after the APPEND: found by search, never sent twice.
    draft = first.root / "cur" / f"1700000000.draft.host{INFO}DS"
    draft.write_bytes(normalize(message(99)))
    steps = 0
    while True:
        steps += 1
        reached = crash_at_step(first.config, steps)
        if reached != steps or server_subjects(plain)["message 99 in INBOX"]:
            break
    assert reached == steps and first.intents() == 1  # stopped between the APPEND and its record
    assert first.sync() == 0 and first.sync() == 0
    assert server_subjects(plain)["message 99 in INBOX"] == 1

    # A deletion is only marked; a move is COPY + \Deleted; neither comes back here.
    first.files()["message 3 in INBOX"].unlink()
    moved = first.files()["message 4 in INBOX"]
    os.rename(moved, first.folder_dir("Archive") / "cur" / moved.name)
    assert first.sync() == 0 and first.sync() == 0
    flags = server_flags(plain)
    assert "\\Deleted" in flags["message 3 in INBOX"] and "\\Deleted" in flags["message 4 in INBOX"]
    assert set(server_subjects(plain, "Archive")) == {"message 4 in INBOX"}
    assert set(first.files()) == {"message 1 in INBOX", "message 2 in INBOX", "message 99 in INBOX"}
    assert set(first.files("Archive")) == {"message 4 in INBOX"}
    assert second.sync() == 0
    assert second.letters()["message 3 in INBOX"] == "T"  # marked deleted, as on the server
    assert set(second.files("Archive")) == {"message 4 in INBOX"}
