"""Mail users of the private Dovecot: one passwd-file each, and mail directories it may enter."""

from __future__ import annotations

import grp
import os
import pwd
import re
from pathlib import Path

from mailsyncd.testing.launch import DovecotError

_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def give_to_mail_user(path: Path, *, root: bool) -> None:
    """Hand a mail directory to the uid the mail processes run as (Dovecot refuses root)."""
    if root:
        os.chown(path, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
    path.chmod(0o700)


def write_user(workdir: Path, user: str, password: str, *, root: bool) -> None:
    """Create a user or change a password; works while the server runs.

    Each user has their own passwd-file (``users/%u``). Dovecot re-reads a changed passwd-file
    at most once a second, but opens a file it has not seen before at once, so a new user can
    log in immediately. (A changed password may take up to a second to apply.)
    """
    if not _USER_NAME.fullmatch(user) or any(c in password for c in ":\r\n"):
        raise DovecotError(f"unsupported user name or password for {user!r}")
    home = workdir / "mail" / user
    home.mkdir(exist_ok=True)
    give_to_mail_user(home, root=root)  # else the first login logs "chdir failed"
    scratch = workdir / "users" / f".{user}.tmp"
    scratch.write_text(f"{user}:{{PLAIN}}{password}\n")
    scratch.chmod(0o600)
    scratch.replace(workdir / "users" / user)
