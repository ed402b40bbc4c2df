"""The tools under test: how each one is configured, run and located on disk.

Every tool gets its own empty directory with ``home/`` (HOME, so no user config leaks in),
``store/`` (its Maildir) and ``state/`` (its own sync state), verifies TLS against the throwaway
CA, writes Maildir, and keeps its own fsync default. ``prepare`` writes the config and returns
the argv of one sync run; the same argv is run for every round.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    ca_file: Path
    user: str
    password: str


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def create(self) -> None:
        for path in (self.home, self.store, self.state):
            path.mkdir(parents=True, mode=0o700)

    def env(self) -> dict[str, str]:
        home = str(self.home)
        return {"HOME": home, "XDG_CONFIG_HOME": f"{home}/.config", "XDG_STATE_HOME": f"{home}/.local/state",
                "XDG_DATA_HOME": f"{home}/.local/share", "XDG_CACHE_HOME": f"{home}/.cache",
                "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "TMPDIR": home}


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def _maildir(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "not installed"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line and "WARNING" not in line]
    return lines[0].strip() if lines else "?"


def debian_version(package: str) -> str:
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                              timeout=30, check=False)
    except OSError:
        return "?"
    return done.stdout.strip() or "not installed"


class Tool:
    name: str = ""
    protocol: str = "imap"
    syncs_flags: bool = False
    binary: str = ""
    package: str = ""
    fsync: str = ""
    settings: str = ""
    added_headers: tuple[bytes, ...] = ()
    refuses_root: bool = False  # run as nobody when the benchmark runs as root
    success_codes: frozenset[int] = frozenset({0})

    def missing(self) -> str | None:
        """Why this tool cannot run here, or None."""
        return None if shutil.which(self.binary) or Path(self.binary).exists() else f"{self.binary} not found"

    def version(self) -> str:
        return f"{first_line([self.binary, '--version'])} (Debian {debian_version(self.package)})"

    def prepare(self, ws: Workspace, ep: Endpoint, folders: list[str]) -> list[str]:
        raise NotImplementedError

    def state_bytes(self, ws: Workspace) -> int:
        return sum(p.stat().st_size for p in ws.state.rglob("*") if p.is_file())


def mailsyncd_source_digest() -> str:
    """A short digest of the mailsyncd sources the venv runs (an editable install follows the tree)."""
    import hashlib

    import mailsyncd

    digest = hashlib.sha256()
    root = Path(mailsyncd.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


class Mailsyncd(Tool):
    name = "mailsyncd"
    syncs_flags = True
    binary = str(VENV_BIN / "mailsyncd")
    fsync = ("per batch of up to 3 MB: one syncfs(2) of the store's filesystem instead of an fsync per file, "
             "then the directories; SQLite WAL with synchronous=FULL")
    settings = "mode archive (default), Maildir++ layout, one IMAP connection"

    def version(self) -> str:
        from importlib.metadata import version

        return f"mailsyncd {version('mailsyncd')} (Python {sys.version.split()[0]})"

    def config_text(self, ws: Workspace, ep: Endpoint) -> str:
        return (f'[general]\nstate = "{ws.state / "state.db"}"\nlog_level = "warning"\n\n'
                f'[[account]]\nname = "bench"\nprotocol = "{self.protocol}"\nhost = "{ep.host}"\n'
                f'port = {ep.port}\ntls_ca_file = "{ep.ca_file}"\nusername = "{ep.user}"\n'
                f'password = "{ep.password}"\n{self.extra()}\n'
                f'[account.store]\nformat = "maildir"\npath = "{ws.store}"\n')

    def extra(self) -> str:
        return ""

    def prepare(self, ws: Workspace, ep: Endpoint, folders: list[str]) -> list[str]:
        config = _private(ws.root / "config.toml", self.config_text(ws, ep))
        return [self.binary, "--config", str(config), "-q", "sync"]


class MailsyncdPop3(Mailsyncd):
    name = "mailsyncd-pop3"
    protocol = "pop3"
    syncs_flags = False
    settings = "leave_on_server = true, UIDL tracked in the state database"

    def extra(self) -> str:
        return "leave_on_server = true\n"


class Mbsync(Tool):
    name = "mbsync"
    syncs_flags = True
    binary = "/usr/bin/mbsync"
    package = "isync"
    fsync = "FSync yes (default): every message file, and its state journal"
    settings = "Sync Pull, Create Near, Expunge None, SubFolders Verbatim, one IMAP connection, pipelined"
    added_headers = (b"X-TUID",)  # mbsync's own tracking header; the check ignores it

    def prepare(self, ws: Workspace, ep: Endpoint, folders: list[str]) -> list[str]:
        config = _private(ws.root / "mbsyncrc", f"""\
IMAPAccount far
Host {ep.host}
Port {ep.port}
User {ep.user}
Pass {ep.password}
SSLType IMAPS
CertificateFile {ep.ca_file}
SystemCertificates no

IMAPStore far
Account far

MaildirStore near
Path {ws.store}/
Inbox {ws.store}/INBOX
SubFolders Verbatim

