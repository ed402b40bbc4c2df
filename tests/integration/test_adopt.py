"""A lost state database costs no duplicate (invariant 10): pointed at a store that holds
mail, a new state database indexes the store, matches it with the server and downloads
only what is missing; nothing is removed, local-only mail included. ``mailsyncd adopt``
does the same on purpose for a Maildir written by mbsync. Downloads are counted on the
wire, through a proxy between mailsyncd and the real Dovecot."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.message import message_id, without_marks
from mailsyncd.sync.effects import Counts
from tests.conftest import DovecotUser
from tests.helpers import (
    corpus_messages,
    maildir_contents,
    mbox_contents,
    neomutt,
    normalize,
    run_cli,
    write_config,
)
from tests.proxy import CutProxy

LOSSES = ["deleted", "zeroed", "replaced"]
LOCAL_ONLY = b"From: me@example.org\nSubject: written here, never on the server\nMessage-ID: <local@x>\n\nmine\n"


@pytest.fixture
def proxy(dovecot: DovecotUser) -> Iterator[CutProxy]:
    with CutProxy(dovecot.server.host, dovecot.server.imaps_port, dovecot.server.host) as running:
        yield running


def via(config: Path, port: int) -> Path:
    config.write_text(re.sub(r"(?m)^port = \d+$", f"port = {port}", config.read_text()))
    return config


def sync_counts(config: Path) -> Counts:
    loaded = load_config(config)
    with App.open(loaded) as app:
        return app.sync_account(loaded.accounts[0])


def lose_state(tmp_path: Path, config: Path, how: str) -> None:
    """The state database deleted, zeroed, or replaced by another machine's that never
    saw this store."""
    state = Path(load_config(config).general.state)
    for extra in (Path(f"{state}-wal"), Path(f"{state}-shm")):
        extra.unlink(missing_ok=True)
    if how == "deleted":
        state.unlink()
    elif how == "zeroed":
        state.write_bytes(b"")
    else:
        other = tmp_path / "elsewhere"
        other.mkdir()
        other_config = other / "config.toml"
        other_config.write_text(config.read_text().replace(str(state), str(other / "state.db")))
        assert run_cli(other_config, "db", "upgrade").returncode == 0
        shutil.copyfile(other / "state.db", state)


def unmarked(bags: dict[str, Counter[bytes]]) -> dict[str, Counter[bytes]]:
    """Each message without the fields mail readers and we add to an mbox copy."""
    return {folder: Counter({without_marks(data): count for data, count in bag.items()})
            for folder, bag in bags.items()}


def store_bags(root: Path, store_format: str) -> dict[str, Counter[bytes]]:
    return maildir_contents(root) if store_format == "maildir" else unmarked(mbox_contents(root, False))


def add_local_only(root: Path, store_format: str) -> None:
    """Mail another program wrote into the store: it must stay, once."""
    if store_format == "maildir":
        (root / "cur" / "1700000000.local.example:2,S").write_bytes(LOCAL_ONLY)
    else:
        with (root / "INBOX").open("ab") as handle:
            handle.write(b"\nFrom me@example.org Sat Jan  6 10:00:00 2024\n" + LOCAL_ONLY + b"\n")


def mail(number: int, size: int = 6000) -> bytes:
    """A message as mail usually is: with a Message-ID, so a listing can match it."""
    body = b"".join(b"line %d of message %d, some text to make it long enough\r\n" % (line, number)
                    for line in range(size // 50))
    return (b"From: sender%d@example.org\r\nTo: me@example.org\r\nSubject: message %d\r\n"
            b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <m%d@example.org>\r\n\r\n" % (
                number, number, number)) + body


def corpus_and_mail(count: int, without_id: int) -> list[bytes]:
    """``count`` messages: ``without_id`` of the corpus (which mostly has no Message-ID,
    so only its content can match it), the rest ``mail``."""
    return [path.read_bytes() for path in corpus_messages(without_id)][:without_id] + [
        mail(number) for number in range(count - without_id)]


def expected_bag(messages: list[bytes], store_format: str) -> Counter[bytes]:
    bag: Counter[bytes] = Counter()
    for data in messages:
        data = normalize(data)
        bag[data + (b"\n" if store_format == "mbox" and not data.endswith(b"\n") else b"")] += 1
    return bag


@pytest.mark.parametrize("how", LOSSES)
@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_a_lost_state_database_downloads_nothing_twice(tmp_path: Path, dovecot: DovecotUser, proxy: CutProxy,
                                                       store_format: str, how: str) -> None:
    server = dovecot.server
    files = corpus_and_mail(70, 10)
    inbox, lists, new = files[:40], files[40:60], files[60:]
    by_content = sum(len(data) for data in files[:10] if message_id(data) is None)
    server.append_many(dovecot.user, "INBOX", inbox)
    server.append_many(dovecot.user, "Lists/debian", lists)
    server.add_flags(dovecot.user, "INBOX", range(1, 11), ["\\Seen"])
    config = via(write_config(tmp_path, server, dovecot.user, dovecot.password, store_format), proxy.port)
    root = load_config(config).accounts[0].store.path
    first = sync_counts(config)
    assert first.fetched == 60
    full_download = proxy.bytes_to_client
    add_local_only(root, store_format)
    before = store_bags(root, store_format)

    lose_state(tmp_path, config, how)
    server.append_many(dovecot.user, "INBOX", new)
    proxy.bytes_to_client = 0
    counts = sync_counts(config)
    downloaded = proxy.bytes_to_client
    new_bytes = sum(len(data) for data in new)
    print(f"{store_format}/{how}: first sync {full_download} bytes on the wire; after the loss {downloaded} "
          f"bytes for {new_bytes} bytes of new mail")

    assert (counts.fetched, counts.adopted) == (10, 60)
    # On the wire: the new mail, listings and Message-IDs, the bodies of old messages
    # without a Message-ID (compared by content), never the other old bodies again.
    assert downloaded < new_bytes + by_content + full_download // 10
    after = store_bags(root, store_format)
    inbox_key = "" if store_format == "maildir" else "INBOX"
    grown = {folder: bag.copy() for folder, bag in before.items()}
    grown[inbox_key] += expected_bag(new, store_format)
    assert after == grown  # each message once, the local-only one still there
    assert sync_counts(config).fetched == 0


def test_the_main_test_fails_when_the_store_is_not_indexed(tmp_path: Path, dovecot: DovecotUser,
                                                           proxy: CutProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above can fail: without the index step every message is stored twice."""
    from mailsyncd.sync import imap as imap_sync

    monkeypatch.setattr(imap_sync.FolderSync, "index_store", lambda self, known: False)
    with pytest.raises(AssertionError):
        test_a_lost_state_database_downloads_nothing_twice(tmp_path, dovecot, proxy, "maildir", "deleted")


