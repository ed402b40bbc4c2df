"""The test harness itself: the private Dovecot server and the fault-injection proxy."""

from __future__ import annotations

import imaplib
import poplib
import re
import socket
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailsyncd.testing import DovecotError
from tests.conftest import DovecotUser, require_dovecot
from tests.proxy import CutProxy
from tests.server_helpers import DevServer, decode_mutf7, encode_mutf7

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


@pytest.fixture
def own_server(tmp_path: Path) -> DevServer:
    """A server of the test's own, for tests that stop or reconfigure it."""
    require_dovecot()
    return DevServer(tmp_path / "dovecot")


def imaps(server: DevServer, context: ssl.SSLContext | None = None) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL(server.host, server.imaps_port, ssl_context=context or server.client_context())


def test_imaps_verifies_against_the_ca_and_only_with_it(dovecot: DovecotUser) -> None:
    conn = imaps(dovecot.server)
    assert conn.login(dovecot.user, dovecot.password)[0] == "OK"
    conn.logout()
    with socket.create_connection(("127.0.0.1", dovecot.server.imaps_port)) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    # The certificate names both the loopback address and "localhost".
    with socket.create_connection(("127.0.0.1", dovecot.server.imaps_port)) as raw, \
            dovecot.server.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.recv(4) == b"* OK"


def test_starttls_and_stls(dovecot: DovecotUser) -> None:
    server = dovecot.server
    conn = imaplib.IMAP4(server.host, server.imap_port)
    assert "STARTTLS" in conn.capabilities
    conn.starttls(server.client_context())
    assert conn.login(dovecot.user, dovecot.password)[0] == "OK"
    conn.logout()
    pop = poplib.POP3(server.host, server.pop3_port)
    pop.stls(server.client_context())
    pop.user(dovecot.user)
    pop.pass_(dovecot.password)
    assert pop.stat() == (0, 0)
    pop.quit()
    pops = poplib.POP3_SSL(server.host, server.pop3s_port, context=server.client_context())
    pops.user(dovecot.user)
    pops.pass_(dovecot.password)
    pops.quit()


def test_plaintext_login_is_allowed_so_the_client_must_refuse_it(dovecot: DovecotUser) -> None:
    conn = imaplib.IMAP4(dovecot.server.host, dovecot.server.imap_port)
    assert "LOGINDISABLED" not in conn.capabilities
    assert conn.login(dovecot.user, dovecot.password)[0] == "OK"
    conn.logout()


def test_wrong_password_is_refused_without_slowing_later_logins(dovecot: DovecotUser) -> None:
    for _attempt in range(3):
        conn = imaps(dovecot.server)
        with pytest.raises(imaplib.IMAP4.error):
            conn.login(dovecot.user, dovecot.password + "x")
        conn.shutdown()
    started = time.monotonic()
    conn = imaps(dovecot.server)
    conn.login(dovecot.user, dovecot.password)
    conn.logout()
    assert time.monotonic() - started < 1  # Dovecot's per-IP auth penalty is off


def test_fresh_user_has_empty_special_use_folders(dovecot: DovecotUser) -> None:
    server, user = dovecot.server, dovecot.user
    assert server.list_folders(user) == ["Drafts", "INBOX", "Junk", "Sent", "Trash"]
    assert server.uids(user, "INBOX") == []
    assert server.fetch_all(user, "INBOX") == {}
    conn = imaps(server)
    conn.login(user, dovecot.password)
    listing = b"\n".join(line for line in conn.list()[1] if isinstance(line, bytes))
    conn.logout()
    assert rb'(\HasNoChildren \Sent) "/" Sent' in listing


def test_append_returns_increasing_uids_and_keeps_bytes(dovecot: DovecotUser) -> None:
    server, user = dovecot.server, dovecot.user
    odd = b"Subject: bare line ends\n\nlf only\nand a bare\rcr\n"
    first = server.append(user, "INBOX", MESSAGE)
    second = server.append(user, "INBOX", odd, flags=[r"\Seen", "$Label1"],
                           internaldate=datetime(2024, 2, 29, 12, 0, tzinfo=UTC))
    many = server.append_many(user, "INBOX", [b"Subject: %d\r\n\r\n%d\r\n" % (i, i) for i in range(50)])
    assert first < second < many[0]
    assert many == sorted(many) and len(set(many)) == 50
    assert server.uids(user, "INBOX") == [first, second, *many]
    stored = server.fetch_all(user, "INBOX")
    assert stored[first] == MESSAGE
    assert stored[second] == odd.replace(b"\n", b"\r\n")  # IMAP serves LF as CRLF; the CR survives
    assert server.flags(user, "INBOX")[second] == {r"\Seen", "$Label1"}
    assert server.maildir(user).joinpath("cur").is_dir()


