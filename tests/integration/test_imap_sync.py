"""IMAP sync against the real Dovecot from the harness: contents, flags, expunges,
UIDVALIDITY, read-only pulls, hostile names. Checks look at the store and the state
database, not at a protocol transcript."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from mailsyncd.app import App
from mailsyncd.config import load_config
from mailsyncd.sources import imap as imap_source
from mailsyncd.stores.maildir import flags_from_name
from tests.conftest import DovecotUser
from tests.helpers import (
    corpus_messages,
    crash_at_step,
    expected,
    maildir_contents,
    mbox_contents,
    normalize,
    round_trips,
    sync,
    write_config,
)

FOLDERS = ["INBOX", "Archive/2024", "Entwürfe", "Входящие", "A & B", "Lists/debian.devel"]


def sync_counts(config: Path, folders: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    loaded = load_config(config)
    app = App.open(loaded)
    try:
        return app.sync_account(loaded.accounts[0], folders)
    finally:
        app.close()


def store_bags(config: Path, store_format: str) -> dict[str, Counter[bytes]]:
    root = load_config(config).accounts[0].store.path
    return maildir_contents(root) if store_format == "maildir" else mbox_contents(root)


def server_bag(dovecot: DovecotUser, folder: str, store_format: str) -> Counter[bytes]:
    return expected(dovecot.server.fetch_all(dovecot.user, folder).values(), store_format)


@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_whole_corpus_is_stored_byte_exact(tmp_path: Path, dovecot: DovecotUser, store_format: str) -> None:
    files = corpus_messages()
    assert len(files) > 800
    for index, folder in enumerate(FOLDERS):
        dovecot.server.append_many(dovecot.user, folder, [path.read_bytes() for path in files[index::len(FOLDERS)]])
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password, store_format)
    assert sync(config) == 0

    stored = store_bags(config, store_format)
    wanted = {folder: server_bag(dovecot, folder, store_format) for folder in FOLDERS}
    assert sum(sum(bag.values()) for bag in stored.values()) == len(files)
    assert sorted(stored.values(), key=sorted) == sorted(wanted.values(), key=sorted)
    # Dovecot hands back what was appended; the store holds exactly that, CRLF -> LF.
    originals = Counter(normalize(path.read_bytes()) for path in files)
    exact = sum(1 for data in originals if any(data in bag or data + b"\n" in bag for bag in stored.values()))
    assert exact >= len(originals) * 0.97, "messages were altered on the way"
    if store_format == "maildir":
        assert_dovecot_reads(dovecot, load_config(config).accounts[0].store.path, wanted)


def assert_dovecot_reads(dovecot: DovecotUser, store: Path, wanted: dict[str, Counter[bytes]]) -> None:
    """Dovecot, with its mail_location pointed at our Maildir++ tree, sees the same
    folders holding the same number of messages."""
    # The harness chroots mail users into its mail/ directory, so the copy goes there.
    copy = dovecot.server.workdir / "mail" / f"readback-{dovecot.user}"
    shutil.copytree(store, copy)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(copy)], check=True)
    location = f"mail_location=maildir:/{copy.name}:UTF-8"
    status = dovecot.server.doveadm("-o", location, "-f", "tab", "mailbox", "status", "-u", dovecot.user,
                                    "messages", "*")
    rows = status.strip().splitlines()
    header = rows[0].split("\t")
    counts = {}
    for row in rows[1:]:
        fields = dict(zip(header, row.split("\t"), strict=True))
        counts[fields["mailbox"]] = int(fields["messages"])
    for folder, bag in wanted.items():
        # Maildir++ uses "." as its separator, so a dot inside a name is stored as %2E,
        # which Dovecot shows as it is.
        assert counts.get(folder.replace(".", "%2E")) == sum(bag.values()), (folder, counts)


def test_noop_sync_fetches_nothing_and_new_mail_only_the_new(tmp_path: Path, dovecot: DovecotUser) -> None:
    server = dovecot.server
    files = corpus_messages(60)
    server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in files[:40]])
    server.append_many(dovecot.user, "Archive", [path.read_bytes() for path in files[40:50]])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password)
    assert sync_counts(config).fetched == 50
    before = store_bags(config, "maildir")
    again = sync_counts(config)
    assert (again.fetched, again.flags, again.gone) == (0, 0, 0)
    assert store_bags(config, "maildir") == before
    server.append_many(dovecot.user, "Archive", [path.read_bytes() for path in files[50:]])
    third = sync_counts(config)
    assert third.fetched == 10
    assert store_bags(config, "maildir")[".Archive"] == server_bag(dovecot, "Archive", "maildir")


def test_pull_never_sets_seen_on_the_server(tmp_path: Path, dovecot: DovecotUser) -> None:
    server = dovecot.server
    uids = server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in corpus_messages(20)])
    server.add_flags(dovecot.user, "INBOX", uids[:3], ["\\Flagged"])
    before = server.flags(dovecot.user, "INBOX")
    config = write_config(tmp_path, server, dovecot.user, dovecot.password)
    assert sync(config) == 0
    assert server.flags(dovecot.user, "INBOX") == before
    assert not any("\\Seen" in flags for flags in before.values())


def test_flags_set_and_cleared_on_the_server_reach_the_local_copy(tmp_path: Path, dovecot: DovecotUser) -> None:
    server = dovecot.server
    uids = server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in corpus_messages(10)])
    server.add_flags(dovecot.user, "INBOX", uids[:5], ["\\Seen"])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password)
    assert sync(config) == 0
    server.add_flags(dovecot.user, "INBOX", uids[5:], ["\\Flagged", "\\Answered"])
    server.remove_flags(dovecot.user, "INBOX", uids[:2], ["\\Seen"])
    counts = sync_counts(config)
    assert counts.flags == 7
    root = load_config(config).accounts[0].store.path
    names = [path.name for sub in ("new", "cur") for path in (root / sub).iterdir()]
    by_letters = Counter(name.partition(":2,")[2] for name in names)
    assert by_letters == Counter({"S": 3, "FR": 5, "": 2})
    db = sqlite3.connect(tmp_path / "state.db")
    flags = Counter(row[0] for row in db.execute("select flags from messages"))
    db.close()
    assert flags == Counter({"\\Seen": 3, "\\Answered \\Flagged": 5, "": 2})
    assert {frozenset(flags_from_name(name)) for name in names} == {
        frozenset({"\\Seen"}), frozenset({"\\Flagged", "\\Answered"}), frozenset()}


@pytest.mark.parametrize("mode", ["archive", "mirror"])
def test_expunged_on_the_server(tmp_path: Path, dovecot: DovecotUser, mode: str) -> None:
    server = dovecot.server
    uids = server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in corpus_messages(12)])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password, extra=f'mode = "{mode}"')
    assert sync(config) == 0
    server.expunge(dovecot.user, "INBOX", uids[:4])
    counts = sync_counts(config)
    local = sum(store_bags(config, "maildir")[""].values())
    if mode == "archive":
        assert (counts.gone, counts.removed, local) == (4, 0, 12)
    else:
        assert (counts.gone, counts.removed, local) == (0, 4, 8)
        assert store_bags(config, "maildir")[""] == server_bag(dovecot, "INBOX", "maildir")
    assert sync_counts(config).gone + sync_counts(config).removed == 0


@pytest.mark.parametrize("store_format", ["maildir", "mbox"])
def test_uidvalidity_change_loses_nothing_and_duplicates_nothing(
        tmp_path: Path, dovecot: DovecotUser, store_format: str) -> None:
    server = dovecot.server
    files = corpus_messages(80)
    uids = server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in files[:60]])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password, store_format)
    assert sync(config) == 0
    server.expunge(dovecot.user, "INBOX", uids[:5])
    server.change_uidvalidity(dovecot.user, "INBOX")
    server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in files[60:]])
    counts = sync_counts(config)
    assert counts.adopted == 55 and counts.fetched == 20
    stored = next(iter(store_bags(config, store_format).values()))
    wanted = server_bag(dovecot, "INBOX", store_format)
    # Every server message once, plus the five expunged ones still kept locally.
    assert stored - wanted == expected([normalize(path.read_bytes()) for path in files[:5]], store_format)
    assert not wanted - stored
    assert sync_counts(config).fetched == 0


def test_new_and_renamed_folders_appear_and_nothing_local_is_deleted(tmp_path: Path, dovecot: DovecotUser) -> None:
    server = dovecot.server
    server.append_many(dovecot.user, "Old", [path.read_bytes() for path in corpus_messages(3)])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password)
    assert sync(config) == 0
    server.rename_folder(dovecot.user, "Old", "New")
    assert sync(config) == 0
    bags = store_bags(config, "maildir")
    assert sum(bags[".Old"].values()) == 3 and sum(bags[".New"].values()) == 3


HOSTILE = ["..", "../x", "a/../../b", "dots..in..name", ".hidden", "tab\there", "x" * 300, "per%cent",
           "co:lon", "back\\slash", "-rf"]


@pytest.mark.parametrize("layout", ["maildir++", "fs"])
def test_hostile_folder_names_stay_inside_the_store(tmp_path: Path, dovecot: DovecotUser, layout: str) -> None:
    server = dovecot.server
    accepted = []
    for name in HOSTILE:
        try:
            server.append(dovecot.user, name, b"Subject: hostile\n\nbody\n")
            accepted.append(name)
        except Exception:  # noqa: S112 - the server may refuse a name; that is its right
            continue
    assert len(accepted) >= 6, accepted
    config = write_config(tmp_path, server, dovecot.user, dovecot.password, store_extra=f'layout = "{layout}"')
    assert sync(config) == 0
    outside = {path.name for path in tmp_path.iterdir()}
    assert outside <= {"store-acct", "state.db", "state.db-wal", "state.db-shm", "state.db.lock", "config.toml"}
    store = tmp_path / "store-acct"
    for path in store.rglob("*"):
        assert path.resolve().is_relative_to(store.resolve())
    assert sum(sum(bag.values()) for bag in maildir_contents(store).values()) == len(accepted)


def test_without_condstore_a_uid_flags_scan_finds_flags_and_expunges(
        tmp_path: Path, dovecot: DovecotUser, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers without CONDSTORE get the fallback path: one UID/FLAGS scan per folder."""
    from mailsyncd.sources import imap

    original = imap.ImapSession.__init__

    def without_condstore(self: imap.ImapSession, *args: object) -> None:
        original(self, *args)  # type: ignore[arg-type]
        self.condstore = False

    monkeypatch.setattr(imap.ImapSession, "__init__", without_condstore)
    server = dovecot.server
    uids = server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in corpus_messages(8)])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password)
    assert sync_counts(config).fetched == 8
    server.add_flags(dovecot.user, "INBOX", uids[:3], ["\\Seen"])
    server.expunge(dovecot.user, "INBOX", uids[-2:])
    server.append(dovecot.user, "INBOX", b"Subject: late\n\nnew\n")
    counts = sync_counts(config)
    assert (counts.fetched, counts.flags, counts.gone) == (1, 3, 2)
    assert sync_counts(config).flags == 0