@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_pop3_after_a_lost_state_database_stores_nothing_twice(tmp_path: Path, dovecot: DovecotUser,
                                                               store_format: str) -> None:
    server = dovecot.server
    files = [path.read_bytes() for path in corpus_messages(30)]
    server.append_many(dovecot.user, "INBOX", files[:25])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password, store_format, protocol="pop3")
    root = load_config(config).accounts[0].store.path
    assert sync_counts(config).fetched == 25
    add_local_only(root, store_format)
    before = store_bags(root, store_format)
    lose_state(tmp_path, config, "deleted")
    server.append_many(dovecot.user, "INBOX", files[25:])
    counts = sync_counts(config)
    assert (counts.fetched, counts.adopted) == (5, 25)
    inbox_key = "" if store_format == "maildir" else "INBOX"
    before[inbox_key] += expected_bag(files[25:], store_format)
    assert store_bags(root, store_format) == before
    assert sync_counts(config).fetched == 0


def test_mbox_rewritten_by_neomutt_then_state_lost(tmp_path: Path, dovecot: DovecotUser, proxy: CutProxy) -> None:
    """neomutt rewrote every message's Status: fields (and every offset): still found."""
    server = dovecot.server
    files = corpus_and_mail(12, 0)
    server.append_many(dovecot.user, "INBOX", files)
    config = via(write_config(tmp_path, server, dovecot.user, dovecot.password, "mbox"), proxy.port)
    root = load_config(config).accounts[0].store.path
    assert sync_counts(config).fetched == 12
    original = (root / "INBOX").read_bytes()
    with neomutt(root / "INBOX", tmp_path / "home") as keys:
        keys("F")  # flag the first message: neomutt writes the whole file back on quit
    assert (root / "INBOX").read_bytes() != original, "neomutt did not rewrite the mbox"
    before = store_bags(root, "mbox")
    lose_state(tmp_path, config, "deleted")
    proxy.bytes_to_client = 0
    counts = sync_counts(config)
    assert (counts.fetched, counts.adopted) == (0, 12)
    assert proxy.bytes_to_client < sum(len(data) for data in files) // 5
    assert store_bags(root, "mbox") == before
    assert sync_counts(config).fetched == 0


