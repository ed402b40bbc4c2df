"""POP3 against the real Dovecot from the harness: byte-exact downloads, incremental runs,
policy-driven deletion (invariant 4) while other clients change the mailbox, dropped
connections, the delete_after_days clock, and how we log in (APOP, STLS, plaintext).

Checks look at the store, the server's remaining messages and the state database.
"""

from __future__ import annotations

import hashlib
import io
import logging
import poplib
import random
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsyncd.app import App
from mailsyncd.cli import main
from mailsyncd.config import load_config
from mailsyncd.errors import AccountError, AuthError, MessageError
from mailsyncd.secrets import Secret
from mailsyncd.sources import pop3
from mailsyncd.stores.mbox import MboxStore
from mailsyncd.sync.effects import Checkpoint, Counts, no_checkpoint
from tests.conftest import DovecotUser, require_dovecot
from tests.helpers import (
    corpus_messages,
    debug_records,
    maildir_contents,
    mbox_contents,
    normalize,
    run_cli,
    write_config,
)
from tests.proxy import CutProxy
from tests.server_helpers import DevServer

FORMATS = ["maildir", "mbox"]


# --- helpers ---------------------------------------------------------------------------


def pop_config(directory: Path, dovecot: DovecotUser, store_format: str = "maildir", *,
               leave_on_server: bool = True, extra: str = "", port: int | None = None,
               security: str | None = None, server: DevServer | None = None) -> Path:
    """A POP3 account on the harness server (implicit TLS unless ``security`` says)."""
    server = server or dovecot.server
    directory.mkdir(parents=True, exist_ok=True)
    lines = [extra] if extra else []
    if not leave_on_server:
        lines.append("leave_on_server = false")
    if security:
        lines.append(f'security = "{security}"')
    path = write_config(directory, server, dovecot.user, dovecot.password, store_format, protocol="pop3",
                        extra="\n".join(lines))
    if port is not None:
        path.write_text(path.read_text().replace(f"port = {server.pop3s_port}\n", f"port = {port}\n"))
    return path


def sync_in_process(config: Path, checkpoint: Checkpoint = no_checkpoint,
                    now: datetime | None = None) -> Counts:
    loaded = load_config(config)
    app = App.open(loaded)
    try:
        if now is not None:
            app.clock = lambda: now
        return app.sync_account(loaded.accounts[0], checkpoint=checkpoint)
    finally:
        app.close()


def as_stored(data: bytes) -> bytes:
    """What a POP download keeps of a message: CRLF -> LF, and (POP sends every line with
    its line end) a final newline."""
    data = normalize(data)
    return data if data.endswith(b"\n") else data + b"\n"


def local(config: Path, store_format: str) -> Counter[bytes]:
    root = load_config(config).accounts[0].store.path
    if not root.exists():
        return Counter()
    bags = maildir_contents(root) if store_format == "maildir" else mbox_contents(root)
    assert set(bags) <= {"", ".", "INBOX"}, bags.keys()  # a POP mailbox is the store's INBOX
    total: Counter[bytes] = Counter()
    for bag in bags.values():
        total.update(bag)
    return total


def on_server(dovecot: DovecotUser) -> Counter[bytes]:
    return Counter(as_stored(data) for data in dovecot.server.fetch_all(dovecot.user, "INBOX").values())


def rows(config: Path) -> list[tuple[str, str, str | None, str | None]]:
    db = sqlite3.connect(config.parent / "state.db")
    try:
        return list(db.execute("select uidl, state, location, sha256 from pop_messages"))
    finally:
        db.close()


def states(config: Path) -> Counter[str]:
    return Counter(state for _, state, _, _ in rows(config))