def test_folder_globs_include_and_exclude(tmp_path: Path, dovecot: DovecotUser) -> None:
    server = dovecot.server
    for folder in ("INBOX", "Lists/python", "Lists/rust", "Junk"):
        server.append(dovecot.user, folder, b"Subject: x\n\ny\n")
    config = write_config(tmp_path, server, dovecot.user, dovecot.password,
                          extra='folders = ["INBOX", "Lists/*", "Junk"]\nexclude = ["Lists/rust", "Junk"]')
    assert sync(config) == 0
    assert set(store_bags(config, "maildir")) == {"", ".Lists.python"}
    assert sync(config, "--folder", "Lists/*") == 0


def test_raising_max_message_size_fetches_what_was_skipped(tmp_path: Path, dovecot: DovecotUser) -> None:
    server = dovecot.server
    server.append(dovecot.user, "INBOX", b"Subject: small\n\nx\n")
    server.append(dovecot.user, "INBOX", b"Subject: large\n\n" + b"y" * 5000 + b"\n")
    config = write_config(tmp_path, server, dovecot.user, dovecot.password,
                          extra='max_message_size = "1KB"\nlarge_messages = "skip"')
    counts = sync_counts(config)
    assert (counts.fetched, counts.skipped) == (1, 1)
    assert sync_counts(config).skipped == 0  # recorded once, not re-reported every run
    config.write_text(config.read_text().replace('max_message_size = "1KB"', 'max_message_size = "1MB"'))
    assert sync_counts(config).fetched == 1
    assert store_bags(config, "maildir")[""] == server_bag(dovecot, "INBOX", "maildir")