MBSYNCRC = """IMAPAccount test
Host {host}
Port {port}
User {user}
Pass {password}
SSLType IMAPS
CertificateFile {ca}

IMAPStore remote
Account test

MaildirStore local
Inbox {store}
SubFolders Maildir++

Channel all
Far :remote:
Near :local:
Patterns *
Create Near
Sync Pull
SyncState *
"""


def tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_adopt_a_maildir_written_by_mbsync(tmp_path: Path, dovecot: DovecotUser, proxy: CutProxy) -> None:
    server = dovecot.server
    files = corpus_and_mail(45, 5)
    server.append_many(dovecot.user, "INBOX", files[:30])
    server.append_many(dovecot.user, "Archive", files[30:40])
    server.add_flags(dovecot.user, "INBOX", [1, 2, 3], ["\\Seen", "\\Flagged"])
    config = via(write_config(tmp_path, server, dovecot.user, dovecot.password), proxy.port)
    root = load_config(config).accounts[0].store.path
    rc = tmp_path / "mbsyncrc"
    # localhost: mbsync checks the name in the certificate, which holds no IP address for it.
    rc.write_text(MBSYNCRC.format(host="localhost", port=server.imaps_port, user=dovecot.user,
                                  password=dovecot.password, ca=server.ca_file, store=root))
    done = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert len(maildir_contents(root)[""]) == 30 and len(maildir_contents(root)[".Archive"]) == 10
    assert any(b"X-TUID: " in data for data in maildir_contents(root)[""]), "mbsync marks its copies"
    (root / "cur" / "1700000000.local.example:2,S").write_bytes(LOCAL_ONLY)
    server.append_many(dovecot.user, "INBOX", files[40:])
    written = tree(root)

    proxy.bytes_to_client = 0
    dry = run_cli(config, "adopt", "acct", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    inbox = re.search(r"INBOX: 31 messages in the store: (\d+) matched by Message-ID and size, (\d+) to fetch "
                      r"\(compared by content first\), (\d+) local only so far", dry.stdout)
    assert inbox, dry.stdout
    matched, fetch, local_only = map(int, inbox.groups())
    # All 25 mail messages by their listing; a corpus message (most have no Message-ID)
    # is fetched and compared by content, and is local only until then.
    assert matched >= 25 and matched + fetch == 35 and local_only == fetch - 5 + 1
    assert "Archive: 10 messages in the store: 10 matched by Message-ID and size, 0 to fetch" in dry.stdout
    assert tree(root) == written  # the dry run changed nothing
    listing_only = proxy.bytes_to_client

    proxy.bytes_to_client = 0
    real = run_cli(config, "adopt", "acct")
    assert real.returncode == 0, real.stderr
    assert "40 matched and recorded where they lie, 5 new stored" in real.stdout, real.stdout
    assert "1 local only (kept, never removed)" in real.stdout
    new_bytes = sum(len(data) for data in files[40:])
    print(f"mbsync adopt: dry run {listing_only} bytes, adopt {proxy.bytes_to_client} bytes on the wire "
          f"for {new_bytes} bytes of new mail")
    # The new mail, the corpus messages (compared by content), and the listing (twice:
    # the preview's and the sync's); none of the other 35 old bodies.
    assert proxy.bytes_to_client < new_bytes + sum(len(data) for data in files[:5]) + 2 * listing_only
    after = maildir_contents(root)
    assert after[""] == Counter({**maildir_contents_of(written, ""), **expected_bag(files[40:], "maildir")})
    assert after[".Archive"] == maildir_contents_of(written, ".Archive")
    again = run_cli(config, "-q", "sync")
    assert again.returncode == 0 and maildir_contents(root) == after


def maildir_contents_of(files: dict[str, bytes], folder: str) -> Counter[bytes]:
    prefix = f"{folder}/" if folder else ""
    return Counter(data for name, data in files.items()
                   if name.startswith(prefix) and name[len(prefix):].split("/")[0] in ("cur", "new")
                   and name.count("/") == prefix.count("/") + 1)


def test_adopt_a_maildir_as_getmail_writes_it(tmp_path: Path, dovecot: DovecotUser) -> None:
    """getmail puts Delivered-To:, Return-Path: and Received: on top of what it stores, so
    neither the size nor the digest matches: each message is fetched, found to be its
    copy with fields added, and not stored a second time (by Message-ID: a message without
    one is stored beside such a copy)."""
    server = dovecot.server
    files = corpus_and_mail(20, 0)
    server.append_many(dovecot.user, "INBOX", files)
    config = write_config(tmp_path, server, dovecot.user, dovecot.password)
    root = load_config(config).accounts[0].store.path
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True)
    for number, data in enumerate(files):
        added = (b"Return-Path: <sender@example.org>\nDelivered-To: me@example.org\nReceived: from pop.example.org "
                 b"by laptop with POP3 (getmail 6.19)\n\tfor <me@example.org>; Mon, 1 Jan 2024 10:00:00 +0000\n")
        (root / "new" / f"1700000000.M{number}P1.laptop").write_bytes(added + normalize(data))
    before = maildir_contents(root)
    real = run_cli(config, "adopt", "acct")
    assert real.returncode == 0, real.stderr
    assert "20 matched and recorded where they lie, 0 new stored" in real.stdout, real.stdout
    assert maildir_contents(root) == before
    assert sync_counts(config).fetched == 0


