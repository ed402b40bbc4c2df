"""Messages over max_message_size kept as placeholders, against the real Dovecot: what a
placeholder holds, that mail readers open it, what it saves on the wire, and that the
whole message replaces it exactly once (by `mailsyncd fetch`, a local flag or a higher
limit), also when the replacement is stopped at any step."""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import os
import random
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.message import header_block
from mailsyncd.stores.maildir import flags_from_name
from tests.conftest import DovecotUser
from tests.helpers import (
    corpus_messages,
    crash_at_step,
    kill_after,
    neomutt,
    normalize,
    run_cli,
    sync,
    write_config,
)
from tests.proxy import CutProxy

MARKER = b"X-Mailsyncd-Placeholder: "


def attachment_message(index: int, attachment_size: int, html: bool = False) -> bytes:
    """A message with a short text (and maybe an HTML alternative) and one binary attachment."""
    message = EmailMessage()
    message["From"] = "Sender <sender@example.org>"
    message["To"] = "me@example.org"
    message["Subject"] = f"Large {index}"
    message["Message-ID"] = f"<large-{index}@example.org>"
    message["Date"] = "Sat, 05 Dec 2026 12:00:00 +0000"
    message.set_content(f"Please find report {index} attached.\n")
    if html:
        message.add_alternative(f"<p>Please find report {index} attached.</p>\n", subtype="html")
    data = random.Random(index).randbytes(attachment_size)
    message.add_attachment(data, maintype="application", subtype="pdf", filename=f"report-{index}.pdf")
    return message.as_bytes(policy=email.policy.SMTP)


def files(root: Path) -> dict[str, bytes]:
    """Every message file of the INBOX (Maildir++ root), by name."""
    return {path.name: path.read_bytes() for sub in ("new", "cur") for path in (root / sub).glob("*")}


def states(config: Path) -> dict[int, str]:
    db = sqlite3.connect(config.parent / "state.db")
    try:
        return dict(db.execute("select uid, state from messages"))
    finally:
        db.close()


def assert_placeholder(data: bytes, server: bytes) -> None:
    """The server's header block byte-exact, then the marker with the server's size."""
    assert data.startswith(header_block(normalize(server)) + MARKER + b"%d\n" % len(server)), data[:2000]


def setup(tmp_path: Path, dovecot: DovecotUser, sizes: list[int], small: int = 20, extra: str = "",
          html: bool = False) -> tuple[Path, dict[int, bytes], list[int]]:
    """Small corpus messages and large ones; returns the config, the server's bytes by
    UID, and the UIDs of the large ones."""
    messages = [path.read_bytes() for path in corpus_messages(small)]
    large = [attachment_message(index, size, html) for index, size in enumerate(sizes)]
    uids = dovecot.server.append_many(dovecot.user, "INBOX", messages + large)
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password,
                          extra='folders = ["INBOX"]\nmax_message_size = "1MB"\n' + extra)
    return config, dovecot.server.fetch_all(dovecot.user, "INBOX"), uids[len(messages):]


def store_root(config: Path) -> Path:
    return load_config(config).accounts[0].store.path


