"""What mail readers see in an mbox we wrote: the flags the server had when a message was
stored, through Status:/X-Status: fields (real neomutt in tmux, and the standard
library's mailbox module), and the server's exact bytes when those fields are off.
"""

from __future__ import annotations

import mailbox
import os
import re
import shutil
from pathlib import Path

from mailsyncd.config import load_config
from tests.conftest import DovecotUser
from tests.helpers import mbox_contents, neomutt, normalize, sync, write_config

FLAGS = {  # subject -> server flags
    "plain new mail": [],
    "read mail": ["\\Seen"],
    "flagged mail": ["\\Flagged"],
    "answered and read": ["\\Answered", "\\Seen"],
    "a draft, deleted": ["\\Draft", "\\Deleted"],
}
MAILBOX_FLAGS = {"plain new mail": "O", "read mail": "RO", "flagged mail": "OF", "answered and read": "ROA",
                 "a draft, deleted": "ODT"}


def fill(dovecot: DovecotUser) -> None:
    for index, (subject, flags) in enumerate(FLAGS.items()):
        [uid] = dovecot.server.append_many(dovecot.user, "INBOX", [
            f"From: sender{index}@example.org\r\nSubject: {subject}\r\nMessage-ID: <r{index}@example.org>\r\n"
            f"\r\nbody {index}\r\n".encode()])
        if flags:
            dovecot.server.add_flags(dovecot.user, "INBOX", [uid], flags)


def synced(tmp_path: Path, dovecot: DovecotUser, store_extra: str = "") -> Path:
    fill(dovecot)
    config = write_config(tmp_path, dovecot.server, dovecot.user, dovecot.password, "mbox", store_extra=store_extra)
    assert sync(config) == 0
    return load_config(config).accounts[0].store.path / "INBOX"


def test_the_mailbox_module_reads_the_servers_flags(tmp_path: Path, dovecot: DovecotUser) -> None:
    box = mailbox.mbox(synced(tmp_path, dovecot), create=False)
    try:
        read = {message["Subject"]: message.get_flags() for message in box}
    finally:
        box.close()
    assert {subject: "".join(sorted(flags)) for subject, flags in read.items()} == {
        subject: "".join(sorted(flags)) for subject, flags in MAILBOX_FLAGS.items()}


def test_neomutt_shows_the_servers_flags(tmp_path: Path, dovecot: DovecotUser) -> None:
    with neomutt(synced(tmp_path, dovecot), tmp_path / "home") as keys:
        screen = keys("")
    rows = {subject: re.search(rf"\[(.*?)\] {re.escape(subject)}", screen) for subject in FLAGS}
    assert all(rows.values()), screen
    shown = {subject: match[1] for subject, match in rows.items() if match}
    assert "N" not in "".join(shown.values()), f"a message is shown as new:\n{screen}"
    assert "O" in shown["plain new mail"], screen  # stored unread: old, not new
    assert shown["read mail"].strip() == "", screen
    assert "!" in shown["flagged mail"], screen
    assert "r" in shown["answered and read"], screen
    assert "D" in shown["a draft, deleted"], screen


def test_without_status_headers_the_bytes_are_the_servers(tmp_path: Path, dovecot: DovecotUser) -> None:
    path = synced(tmp_path, dovecot, "mbox_status_headers = false")
    server = dovecot.server.fetch_all(dovecot.user, "INBOX").values()
    assert mbox_contents(path.parent, status_headers=False) == {"INBOX": {normalize(body): 1 for body in server}}
    assert b"Status:" not in path.read_bytes()


def test_dovecot_reads_the_servers_flags_and_lists_no_journal(tmp_path: Path, dovecot: DovecotUser) -> None:
    """The same Dovecot serves a copy of our mbox store from the user's home (it chroots
    there and reads as the mail user): it lists no journal and shows the server's flags."""
    home = dovecot.server.maildir(dovecot.user).parent
    served = home / "archive"
    shutil.copytree(synced(tmp_path, dovecot).parent, served)
    for path in [served, *served.rglob("*")]:
        os.chown(path, home.stat().st_uid, home.stat().st_gid)
    inside = f"/{dovecot.user}/archive"  # the path in Dovecot's chroot
    location = f"mail_location=mbox:{inside}:INBOX={inside}/INBOX:INDEX=MEMORY"
    listed = dovecot.server.doveadm("-o", location, "mailbox", "list", "-u", dovecot.user).split()
    assert "INBOX" in listed and not [name for name in listed if "mailsyncd" in name], listed
    fetched = dovecot.server.doveadm("-o", location, "-f", "flow", "fetch", "-u", dovecot.user,
                                     "flags hdr.subject", "mailbox", "INBOX", "all")
    shown = {match[2]: set(match[1].split()) - {"\\Recent"}
             for match in re.finditer(r"flags=(.*?) hdr\.subject=(.*)", fetched)}
    assert shown == {subject: set(flags) for subject, flags in FLAGS.items()}, fetched