STOP_AT_STEP = """
import os, sys
from pathlib import Path
from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.state import db

steps = 0

def checkpoint(_name):
    global steps
    steps += 1
    if steps == int(sys.argv[2]):
        os._exit(9)  # skips every finally block, as a kill does

loaded = load_config(Path(sys.argv[1]))
with db.instance_lock(loaded.general.state):
    App.open(loaded).sync_account(loaded.accounts[0], checkpoint=checkpoint)
"""


def stop_at_step(config: Path, step: int) -> bool:
    """One sync in a process of its own that dies at effect step ``step``; False when
    it finished first."""
    done = subprocess.run([sys.executable, "-c", STOP_AT_STEP, str(config), str(step)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode in (0, 9), done.stderr
    return done.returncode == 9


@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_a_sync_after_a_loss_stopped_at_every_step_still_stores_each_message_once(
        tmp_path: Path, dovecot: DovecotUser, store_format: str) -> None:
    """The index is recorded before anything else, and each adoption with its batch:
    stopped at any step of the sync that follows a loss, the next run ends with every
    message once."""
    server = dovecot.server
    files = corpus_and_mail(10, 3)
    server.append_many(dovecot.user, "INBOX", files[:8])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password, store_format)
    root = load_config(config).accounts[0].store.path
    assert sync_counts(config).fetched == 8
    add_local_only(root, store_format)
    server.append_many(dovecot.user, "INBOX", files[8:])
    saved = tmp_path / "saved"
    shutil.copytree(root, saved)
    wanted = store_bags(root, store_format)
    wanted["" if store_format == "maildir" else "INBOX"] += expected_bag(files[8:], store_format)

    step = 1
    while True:
        shutil.rmtree(root)
        shutil.copytree(saved, root)
        lose_state(tmp_path, config, "deleted")
        stopped = stop_at_step(config, step)
        counts = sync_counts(config)
        assert store_bags(root, store_format) == wanted, f"stopped at step {step}"
        assert sync_counts(config).fetched == 0
        if not stopped:  # the run finished before this step: every step was tried
            break
        assert counts.fetched <= 2
        step += 1
    assert step > 5