def test_large_messages_become_placeholders_readers_open(tmp_path: Path, dovecot: DovecotUser) -> None:
    config, server, large = setup(tmp_path, dovecot, [1_200_000, 5_000_000, 22_000_000])
    assert len(server[large[-1]]) > 29_000_000  # base64: the largest message is 30 MB on the server
    assert sync(config) == 0
    root = store_root(config)
    stored = files(root)
    assert len(stored) == len(server)
    whole = {normalize(body) for uid, body in server.items() if uid not in large}
    held = [data for data in stored.values() if MARKER in header_block(data)]
    assert {data for data in stored.values() if data not in held} == whole
    assert len(held) == len(large)
    recorded = states(config)
    assert {uid for uid, state in recorded.items() if state == "placeholder"} == set(large)
    for uid in large:
        data = next(data for data in held if b"<large-%d@" % large.index(uid) in data)
        assert_placeholder(data, server[uid])
        # The part list is the server's structure: every leaf, its type and file name.
        original = email.message_from_bytes(server[uid], policy=email.policy.default)
        leaves = [part for part in original.walk() if not part.is_multipart()]
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert parsed.is_multipart() and parsed["Subject"] == original["Subject"]
        note = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        listed = re.findall(r"^  part (\S+), ([^,\s]+)(?:, ([^,]+))?, ([\d,]+) bytes", note, re.MULTILINE)
        assert [(section, kind, name or None) for section, kind, name, _ in listed] == [
            (str(index), leaf.get_content_type(), leaf.get_filename()) for index, leaf in enumerate(leaves, 1)]
        attachment = len(leaves[-1].get_payload())
        assert abs(int(listed[-1][3].replace(",", "")) - attachment) < attachment / 100
        assert f"mailsyncd fetch acct INBOX --uid {uid}" in note

    # Python's mailbox module reads the store, placeholders included.
    box = mailbox.Maildir(root, factory=None, create=False)
    assert sorted(str(message["Subject"]) for message in box if "Large" in str(message["Subject"])) == [
        "Large 0", "Large 1", "Large 2"]
    # notmuch indexes them and shows the note.
    notmuch_config = tmp_path / "notmuch-config"
    notmuch_config.write_text(f"[database]\npath={root}\n[new]\ntags=inbox\n[maildir]\nsynchronize_flags=true\n")
    env = {**os.environ, "NOTMUCH_CONFIG": str(notmuch_config)}
    subprocess.run(["notmuch", "new", "--quiet"], env=env, check=True, capture_output=True)
    found = subprocess.run(["notmuch", "search", "--output=files", "subject:Large"], env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    assert len(found) == 3
    shown = subprocess.run(["notmuch", "show", "--entire-thread=false", "id:large-2@example.org"], env=env,
                           check=True, capture_output=True, text=True).stdout
    assert "over max_message_size" in shown and "report-2.pdf" in shown


def test_text_parts_kept_with_fetch_parts_text(tmp_path: Path, dovecot: DovecotUser) -> None:
    config, server, large = setup(tmp_path, dovecot, [2_000_000], small=3, extra='fetch_parts = "text"\n',
                                  html=True)
    assert sync(config) == 0
    (data,) = [data for data in files(store_root(config)).values() if MARKER in header_block(data)]
    assert_placeholder(data, server[large[0]])
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    texts = [part.get_content().strip() for part in parsed.walk()
             if part.get_content_type() in ("text/plain", "text/html")]
    assert "Please find report 0 attached." in texts
    assert "<p>Please find report 0 attached.</p>" in texts
    assert any("[left out: part 2, application/pdf, report-0.pdf" in text for text in texts)
    assert len(data) < 10_000


def test_fetch_replaces_exactly_one_keeping_its_flags(tmp_path: Path, dovecot: DovecotUser) -> None:
    config, server, large = setup(tmp_path, dovecot, [1_500_000, 1_600_000, 1_700_000], small=5)
    dovecot.server.add_flags(dovecot.user, "INBOX", [large[0]], ["\\Seen", "\\Answered"])
    assert sync(config) == 0
    root = store_root(config)
    before = files(root)
    (name,) = [name for name, data in before.items() if b"<large-0@" in header_block(data)]
    assert flags_from_name(name) == {"\\Seen", "\\Answered"}

    result = run_cli(config, "fetch", "acct", "INBOX", "--uid", str(large[0]))
    assert result.returncode == 0, result.stderr
    after = files(root)
    assert set(after) == set(before)  # the same names: flags kept, nothing added, nothing lost
    assert after[name] == normalize(server[large[0]])
    assert {n: d for n, d in after.items() if n != name} == {n: d for n, d in before.items() if n != name}
    assert states(config)[large[0]] == "stored"
    assert dovecot.server.flags(dovecot.user, "INBOX")[large[1]] == set()  # BODY.PEEK: still unseen

    status = json.loads(run_cli(config, "status", "--json").stdout)
    (inbox,) = [folder for folder in status[0]["folders"] if folder["name"] == "INBOX"]
    assert inbox["messages"]["placeholder"] == 2
    assert [(entry["uid"], entry["message_id"]) for entry in inbox["placeholders"]] == [
        (large[1], "<large-1@example.org>"), (large[2], "<large-2@example.org>")]
    by_id = run_cli(config, "fetch", "acct", "INBOX", "--message-id", "<large-1@example.org>")
    assert by_id.returncode == 0, by_id.stderr
    again = run_cli(config, "fetch", "acct", "INBOX", "--uid", str(large[0]))
    assert again.returncode == 1 and "no placeholder" in again.stderr and len(again.stderr.splitlines()) == 1
    final = files(root)
    assert len(final) == len(server)
    assert sum(MARKER in header_block(data) for data in final.values()) == 1
    assert sync(config) == 0 and files(root) == final  # a sync after it changes nothing


def test_flagging_a_placeholder_or_raising_the_limit_fetches_it_whole(tmp_path: Path,
                                                                      dovecot: DovecotUser) -> None:
    config, server, large = setup(tmp_path, dovecot, [1_500_000, 1_600_000], small=5)
    assert sync(config) == 0
    root = store_root(config)
    (path,) = [root / sub / name for sub in ("new", "cur") for name, data in files(root).items()
               if (root / sub / name).exists() and b"<large-0@" in header_block(data)]
    flagged = root / "cur" / (path.name.split(":2,")[0] + ":2,F")
    path.rename(flagged)  # what a mail reader does when the user flags the message
    assert sync(config) == 0
    assert flagged.read_bytes() == normalize(server[large[0]])
    assert states(config)[large[0]] == "stored" and states(config)[large[1]] == "placeholder"

    config.write_text(config.read_text().replace('max_message_size = "1MB"', 'max_message_size = "100MB"'))
    assert sync(config) == 0
    stored = files(root)
    assert sorted(stored.values()) == sorted(normalize(body) for body in server.values())
    assert set(states(config).values()) == {"stored"}


def fetching(uid: int) -> Callable[[App, Any, Callable[[str], None]], object]:
    def work(app: App, account: Any, checkpoint: Callable[[str], None]) -> object:
        return app.fetch_whole(account, "INBOX", str(uid), None, checkpoint=checkpoint)
    return work


def test_replacement_stopped_at_every_step_leaves_one_copy(tmp_path: Path, dovecot: DovecotUser) -> None:
    messages = [path.read_bytes() for path in corpus_messages(3)] + [attachment_message(0, 1_500_000)]
    uids = dovecot.server.append_many(dovecot.user, "INBOX", messages)
    server = dovecot.server.fetch_all(dovecot.user, "INBOX")
    large = uids[-1]

    def prepared(directory: Path) -> Path:
        directory.mkdir()
        config = write_config(directory, dovecot.server, dovecot.user, dovecot.password,
                              extra='folders = ["INBOX"]\nmax_message_size = "1MB"\n')
        assert sync(config) == 0
        return config

    steps = crash_at_step(prepared(tmp_path / "reference"), 10**9, fetching(large)) - 1
    assert steps >= 4  # intent, fetched, write, commit, recorded
    whole = normalize(server[large])
    for step in range(1, steps + 1):
        config = prepared(tmp_path / f"k{step}")
        root = store_root(config)
        assert crash_at_step(config, step, fetching(large)) == step
        # Killed here: the placeholder or the whole message, never neither, never both.
        copies = [data for data in files(root).values() if b"<large-0@" in header_block(data)]
        assert len(copies) == 1, step
        assert copies[0] == whole or copies[0].startswith(header_block(whole) + MARKER), step
        assert len(files(root)) == len(server)
        assert sync(config) == 0  # recovery settles the replacement either way
        if states(config)[large] == "placeholder":
            assert run_cli(config, "fetch", "acct", "INBOX", "--uid", str(large)).returncode == 0
        assert states(config)[large] == "stored", step
        assert sorted(files(root).values()) == sorted(normalize(body) for body in server.values()), step
        assert not list((root / "tmp").iterdir()), step


def first_sync_bytes(tmp_path: Path, dovecot: DovecotUser, limit: str | None) -> int:
    """Bytes the server sent during a first sync, counted by a proxy in between."""
    with CutProxy(dovecot.server.host, dovecot.server.imaps_port) as proxy:
        tmp_path.mkdir()
        config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password,
                              extra='folders = ["INBOX"]\n' + (f'max_message_size = "{limit}"\n' if limit else ""))
        config.write_text(config.read_text().replace(f"port = {dovecot.server.imaps_port}", f"port = {proxy.port}"))
        assert sync(config) == 0
        return proxy.bytes_to_client