def test_a_changed_folder_costs_a_fixed_few_round_trips(tmp_path: Path, dovecot: DovecotUser) -> None:
    """New mail, flag changes and an expunge in one folder: the EXAMINE carries what
    QRESYNC can tell, the listing of new UIDs goes right behind it, so the run waits after
    the login for LIST, the EXAMINE burst and the bodies, whatever changed. Each change
    finds its way into the store all the same."""
    server = dovecot.server
    uids = server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in corpus_messages(12)])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password, extra='mode = "mirror"')
    assert sync(config) == 0
    server.add_flags(dovecot.user, "INBOX", uids[:3], ["\\Flagged"])
    server.expunge(dovecot.user, "INBOX", uids[-2:])
    server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in corpus_messages(15)[-3:]])
    with round_trips() as trips:
        counts = sync_counts(config)
    assert (counts.fetched, counts.flags, counts.removed) == (3, 3, 2)
    assert store_bags(config, "maildir")[""] == server_bag(dovecot, "INBOX", "maildir")
    assert len(trips) == 1 and trips[0] <= 3, trips


def test_commands_sent_together_leave_together(tmp_path: Path, dovecot: DovecotUser) -> None:
    """What the client counts as one wait is one on the wire too: a command written right
    behind another (ENABLE and LIST) is not held back by Nagle's algorithm until the
    first is answered. Counted by the benchmark's delaying proxy, which sees the wire:
    a no-op run is the TLS handshake (2), LOGIN, ENABLE with LIST, and LOGOUT."""
    from bench.latency import LatencyProxy

    server = dovecot.server
    server.append(dovecot.user, "INBOX", b"Subject: one\r\n\r\nbody\r\n")
    proxy = LatencyProxy(server.host, [server.imaps_port], rtt_ms=20)
    try:
        config = write_config(tmp_path, server, dovecot.user, dovecot.password)
        config.write_text(config.read_text().replace(f"port = {server.imaps_port}",
                                                     f"port = {proxy.port(server.imaps_port)}"))
        assert sync(config) == 0
        before = proxy.trips()
        assert sync(config) == 0
        run = proxy.trips() - before
    finally:
        proxy.close()
    assert (run.connections, run.turns) == (1, 5)


