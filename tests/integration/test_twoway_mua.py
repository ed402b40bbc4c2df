"""Two-way sync with real mail programs acting as the user on machine A: neomutt (driven
in tmux) and notmuch (tags with maildir.synchronize_flags). After A's sync the server
shows what the user did, and machine B gets it too."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DovecotUser
from tests.helpers import neomutt
from tests.twoway_helpers import Machine, machine, message, server_flags, server_subjects

LETTERS = {"\\Draft": "D", "\\Flagged": "F", "$Forwarded": "P", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}


@pytest.fixture
def two(tmp_path: Path, dovecot: DovecotUser) -> tuple[Machine, Machine]:
    dovecot.server.create_folder(dovecot.user, "Archive")
    dovecot.server.append_many(dovecot.user, "INBOX", [message(number) for number in range(1, 6)])
    first, second = machine(tmp_path, dovecot, "a"), machine(tmp_path, dovecot, "b")
    assert first.sync() == 0 and second.sync() == 0
    return first, second


def assert_agree(dovecot: DovecotUser, *machines: Machine) -> None:
    """Every machine shows every folder as the server does: the same messages, once, with
    the same flags."""
    for folder in ("INBOX", "Archive"):
        assert max(server_subjects(dovecot, folder).values(), default=1) == 1
        on_server = {subject: "".join(sorted(LETTERS[flag] for flag in flags if flag in LETTERS))
                     for subject, flags in server_flags(dovecot, folder).items()}
        for each in machines:
            assert each.letters(folder) == on_server, (each.root, folder)


def test_neomutt_reads_flags_deletes_and_files(two: tuple[Machine, Machine], dovecot: DovecotUser,
                                               tmp_path: Path) -> None:
    first, second = two
    settings = ("set mbox_type=Maildir", "set sort=subject", "set delete=yes", "set confirmappend=no",
                "set maildir_trash=no", "set resolve=yes", f'set folder="{first.root}"')
    with neomutt(first.root, tmp_path / "home", *settings) as keys:
        keys("Enter")  # message 1: read it
        keys("q")  # back to the index
        keys("j F")  # message 2: flag it (resolve: the cursor moves on)
        keys("d")  # message 3: delete it
        screen = keys("s")  # message 4: save it into Archive (marks the original deleted)
        assert "Save to mailbox" in screen, screen
        keys("C-u =.Archive Enter")
    assert first.sync() == 0
    flags = server_flags(dovecot)
    assert flags["message 1 in INBOX"] == {"\\Seen"}
    assert flags["message 2 in INBOX"] == {"\\Flagged"}
    assert set(flags) == {"message 1 in INBOX", "message 2 in INBOX", "message 5 in INBOX"}
    assert set(server_subjects(dovecot, "Archive")) == {"message 4 in INBOX"}
    assert second.sync() == 0 and first.sync() == 0
    assert_agree(dovecot, first, second)


def test_notmuch_tags_reach_the_server(two: tuple[Machine, Machine], dovecot: DovecotUser, tmp_path: Path) -> None:
    first, second = two
    config = tmp_path / "notmuch-config"
    config.write_text(f"[database]\npath={first.root}\n[user]\nname=Test\nprimary_email=t@example.org\n"
                      "[new]\ntags=unread;inbox;\nignore=\n[maildir]\nsynchronize_flags=true\n")
    env = {**os.environ, "NOTMUCH_CONFIG": str(config), "HOME": str(tmp_path)}

    def notmuch(*args: str) -> None:
        subprocess.run(["notmuch", *args], env=env, check=True, capture_output=True, timeout=60)

    notmuch("new")
    notmuch("tag", "-unread", "--", 'subject:"message 1 in INBOX"')
    notmuch("tag", "+flagged", "+replied", "--", 'subject:"message 2 in INBOX"')
    assert first.sync() == 0
    flags = server_flags(dovecot)
    assert flags["message 1 in INBOX"] == {"\\Seen"}
    assert flags["message 2 in INBOX"] == {"\\Flagged", "\\Answered"}
    # And back: the server's change shows in notmuch's tags after the sync renames the file.
    uid = dovecot.server.uids(dovecot.user, "INBOX")[2]
    dovecot.server.add_flags(dovecot.user, "INBOX", [uid], ["\\Flagged"])
    assert first.sync() == 0
    notmuch("new")
    found = subprocess.run(["notmuch", "search", "--output=messages", "tag:flagged"], env=env, check=True,
                           capture_output=True, text=True, timeout=60).stdout.split()
    assert len(found) == 2
    assert second.sync() == 0
    assert_agree(dovecot, first, second)