def test_placeholders_cost_a_fraction_of_the_bytes(tmp_path: Path, dovecot: DovecotUser,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    small = [path.read_bytes() for path in corpus_messages(900)[::5][:180]]
    total_small = sum(len(data) for data in small)
    # 10% of the messages hold 95% of the bytes.
    large = [attachment_message(index, total_small * 19 // 20 * 3 // 4) for index in range(20)]
    dovecot.server.append_many(dovecot.user, "INBOX", small + large)
    on_server = sum(len(data) for data in dovecot.server.fetch_all(dovecot.user, "INBOX").values())
    full = first_sync_bytes(tmp_path / "full", dovecot, None)
    partial = first_sync_bytes(tmp_path / "partial", dovecot, "200KB")
    with capsys.disabled():
        print(f"\nfirst sync of {len(small) + len(large)} messages ({on_server} bytes on the server, "
              f"{sum(len(data) for data in large) * 100 // (total_small + sum(len(d) for d in large))}% in the "
              f"largest 10%): {full} bytes received whole, {partial} bytes with placeholders "
              f"({partial * 100 / full:.1f}%)")
    assert full > on_server
    assert partial < full * 0.10


def test_pop3_placeholders_from_top_then_fetched_by_uidl(tmp_path: Path, dovecot: DovecotUser) -> None:
    messages = [path.read_bytes() for path in corpus_messages(4)] + [attachment_message(0, 1_500_000)]
    dovecot.server.append_many(dovecot.user, "INBOX", messages)
    server = dovecot.server.fetch_all(dovecot.user, "INBOX")
    large = max(server, key=lambda uid: len(server[uid]))
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password, protocol="pop3",
                          extra='max_message_size = "1MB"\nleave_on_server = false')
    assert sync(config) == 0
    root = store_root(config)
    db = sqlite3.connect(config.parent / "state.db")
    try:
        (uidl,) = [uidl for (uidl,) in db.execute("select uidl from pop_messages where state = 'placeholder'")]
    finally:
        db.close()
    held = [data for data in files(root).values() if MARKER in header_block(data)]
    assert len(held) == 1 and b"POP3 shows only the header block" in held[0]
    assert held[0].startswith(header_block(normalize(server[large])) + MARKER)
    assert f"mailsyncd fetch acct INBOX --uid {uidl}" in held[0].decode()
    # leave_on_server = false deleted what is stored whole, and only that.
    assert set(dovecot.server.fetch_all(dovecot.user, "INBOX")) == {large}

    result = run_cli(config, "fetch", "acct", "INBOX", "--uid", uidl)
    assert result.returncode == 0, result.stderr
    assert sorted(files(root).values()) == sorted(normalize(body) for body in server.values())
    assert sync(config) == 0  # now stored whole, so leave_on_server = false deletes it
    assert dovecot.server.fetch_all(dovecot.user, "INBOX") == {}


def test_kill_9_during_replacement_at_random_moments(tmp_path: Path, dovecot: DovecotUser) -> None:
    messages = [attachment_message(index, 3_000_000) for index in range(3)]
    uids = dovecot.server.append_many(dovecot.user, "INBOX", messages)
    server = dovecot.server.fetch_all(dovecot.user, "INBOX")
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password,
                          extra='folders = ["INBOX"]\nmax_message_size = "1MB"\n')
    assert sync(config) == 0
    root = store_root(config)
    chance = random.Random(15)
    for round_number in range(12):
        uid = uids[round_number % len(uids)]
        if states(config)[uid] == "placeholder":
            argv = [sys.executable, "-m", "mailsyncd", "--config", str(config), "fetch", "acct", "INBOX",
                    "--uid", str(uid)]
            kill_after(argv, chance.uniform(0.2, 1.5))
        # Killed anywhere: each message is there once, as placeholder or whole.
        stored = files(root)
        assert len(stored) == len(server), round_number
        for index, uid_of in enumerate(uids):
            (copy,) = [data for data in stored.values() if b"<large-%d@" % index in header_block(data)]
            assert copy == normalize(server[uid_of]) or copy.startswith(
                header_block(normalize(server[uid_of])) + MARKER), round_number
    assert sync(config) == 0
    for uid in uids:
        if states(config)[uid] == "placeholder":
            assert run_cli(config, "fetch", "acct", "INBOX", "--uid", str(uid)).returncode == 0
    assert sorted(files(root).values()) == sorted(normalize(body) for body in server.values())
    assert set(states(config).values()) == {"stored"}


def test_neomutt_shows_a_placeholder(tmp_path: Path, dovecot: DovecotUser) -> None:
    config, _, _ = setup(tmp_path, dovecot, [1_500_000], small=2)
    assert sync(config) == 0
    with neomutt(store_root(config), tmp_path / "home") as keys:
        index = keys("")
        assert "Large 0" in index, index
        # Find the placeholder and open it: its note is the text neomutt shows.
        shown = keys("/ Large Enter Enter")
        assert "over max_message_size" in shown and "report-0.pdf" in shown, shown
        keys("q")  # back from the pager to the index, which the helper quits
