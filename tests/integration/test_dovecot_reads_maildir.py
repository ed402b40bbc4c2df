"""Dovecot serving a Maildir store that mailsyncd wrote, with the settings the README
gives: every folder listed under its server name (non-ASCII ones too), every message
there. The README's lines are read from the README itself, so the two cannot drift."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import DovecotUser
from tests.helpers import REPO, corpus_messages, normalize, sync, write_config

FOLDERS = ["Entwürfe", "Архив", "日本語/報告", "Plain/Sub"]


def readme_location(layout: str) -> str:
    """The README's ``mail_location`` line for ``layout``."""
    lines = re.findall(r"^\s*mail_location = (maildir:~/Mail/personal:\S+)$", (REPO / "README.md").read_text(),
                       re.MULTILINE)
    [line] = [line for line in lines if ("LAYOUT=fs" in line) == (layout == "fs")]
    return line


@pytest.mark.parametrize("layout", ["maildir++", "fs"])
def test_dovecot_lists_and_reads_our_folders_with_the_readme_settings(
        tmp_path: Path, dovecot: DovecotUser, layout: str) -> None:
    server = dovecot.server
    bodies = [path.read_bytes() for path in corpus_messages(len(FOLDERS) + 1)]
    for index, folder in enumerate(FOLDERS):
        server.create_folder(dovecot.user, folder)
        server.append_many(dovecot.user, folder, [bodies[index]])
    server.append_many(dovecot.user, "INBOX", [bodies[-1]])
    config = write_config(tmp_path, server, dovecot.user, dovecot.password, store_extra=f'layout = "{layout}"')
    assert sync(config) == 0
    # The same Dovecot serves a copy from the user's home: it chroots there and reads as the mail user.
    home = server.maildir(dovecot.user).parent
    served = home / "Mail" / "personal"
    shutil.copytree(tmp_path / "store-acct", served)
    for path in [served.parent, served, *served.rglob("*")]:
        os.chown(path, home.stat().st_uid, home.stat().st_gid)
    location = readme_location(layout).replace("~", f"/{dovecot.user}") + ":INDEX=MEMORY"
    listed = set(server.doveadm("-o", f"mail_location={location}", "-f", "flow", "mailbox", "list",
                                "-u", dovecot.user).splitlines())
    assert set(FOLDERS) | {"INBOX"} <= listed, listed
    for index, folder in enumerate([*FOLDERS, "INBOX"]):
        fetched = server.doveadm("-o", f"mail_location={location}", "-f", "flow", "fetch", "-u", dovecot.user,
                                 "size.physical", "mailbox", folder, "all")
        # The one message, whole: Maildir keeps LF line ends, which Dovecot counts as they are.
        assert re.findall(r"size\.physical=(\d+)", fetched) == [str(len(normalize(bodies[index])))], (folder, fetched)