Channel bench
Far :far:
Near :near:
Patterns *
Sync Pull
Create Near
Expunge None
SyncState {ws.state}/
""")
        return [self.binary, "-c", str(config), "-q", "-a"]


class Offlineimap(Tool):
    name = "offlineimap"
    syncs_flags = True
    binary = "/usr/bin/offlineimap"
    package = "offlineimap3"
    fsync = "fsync = true (default): every message file, and its SQLite status database"
    settings = ("remote readonly = True, sync_deletes = no (keeps what the server expunged), "
                "maxconnections = 1 (default), singlethreadperfolder = no (default), status in SQLite (its only "
                "backend), ui = quiet")

    def prepare(self, ws: Workspace, ep: Endpoint, folders: list[str]) -> list[str]:
        config = _private(ws.root / "offlineimaprc", f"""\
[general]
accounts = bench
metadata = {ws.state}
ui = quiet

[Account bench]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {ws.store}

[Repository remote]
type = IMAP
remotehost = {ep.host}
remoteport = {ep.port}
remoteuser = {ep.user}
remotepass = {ep.password}
ssl = yes
sslcacertfile = {ep.ca_file}
readonly = True
sync_deletes = no
""")
        return [self.binary, "-c", str(config), "-u", "quiet"]


class Getmail(Tool):
    name = "getmail6"
    binary = "/usr/bin/getmail"
    package = "getmail6"
    refuses_root = True  # "refuse to deliver mail as root"
    fsync = "every message file (written by a forked child per message), and its oldmail files"
    settings = ("one getmail process, one rc file per folder (own connection each), read_all = false, "
                "delivered_to/received/record_mailbox = false, runs as nobody (refuses to deliver as root)")

    def prepare(self, ws: Workspace, ep: Endpoint, folders: list[str]) -> list[str]:
        argv = [self.binary, "--getmaildir", str(ws.state), "--quiet"]
        for index, folder in enumerate(folders):
            target = ws.store / folder.replace("/", ".")
            _maildir(target)
            rc = _private(ws.state / f"getmailrc-{index:03d}", f"""\
[retriever]
type = SimpleIMAPSSLRetriever
server = {ep.host}
port = {ep.port}
username = {ep.user}
password = {ep.password}
mailboxes = ("{folder}",)
ca_certs = {ep.ca_file}
record_mailbox = false

[destination]
type = Maildir
path = {target}/

[options]
verbose = 0
read_all = false
delete = false
delivered_to = false
received = false
""")
            argv += ["--rcfile", str(rc)]
        return argv


class Fetchmail(Tool):
    name = "fetchmail"
    protocol = "pop3"
    binary = "/usr/bin/fetchmail"
    package = "fetchmail"
    fsync = "none: fetchmail hands each message to an MDA; bench/maildir-mda (perl) does not fsync"
    settings = "keep, uidl, invisible, no rewrite, mda = bench/maildir-mda (one perl process per message)"
    success_codes = frozenset({0, 1})  # 1: "no new mail"

    def version(self) -> str:
        text = first_line([self.binary, "--version"]).replace("This is fetchmail release ", "fetchmail ")
        return f"{text.split('+')[0]} (Debian {debian_version(self.package)})"

    def prepare(self, ws: Workspace, ep: Endpoint, folders: list[str]) -> list[str]:
        _maildir(ws.store)
        config = _private(ws.root / "fetchmailrc", f"""\
set no bouncemail
set invisible
poll {ep.host} service {ep.port} protocol pop3 uidl
  user "{ep.user}" password "{ep.password}"
  ssl sslcertck sslcertfile "{ep.ca_file}"
  keep
  no rewrite
  mda "/usr/bin/perl {BENCH / 'maildir-mda'} {ws.store}"
""")
        return [self.binary, "-f", str(config), "--idfile", str(ws.state / "fetchids"),
                "--pidfile", str(ws.state / "fetchmail.pid"), "--nosyslog", "--silent"]


class Mpop(Tool):
    name = "mpop"
    protocol = "pop3"
    binary = "/usr/bin/mpop"
    package = "mpop"
    fsync = "every message file (built-in maildir delivery)"
    settings = "keep on, only_new (default), pipelining auto, delivery maildir, received_header off"

    def prepare(self, ws: Workspace, ep: Endpoint, folders: list[str]) -> list[str]:
        _maildir(ws.store)
        config = _private(ws.root / "mpoprc", f"""\
defaults
tls on
tls_starttls off
tls_trust_file {ep.ca_file}

account bench
host {ep.host}
port {ep.port}
user {ep.user}
password {ep.password}
delivery maildir {ws.store}
keep on
uidls_file {ws.state}/uidls
received_header off
""")
        return [self.binary, "--file", str(config), "--quiet", "bench"]


IMAP_TOOLS: tuple[Tool, ...] = (Mailsyncd(), Mbsync(), Offlineimap(), Getmail())
POP3_TOOLS: tuple[Tool, ...] = (MailsyncdPop3(), Fetchmail(), Mpop())
ALL_TOOLS: dict[str, Tool] = {tool.name: tool for tool in IMAP_TOOLS + POP3_TOOLS}
