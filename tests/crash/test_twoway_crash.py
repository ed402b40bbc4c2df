"""Invariant 9 under fire: a two-way pass stopped at any instant, then run again, ends
where an uninterrupted pass ends: no change of either side lost, no message twice on
either side (no second APPEND after a kill between the APPEND and its answer).

Two kinds of stop, as for the pull path: at every effect step in turn (a forked child
calls os._exit at step k, skipping every finally block, as a kill does), and SIGKILL
of real `mailsyncd sync` processes at random moments while they push and pull.
"""

from __future__ import annotations

import os
import random
import secrets
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mailsyncd.stores.maildir import INFO
from tests.conftest import DovecotUser
from tests.helpers import crash_at_step, kill_after, normalize
from tests.server_helpers import DevServer
from tests.twoway_helpers import Machine, machine, message, server_flags, server_subjects

FOLDERS = ("INBOX", "Archive")


def bare(number: int) -> bytes:
    """A message without a Message-ID: only its bytes can tell it apart."""
    return f"From: a@example.org\r\nSubject: bare {number}\r\n\r\nno id {number}\r\n".encode()


def new_user(server: DevServer) -> DovecotUser:
    user = DovecotUser(server, f"crash{secrets.token_hex(4)}", secrets.token_urlsafe(12))
    server.add_user(user.user, user.password)
    return user


def prepare(tmp_path: Path, server: DevServer, name: str, extra: str = "") -> tuple[DovecotUser, Machine]:
    """A synced machine, then changes on both sides: every kind of effect in one pass."""
    user = new_user(server)
    server.create_folder(user.user, "Archive")
    server.append_many(user.user, "INBOX", [message(n) for n in range(1, 9)] + [bare(1)])
    server.append_many(user.user, "Archive", [message(n, "Archive") for n in (1, 2)])
    mine = machine(tmp_path, user, name, extra)
    assert mine.sync() == 0
    mine.set_letters("message 1 in INBOX", "S")
    mine.set_letters("message 2 in INBOX", "FS")
    mine.files()["message 3 in INBOX"].unlink()
    mine.set_letters("message 4 in INBOX", "T")
    draft = mine.root / "cur" / f"1700000000.draft.host{INFO}DS"
    draft.write_bytes(normalize(message(50)))
    os.utime(draft, (1_600_000_000, 1_600_000_000))
    (mine.folder_dir("Archive") / "new" / "1700000001.bare.host").write_bytes(normalize(bare(2)))
    moved = mine.files()["message 5 in INBOX"]
    os.rename(moved, mine.folder_dir("Archive") / "cur" / f"{moved.name.split(INFO)[0]}{INFO}S")
    mine.files()["message 6 in INBOX"].unlink()  # while the server answers it: a conflict
    mine.set_letters("message 7 in INBOX", "F")  # while the server expunges it: a conflict
    uids = server.uids(user.user, "INBOX")
    server.add_flags(user.user, "INBOX", [uids[5]], ["\\Answered"])
    server.expunge(user.user, "INBOX", [uids[6]])
    server.append_many(user.user, "INBOX", [message(60)])
    with server.session(user.user, "INBOX") as conn:  # another client files message 8
        conn.uid("MOVE", str(uids[7]), "Archive")
    return user, mine


def state(user: DovecotUser, mine: Machine) -> dict[str, object]:
    """Both sides by subject, with their flags; and what the database still owes."""
    db = sqlite3.connect(mine.config.parent / "state.db")
    try:
        owed = db.execute("select count(*) from push_intents").fetchone()[0] + db.execute(
            "select count(*) from messages where state = 'pending'").fetchone()[0]
    finally:
        db.close()
    return {
        "server": {folder: sorted((subject, tuple(sorted(flags))) for subject, flags in
                                  server_flags(user, folder).items()) for folder in FOLDERS},
        "most server copies": {folder: max(server_subjects(user, folder).values()) for folder in FOLDERS},
        "local": {folder: sorted(mine.letters(folder).items()) for folder in FOLDERS},
        "owed": owed,
    }


@pytest.mark.parametrize(("server_kind", "extra"), [("dovecot_server", ""), ("dovecot_server", 'expunge = "never"'),
                                                    ("plain_server", "")])
def test_stop_at_every_step_then_resume(tmp_path: Path, server_kind: str, extra: str,
                                        request: pytest.FixtureRequest) -> None:
    """On Dovecot as it is (expunging our own deletions, or only marking them), and on
    one without UIDPLUS, MOVE and CONDSTORE."""
    server: DevServer = request.getfixturevalue(server_kind)
    user, reference = prepare(tmp_path, server, "reference", extra)
    steps = crash_at_step(reference.config, 10**9) - 1
    assert reference.sync() == 0
    wanted = state(user, reference)
    assert wanted["owed"] == 0
    assert ("message 2 in INBOX", ("\\Flagged", "\\Seen")) in wanted["server"]["INBOX"]  # type: ignore[index]
    assert ("message 6 in INBOX", ("\\Answered",)) in wanted["server"]["INBOX"]  # type: ignore[index]
    assert ("message 7 in INBOX", ("\\Flagged",)) in wanted["server"]["INBOX"]  # type: ignore[index]
    assert ("message 8 in INBOX", "") in wanted["local"]["Archive"]  # type: ignore[index]
    assert steps >= 15
    for step in range(1, steps + 1):
        user, mine = prepare(tmp_path, server, f"k{step}", extra)
        assert crash_at_step(mine.config, step) == step
        assert mine.sync() == 0
        assert mine.sync() == 0
        assert state(user, mine) == wanted, f"stopped at step {step} of {steps}"


