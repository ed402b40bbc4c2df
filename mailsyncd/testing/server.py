"""One private Dovecot with IMAP, IMAPS, POP3 and POP3S, owning one working directory.

A :class:`DovecotServer` owns config, throwaway CA and server certificate, runtime sockets, log,
and every user's Maildir. It listens on 127.0.0.1 only, on free ports picked at the first start
and kept across restarts, so clients configured once keep working.
"""

from __future__ import annotations

import atexit
import contextlib
import imaplib
import os
import re
import ssl
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Self

from mailsyncd.testing import fill, launch
from mailsyncd.testing.dovecot_config import Ports, make_certificates, render_config, render_oauth2
from mailsyncd.testing.users import give_to_mail_user, write_user


class DovecotServer:
    """Start, stop, users and mail for one private Dovecot instance in ``workdir``."""

    host: str = launch.HOST

    def __init__(
        self,
        workdir: Path,
        users: Sequence[tuple[str, str]] = (("alice", "alice-pw"),),
        *,
        apop: bool = False,
        oauth2_introspection_url: str | None = None,
        imap_capability: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        if re.search(r'[\s%"]', str(self.workdir)):  # Dovecot splits args on spaces and expands %
            raise launch.DovecotError(f"Dovecot config cannot hold this workdir path: {self.workdir}")
        self.apop = apop
        # With a URL, Dovecot checks OAuth2 tokens itself, by introspection at that URL.
        self.oauth2_introspection_url = oauth2_introspection_url
        self.imap_capability = imap_capability
        self.imap_port = self.imaps_port = self.pop3_port = self.pop3s_port = 0
        self.ca_file = self.workdir / "ca.pem"
        self.config_file = self.workdir / "dovecot.conf"
        self.log_file = self.workdir / "dovecot.log"
        self._users: dict[str, str] = {}
        self._pending_users = list(users)
        self._process: subprocess.Popen[bytes] | None = None
        self._root = os.geteuid() == 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Write config and certificates, start ``dovecot -F``, return once every port greets."""
        if self._process is not None:
            return
        dovecot = launch.find_dovecot()
        if dovecot is None:
            raise launch.DovecotError("dovecot is not installed; run scripts/test which installs it")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        for sub in ("run", "state", "users", "mail"):
            (self.workdir / sub).mkdir(exist_ok=True)
        give_to_mail_user(self.workdir / "mail", root=self._root)
        make_certificates(self.workdir, self.ca_file)
        for user, password in self._pending_users:
            self.add_user(user, password)
        self._pending_users = []
        # Ports are picked once, then kept, so restart() is invisible to configured clients.
        # Someone may take a just-freed port before dovecot binds it: then retry with new ones.
        fixed = self.imap_port != 0
        for _attempt in range(1 if fixed else 3):
            if not fixed:
                self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = launch.free_ports(4)
            ports = Ports(self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port)
            if self.oauth2_introspection_url is not None:
                (self.workdir / "dovecot-oauth2.conf.ext").write_text(render_oauth2(self.oauth2_introspection_url))
            self.config_file.write_text(render_config(self.workdir, self.log_file, ports, apop=self.apop,
                                                      root=self._root,
                                                      oauth2=self.oauth2_introspection_url is not None,
                                                      imap_capability=self.imap_capability))
            greeters = [(ports.imap, False), (ports.pop3, False), (ports.imaps, True), (ports.pop3s, True)]
            self._process = launch.launch(
                dovecot, self.workdir, self.config_file, self.log_file, greeters, self.client_context)
            if self._process is not None:
                atexit.register(self.stop)
                return
        raise launch.DovecotError(
            f"dovecot could not bind its ports:\n{launch.log_tail(self.workdir, self.log_file)}")

    def stop(self) -> None:
        """Terminate dovecot and all its children; idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        launch.stop(process, self.workdir / "run")

    def restart(self) -> None:
        """Stop and start again on the same ports, with the same users, data and CA."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- users -------------------------------------------------------------------------------------

    def add_user(self, user: str, password: str) -> None:
        """Create a user or change a password; works while the server runs (see :func:`write_user`)."""
        write_user(self.workdir, user, password, root=self._root)
        self._users[user] = password

    def password(self, user: str) -> str:
        return self._users[user]

    def account_toml(self, user: str, store: Path | str, *, name: str | None = None, password: str | None = None,
                     extra: str = "", store_extra: str = "") -> str:
        """An ``[[account]]`` table of mailsyncd's config syncing ``user``'s mailbox over
        IMAPS into a Maildir at ``store``: the demo's, the benchmarks' and the tests'.
        ``password`` is the inline password (the user's by default); ``extra`` lines go
        into the account table (another password source among them: pass ``password=""``),
        ``store_extra`` into its store table."""
        secret = self._users.get(user, "") if password is None else password
        return (f'\n[[account]]\nname = "{name or user}"\nprotocol = "imap"\nhost = "{self.host}"\n'
                f'port = {self.imaps_port}\ntls_ca_file = "{self.ca_file}"\nusername = "{user}"\n'
                + (f'password = "{secret}"\n' if secret else "") + (f"{extra}\n" if extra else "")
                + f'\n[account.store]\nformat = "maildir"\npath = "{store}"\n'
                + (f"{store_extra}\n" if store_extra else ""))

    def maildir(self, user: str) -> Path:
        """The user's Maildir root (INBOX) on disk; sub-folders are nested directories (LAYOUT=fs).

        As root it belongs to ``nobody``: a file put there by hand must be chowned to be readable.
        """
        return self.workdir / "mail" / user / "Maildir"

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts exactly this server's throwaway CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -- mail --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self, user: str, folder: str | None = None, *, readonly: bool = False) -> Iterator[imaplib.IMAP4]:
        """A stdlib IMAPS session as ``user``, with ``folder`` selected (or examined) if given."""
        with fill.session(self.host, self.imaps_port, self.client_context(), user, self.password(user),
                          folder, readonly=readonly) as conn:
            yield conn

    def append(
        self,
        user: str,
        folder: str,
        data: bytes,
        flags: Sequence[str] = (),
        internaldate: datetime | None = None,
    ) -> int:
        """Store one message, creating the folder if needed; returns its UID."""
        with self.session(user) as conn:
            return fill.append(conn, folder, [(flags, internaldate, data)])[0]

    def append_many(self, user: str, folder: str, messages: Iterable[bytes]) -> list[int]:
        """Store many messages over one connection in MULTIAPPEND batches; returns their UIDs."""
        with self.session(user) as conn:
            return fill.append_batches(conn, folder, messages)