def cli(config: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`mailsyncd --config CONFIG ARGS...`, run in this process: (exit code, stdout, stderr).

    main() points the root logger at the sys.stderr of the moment, which capsys closes
    after the test; the handlers are put back so later tests do not log into it."""
    root, ours = logging.getLogger(), logging.getLogger("mailsyncd")
    handlers, level = root.handlers[:], ours.level
    try:
        code = main(["--config", str(config), *args])
    finally:
        root.handlers[:] = handlers
        ours.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generated(count: int, tag: str, seed: int = 0) -> list[bytes]:
    """Distinct messages of 1-8 KB with CRLF line ends, some lines starting with "." and "From "."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        body = [b"line %d of %s" % (line, tag.encode()) for line in range(rng.randint(20, 160))]
        body[3:3] = [b".", b"..double", b".leading dot", b"From the start", b">From quoted"]
        out.append(b"From: sender@example.org\r\nTo: rcpt@example.org\r\nSubject: " + tag.encode()
                   + b" %d\r\nMessage-ID: <%s-%d@test>\r\n\r\n" % (index, tag.encode(), index)
                   + b"\r\n".join(body) + b"\r\n")
    return out


def assert_no_loss(appended: Iterable[bytes], config: Path, store_format: str, dovecot: DovecotUser,
                   removed_by_others: Iterable[bytes] = ()) -> None:
    """Everything we appended is on the server or in the store (or was deleted by another
    client); nothing is in the store twice; every recorded deletion has its local copy."""
    stored = local(config, store_format)
    server = on_server(dovecot)
    others = Counter(as_stored(data) for data in removed_by_others)
    for data in appended:
        wanted = as_stored(data)
        assert stored[wanted] + server[wanted] + others[wanted] >= 1, wanted[:200]
    assert all(count == 1 for count in stored.values()), "a message was stored twice"
    recorded = Counter(state for _, state, _, _ in rows(config))
    assert sum(stored.values()) >= recorded["stored"] + recorded["gone"]


# --- contents ------------------------------------------------------------------------------


def corpus_selection() -> list[Path]:
    """About 300 corpus messages: every fourth, plus every one with a line starting with "."
    or "From ", no final newline, a NUL, a bare CR or a very long line."""
    files = corpus_messages()
    special = re.compile(rb"(^|\n)(\.|From )|\x00|\r(?!\n)|[^\n]{2000}")
    return [path for index, path in enumerate(files)
            if index % 4 == 0 or special.search(path.read_bytes()) or not path.read_bytes().endswith(b"\n")]


@pytest.mark.parametrize("store_format", FORMATS)
def test_corpus_is_stored_byte_exact(tmp_path: Path, dovecot: DovecotUser, store_format: str) -> None:
    files = corpus_selection()
    assert len(files) >= 250
    originals = [path.read_bytes() for path in files]
    assert sum(1 for data in originals if re.search(rb"(^|\n)\.", data)) >= 30
    assert sum(1 for data in originals if re.search(rb"\nFrom ", data)) >= 5
    dovecot.server.append_many(dovecot.user, "INBOX", originals)
    config = pop_config(tmp_path, dovecot, store_format)

    counts = sync_in_process(config)
    assert counts.fetched == len(files)
    # Exactly what the server holds (as IMAP shows it), CRLF -> LF ...
    stored = local(config, store_format)
    assert stored == on_server(dovecot)
    # ... which is the corpus file itself, CRLF -> LF and nothing else (but the final
    # newline that POP puts after every line). Only the message with NUL bytes differs:
    # Dovecot re-encodes its binary part to base64 at APPEND, and IMAP shows the same.
    altered = [data for data in originals if as_stored(data) not in stored]
    assert all(b"\0" in data for data in altered) and len(altered) <= 1
    recorded = rows(config)
    assert Counter(state for _, state, _, _ in recorded) == {"stored": len(files)}
    root = load_config(config).accounts[0].store.path
    if store_format == "mbox":
        # Our own reader (mboxrd-unescaped) agrees with mailbox.mbox and with the hashes.
        store = MboxStore(root)
        read_back = Counter()
        for _, _, location, digest in recorded:
            assert location is not None
            data = store.read(location)
            assert hashlib.sha256(data).hexdigest() == digest
            read_back[data] += 1
        assert read_back == stored
    else:
        for _, _, location, digest in recorded:
            assert location is not None
            assert hashlib.sha256((root / location).read_bytes()).hexdigest() == digest


def test_second_run_downloads_nothing_and_new_mail_only_what_is_new(tmp_path: Path,
                                                                   dovecot: DovecotUser) -> None:
    first = generated(30, "first")
    dovecot.server.append_many(dovecot.user, "INBOX", first)
    config = pop_config(tmp_path, dovecot)
    assert sync_in_process(config).fetched == 30
    again = sync_in_process(config)
    assert (again.fetched, again.gone, again.skipped) == (0, 0, 0)
    more = generated(7, "more")
    dovecot.server.append_many(dovecot.user, "INBOX", more)
    assert sync_in_process(config).fetched == 7
    assert local(config, "maildir") == Counter(as_stored(data) for data in first + more)
    assert on_server(dovecot) == local(config, "maildir")  # leave_on_server is the default
    assert states(config) == {"stored": 37}


@pytest.mark.parametrize("store_format", FORMATS)
def test_leave_on_server_false_deletes_only_what_is_stored(tmp_path: Path, dovecot: DovecotUser,
                                                          store_format: str) -> None:
    messages = generated(40, "del")
    dovecot.server.append_many(dovecot.user, "INBOX", messages)
    config = pop_config(tmp_path, dovecot, store_format, leave_on_server=False)
    counts = sync_in_process(config)
    assert (counts.fetched, counts.gone) == (40, 40)
    assert on_server(dovecot) == Counter()
    assert local(config, store_format) == Counter(as_stored(data) for data in messages)
    assert states(config) == {"gone": 40}
    assert sync_in_process(config).fetched == 0


def test_max_message_size_skips_and_reports(tmp_path: Path, dovecot: DovecotUser,
                                            caplog: pytest.LogCaptureFixture) -> None:
    small = generated(3, "small")
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    big = big + (b"y" * 70 + b"\r\n") * 400
    dovecot.server.append_many(dovecot.user, "INBOX", [*small, big])
    config = pop_config(tmp_path, dovecot, leave_on_server=False,
                        extra='max_message_size = "20KB"\nlarge_messages = "skip"')
    with caplog.at_level(logging.WARNING, logger="mailsyncd"):
        counts = sync_in_process(config)
    assert (counts.fetched, counts.skipped, counts.gone) == (3, 1, 3)
    assert "over max_message_size" in caplog.text
    assert on_server(dovecot) == Counter([as_stored(big)])  # skipped, so never deleted
    assert states(config) == {"gone": 3, "skipped": 1}
    assert sync_in_process(config).skipped == 0  # reported once, recorded


# --- other clients at work during our session --------------------------------------------


def at_step(step: str, action: Callable[[], None], times: int = 1) -> Checkpoint:
    """A checkpoint that runs ``action`` the ``times``-th time ``step`` is reached."""
    seen = Counter[str]()

    def checkpoint(name: str) -> None:
        seen[name] += 1
        if name == step and seen[name] == times:
            action()

    return checkpoint


@pytest.mark.parametrize("store_format", FORMATS)
def test_messages_expunged_by_another_client_after_our_listing(tmp_path: Path, dovecot: DovecotUser,
                                                               store_format: str) -> None:
    messages = generated(30, "race")
    uids = dovecot.server.append_many(dovecot.user, "INBOX", messages)
    config = pop_config(tmp_path, dovecot, store_format, leave_on_server=False)
    gone = [5, 6, 17, 29]  # indexes: some will not have been downloaded yet

    def other_clients() -> None:
        dovecot.server.expunge(dovecot.user, "INBOX", [uids[index] for index in gone[:2]])
        # ... and a second POP3 session deletes two more and quits.
        session = poplib.POP3_SSL(dovecot.server.host, dovecot.server.pop3s_port,
                                  context=dovecot.server.client_context())
        session.user(dovecot.user)
        session.pass_(dovecot.password)
        for index in gone[2:]:
            session.dele(index - 1)  # after the expunge above, numbers shifted by two
        assert session.quit().startswith(b"+OK")

    counts = sync_in_process(config, at_step("listing", other_clients))
    removed = [messages[index] for index in gone]
    assert counts.fetched == 26
    assert on_server(dovecot) == Counter()
    assert local(config, store_format) == Counter(as_stored(data) for index, data in enumerate(messages)
                                                  if index not in gone)
    assert_no_loss(messages, config, store_format, dovecot, removed)
    assert states(config) == {"gone": 26}  # nothing left pending, nothing else recorded
    if store_format == "mbox":
        # The leftover intents of the batch did not make recovery cut the mbox back.
        sync_in_process(config)
        assert local(config, "mbox") == Counter(as_stored(data) for index, data in enumerate(messages)
                                                if index not in gone)


def test_messages_arriving_during_our_session_are_left_for_the_next(tmp_path: Path,
                                                                   dovecot: DovecotUser) -> None:
    first = generated(20, "early")
    later = generated(6, "late")
    dovecot.server.append_many(dovecot.user, "INBOX", first)
    config = pop_config(tmp_path, dovecot, leave_on_server=False)

    counts = sync_in_process(config, at_step("recorded", lambda: dovecot.server.append_many(
        dovecot.user, "INBOX", later)))
    assert (counts.fetched, counts.gone) == (20, 20)
    assert on_server(dovecot) == Counter(as_stored(data) for data in later)
    counts = sync_in_process(config)
    assert (counts.fetched, counts.gone) == (6, 6)
    assert on_server(dovecot) == Counter()
    assert local(config, "maildir") == Counter(as_stored(data) for data in first + later)


def test_other_session_deleting_between_fetch_and_dele(tmp_path: Path, dovecot: DovecotUser) -> None:
    messages = generated(12, "late-dele")
    uids = dovecot.server.append_many(dovecot.user, "INBOX", messages)
    config = pop_config(tmp_path, dovecot, leave_on_server=False)
    counts = sync_in_process(config, at_step("recorded", lambda: dovecot.server.expunge(
        dovecot.user, "INBOX", uids[:4])))
    assert counts.fetched == 12
    assert on_server(dovecot) == Counter()
    assert local(config, "maildir") == Counter(as_stored(data) for data in messages)


# --- dropped connections -------------------------------------------------------------------


@pytest.fixture
def proxy(dovecot: DovecotUser) -> Iterator[CutProxy]:
    with CutProxy(dovecot.server.host, dovecot.server.pop3s_port) as running:
        yield running


@pytest.mark.parametrize("store_format", FORMATS)
def test_connection_dropped_mid_retr(tmp_path: Path, dovecot: DovecotUser, proxy: CutProxy,
                                     store_format: str) -> None:
    messages = generated(40, "cut", seed=1)
    dovecot.server.append_many(dovecot.user, "INBOX", messages)
    config = pop_config(tmp_path, dovecot, store_format, leave_on_server=False, port=proxy.port)
    total = sum(len(data) for data in messages)
    proxy.cut_after_bytes(total // 2)
    with pytest.raises(AccountError, match="connection"):
        sync_in_process(config)
    # Nothing was deleted; what arrived whole before the cut is kept and recorded.
    assert on_server(dovecot) == Counter(as_stored(data) for data in messages)
    partial = local(config, store_format)
    assert 0 < sum(partial.values()) < 40
    assert states(config) == {"stored": sum(partial.values())}
    assert_no_loss(messages, config, store_format, dovecot)

    proxy.reset()
    counts = sync_in_process(config)
    assert counts.fetched == 40 - sum(partial.values())
    assert on_server(dovecot) == Counter()
    assert local(config, store_format) == Counter(as_stored(data) for data in messages)
    assert states(config) == {"gone": 40}


@pytest.mark.parametrize("when", ["mid-deletion", "before-quit"])
def test_connection_dropped_during_deletion_rolls_back(tmp_path: Path, dovecot: DovecotUser, proxy: CutProxy,
                                                       when: str) -> None:
    messages = generated(25, "cut-dele", seed=2)
    dovecot.server.append_many(dovecot.user, "INBOX", messages)
    config = pop_config(tmp_path, dovecot, leave_on_server=False, port=proxy.port)
    with pytest.raises(AccountError):
        sync_in_process(config, at_step("delete", proxy.cut_all, times=10 if when == "mid-deletion" else 25))
    # POP rolled the DELEs back: all still on the server, none recorded deleted.
    assert on_server(dovecot) == Counter(as_stored(data) for data in messages)
    assert states(config) == {"stored": 25}
    assert local(config, "maildir") == Counter(as_stored(data) for data in messages)

    counts = sync_in_process(config)
    assert (counts.fetched, counts.gone) == (0, 25)
    assert on_server(dovecot) == Counter()
    assert local(config, "maildir") == Counter(as_stored(data) for data in messages)


# --- policy over time ----------------------------------------------------------------------


def test_delete_after_days_with_a_controlled_clock(tmp_path: Path, dovecot: DovecotUser) -> None:
    old = generated(5, "old")
    young = generated(3, "young")
    dovecot.server.append_many(dovecot.user, "INBOX", old + young)
    config = pop_config(tmp_path, dovecot, extra="delete_after_days = 30")
    start = datetime.now(UTC)
    assert sync_in_process(config, now=start).fetched == 8
    # The state database records first_seen with the wall clock; make the young ones
    # look first seen 20 days later, as if they had arrived then.
    db = sqlite3.connect(config.parent / "state.db")
    with db:
        later = (start + timedelta(days=20)).replace(tzinfo=None).isoformat(sep=" ")
        db.execute("update pop_messages set first_seen = ? where uidl in (?, ?, ?)",
                   [later, *young_uidls(dovecot, young)])
    db.close()

    assert sync_in_process(config, now=start + timedelta(days=29, hours=23)).gone == 0
    assert on_server(dovecot) == Counter(as_stored(data) for data in old + young)
    counts = sync_in_process(config, now=start + timedelta(days=30, minutes=1))
    assert (counts.fetched, counts.gone) == (0, 5)
    assert on_server(dovecot) == Counter(as_stored(data) for data in young)
    assert states(config) == {"gone": 5, "stored": 3}
    assert sync_in_process(config, now=start + timedelta(days=50, minutes=1)).gone == 3
    assert on_server(dovecot) == Counter()
    assert local(config, "maildir") == Counter(as_stored(data) for data in old + young)


def young_uidls(dovecot: DovecotUser, messages: list[bytes]) -> list[str]:
    """The UIDLs of these messages, from a POP3 session of our own."""
    wanted = {as_stored(data) for data in messages}
    session = poplib.POP3_SSL(dovecot.server.host, dovecot.server.pop3s_port,
                              context=dovecot.server.client_context())
    try:
        session.user(dovecot.user)
        session.pass_(dovecot.password)
        found = []
        for line in session.uidl()[1]:
            number, uidl = line.decode().split()
            body = b"\n".join(session.retr(int(number))[1]) + b"\n"
            if body in wanted:
                found.append(uidl)
        return found
    finally:
        session.quit()


# --- logging in ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apop_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    require_dovecot()
    with DevServer(tmp_path_factory.mktemp("dovecot-apop"), users=(), apop=True) as server:
        yield server


def login_methods(server: DevServer, user: str) -> list[str]:
    return re.findall(rf"pop3-login: Info: Login: user=<{user}>, method=(\w+)", server.log_file.read_text())


def test_apop_is_used_when_offered(tmp_path: Path, apop_server: DevServer,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    user = DovecotUser(apop_server, "apopuser", "apop-secret-1")
    apop_server.add_user(user.user, user.password)
    apop_server.append_many(user.user, "INBOX", generated(3, "apop"))
    config = pop_config(tmp_path / "tls", user)
    assert sync_in_process(config).fetched == 3
    code, out, err = cli(config, "check", capsys=capsys)
    assert code == 0, err
    assert "logged in with APOP" in out
    # Even on a plain connection (allowed here), APOP keeps the password off the wire.
    plain = pop_config(tmp_path / "plain", user, port=apop_server.pop3_port, security="plain",
                       extra="allow_plaintext = true")
    assert sync_in_process(plain).fetched == 3
    assert login_methods(apop_server, user.user) == ["APOP", "APOP", "APOP"]


def test_user_pass_without_apop_challenge(tmp_path: Path, dovecot: DovecotUser) -> None:
    dovecot.server.append_many(dovecot.user, "INBOX", generated(2, "user"))
    account = load_config(pop_config(tmp_path, dovecot)).accounts[0]
    with pop3.connect(account, Secret(dovecot.password)) as session:
        assert session.login_method == "USER"
        assert session.stat()[0] == 2
        session.quit()
    assert login_methods(dovecot.server, dovecot.user) == ["PLAIN"]  # how Dovecot logs USER/PASS


def test_plaintext_is_refused_without_allow_plaintext(tmp_path: Path, dovecot: DovecotUser,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = pop_config(tmp_path, dovecot, port=dovecot.server.pop3_port, security="plain")
    for command in ("sync", "check"):
        code, _, err = cli(config, command, capsys=capsys)
        assert code == 2, err
        assert "security" in err and "allow_plaintext" in err
    # The real command line says the same.
    done = run_cli(config, "sync")
    assert done.returncode == 2 and "allow_plaintext" in done.stderr
    assert login_methods(dovecot.server, dovecot.user) == []
    account = load_config(pop_config(tmp_path / "ok", dovecot)).accounts[0]
    # The adapter refuses too, should a config ever reach it unchecked.
    import dataclasses

    unchecked = dataclasses.replace(account, security="plain", port=dovecot.server.pop3_port)
    with pytest.raises(AccountError, match="allow_plaintext"):
        pop3.connect(unchecked, Secret(dovecot.password))


def test_stls(tmp_path: Path, dovecot: DovecotUser) -> None:
    messages = generated(4, "stls")
    dovecot.server.append_many(dovecot.user, "INBOX", messages)
    config = pop_config(tmp_path, dovecot, port=dovecot.server.pop3_port, security="starttls")
    with pop3.connect(load_config(config).accounts[0], Secret(dovecot.password)) as session:
        assert session.capabilities is not None and "UIDL" in session.capabilities
        assert "STLS" not in session.capabilities  # asked again after TLS, as RFC 2595 wants
        session.quit()
    assert sync_in_process(config).fetched == 4
    assert local(config, "maildir") == Counter(as_stored(data) for data in messages)


def test_bad_password_and_untrusted_certificate_fail_cleanly(tmp_path: Path, dovecot: DovecotUser,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    account = load_config(pop_config(tmp_path, dovecot)).accounts[0]
    with pytest.raises(AuthError) as refused:
        pop3.connect(account, Secret("not-the-password-xyz"))
    assert "not-the-password-xyz" not in str(refused.value)
    assert "\n" not in str(refused.value)
    import dataclasses

    with pytest.raises(AccountError, match="not trusted"):
        pop3.connect(dataclasses.replace(account, tls_ca_file=None), Secret(dovecot.password))
    code, out, _ = cli(pop_config(tmp_path / "cli", dovecot), "check", capsys=capsys)
    assert code == 0 and "ok, 0 messages" in out


# --- servers without UIDL ------------------------------------------------------------------


def test_without_uidl_messages_are_known_by_their_headers(tmp_path: Path, dovecot: DovecotUser,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = pop3._capability_answer

    def without_uidl(answer: Any) -> dict[str, list[str]] | None:
        found = real(answer)
        return None if found is None else {name: args for name, args in found.items() if name != "UIDL"}

    monkeypatch.setattr(pop3, "_capability_answer", without_uidl)
    messages = generated(10, "hdr")
    twin = messages[0]
    dovecot.server.append_many(dovecot.user, "INBOX", [*messages, twin])  # same headers twice
    config = pop_config(tmp_path, dovecot, leave_on_server=False)
    counts = sync_in_process(config)
    assert counts.fetched == 10  # the twin cannot be told apart: one copy is enough ...
    assert on_server(dovecot) == Counter([as_stored(twin)] * 2)  # ... and neither is deleted
    assert local(config, "maildir") == Counter(as_stored(data) for data in messages)
    assert all(uidl.startswith("hdr:") for uidl, _, _, _ in rows(config))
    assert sync_in_process(config).fetched == 0  # the digests are stable across sessions


def test_header_digest_ignores_headers_that_servers_rewrite() -> None:
    plain = [b"From: a@b", b"Subject: hi", b"  folded", b"", b"body", b"Status: RO"]
    rewritten = [b"From: a@b", b"Status: RO", b"X-UID: 17", b"X-Keywords: a", b"\tmore",
                 b"Subject: hi", b"  folded", b"Content-Length: 99", b"Lines: 3", b""]
    assert pop3.header_digest(iter(plain)) == pop3.header_digest(iter(rewritten))
    assert pop3.header_digest(iter(plain)) != pop3.header_digest(iter([b"From: a@b", b"Subject: ho", b""]))


# --- the RETR reader, on canned server bytes ------------------------------------------------


class _Wire:
    """Stands in for poplib's client: canned server bytes behind a small read buffer."""

    def __init__(self, answer: bytes, buffer_size: int) -> None:
        self.file = io.BufferedReader(io.BytesIO(answer), buffer_size=buffer_size)  # type: ignore[arg-type]
        self.sent: list[bytes] = []
        self.sock = self

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)


def _session(answer: bytes, buffer_size: int, sizes: dict[int, int] | None = None) -> pop3.Pop3Session:
    session = pop3.Pop3Session(cast(poplib.POP3, _Wire(answer, buffer_size)), "acct", "host", {}, "USER")
    session._sizes = sizes or {1: len(answer)}
    return session


def _server_form(message: bytes) -> tuple[bytes, bytes]:
    """(what a POP3 server sends for a message, what we must store): lines end in CRLF,
    a leading "." is doubled, the "." line ends it; we keep LF line ends."""
    text = message.replace(b"\r\n", b"\n")
    lines = text.split(b"\n")
    if text.endswith(b"\n") or not text:
        lines.pop()
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"
    return wire, b"".join(line + b"\n" for line in lines)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"From ", b" ", b"\0", b"x" * 40]),
                max_size=60).map(b"".join), st.integers(1, 12))
def test_retrieve_reads_exactly_one_message_whatever_the_blocks(message: bytes, buffer_size: int) -> None:
    wire, stored = _server_form(message)
    session = _session(b"+OK message follows\r\n" + wire + b"+OK next answer\r\n", buffer_size)
    assert session.retrieve(1) == stored
    assert session._client.file.read() == b"+OK next answer\r\n"  # nothing of the next answer eaten


def test_retrieve_edge_cases() -> None:
    assert _session(b"+OK\r\n.\r\n", 3).retrieve(1) == b""
    assert _session(b"+OK\r\n..\r\n...x\r\n.\r\n", 2).retrieve(1) == b".\n..x\n"
    assert _session(b"+OK\nbare\n..lf\n.\n", 4).retrieve(1) == b"bare\n.lf\n"  # LF-only server
    with pytest.raises(MessageError, match="no such message"):
        _session(b"-ERR no such message\r\n", 8).retrieve(1)
    with pytest.raises(AccountError, match="lost"):
        _session(b"+OK\r\nhalf a mess", 8).retrieve(1)
    with pytest.raises(AccountError, match="more for message 1 than"):
        _session(b"+OK\r\n" + b"x" * 200_000 + b"\r\n.\r\n", 4096, {1: 10}).retrieve(1)


def test_pipelined_retrieval_closed_early_leaves_the_session_in_step(tmp_path: Path, dovecot: DovecotUser) -> None:
    """RETRs sent ahead (PIPELINING) whose answers were never asked for are read and
    dropped when the caller stops early, so the next command gets its own answer: a DELE
    must never be confirmed by the tail of a RETR."""
    sent = [path.read_bytes() for path in corpus_messages(6)]
    dovecot.server.append_many(dovecot.user, "INBOX", sent)
    account = load_config(pop_config(tmp_path, dovecot)).accounts[0]
    with pop3.connect(account, Secret(dovecot.password)) as session:
        assert session.capabilities is not None and "PIPELINING" in session.capabilities
        listing = session.listing()
        numbers = sorted(listing.entries)
        answers = session.retrieve_many(numbers)
        assert next(answers) == as_stored(sent[0])
        answers.close()
        assert session.retrieve(numbers[-1]) == as_stored(sent[-1])
        assert session.stat() == (6, sum(size for _, size in listing.entries.values()))
        assert list(session.retrieve_many(numbers[:2])) == [as_stored(data) for data in sent[:2]]
        session.quit()


# --- round trips ---------------------------------------------------------------------------


class _Trace(logging.Handler):
    """The ``-vv`` trace's lines (``> `` sent, ``< `` read) and markers, in order."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        _, shown = record.getMessage().split(" ", 1)
        self.lines.append(shown)

    def sends(self) -> list[list[str]]:
        """The commands of each burst the client sent before it read again."""
        bursts: list[list[str]] = []
        reading = True
        for line in self.lines:
            if line.startswith("> "):
                if reading:
                    bursts.append([])
                bursts[-1].append(line[2:].split(" ")[0])
            reading = line.startswith("< ")
        return bursts


@pytest.fixture
def wire() -> Iterator[_Trace]:
    handler = _Trace()
    with debug_records("mailsyncd.trace", handler):
        yield handler


def test_a_pipelining_server_is_waited_for_only_where_an_answer_is_needed(
        tmp_path: Path, dovecot: DovecotUser, wire: _Trace, monkeypatch: pytest.MonkeyPatch) -> None:
    """USER and PASS go together, the CAPA after the login rides with LIST and UIDL, and
    a QUIT with nothing marked is not waited for: a no-op is four bursts, three waits.
    A batch's RETRs run on into the next batch's, so the server is still sending while
    a batch is committed."""
    from mailsyncd.sync import pop as pop_sync

    monkeypatch.setattr(pop_sync, "BATCH_MAX_COUNT", 5)
    sent = generated(18, "pipe")
    dovecot.server.append_many(dovecot.user, "INBOX", sent)
    config = pop_config(tmp_path, dovecot)

    def mark(step: str) -> None:
        if step == "commit":
            wire.lines.append("commit")

    assert sync_in_process(config, checkpoint=mark).fetched == 18
    commits = [index for index, line in enumerate(wire.lines) if line == "commit"]
    assert len(commits) == 4
    for batch, commit in enumerate(commits[:-1]):
        following = f"> RETR {5 * (batch + 1) + 1}"  # the next batch's first message
        assert following in wire.lines[:commit], (batch, wire.lines)
    assert local(config, "maildir") == Counter(as_stored(data) for data in sent)

    wire.lines.clear()
    assert sync_in_process(config).fetched == 0
    assert wire.sends() == [["CAPA"], ["USER", "PASS"], ["CAPA", "LIST", "UIDL"], ["QUIT"]], wire.lines
    assert wire.lines[-1].startswith("> QUIT")