@pytest.mark.slow
def answer_on_the_server(dovecot: DovecotUser, model: dict[str, tuple[str, str]], rng: random.Random) -> str | None:
    """Another client toggles \\Answered on a message the server has, and the model follows;
    returns its subject."""
    folder = rng.choice(FOLDERS)
    flags = dovecot.server.flags(dovecot.user, folder)
    subjects = {uid: next(line for line in normalize(body).split(b"\n") if line.startswith(b"Subject:"))
                .decode()[len("Subject: "):] for uid, body in dovecot.server.fetch_all(dovecot.user, folder).items()}
    candidates = sorted(uid for uid, subject in subjects.items() if subject in model and "\\Deleted" not in flags[uid])
    if not candidates:
        return None
    uid = rng.choice(candidates)
    if "\\Answered" in flags[uid]:
        dovecot.server.remove_flags(dovecot.user, folder, [uid], ["\\Answered"])
    else:
        dovecot.server.add_flags(dovecot.user, folder, [uid], ["\\Answered"])
    where, letters = model[subjects[uid]]
    model[subjects[uid]] = (where, "".join(sorted(set(letters) ^ {"R"})))
    return subjects[uid]


def test_random_sigkills_while_pushing_and_pulling(tmp_path: Path, dovecot: DovecotUser) -> None:
    """Kill -9 of real processes at 30+ random moments, each during a pass with changes
    of every kind made on machine A while another client answers messages on the server
    (A changes F and S, the other client R, so the model knows each flag's last word);
    then clean runs on A and B. Every message is on the server once, and A, B and the
    server agree on folders and flags, as the model says."""
    server = dovecot.server
    server.create_folder(dovecot.user, "Archive")
    server.append_many(dovecot.user, "INBOX", [message(n, size=2000) for n in range(1, 121)])
    first, second = machine(tmp_path, dovecot, "a"), machine(tmp_path, dovecot, "b")
    assert first.sync() == 0
    rng = random.Random("two-way kills")
    model: dict[str, tuple[str, str]] = {f"message {n} in INBOX": ("INBOX", "") for n in range(1, 121)}
    argv = [sys.executable, "-m", "mailsyncd", "--config", str(first.config), "-q", "sync"]
    started = time.monotonic()
    assert kill_after(argv, 60) == 0
    whole = max(time.monotonic() - started, 0.5)
    kills = attempt = created = cut_short = 0
    answered: set[str | None] = set()
    while kills < 30 and attempt < 120:
        attempt += 1
        for _ in range(10):
            live = sorted(model)
            subject = rng.choice(live)
            folder, letters = model[subject]
            action = rng.choice(["flag", "flag", "delete", "move", "new"])
            if action == "flag":
                # The file's own letters: R there is what the last pass pulled, not news.
                toggled = set(first.letters(folder)[subject]) ^ {rng.choice("FS")}
                first.set_letters(subject, "".join(sorted(toggled)), folder)
                model[subject] = (folder, "".join(sorted((set(letters) & {"R"}) | (toggled - {"R"}))))
            elif action == "delete" and len(live) > 40 and subject not in answered:
                # (One the other client answered could be a conflict, kept by rule.)
                first.files(folder)[subject].unlink()
                del model[subject]
            elif action == "move":
                target = "Archive" if folder == "INBOX" else "INBOX"
                path = first.files(folder)[subject]
                os.rename(path, first.folder_dir(target) / path.parent.name / path.name)
                model[subject] = (target, letters)
            else:
                created += 1
                path = first.folder_dir(folder) / "cur" / f"17000{created}.new.host{INFO}S"
                path.write_bytes(normalize(message(1000 + created, size=3000)))
                model[f"message {1000 + created} in INBOX"] = (folder, "S")
        answered.add(answer_on_the_server(dovecot, model, rng))
        status = kill_after(argv, rng.uniform(0.2, whole))
        if status == -9:
            kills += 1
            cut_short += first.intents() > 0
        else:
            assert status == 0
            whole = max(whole * 0.85, 0.3)  # it finished first: aim earlier from now on
    assert kills >= 30, f"only {kills} of {attempt} runs were killed"
    assert cut_short >= 3, f"only {cut_short} kills landed between an intent and its record"
    for _ in range(2):
        assert first.sync() == 0
    assert second.sync() == 0
    for folder in FOLDERS:
        wanted = {subject: letters for subject, (where, letters) in model.items() if where == folder}
        assert first.letters(folder) == wanted, folder
        assert second.letters(folder) == wanted, folder
        on_server = server_subjects(dovecot, folder)
        assert on_server == Counter(wanted.keys()), folder  # each message once
        flags = server_flags(dovecot, folder)
        letters_of = {"\\Flagged": "F", "\\Answered": "R", "\\Seen": "S"}
        assert {s: "".join(sorted(letters_of[f] for f in fl)) for s, fl in flags.items()} == wanted


def test_a_flag_write_cut_short_then_undone_by_the_user(tmp_path: Path, dovecot: DovecotUser) -> None:
    """Killed after the STORE reached the server but before the base moved; the user then
    takes the change back. Recovery counts the write into the base, so the user's last
    word (no \\Seen) wins; without it the server's \\Seen would be pulled back in."""
    dovecot.server.append_many(dovecot.user, "INBOX", [message(1), message(2)])
    mine = machine(tmp_path, dovecot, "a")
    assert mine.sync() == 0
    mine.set_letters("message 1 in INBOX", "S")
    step = 0
    while not server_flags(dovecot)["message 1 in INBOX"]:
        step += 1
        assert crash_at_step(mine.config, step) == step
    assert mine.intents() == 1  # stopped between the STORE and its record
    mine.set_letters("message 1 in INBOX", "")
    assert mine.sync() == 0
    assert server_flags(dovecot)["message 1 in INBOX"] == set()
    assert mine.letters()["message 1 in INBOX"] == ""
