"""Two-way sync (mode = "sync") against the real Dovecot: two machines (two configs, two
state databases, two Maildirs) and the server, checked by their contents, never by a
transcript. The rules under test are in twoway.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailsyncd import cli
from mailsyncd.stores.maildir import INFO
from tests.conftest import DovecotUser
from tests.helpers import normalize, wait_for, write_config
from tests.twoway_helpers import Machine, internaldates, machine, message, server_flags, server_subjects


@pytest.fixture
def two(tmp_path: Path, dovecot: DovecotUser) -> tuple[Machine, Machine]:
    dovecot.server.create_folder(dovecot.user, "Archive")
    dovecot.server.append_many(dovecot.user, "INBOX", [message(number) for number in range(1, 6)])
    first, second = machine(tmp_path, dovecot, "a"), machine(tmp_path, dovecot, "b")
    assert first.sync() == 0 and second.sync() == 0
    assert len(first.files()) == len(second.files()) == 5
    return first, second


def test_flags_travel_both_ways_and_merge_per_flag(two: tuple[Machine, Machine], dovecot: DovecotUser) -> None:
    first, second = two
    first.set_letters("message 1 in INBOX", "S")  # read on A
    assert first.sync() == 0
    assert server_flags(dovecot)["message 1 in INBOX"] == {"\\Seen"}
    assert second.sync() == 0
    assert second.letters()["message 1 in INBOX"] == "S"

    # A third client flags one; both machines get it.
    uid = dovecot.server.uids(dovecot.user, "INBOX")[1]
    dovecot.server.add_flags(dovecot.user, "INBOX", [uid], ["\\Flagged"])
    assert first.sync() == 0 and second.sync() == 0
    assert first.letters()["message 2 in INBOX"] == second.letters()["message 2 in INBOX"] == "F"

    # Opposite changes to different flags of one message, here and there: both kept.
    first.set_letters("message 2 in INBOX", "FS")  # A reads it
    dovecot.server.remove_flags(dovecot.user, "INBOX", [uid], ["\\Flagged"])  # another client unflags it
    assert first.sync() == 0
    assert server_flags(dovecot)["message 2 in INBOX"] == {"\\Seen"}
    assert first.letters()["message 2 in INBOX"] == "S"
    assert second.sync() == 0
    assert second.letters()["message 2 in INBOX"] == "S"
    assert first.intents() == second.intents() == 0


def test_keywords_stay_on_the_server_and_unknown_letters_in_the_file(two: tuple[Machine, Machine],
                                                                      dovecot: DovecotUser) -> None:
    first, _ = two
    uid = dovecot.server.uids(dovecot.user, "INBOX")[0]
    dovecot.server.add_flags(dovecot.user, "INBOX", [uid], ["$Label1", "\\Flagged"])
    assert first.sync() == 0
    assert first.letters()["message 1 in INBOX"] == "F"
    first.set_letters("message 1 in INBOX", "FSa")  # read; "a" is a letter another program keeps
    assert first.sync() == 0
    assert server_flags(dovecot)["message 1 in INBOX"] == {"$Label1", "\\Flagged", "\\Seen"}
    dovecot.server.add_flags(dovecot.user, "INBOX", [uid], ["\\Answered"])
    assert first.sync() == 0
    assert first.letters()["message 1 in INBOX"] == "FRSa"


def test_local_deletion_expunges_only_its_own_uid(two: tuple[Machine, Machine], dovecot: DovecotUser) -> None:
    first, second = two
    uids = dovecot.server.uids(dovecot.user, "INBOX")
    # Another client marked message 5 \Deleted; mailsyncd must not expunge it.
    dovecot.server.add_flags(dovecot.user, "INBOX", [uids[4]], ["\\Deleted"])
    first.files()["message 1 in INBOX"].unlink()
    first.set_letters("message 2 in INBOX", "ST")  # trashed in the reader
    assert first.sync() == 0
    assert set(server_subjects(dovecot)) == {f"message {n} in INBOX" for n in (3, 4, 5)}
    assert "\\Deleted" in server_flags(dovecot)["message 5 in INBOX"]
    assert set(first.files()) == {f"message {n} in INBOX" for n in (3, 4, 5)}
    assert second.sync() == 0
    assert set(second.files()) == {f"message {n} in INBOX" for n in (3, 4, 5)}


def test_expunge_never_only_marks(tmp_path: Path, dovecot: DovecotUser) -> None:
    dovecot.server.append_many(dovecot.user, "INBOX", [message(n) for n in (1, 2)])
    first = machine(tmp_path, dovecot, "a", 'expunge = "never"')
    assert first.sync() == 0
    first.files()["message 1 in INBOX"].unlink()
    assert first.sync() == 0 and first.sync() == 0
    assert server_flags(dovecot)["message 1 in INBOX"] == {"\\Deleted"}
    assert len(server_subjects(dovecot)) == 2


def test_server_expunge_removes_the_file(two: tuple[Machine, Machine], dovecot: DovecotUser) -> None:
    first, _ = two
    dovecot.server.expunge(dovecot.user, "INBOX", dovecot.server.uids(dovecot.user, "INBOX")[:1])
    assert first.sync() == 0
    assert "message 1 in INBOX" not in first.files()
    assert len(first.files()) == 4


def test_delete_against_a_change_keeps_the_message(two: tuple[Machine, Machine], dovecot: DovecotUser,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    first, second = two
    uid = dovecot.server.uids(dovecot.user, "INBOX")[0]
    # Deleted on A while flagged on the server: downloaded again, flagged.
    first.files()["message 1 in INBOX"].unlink()
    dovecot.server.add_flags(dovecot.user, "INBOX", [uid], ["\\Flagged"])
    assert first.sync() == 0
    assert capfd.readouterr().err.count("conflict") == 1
    assert first.letters()["message 1 in INBOX"] == "F"
    assert server_subjects(dovecot)["message 1 in INBOX"] == 1
    # Flagged on B while expunged on the server: uploaded again, once.
    second.set_letters("message 2 in INBOX", "F")
    dovecot.server.expunge(dovecot.user, "INBOX", [dovecot.server.uids(dovecot.user, "INBOX")[1]])
    assert second.sync() == 0
    assert server_subjects(dovecot)["message 2 in INBOX"] == 1
    assert server_flags(dovecot)["message 2 in INBOX"] == {"\\Flagged"}
    assert second.sync() == 0 and first.sync() == 0
    assert server_subjects(dovecot)["message 2 in INBOX"] == 1
    assert first.letters()["message 2 in INBOX"] == "F"


def test_new_local_message_is_uploaded_once_with_flags_and_date(two: tuple[Machine, Machine],
                                                                 dovecot: DovecotUser) -> None:
    first, second = two
    draft = first.root / "cur" / f"1700000000.draft.host{INFO}DS"
    draft.write_bytes(normalize(message(99)))
    os.utime(draft, (1_600_000_000, 1_600_000_000))
    assert first.sync() == 0 and first.sync() == 0
    assert server_subjects(dovecot)["message 99 in INBOX"] == 1
    assert server_flags(dovecot)["message 99 in INBOX"] == {"\\Draft", "\\Seen"}
    assert second.sync() == 0
    assert second.letters()["message 99 in INBOX"] == "DS"
    assert second.files()["message 99 in INBOX"].stat().st_mtime == 1_600_000_000
    assert len(first.files()) == 6


def test_move_between_folders_is_a_server_move(two: tuple[Machine, Machine], dovecot: DovecotUser) -> None:
    first, second = two
    first.set_letters("message 3 in INBOX", "S")
    path = first.files()["message 3 in INBOX"]
    dates_before = internaldates(dovecot, "INBOX")
    # An APPEND would take this as INTERNALDATE; a MOVE keeps the server's.
    os.utime(path, (1_500_000_000, 1_500_000_000))
    os.rename(path, first.folder_dir("Archive") / "cur" / path.name)
    assert first.sync() == 0
    assert "message 3 in INBOX" not in server_subjects(dovecot)
    assert server_flags(dovecot, "Archive") == {"message 3 in INBOX": {"\\Seen"}}
    assert list(internaldates(dovecot, "Archive").values()) == [dates_before["message 3 in INBOX"]]
    assert second.sync() == 0
    assert set(second.files("Archive")) == {"message 3 in INBOX"}
    assert "message 3 in INBOX" not in second.files()
    assert first.sync() == 0
    assert set(first.files("Archive")) == {"message 3 in INBOX"}


def test_deletion_guard_and_allow_deletions(two: tuple[Machine, Machine], dovecot: DovecotUser,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    first, _ = two
    for path in first.files().values():
        path.unlink()
    capfd.readouterr()
    assert first.sync() == 1
    error = capfd.readouterr().err
    assert error.count("\n") == 1 and "INBOX" in error and "--allow-deletions INBOX" in error
    assert len(server_subjects(dovecot)) == 5
    assert first.sync("--allow-deletions", "INBOX") == 0
    assert len(server_subjects(dovecot)) == 0


def test_missing_store_root_changes_nothing(two: tuple[Machine, Machine], dovecot: DovecotUser,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    first, _ = two
    first.root.rename(first.root.with_name("away"))
    capfd.readouterr()
    assert first.sync() == 1
    errors = capfd.readouterr().err.splitlines()
    assert len(errors) == 2 and all("not mounted" in line and "--allow-deletions" not in line for line in errors)
    assert any("acct/INBOX" in line for line in errors)
    assert not first.root.exists()
    assert len(server_subjects(dovecot)) == 5


def test_dry_run_changes_nothing(two: tuple[Machine, Machine], dovecot: DovecotUser,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = two
    first.set_letters("message 1 in INBOX", "S")
    first.files()["message 2 in INBOX"].unlink()
    dovecot.server.add_flags(dovecot.user, "INBOX", [dovecot.server.uids(dovecot.user, "INBOX")[2]], ["\\Flagged"])
    before = sorted(p.name for p in first.root.rglob("*"))
    flags_before = server_flags(dovecot)
    capsys.readouterr()
    assert first.sync("--dry-run") == 0
    out = capsys.readouterr().out
    assert "acct/INBOX: to the server: 1 flag writes, 1 deletions; here: 1 flag renames" in out
    assert sorted(p.name for p in first.root.rglob("*")) == before
    assert server_flags(dovecot) == flags_before
    # A folder with nothing paired and no directory yet: what would come down, not a stop.
    dovecot.server.append_many(dovecot.user, "Archive", [message(7, "Archive")])
    shutil.rmtree(first.folder_dir("Archive"))
    assert first.sync("--dry-run") == 0
    assert "acct/Archive: to the server: nothing; here: 1 downloads" in capsys.readouterr().out
    assert not first.folder_dir("Archive").exists()


def test_uidvalidity_change_loses_and_copies_nothing(two: tuple[Machine, Machine], dovecot: DovecotUser) -> None:
    first, _ = two
    first.set_letters("message 1 in INBOX", "S")
    dovecot.server.change_uidvalidity(dovecot.user, "INBOX")
    time.sleep(0.01)
    assert first.sync() == 0 and first.sync() == 0
    assert len(first.files()) == 5
    assert len(server_subjects(dovecot)) == 5
    assert server_flags(dovecot)["message 1 in INBOX"] == {"\\Seen"}


def test_unchanged_folders_are_not_listed(two: tuple[Machine, Machine], dovecot: DovecotUser) -> None:
    """cur/ and new/ keep their mtimes: the pass trusts the last listing. The proof is a
    change hidden by setting the mtimes back, which the pass then does not see."""
    first, _ = two

    def age_directories() -> tuple[int, int]:
        for sub in ("cur", "new"):
            os.utime(first.root / sub, (1_600_000_000, 1_600_000_000))
        return (first.root / "cur").stat().st_mtime_ns, (first.root / "new").stat().st_mtime_ns

    age_directories()
    assert first.sync() == 0  # lists, and records the mtimes
    first.set_letters("message 1 in INBOX", "S")
    age_directories()
    assert first.sync() == 0
    assert server_flags(dovecot)["message 1 in INBOX"] == set()  # not listed
    (first.root / "cur").touch()
    assert first.sync() == 0
    assert server_flags(dovecot)["message 1 in INBOX"] == {"\\Seen"}


def test_status_shows_each_direction(two: tuple[Machine, Machine], dovecot: DovecotUser,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = two
    first.set_letters("message 1 in INBOX", "S")
    dovecot.server.add_flags(dovecot.user, "INBOX", [dovecot.server.uids(dovecot.user, "INBOX")[1]], ["\\Flagged"])
    assert first.sync() == 0
    capsys.readouterr()
    assert cli.main(["--config", str(first.config), "status"]) == 0
    assert "INBOX: 5 stored; synced" in capsys.readouterr().out
    assert cli.main(["--config", str(first.config), "status", "--json"]) == 0
    [account] = json.loads(capsys.readouterr().out)
    inbox = next(folder for folder in account["folders"] if folder["name"] == "INBOX")
    assert (inbox["pushed"], inbox["pulled"]) == (1, 1)


def test_a_folder_made_here_is_created_on_the_server(tmp_path: Path, dovecot: DovecotUser) -> None:
    folders = '["INBOX", "Archive", "Lists*"]'
    dovecot.server.append_many(dovecot.user, "INBOX", [message(1)])
    first = machine(tmp_path, dovecot, "a", folders=folders)
    assert first.sync() == 0
    for sub in ("cur", "new", "tmp"):
        (first.root / ".Lists.Python" / sub).mkdir(parents=True)
    path = first.files()["message 1 in INBOX"]
    os.rename(path, first.root / ".Lists.Python" / "cur" / path.name)
    (first.root / ".notmuch" / "xapian").mkdir(parents=True)  # not a Maildir folder
    assert first.sync() == 0
    assert "Lists/Python" in dovecot.server.list_folders(dovecot.user)
    assert set(server_subjects(dovecot, "Lists/Python")) == {"message 1 in INBOX"}
    assert not server_subjects(dovecot)
    second = machine(tmp_path, dovecot, "b", folders=folders)
    assert second.sync() == 0
    assert set(second.files("Lists.Python")) == {"message 1 in INBOX"}


def test_moved_to_different_folders_on_both_sides(tmp_path: Path, dovecot: DovecotUser) -> None:
    """Moved here into Archive while another client moved it into Lists: the server's
    folder wins (other machines may show it there already), and nothing is copied."""
    folders = '["INBOX", "Archive", "Lists"]'
    for name in ("Archive", "Lists"):
        dovecot.server.create_folder(dovecot.user, name)
    dovecot.server.append_many(dovecot.user, "INBOX", [message(n) for n in (1, 2, 3)])
    first = machine(tmp_path, dovecot, "a", folders=folders)
    assert first.sync() == 0
    path = first.files()["message 3 in INBOX"]
    os.rename(path, first.folder_dir("Archive") / "cur" / f"{path.name.split(INFO)[0]}{INFO}F")
    with dovecot.server.session(dovecot.user, "INBOX") as conn:
        conn.uid("MOVE", str(dovecot.server.uids(dovecot.user, "INBOX")[2]), "Lists")
    assert first.sync() == 0 and first.sync() == 0
    everywhere = [server_subjects(dovecot, name) for name in ("INBOX", "Archive", "Lists")]
    assert everywhere[2] == {"message 3 in INBOX": 1} and "message 3 in INBOX" not in everywhere[0] + everywhere[1]
    assert "message 3 in INBOX" not in first.files("Archive")
    assert first.letters("Lists") == {"message 3 in INBOX": "F"}
    assert server_flags(dovecot, "Lists")["message 3 in INBOX"] == {"\\Flagged"}


def test_a_folder_emptied_on_the_server_is_not_emptied_here(two: tuple[Machine, Machine],
                                                             dovecot: DovecotUser) -> None:
    first, _ = two
    dovecot.server.expunge(dovecot.user, "INBOX", dovecot.server.uids(dovecot.user, "INBOX"))
    assert first.sync() == 1
    assert len(first.files()) == 5
    assert first.sync("--allow-deletions", "INBOX") == 0
    assert not first.files()


def test_dry_run_of_a_pull_account(tmp_path: Path, dovecot: DovecotUser,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    dovecot.server.append_many(dovecot.user, "INBOX", [message(n) for n in (1, 2)])
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password, extra='folders = ["INBOX"]')
    capsys.readouterr()
    assert cli.main(["--config", str(config), "sync", "--dry-run"]) == 0
    assert "acct/INBOX: here: 2 downloads, 0 flag changes, 0 removals; to the server: nothing" in \
        capsys.readouterr().out
    assert not list((tmp_path / "store-acct").rglob("*:2,*")) and not list((tmp_path / "store-acct").rglob("new/*"))


def test_the_daemon_pushes_a_change_made_in_the_maildir_within_seconds(two: tuple[Machine, Machine],
                                                                        dovecot: DovecotUser) -> None:
    first, _ = two
    config = first.config.read_text().replace("[account.store]", 'interval = "1h"\n\n[account.store]')
    first.config.write_text(config)
    daemon = subprocess.Popen([sys.executable, "-m", "mailsyncd", "--config", str(first.config), "run"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)  # the first pass at start
        first.set_letters("message 1 in INBOX", "FS")
        changed = time.monotonic()
        assert wait_for(lambda: server_flags(dovecot)["message 1 in INBOX"] == {"\\Flagged", "\\Seen"}, 15)
        assert time.monotonic() - changed < 15
    finally:
        daemon.terminate()
        daemon.wait(10)


def test_an_archive_turned_two_way_does_not_upload_what_the_server_deleted(tmp_path: Path,
                                                                          dovecot: DovecotUser) -> None:
    dovecot.server.append_many(dovecot.user, "INBOX", [message(n) for n in (1, 2, 3)])
    mine = machine(tmp_path, dovecot, "a")
    archive = mine.config.read_text()
    mine.config.write_text(archive.replace('mode = "sync"', 'mode = "archive"'))
    assert mine.sync() == 0
    dovecot.server.expunge(dovecot.user, "INBOX", dovecot.server.uids(dovecot.user, "INBOX")[:1])
    assert mine.sync() == 0  # kept here, recorded as gone
    mine.config.write_text(archive)
    assert mine.sync() == 0 and mine.sync() == 0
    assert set(server_subjects(dovecot)) == {"message 2 in INBOX", "message 3 in INBOX"}
    assert len(mine.files()) == 3


def test_an_upload_expunged_by_another_client_is_removed_here(two: tuple[Machine, Machine],
                                                               dovecot: DovecotUser) -> None:
    """Its UID is above the folder's recorded UIDNEXT: the next listing of new UIDs not
    showing it proves it gone."""
    first, _ = two
    (first.root / "cur" / f"1700000000.new.host{INFO}S").write_bytes(normalize(message(99)))
    assert first.sync() == 0
    dovecot.server.expunge(dovecot.user, "INBOX", dovecot.server.uids(dovecot.user, "INBOX")[-1:])
    assert first.sync() == 0
    assert "message 99 in INBOX" not in first.files()
    assert "message 99 in INBOX" not in server_subjects(dovecot)