def test_flag_helpers_and_expunge(dovecot: DovecotUser) -> None:
    server, user = dovecot.server, dovecot.user
    uids = server.append_many(user, "Work", [MESSAGE] * 3)
    server.add_flags(user, "Work", uids[:2], [r"\Flagged", r"\Seen"])
    server.remove_flags(user, "Work", uids[:1], [r"\Seen"])
    server.set_flags(user, "Work", uids[2:], [r"\Answered"])
    assert server.flags(user, "Work") == {
        uids[0]: {r"\Flagged"}, uids[1]: {r"\Flagged", r"\Seen"}, uids[2]: {r"\Answered"},
    }
    server.expunge(user, "Work", uids[1:2])
    assert server.uids(user, "Work") == [uids[0], uids[2]]


def uidvalidity(dovecot: DovecotUser, folder: str) -> int:
    """UIDVALIDITY as a client sees it on EXAMINE (not through the helpers under test)."""
    conn = imaps(dovecot.server)
    conn.login(dovecot.user, dovecot.password)
    conn.select(f'"{encode_mutf7(folder)}"', readonly=True)
    value = conn.untagged_responses["UIDVALIDITY"][-1]
    conn.logout()
    assert isinstance(value, bytes)
    return int(value)


def test_change_uidvalidity_keeps_messages_byte_identical(dovecot: DovecotUser) -> None:
    server, user = dovecot.server, dovecot.user
    uids = server.append_many(user, "Entwürfe", [MESSAGE, b"Subject: two\r\n\r\n2\r\n"])
    before, old = server.fetch_all(user, "Entwürfe"), uidvalidity(dovecot, "Entwürfe")
    new = server.change_uidvalidity(user, "Entwürfe")
    assert new != old
    assert uidvalidity(dovecot, "Entwürfe") == new
    assert server.fetch_all(user, "Entwürfe") == before
    assert server.uids(user, "Entwürfe") == uids
    uids.append(server.append(user, "Entwürfe", MESSAGE))  # the folder keeps working
    assert server.uids(user, "Entwürfe") == uids


def test_non_ascii_and_hostile_folder_names_round_trip(dovecot: DovecotUser) -> None:
    server, user = dovecot.server, dovecot.user
    names = ["Entwürfe", "Входящие", "A & B", "Archive/2024", 'Quote " and \\ backslash']
    for name in names:
        server.create_folder(user, name)
        server.append(user, name, MESSAGE)
    assert set(names) <= set(server.list_folders(user))
    assert "Archive" not in server.list_folders(user)  # a \Noselect parent in LAYOUT=fs
    assert (server.maildir(user) / "Archive" / "2024" / "cur").is_dir()
    server.rename_folder(user, "A & B", "A & C")
    server.delete_folder(user, "Входящие")
    folders = server.list_folders(user)
    assert "A & C" in folders and "A & B" not in folders and "Входящие" not in folders
    assert server.fetch_all(user, "A & C") == {1: MESSAGE}