def test_a_large_first_sync_goes_a_slice_at_a_time_and_a_kill_anywhere_loses_nothing(
        tmp_path: Path, dovecot: DovecotUser, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder larger than LISTING_SLICE is listed, planned and fetched a slice at a
    time on its first sync (so memory does not grow with the folder); killed at any step
    of it, the next sync stores every message exactly once, and a no-op after it
    fetches nothing."""
    monkeypatch.setattr(imap_source, "UID_CHUNK", 2)
    monkeypatch.setattr(imap_source, "LISTING_SLICE", 4)
    dovecot.server.append_many(dovecot.user, "INBOX", [path.read_bytes() for path in corpus_messages(11)])
    wanted = server_bag(dovecot, "INBOX", "maildir")
    described: list[int] = []
    metadata = imap_source.ImapSession._metadata

    def spy(session: imap_source.ImapSession, uids: list[int], items: list[bytes]) -> object:
        described.append(len(uids))
        return metadata(session, uids, items)

    def prepared(directory: Path) -> Path:
        directory.mkdir()
        return write_config(directory, dovecot.server, dovecot.user, dovecot.password, extra='folders = ["INBOX"]')

    monkeypatch.setattr(imap_source.ImapSession, "_metadata", spy)
    reference = prepared(tmp_path / "reference")
    assert sync_counts(reference).fetched == 11
    assert described == [4, 4, 3]
    assert store_bags(reference, "maildir")[""] == wanted
    steps = crash_at_step(prepared(tmp_path / "steps"), 10**9) - 1
    assert steps > 3 * 4  # intent, fetched, write..., commit, recorded: for each slice
    for step in range(1, steps + 1):
        config = prepared(tmp_path / f"k{step}")
        assert crash_at_step(config, step) == step
        assert sync(config) == 0
        assert store_bags(config, "maildir")[""] == wanted, step
        assert sync_counts(config).fetched == 0, step
