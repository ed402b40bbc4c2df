"""A private, throwaway Dovecot server for tests, the demo and benchmarks.

A :class:`DevServer` owns one directory: config, throwaway CA and server certificate, runtime
sockets, log, and every user's Maildir. It listens on 127.0.0.1 only, on free ports picked at the
first start and kept across restarts, so clients configured once keep working.

Root (the normal case in CI) needs care: Dovecot refuses to run mail processes as root, and the
workdir usually sits under a 0700 directory (``/tmp/pytest-of-root``) no other uid can enter. So as
root the mail processes chroot into ``<workdir>/mail`` while still root and only then become
``nobody``, and the auth process, which reads the password files, stays root. As a normal user,
everything runs as that user and nothing chroots.

The fill helpers speak IMAP over implicit TLS with stdlib :mod:`imaplib`, verifying against
:attr:`DevServer.ca_file`, so they share no code with the client under test.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType

__all__ = ["DevServer", "DevServerError", "decode_mutf7", "encode_mutf7", "find_dovecot"]

_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_APPENDUID = re.compile(rb"\[APPENDUID \d+ ([0-9:,]+)\]")
_START_TIMEOUT = 15.0
_BATCH_BYTES = 8 << 20  # a MULTIAPPEND stops growing here, so a big fill never sits in one command
_Message = tuple[Sequence[str], datetime | None, bytes]  # flags, internaldate, bytes


class DevServerError(RuntimeError):
    """The test server could not be started, or a helper command failed."""


def find_dovecot() -> str | None:
    """The dovecot binary, also when /usr/sbin is missing from a normal user's PATH."""
    return shutil.which("dovecot", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def encode_mutf7(name: str) -> str:
    """Encode a folder name to IMAP modified UTF-7 (RFC 3501 section 5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = base64.b64encode("".join(pending).encode("utf-16-be")).rstrip(b"=")
            out.append("&" + raw.decode("ascii").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def decode_mutf7(name: str) -> str:
    """Decode IMAP modified UTF-7; the inverse of :func:`encode_mutf7`."""

    def shifted(match: re.Match[str]) -> str:
        raw = match.group(1).replace(",", "/")
        if not raw:
            return "&"
        return base64.b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-16-be")

    return re.sub(r"&([^-]*)-", shifted, name)


def _mailbox(folder: str) -> str:
    """The quoted wire form of a decoded folder name: imaplib sends its arguments verbatim."""
    return '"' + encode_mutf7(folder).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _uid_set(uids: Iterable[int]) -> str:
    return ",".join(str(uid) for uid in sorted(set(uids)))


def _check(result: tuple[str, Sequence[object]], what: str) -> Sequence[object]:
    status, data = result
    if status != "OK":
        raise DevServerError(f"{what} failed: {status} {data!r}")
    return data


def _free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out, held open together so that they are distinct."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _live_members(pgid: int) -> bool:
    """Whether a process group still has a running (not zombie) member, read from Linux /proc.

    Orphaned zombies stay in the group wherever PID 1 does not reap them (containers, CI), so
    ``killpg(pgid, 0)`` alone would report them alive forever.
    """
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


class DevServer:
    """One private Dovecot instance with IMAP, IMAPS, POP3 and POP3S in ``workdir``."""

    host: str = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        users: Sequence[tuple[str, str]] = (("alice", "alice-pw"),),
        *,
        apop: bool = False,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        if re.search(r'[\s%"]', str(self.workdir)):  # Dovecot splits args on spaces and expands %
            raise DevServerError(f"Dovecot config cannot hold this workdir path: {self.workdir}")
        self.apop = apop
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
        dovecot = find_dovecot()
        if dovecot is None:
            raise DevServerError("dovecot is not installed; run scripts/test which installs it")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        for sub in ("run", "state", "users", "mail"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self._give_to_mail_user(self.workdir / "mail")
        self._make_certificates()
        for user, password in self._pending_users:
            self.add_user(user, password)
        self._pending_users = []
        # Ports are picked once, then kept, so restart() is invisible to configured clients.
        # Someone may take a just-freed port before dovecot binds it: then retry with new ones.
        fixed = self.imap_port != 0
        for _attempt in range(1 if fixed else 3):
            if not fixed:
                self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = _free_ports(4)
            self.config_file.write_text(self._render_config())
            if self._launch(dovecot):
                return
        raise DevServerError(f"dovecot could not bind its ports:\n{self._log_tail()}")

    def _launch(self, dovecot: str) -> bool:
        """Start the master; True once all ports greet, False on a port clash (caller retries)."""
        # Dovecot's anvil delays every login from an IP for up to 15 s after a failed one from it:
        # one wrong-password test would slow all later tests on 127.0.0.1. The auth process
        # quietly does without this penalty if its anvil socket is missing when it starts, and
        # it starts only at the first login, so the socket is unlinked as soon as it appears.
        penalty_socket = self.workdir / "run" / "anvil-auth-penalty"
        for stale in (self.workdir / "run" / "master.pid", penalty_socket):
            stale.unlink(missing_ok=True)  # of a SIGKILLed master
        penalty: Path | None = penalty_socket
        stderr_file = self.workdir / "dovecot.stderr"  # this launch only; log_path keeps history
        with open(stderr_file, "wb") as stderr:
            # A new session makes the master a group leader: stop() reaches every child by killpg.
            self._process = subprocess.Popen(
                [dovecot, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + _START_TIMEOUT
        # A listening port only proves the master bound it. Reading the greeting (through TLS on
        # the TLS ports) proves login processes, auth config and certificate all work.
        waiting = [(self.imap_port, False), (self.pop3_port, False), (self.imaps_port, True),
                   (self.pop3s_port, True)]
        error: Exception | None = None
        while waiting:
            if self._process.poll() is not None:
                self.stop()
                if "Address already in use" in stderr_file.read_text(errors="replace"):
                    return False
                raise DevServerError(f"dovecot exited during startup:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise DevServerError(f"dovecot not ready in {_START_TIMEOUT}s ({error}):\n{self._log_tail()}")
            if penalty is not None:
                if penalty.exists():
                    penalty.unlink()
                    penalty = None
                time.sleep(0.002)
                continue
            try:
                port, tls = waiting[0]
                with contextlib.ExitStack() as stack:
                    sock = stack.enter_context(socket.create_connection((self.host, port), timeout=2))
                    if tls:
                        context = self.client_context()
                        sock = stack.enter_context(context.wrap_socket(sock, server_hostname=self.host))
                    if sock.recv(64).startswith((b"* OK", b"+OK")):
                        waiting.pop(0)
            except OSError as exc:
                error = exc
                time.sleep(0.02)
        return True

    def stop(self) -> None:
        """Terminate dovecot and all its children; idempotent.

        SIGTERM first, so connected clients get a BYE as from a real server restart. The master
        then sleeps a fixed second for its log process before exiting; once the mail and login
        processes had their moment, the group is SIGKILLed instead of waiting that out.
        """
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.3)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if process.poll() is not None and not _live_members(process.pid):
                break  # nothing holds the listening sockets any more; restart() can rebind
            if time.monotonic() > deadline:
                raise DevServerError(f"dovecot process group {process.pid} does not die")
            time.sleep(0.01)
        (self.workdir / "run" / "master.pid").unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop and start again on the same ports, with the same users, data and CA."""
        self.stop()
        self.start()

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- users -------------------------------------------------------------------------------------

    def add_user(self, user: str, password: str) -> None:
        """Create a user or change a password; works while the server runs.

        Each user has their own passwd-file (``users/%u``). Dovecot re-reads a changed passwd-file
        at most once a second, but opens a file it has not seen before at once, so a new user can
        log in immediately. (A changed password may take up to a second to apply.)
        """
        if not _USER_NAME.fullmatch(user) or any(c in password for c in ":\r\n"):
            raise DevServerError(f"unsupported user name or password for {user!r}")
        home = self.workdir / "mail" / user
        home.mkdir(exist_ok=True)
        self._give_to_mail_user(home)  # else the first login logs "chdir failed"
        scratch = self.workdir / "users" / f".{user}.tmp"
        scratch.write_text(f"{user}:{{PLAIN}}{password}\n")
        scratch.chmod(0o600)
        scratch.replace(self.workdir / "users" / user)
        self._users[user] = password

    def password(self, user: str) -> str:
        return self._users[user]

    def maildir(self, user: str) -> Path:
        """The user's Maildir root (INBOX) on disk; sub-folders are nested directories (LAYOUT=fs).

        As root it belongs to ``nobody``: a file put there by hand must be chowned to be readable.
        """
        return self.workdir / "mail" / user / "Maildir"

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts exactly this server's throwaway CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -- fill and inspect helpers ------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(
        self, user: str, folder: str | None = None, *, readonly: bool = False
    ) -> Iterator[imaplib.IMAP4]:
        conn = imaplib.IMAP4_SSL(self.host, self.imaps_port, ssl_context=self.client_context(), timeout=60)
        try:
            conn.login(user, self.password(user))
            if folder is not None:
                _check(conn.select(_mailbox(folder), readonly=readonly), f"SELECT {folder!r}")
            yield conn
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                conn.logout()

    @staticmethod
    def _append(conn: imaplib.IMAP4, folder: str, messages: Sequence[_Message]) -> list[int]:
        """One MULTIAPPEND with LITERAL+ (a single round trip); returns the UIDs from APPENDUID.

        Written to the socket by hand because imaplib.append() rewrites bare CR and LF to CRLF,
        and test messages must reach the server byte for byte.
        """
        if folder.upper() != "INBOX":
            status, reply = conn.create(_mailbox(folder))
            if status != "OK" and b"ALREADYEXISTS" not in b" ".join(r for r in reply if isinstance(r, bytes)):
                raise DevServerError(f"CREATE {folder!r} failed: {reply!r}")
        tag = b"DS%d" % time.monotonic_ns()
        parts = [tag + b" APPEND " + _mailbox(folder).encode("ascii")]
        for flags, internaldate, data in messages:
            if flags:
                parts.append(b" (" + " ".join(flags).encode("ascii") + b")")
            if internaldate is not None:
                parts.append(b" " + imaplib.Time2Internaldate(internaldate).encode("ascii"))
            # NUL goes as literal8 (BINARY): Dovecot then stores binary MIME parts base64-encoded,
            # so IMAP and POP3 serve the same bytes. From a plain literal it would store the NUL,
            # but send it as 0x80 over IMAP and as NUL over POP3.
            literal = b" ~{%d+}\r\n" if b"\0" in data else b" {%d+}\r\n"
            parts.append(literal % len(data) + data)
        conn.send(b"".join(parts) + b"\r\n")
        line = b""
        while not line.startswith(tag + b" "):
            line = conn.readline()
            if not line:
                raise DevServerError("connection closed during APPEND")
        match = _APPENDUID.search(line)
        if not line.startswith(tag + b" OK") or match is None:
            raise DevServerError(f"APPEND to {folder!r} failed: {line!r}")
        uids: list[int] = []
        for part in match.group(1).decode("ascii").split(","):
            low, _, high = part.partition(":")
            uids.extend(range(int(low), int(high or low) + 1))
        if len(uids) != len(messages):
            raise DevServerError(f"APPENDUID lists {len(uids)} UIDs for {len(messages)} messages")
        return uids

    def append(
        self,
        user: str,
        folder: str,
        data: bytes,
        flags: Sequence[str] = (),
        internaldate: datetime | None = None,
    ) -> int:
        """Store one message, creating the folder if needed; returns its UID."""
        with self._session(user) as conn:
            return self._append(conn, folder, [(flags, internaldate, data)])[0]

    def append_many(self, user: str, folder: str, messages: Iterable[bytes]) -> list[int]:
        """Store many messages over one connection in MULTIAPPEND batches; returns their UIDs."""
        uids: list[int] = []
        batch: list[_Message] = []
        size = 0
        with self._session(user) as conn:
            for data in messages:
                batch.append(((), None, data))
                size += len(data)
                if len(batch) >= 2000 or size >= _BATCH_BYTES:
                    uids += self._append(conn, folder, batch)
                    batch, size = [], 0
            if batch:
                uids += self._append(conn, folder, batch)
        return uids

    def create_folder(self, user: str, folder: str) -> None:
        with self._session(user) as conn:
            _check(conn.create(_mailbox(folder)), f"CREATE {folder!r}")

    def rename_folder(self, user: str, old: str, new: str) -> None:
        with self._session(user) as conn:
            _check(conn.rename(_mailbox(old), _mailbox(new)), f"RENAME {old!r}")

    def delete_folder(self, user: str, folder: str) -> None:
        with self._session(user) as conn:
            _check(conn.delete(_mailbox(folder)), f"DELETE {folder!r}")

    def _store(self, user: str, folder: str, uids: Iterable[int], how: str, flags: Sequence[str]) -> None:
        if uid_set := _uid_set(uids):
            with self._session(user, folder) as conn:
                _check(conn.uid("STORE", uid_set, how, f"({' '.join(flags)})"), "UID STORE")

    def set_flags(self, user: str, folder: str, uids: Iterable[int], flags: Sequence[str]) -> None:
        self._store(user, folder, uids, "FLAGS.SILENT", flags)

    def add_flags(self, user: str, folder: str, uids: Iterable[int], flags: Sequence[str]) -> None:
        self._store(user, folder, uids, "+FLAGS.SILENT", flags)

    def remove_flags(self, user: str, folder: str, uids: Iterable[int], flags: Sequence[str]) -> None:
        self._store(user, folder, uids, "-FLAGS.SILENT", flags)

    def expunge(self, user: str, folder: str, uids: Iterable[int]) -> None:
        """Expunge exactly these UIDs; UID EXPUNGE leaves other \\Deleted messages alone."""
        if uid_set := _uid_set(uids):
            with self._session(user, folder) as conn:
                _check(conn.uid("STORE", uid_set, "+FLAGS.SILENT", r"(\Deleted)"), "UID STORE")
                _check(conn.uid("EXPUNGE", uid_set), "UID EXPUNGE")

    def uids(self, user: str, folder: str) -> list[int]:
        with self._session(user, folder, readonly=True) as conn:
            found = _check(conn.uid("SEARCH", "ALL"), "UID SEARCH")
            raw = found[0] if found and isinstance(found[0], bytes) else b""
            return sorted(int(uid) for uid in raw.split())

    def _fetch(self, user: str, folder: str, items: str) -> Sequence[object]:
        """UID FETCH of everything, read-only (EXAMINE, BODY.PEEK): inspecting changes no flag."""
        with self._session(user, folder, readonly=True) as conn:
            if conn.untagged_responses.get("EXISTS", [b"0"])[-1] == b"0":
                return []
            return _check(conn.uid("FETCH", "1:*", items), "UID FETCH")

    def flags(self, user: str, folder: str) -> dict[int, set[str]]:
        """Flags per UID, without ``\\Recent``, which belongs to a session rather than a message."""
        result: dict[int, set[str]] = {}
        for item in self._fetch(user, folder, "(UID FLAGS)"):
            text = item.decode() if isinstance(item, bytes) else ""
            uid, flags = re.search(r"UID (\d+)", text), re.search(r"FLAGS \(([^)]*)\)", text)
            if uid and flags:
                result[int(uid.group(1))] = set(flags.group(1).split()) - {"\\Recent"}
        return result

    def fetch_all(self, user: str, folder: str) -> dict[int, bytes]:
        """Every message's full bytes as the server serves them (BODY.PEEK[])."""
        result: dict[int, bytes] = {}
        for item in self._fetch(user, folder, "(UID BODY.PEEK[])"):
            if isinstance(item, tuple):
                uid = re.search(rb"UID (\d+)", item[0])
                if uid is None:
                    raise DevServerError(f"FETCH response without UID: {item[0]!r}")
                result[int(uid.group(1))] = item[1]
        return result

    def list_folders(self, user: str) -> list[str]:
        """Decoded, sorted names of the selectable folders (LAYOUT=fs ``\\Noselect`` parents left out)."""
        names: list[str] = []
        with self._session(user) as conn:
            for item in _check(conn.list('""', "*"), "LIST"):
                line, literal = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
                if not isinstance(line, bytes):
                    continue
                match = re.match(rb'\(([^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) ?(.*)', line)
                if match is None or {b"\\noselect", b"\\nonexistent"} & set(match.group(1).lower().split()):
                    continue
                raw = literal if literal is not None else match.group(2)
                if raw.startswith(b'"'):
                    raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
                names.append(decode_mutf7(raw.decode("ascii")))
        return sorted(names)

    def change_uidvalidity(self, user: str, folder: str) -> int:
        """Give the folder a new UIDVALIDITY, keeping every message and its bytes; returns it.

        ``doveadm mailbox update`` rewrites the index and dovecot-uidlist together, which is what a
        client sees after a server rebuilt or restored a mailbox. UIDs stay, but are new by rule.
        """
        new = self._uidvalidity(user, folder) % 0xFFFFFFFF + 1
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(new), folder)
        if self._uidvalidity(user, folder) != new:
            raise DevServerError(f"UIDVALIDITY of {folder!r} did not change")
        return new

    def _uidvalidity(self, user: str, folder: str) -> int:
        # doveadm takes decoded (UTF-8) folder names, not modified UTF-7.
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", user, "uidvalidity", folder)
        return int(out.split("uidvalidity=")[1].split()[0])

    def doveadm(self, *args: str) -> str:
        """Run doveadm against this instance's config; returns stdout."""
        done = subprocess.run(
            ["doveadm", "-c", str(self.config_file), *args], capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise DevServerError(f"doveadm {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode()

    # -- internals ---------------------------------------------------------------------------------

    def _give_to_mail_user(self, path: Path) -> None:
        """Hand a mail directory to the uid the mail processes run as (Dovecot refuses root)."""
        if self._root:
            os.chown(path, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        path.chmod(0o700)

    def _log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.workdir / "dovecot.stderr", self.log_file):
            if path.exists():
                text += "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        return text

    def _make_certificates(self) -> None:
        """A throwaway CA and a server cert for 127.0.0.1 and localhost; kept across restarts."""
        server_cert, server_key, ca_key = (self.workdir / n for n in ("server.pem", "server.key", "ca.key"))
        if server_cert.exists() and server_key.exists() and self.ca_file.exists():
            return
        cnf = self.workdir / "openssl.cnf"
        # Own config, so the host's openssl.cnf defaults cannot add or clash with extensions.
        cnf.write_text(
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = mailsyncd devserver\n"
            "[ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
            "subjectKeyIdentifier = hash\n"
            "[server]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n"
            "extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1,DNS:localhost\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        )
        common = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                  "-days", "10", "-config", str(cnf)]
        for argv in (
            [*common, "-extensions", "ca", "-subj", "/CN=mailsyncd devserver CA",
             "-keyout", str(ca_key), "-out", str(self.ca_file)],
            [*common, "-extensions", "server", "-subj", "/CN=localhost", "-CA", str(self.ca_file),
             "-CAkey", str(ca_key), "-keyout", str(server_key), "-out", str(server_cert)],
        ):
            try:
                subprocess.run(["openssl", *argv], capture_output=True, check=True)
            except subprocess.CalledProcessError as exc:
                raise DevServerError(f"openssl failed: {exc.stderr.decode(errors='replace')}") from exc
            except OSError as exc:
                raise DevServerError(f"openssl is needed for the test certificates: {exc}") from exc
        ca_key.unlink()  # nothing else will ever be signed with it

    def _render_config(self) -> str:
        work = self.workdir
        if self._root:
            # "/./" in home chroots the mail process into <workdir>/mail while still root; only
            # then does it become nobody. valid_chroot_dirs is what permits that chroot.
            privileges = (
                "mail_uid = nobody\nmail_gid = nogroup\n"
                f"valid_chroot_dirs = {work}/mail\nservice auth {{\n  user = root\n}}\n"
            )
            home = f"{work}/mail/./%u"
        else:
            me, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
            unchrooted = ("anvil", "imap-login", "pop3-login")  # chroot needs root
            privileges = (
                f"default_internal_user = {me}\ndefault_internal_group = {group}\n"
                f"default_login_user = {me}\nmail_uid = {os.getuid()}\nmail_gid = {os.getgid()}\n"
                + "".join(f"service {name} {{\n  chroot =\n}}\n" for name in unchrooted)
            )
            home = f"{work}/mail/%u"
        listeners = "".join(
            f"service {proto}-login {{\n  service_count = 0\n"
            f"  inet_listener {proto} {{\n    port = {plain}\n  }}\n"
            f"  inet_listener {proto}s {{\n    port = {tls}\n    ssl = yes\n  }}\n}}\n"
            for proto, plain, tls in (("imap", self.imap_port, self.imaps_port),
                                      ("pop3", self.pop3_port, self.pop3s_port))
        )
        specials = "".join(
            f"  mailbox {name} {{\n    special_use = \\{name}\n    auto = subscribe\n  }}\n"
            for name in ("Drafts", "Junk", "Sent", "Trash")
        )
        return (
            "# Generated by mailsyncd.devserver at every start.\n"
            f"instance_name = mailsyncd-{self.imap_port}\nbase_dir = {work}/run\nstate_dir = {work}/state\n"
            f"log_path = {self.log_file}\nlisten = 127.0.0.1\nprotocols = imap pop3\n{privileges}"
            "first_valid_uid = 1\nfirst_valid_gid = 1\n"
            f"ssl = yes\nssl_cert = <{work}/server.pem\nssl_key = <{work}/server.key\n"
            "# Plaintext LOGIN works on the plain ports: the client's own refusal is what tests check.\n"
            "disable_plaintext_auth = no\n"
            # APOP makes pop3-login put a <timestamp> in its greeting; it needs {PLAIN} passwords.
            f"auth_mechanisms = plain login{' apop' if self.apop else ''}\n"
            "auth_username_format = %u\nauth_failure_delay = 0\nauth_verbose = yes\n"
            "mail_plugins =\nmail_location = maildir:~/Maildir:LAYOUT=fs\nmail_fsync = never\n"
            "mail_max_userip_connections = 100\nimap_idle_notify_interval = 10 secs\n"
            f"passdb {{\n  driver = passwd-file\n  args = {work}/users/%u\n}}\n"
            f"userdb {{\n  driver = static\n  args = home={home} allow_all_users=yes\n}}\n"
            f"namespace inbox {{\n  inbox = yes\n  separator = /\n{specials}}}\n{listeners}"
        )