def test_modified_utf7_codec() -> None:
    assert encode_mutf7("Entwürfe") == "Entw&APw-rfe"
    assert encode_mutf7("A & B") == "A &- B"
    assert encode_mutf7("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"  # RFC 3501
    for name in ("Entwürfe", "A & B", "Входящие", "日本語/メール", "&&", "~peter/mail/台北"):
        assert decode_mutf7(encode_mutf7(name)) == name


def test_restart_keeps_data_ports_and_ca(own_server: DevServer) -> None:
    with own_server as server:
        uid = server.append("alice", "INBOX", MESSAGE)
        ports = (server.imap_port, server.imaps_port, server.pop3_port, server.pop3s_port)
        ca = server.ca_file.read_bytes()
        conn = imaps(server)
        conn.login("alice", "alice-pw")
        conn.select()
        server.restart()
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            conn.noop()  # the old connection is gone: the client sees the restart
        conn.shutdown()
        assert (server.imap_port, server.imaps_port, server.pop3_port, server.pop3s_port) == ports
        assert server.ca_file.read_bytes() == ca
        assert server.fetch_all("alice", "INBOX") == {uid: MESSAGE}


def test_stop_is_idempotent_and_leaves_no_listener(own_server: DevServer) -> None:
    own_server.start()
    started = time.monotonic()
    own_server.stop()
    own_server.stop()
    assert time.monotonic() - started < 3
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((own_server.host, own_server.imap_port), timeout=2)


def test_two_servers_run_side_by_side(tmp_path: Path, own_server: DevServer) -> None:
    with own_server, DevServer(tmp_path / "second", users=[("bob", "bob-pw")]) as second:
        assert {own_server.imap_port, own_server.imaps_port} & {second.imap_port, second.imaps_port} == set()
        own_server.append("alice", "INBOX", MESSAGE)
        assert second.uids("bob", "INBOX") == []
        conn = imaps(second)
        with pytest.raises(imaplib.IMAP4.error):
            conn.login("alice", "alice-pw")
        conn.shutdown()


def test_apop_greeting_only_when_asked(tmp_path: Path) -> None:
    require_dovecot()
    with DevServer(tmp_path / "apop", apop=True) as server:
        pop = poplib.POP3(server.host, server.pop3_port)
        assert re.search(rb"<[^<>@]+@[^<>]+>", pop.getwelcome())
        pop.apop("alice", "alice-pw")
        assert pop.stat() == (0, 0)
        pop.quit()
    with DevServer(tmp_path / "plain") as server:
        pop = poplib.POP3(server.host, server.pop3_port)
        assert b"<" not in pop.getwelcome()
        pop.quit()


def test_add_user_at_runtime_logs_in_at_once(dovecot: DovecotUser) -> None:
    for number in range(3):
        dovecot.server.add_user(f"{dovecot.user}-extra{number}", "pw")
        conn = imaps(dovecot.server)
        assert conn.login(f"{dovecot.user}-extra{number}", "pw")[0] == "OK"
        conn.logout()


def test_restart_onto_a_taken_port_fails_with_the_log(own_server: DevServer) -> None:
    own_server.start()
    own_server.stop()
    with socket.create_server((own_server.host, own_server.pop3_port)), \
            pytest.raises(DovecotError, match="Address already in use"):
        own_server.start()
    own_server.start()  # and works again once the port is free
    own_server.stop()


def test_proxy_cut_all_gives_eof(dovecot: DovecotUser) -> None:
    with CutProxy(dovecot.server.host, dovecot.server.imap_port) as proxy:
        conn = imaplib.IMAP4(dovecot.server.host, proxy.port)
        conn.login(dovecot.user, dovecot.password)
        raw = conn.socket()
        proxy.cut_all()
        raw.settimeout(5)
        assert raw.recv(100) == b""
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            conn.noop()
        conn.shutdown()
        # New connections still work after a cut.
        again = imaplib.IMAP4(dovecot.server.host, proxy.port)
        assert again.login(dovecot.user, dovecot.password)[0] == "OK"
        again.logout()


def test_proxy_cut_after_bytes_mid_response(dovecot: DovecotUser) -> None:
    server = dovecot.server
    server.append(dovecot.user, "INBOX", b"Subject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n")
    with CutProxy(server.host, server.imaps_port) as proxy:
        proxy.cut_after_bytes(20_000)  # past the TLS handshake and login, inside the FETCH
        conn = imaplib.IMAP4_SSL(server.host, proxy.port, ssl_context=server.client_context())
        conn.login(dovecot.user, dovecot.password)
        conn.select()
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            conn.fetch("1", "(BODY.PEEK[])")
        conn.shutdown()
        proxy.reset()
        conn = imaplib.IMAP4_SSL(server.host, proxy.port, ssl_context=server.client_context())
        conn.login(dovecot.user, dovecot.password)
        conn.select()
        assert conn.fetch("1", "(BODY.PEEK[])")[0] == "OK"
        conn.logout()
