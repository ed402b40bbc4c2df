"""The TOML config, read into frozen, typed dataclasses.

Every key is declared once, in ``KEYS``, with its type, default, allowed values and help.
The parser, its error messages, the example config's test and the README's table all
follow that one list, so they cannot drift apart. A config error is the first thing a new
user meets, so each one names the file and the key, says what was expected, and suggests
the closest known key for a typo. Unknown keys are errors, not warnings: a misspelt
``leave_on_sever = true`` silently ignored would delete mail.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from mailsyncd.domain import DEFAULT_MAX_DELETIONS, DeletionLimit
from mailsyncd.errors import ConfigError

log = logging.getLogger("mailsyncd.config")

PasswordKind = Literal["command", "env", "file", "keyring", "inline"]
Section = Literal["general", "account", "account.store", "account.oauth2"]
KeyType = Literal[
    "string", "boolean", "integer", "port", "path", "database", "size", "duration", "strings", "choice",
    "table", "limit", "url",
]
PROVIDERS = ("google", "microsoft", "custom")

MIN_INTERVAL = 10  # seconds; anything faster hammers the server for no gain


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    """$MAILSYNCD_CONFIG, else the XDG config directory's mailsyncd/config.toml."""
    if env.get("MAILSYNCD_CONFIG"):
        return Path(env["MAILSYNCD_CONFIG"]).expanduser()
    return _xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "mailsyncd" / "config.toml"


def default_state_path(env: Mapping[str, str] = os.environ) -> Path:
    """The XDG state directory's mailsyncd/state.db."""
    return _xdg_dir(env, "XDG_STATE_HOME", ".local/state") / "mailsyncd" / "state.db"


def _xdg_dir(env: Mapping[str, str], variable: str, fallback: str) -> Path:
    # The XDG spec says a relative value is invalid and must be ignored.
    value = env.get(variable, "")
    if value and Path(value).is_absolute():
        return Path(value)
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / fallback


def default_port(protocol: str, security: str) -> int:
    """The IANA port for the protocol: implicit TLS has its own, STARTTLS and plain share one."""
    if protocol == "imap":
        return 993 if security == "tls" else 143
    return 995 if security == "tls" else 110


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.ASCII | re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
    "k": 1024, "m": 1024**2, "g": 1024**3,
}


def parse_size(text: str | int) -> int:
    """Read "50MB", "10k", "1.5 GiB" or 1234 as a number of bytes.

    KB/MB/GB count in 1000s and KiB/MiB/GiB in 1024s, as their names say; a bare K/M/G
    counts in 1024s, as mutt and mbsync read it. Case is ignored. Fractions of a byte
    are dropped. Raises ValueError with a message fit for the user.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None or match[2].lower() not in _SIZE_UNITS:
        raise ValueError(f'not a size: {text!r}; write e.g. "50MB", "512KiB" or a number of bytes')
    return int(Decimal(match[1]) * _SIZE_UNITS[match[2].lower()])


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", re.ASCII)


def parse_duration(text: str | int) -> int:
    """Read "90s", "5m", "1h30m", "1d" or a bare number of seconds as seconds.

    Units go largest first and each at most once, so a duration reads only one way.
    Raises ValueError with a message fit for the user.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    compact = "".join(text.split()) if isinstance(text, str) else ""
    if re.fullmatch(r"\d+", compact, re.ASCII):
        return int(compact)
    match = _DURATION.fullmatch(compact)
    if not compact or match is None:
        raise ValueError(f'not a duration: {text!r}; write e.g. "90s", "5m", "1h30m", "1d" or seconds')
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


_LIMIT_PART = re.compile(r"(\d+)(%?)", re.ASCII)


def parse_deletion_limit(text: str | int) -> DeletionLimit:
    """Read "50", "25%" or "50,25%" (the larger of the two) as a deletion limit.

    A count alone allows no percentage and a percentage alone no fixed count, so each
    form means what it says. Raises ValueError with a message fit for the user.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return DeletionLimit(count=text, percent=0)
    parts = "".join(text.split()).split(",") if isinstance(text, str) else []
    matches = [_LIMIT_PART.fullmatch(part) for part in parts]
    counts = [int(match[1]) for match in matches if match and not match[2]]
    percents = [int(match[1]) for match in matches if match and match[2]]
    if not parts or None in matches or len(counts) > 1 or len(percents) > 1 or any(p > 100 for p in percents):
        raise ValueError(f'not a deletion limit: {text!r}; write e.g. "50", "25%" or "50,25%" '
                         "(the larger of a count and a percentage of the folder)")
    return DeletionLimit(count=counts[0] if counts else 0, percent=percents[0] if percents else 0)


@dataclass(frozen=True)
class Key:
    """One config key: everything the parser, its errors and the docs need to know.

    ``default`` None means the key is optional with no value, or that the default is
    computed from other keys (``port``, ``state``), as ``help`` then says. ``only`` names
    another key of the same table and the value it must have for this key to be allowed.
    """

    section: Section
    name: str
    type: KeyType
    help: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    only: tuple[str, str] | None = None


_IMAP = ("protocol", "imap")
_SYNC = ("mode", "sync")
_POP3 = ("protocol", "pop3")

KEYS: tuple[Key, ...] = (
    Key("general", "state", "database",
        "the state database: a file (SQLite) or an SQLAlchemy URL; "
        "default $XDG_STATE_HOME/mailsyncd/state.db"),
    Key("general", "log_level", "choice",
        "how much the log says", "info", choices=("debug", "info", "warning", "error")),
    Key("general", "node", "string",
        "this daemon's name among daemons sharing a PostgreSQL state, shown as host:node in leases and "
        "status; default the process id"),
    Key("general", "lease_time", "duration",
        "shared state: how long a daemon's claim on an account lasts unless renewed (every third of it); "
        "a dead daemon's accounts are taken over after this", 60),
    Key("general", "host_logins", "integer",
        "shared state: at most this many syncs at once per server host, among all the daemons sharing the "
        "state (on SQLite: in this daemon); an account over it waits for its next run; no cap if unset"),
    Key("general", "sticky", "boolean",
        "the default of each account's sticky", False),
    Key("general", "metrics_port", "port",
        "serve Prometheus metrics on 127.0.0.1 at this port; off if unset"),
    Key("account", "name", "string",
        "a unique name of letters, digits, '_', '.' and '-'", required=True),
    Key("account", "protocol", "choice",
        "how to reach the server", required=True, choices=("imap", "pop3")),
    Key("account", "host", "string",
        "the server's host name", required=True),
    Key("account", "port", "port",
        "the server's port; default 993/143 (IMAP) or 995/110 (POP3) by security"),
    Key("account", "security", "choice",
        '"tls": TLS from the start; "starttls": upgrade a plain connection; '
        '"plain": no encryption (needs allow_plaintext)', "tls", choices=("tls", "starttls", "plain")),
    Key("account", "allow_plaintext", "boolean",
        'allow security = "plain", which sends the password unencrypted', False),
    Key("account", "tls_ca_file", "path",
        "an extra CA certificate (PEM) to trust, e.g. for a self-signed server"),
    Key("account", "tls_verify", "boolean",
        "check the server's certificate and host name; turn off only for testing", True),
    Key("account", "username", "string",
        "the login name", required=True),
    Key("account", "password_command", "string",
        "a shell command that prints the password as its first line"),
    Key("account", "password_env", "string",
        "an environment variable that holds the password"),
    Key("account", "password_file", "path",
        "a file whose first line is the password (chmod 600 it)"),
    Key("account", "keyring", "boolean",
        'take the password from the system keyring: service "mailsyncd:<name>", user = username', False),
    Key("account", "password", "string",
        "the password itself; prefer another source, and chmod 600 the config"),
    Key("account", "auth", "choice",
        'how to log in: "login" (LOGIN) or "plain" (AUTHENTICATE PLAIN), IMAP only; "oauth2" (XOAUTH2 or '
        'OAUTHBEARER with a token from the [account.oauth2] table), IMAP and POP3', "login",
        choices=("login", "plain", "oauth2")),
    Key("account", "interval", "duration",
        'time between syncs in the daemon, e.g. "5m" or seconds; at least 10s', 300),
    Key("account", "cron", "string",
        'a crontab schedule instead of interval, e.g. "*/5 * * * *"'),
    Key("account", "folders", "strings",
        "globs of the folders to sync, on decoded names", ("*",), only=_IMAP),
    Key("account", "exclude", "strings",
        "globs of folders to leave out", (), only=_IMAP),
    Key("account", "mode", "choice",
        '"archive" keeps local copies of mail deleted on the server; "mirror" deletes them too; '
        '"sync" is two-way: flags, deletions, new messages and moves go both ways (Maildir only)', "archive",
        choices=("archive", "mirror", "sync"), only=_IMAP),
    Key("account", "expunge", "choice",
        '"own": a message deleted locally is marked \\Deleted on the server and then expunged by UID, only '
        'the ones mailsyncd marked; "never": only marked', "own", choices=("never", "own"), only=_SYNC),
    Key("account", "max_deletions", "limit",
        'the mass-deletion guard: a pass that would delete more messages of a folder on either side '
        'stops that folder; "50", "25%" or "50,25%" (the larger of both)', DEFAULT_MAX_DELETIONS, only=_SYNC),
    Key("account", "max_message_size", "size",
        'larger messages are not downloaded whole (see large_messages), e.g. "50MB"; if unset, IMAP '
        'still reads none over 512 MiB'),
    Key("account", "large_messages", "choice",
        'what becomes of a message over max_message_size: "headers" stores a placeholder (its header '
        'block, a list of its parts) that `mailsyncd fetch`, flagging it, or a higher limit replaces by '
        'the whole message; "skip" stores nothing and reports it. Default "headers" with a Maildir store '
        '(archive or mirror mode), else "skip"', "skip", choices=("headers", "skip")),
    Key("account", "fetch_parts", "choice",
        'what a placeholder keeps besides the header block: "headers" nothing more; "text" also the '
        'text/plain and text/html parts (up to max_message_size), leaving out only the attachments',
        "headers", choices=("headers", "text"), only=_IMAP),
    Key("account", "progress_timeout", "duration",
        "give up on a connection when the server sends no complete line and no 64 KiB of a message "
        'for this long, e.g. "2m"', 120),
    Key("account", "timeout", "duration",
        'end a run of this account that takes longer than this, e.g. "1h"; no limit if unset'),
    Key("account", "keep_connection", "boolean",
        "the daemon stays logged in between runs (a NOOP every 4 minutes keeps the connection), so a "
        "run pays no TLS handshake and login; not with host_logins, nor on a shared state unless the "
        "account is sticky, and not for accounts synced less often than every 30 minutes", True, only=_IMAP),
    Key("account", "idle", "strings",
        "folders the daemon watches with IDLE, to fetch new mail at once", (), only=_IMAP),
    Key("account", "leave_on_server", "boolean",
        "keep messages on the server after download", True, only=_POP3),
    Key("account", "delete_after_days", "integer",
        "with leave_on_server, delete downloaded messages from the server after this many days; "
        "never if unset", only=_POP3),
    Key("account", "sticky", "boolean",
        "shared state: the account stays with the node that synced it last (its store on that node's "
        "disk) while that node syncs it in time; another node takes it over once it is overdue by "
        "half an interval (at least lease_time); unset: general.sticky", False),
    Key("account", "store", "table",
        "where the mail goes: the [account.store] table", required=True),
    Key("account", "oauth2", "table",
        'with auth = "oauth2": the [account.oauth2] table (provider, client_id, ...)', only=("auth", "oauth2")),
    Key("account.store", "format", "choice",
        "the local mailbox format", required=True, choices=("maildir", "mbox")),
    Key("account.store", "path", "path",
        "the store's root directory (mbox: one file per folder in it); {account} stands for the "
        "account's name", required=True),
    Key("account.store", "layout", "choice",
        '"maildir++": INBOX at the root, subfolders as .Sub.Folder; "fs": nested directories', "maildir++",
        choices=("maildir++", "fs"), only=("format", "maildir")),
    Key("account.store", "mbox_status_headers", "boolean",
        "write Status: and X-Status: fields from the server's flags into each message appended, so "
        "mail readers show them; false keeps the server's bytes exact", True, only=("format", "mbox")),
    Key("account.store", "shared_store", "boolean",
        "an mbox store with a shared (PostgreSQL) state is refused, since any node may sync the account "
        "and mbox locks may not hold across machines; false says the store is on a local disk that only "
        "this node syncs", True, only=("format", "mbox")),
    Key("account.oauth2", "provider", "choice",
        '"google" and "microsoft" carry their endpoints and scopes; "custom" needs authorize_url and token_url',
        required=True, choices=PROVIDERS),
    Key("account.oauth2", "client_id", "string",
        "the client ID of the app you registered with the provider", required=True),
    Key("account.oauth2", "client_secret_command", "string",
        "a shell command that prints the client secret, where the app type has one (Google)"),
    Key("account.oauth2", "client_secret_env", "string",
        "an environment variable that holds the client secret"),
    Key("account.oauth2", "client_secret_file", "path",
        "a file whose first line is the client secret (chmod 600 it)"),
    Key("account.oauth2", "client_secret", "string",
        "the client secret itself (Google desktop apps have one, which Google says is not secret)"),
    Key("account.oauth2", "tenant", "string",
        'the Microsoft Entra tenant: "common", "organizations", "consumers" or a tenant ID', "common",
        only=("provider", "microsoft")),
    Key("account.oauth2", "authorize_url", "url",
        "the authorization endpoint (browser login)", only=("provider", "custom")),
    Key("account.oauth2", "token_url", "url",
        "the token endpoint", only=("provider", "custom")),
    Key("account.oauth2", "device_url", "url",
        "the device authorization endpoint, for mailsyncd auth --device", only=("provider", "custom")),
    Key("account.oauth2", "scopes", "strings",
        "the scopes to ask for; default the provider's mail scopes (required for custom)"),
    Key("account.oauth2", "mechanism", "choice",
        '"auto": XOAUTH2 where the server offers it, else OAUTHBEARER; or either one', "auto",
        choices=("auto", "xoauth2", "oauthbearer")),
    Key("account.oauth2", "storage", "choice",
        '"file": the refresh token in token_file (0600); "keyring": in the system keyring, service '
        '"mailsyncd-oauth2:<name>", user = username', "file", choices=("file", "keyring")),
    Key("account.oauth2", "token_file", "path",
        "where the refresh token is kept (0600); default oauth2/<name>.json beside the state database"),
)

_PASSWORD_KEYS: dict[str, PasswordKind] = {
    "password_command": "command", "password_env": "env", "password_file": "file",
    "keyring": "keyring", "password": "inline",
}
_CLIENT_SECRET_KEYS: dict[str, PasswordKind] = {
    "client_secret_command": "command", "client_secret_env": "env", "client_secret_file": "file",
    "client_secret": "inline",
}
_MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/"


@dataclass(frozen=True)
class Preset:
    """A provider's endpoints and mail scopes, so that a user names the provider only.

    ``authorize_params`` are added to the browser login: Google hands out a refresh token
    only with ``access_type=offline``, and again on a second login only with a consent
    prompt. ``redirect_host`` is the loopback name the provider matches registered
    redirect URIs against (Microsoft's "http://localhost" allows any port).
    """

    authorize_url: str
    token_url: str
    device_url: str | None
    imap_scopes: tuple[str, ...]
    pop3_scopes: tuple[str, ...]
    authorize_params: tuple[tuple[str, str], ...] = ()
    redirect_host: str = "127.0.0.1"


PRESETS: dict[str, Preset] = {
    # Google allows its device flow only for a few scopes, and https://mail.google.com/
    # is not one of them: headless servers use --no-browser with an SSH port forward.
    "google": Preset("https://accounts.google.com/o/oauth2/v2/auth", "https://oauth2.googleapis.com/token", None,
                     ("https://mail.google.com/",), ("https://mail.google.com/",),
                     (("access_type", "offline"), ("prompt", "consent"))),
    "microsoft": Preset(_MICROSOFT + "authorize", _MICROSOFT + "token", _MICROSOFT + "devicecode",
                        ("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"),
                        ("https://outlook.office.com/POP.AccessAsUser.All", "offline_access"),
                        redirect_host="localhost"),
}
_NAME = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)


@dataclass(frozen=True, repr=False)
class PasswordSource:
    """Where an account's password comes from; only ``secrets.resolve_password`` reads it."""

    kind: PasswordKind
    value: str  # the command, variable name, absolute file path, "" for keyring, or the password

    def __repr__(self) -> str:
        shown = "***" if self.kind == "inline" else self.value
        return f"PasswordSource(kind={self.kind!r}, value={shown!r})"


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    format: Literal["maildir", "mbox"]
    path: Path  # absolute; ~ and $VARS expanded, relative to the config file's directory
    layout: Literal["maildir++", "fs"] = "maildir++"  # only meaningful for maildir
    mbox_status_headers: bool = True  # only meaningful for mbox
    shared_store: bool = True  # mbox with a shared state: refused unless false (a local disk, one node)


@dataclass(frozen=True, kw_only=True)
class OAuth2Config:
    """An [account.oauth2] table with the provider's preset applied: every endpoint and
    scope is explicit here, whichever provider it came from."""

    provider: Literal["google", "microsoft", "custom"]
    client_id: str
    client_secret: PasswordSource | None
    authorize_url: str
    token_url: str
    device_url: str | None
    scopes: tuple[str, ...]
    mechanism: Literal["auto", "xoauth2", "oauthbearer"]
    storage: Literal["file", "keyring"] = "file"
    token_file: Path  # absolute; with the keyring store, its lock file still lives beside it
    authorize_params: tuple[tuple[str, str], ...] = ()
    redirect_host: str = "127.0.0.1"


@dataclass(frozen=True, kw_only=True)
class AccountConfig:
    """One [[account]]. ``interval`` keeps its default when ``cron`` is set; cron wins.

    The IMAP-only keys (folders, exclude, mode, idle, auth) and POP3-only keys
    (leave_on_server, delete_after_days) keep their defaults for the other protocol.
    """

    name: str
    protocol: Literal["imap", "pop3"]
    host: str
    port: int
    username: str
    password: PasswordSource | None  # None with auth = "oauth2", which logs in with a token
    store: StoreConfig
    security: Literal["tls", "starttls", "plain"] = "tls"
    allow_plaintext: bool = False
    tls_ca_file: Path | None = None
    tls_verify: bool = True
    auth: Literal["login", "plain", "oauth2"] = "login"
    oauth2: OAuth2Config | None = None  # set exactly when auth = "oauth2"
    interval: int = 300
    cron: str | None = None
    folders: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    mode: Literal["archive", "mirror", "sync"] = "archive"
    expunge: Literal["never", "own"] = "own"
    max_deletions: DeletionLimit = DEFAULT_MAX_DELETIONS
    max_message_size: int | None = None
    large_messages: Literal["headers", "skip"] = "skip"
    fetch_parts: Literal["headers", "text"] = "headers"
    progress_timeout: int = 120
    timeout: int | None = None
    keep_connection: bool = True
    idle: tuple[str, ...] = ()
    leave_on_server: bool = True
    delete_after_days: int | None = None
    sticky: bool = False  # shared state: prefer the node that synced it last


@dataclass(frozen=True, kw_only=True)
class GeneralConfig:
    # An absolute file path, or an SQLAlchemy URL when it contains "://".
    state: str = field(default_factory=lambda: str(default_state_path()))
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_port: int | None = None  # served on 127.0.0.1 only
    node: str | None = None  # with the host name, this daemon's identity in account leases
    lease_time: int = 60
    host_logins: int | None = None  # concurrent syncs per server host, among all daemons; None: no cap
    sticky: bool = False  # the accounts' default

    @property
    def shared(self) -> bool:
        """Whether the state is a server database several daemons may share."""
        return "://" in self.state and not self.state.startswith("sqlite")


@dataclass(frozen=True)
class Config:
    """The config file's accounts, then the state database's (``with_stored_accounts``).

    ``stored`` names the accounts that came from the database; ``shadowed`` those stored
    under a name the config file also has, whose file definition wins; ``generation`` is
    the database's change counter when they were read (a daemon reloads when it moves).
    """

    path: Path
    general: GeneralConfig
    accounts: tuple[AccountConfig, ...]
    stored: frozenset[str] = frozenset()
    shadowed: tuple[str, ...] = ()
    generation: int = 0

    def account(self, name: str) -> AccountConfig:
        """The account called ``name``; KeyError if there is none."""
        for account in self.accounts:
            if account.name == name:
                return account
        raise KeyError(name)


def load_config(path: Path) -> Config:
    """Read and check the config file; raises ConfigError, naming the file and the key."""
    text, mode = _read(path)
    config = parse_config(text, path)
    _check_ca_files(path, config.accounts)
    # A warning, not an error: the file may be private by other means (an encrypted home).
    if mode & 0o044 and any(account.password and account.password.kind == "inline" for account in config.accounts):
        log.warning("%s holds a password and other users can read it; run: chmod 600 %s", path, path)
    return config


def load_account_file(path: Path, state: str | None) -> list[tuple[AccountConfig, dict[str, Any]]]:
    """Read and check a file of accounts to import (``parse_account_file``)."""
    parsed = parse_account_file(_read(path, "name a TOML file of [[account]] tables")[0], path, state)
    _check_ca_files(path, [account for account, _ in parsed])
    return parsed


def _check_ca_files(path: Path, accounts: Iterable[AccountConfig]) -> None:
    for account in accounts:
        # Checked here, not at the first connection, where it would read "[Errno 2]".
        if account.tls_ca_file is not None and not account.tls_ca_file.is_file():
            raise ConfigError(path, f'account "{account.name}".tls_ca_file',
                              f"no such file: {account.tls_ca_file}")


_CREATE_IT = "create it (`mailsyncd example-config` prints an example) or pass --config"


def _read(path: Path, hint: str = _CREATE_IT) -> tuple[str, int]:
    """A TOML file's text and its mode bits; ConfigError naming it when it cannot be read."""
    try:
        with path.open("rb") as handle:
            data = handle.read()
            mode = os.fstat(handle.fileno()).st_mode
    except FileNotFoundError:
        raise ConfigError(path, "", f"no such file; {hint}") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read it: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    return text, mode


def _document(text: str, path: Path) -> tuple[dict[str, Any], _Where]:
    """The TOML document of a config or account file, and where its errors point."""
    try:
        return tomllib.loads(text), _Where(path, "")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None


def parse_config(text: str, path: Path) -> Config:
    """Check ``text`` as if read from ``path``, which anchors relative paths and names errors."""
    document, top = _document(text, path)
    for name in document:
        if name not in ("general", "account"):
            raise top.error(name, _unknown(name, ["general", "account"]))
    base = path.parent.absolute()
    general = _expect_table(document.get("general", {}), top, "general")
    values = _parse_table(general, "general", _Where(path, "general"), base)
    accounts = document.get("account", [])
    if not isinstance(accounts, list):
        raise top.error("account", f"expected an array of tables ([[account]]), got {_a(accounts)}")
    token_dir = _token_dir(values["state"])
    parsed = tuple(_parse_account(table, index, path, base, token_dir, values["sticky"])
                   for index, table in enumerate(accounts))
    seen: set[str] = set()
    for account in parsed:
        if account.name in seen:
            raise ConfigError(path, f'account "{account.name}".name', "duplicate name; names must be unique")
        seen.add(account.name)
    # Unset keys take the dataclass defaults: state's is computed from the environment.
    general_config = GeneralConfig(**{name: value for name, value in values.items() if value is not None})
    if general_config.shared:
        for account in parsed:
            _refuse_shared_mbox(account, path)
    return Config(path, general_config, parsed)


def _refuse_shared_mbox(account: AccountConfig, path: Path) -> None:
    """With a shared state any node may sync the account, and mbox locks may not hold
    across machines: an mbox store must be declared one node's local disk."""
    if account.store.format == "mbox" and account.store.shared_store:
        raise ConfigError(path, f'account "{account.name}".store.format',
                          '"mbox" is refused with a shared (PostgreSQL) state: any node may sync the '
                          'account and mbox locks may not hold across machines; use "maildir", or set '
                          "shared_store = false if the store is on a local disk only this node syncs")


def _token_dir(state: str | None) -> Path:
    """Tokens live beside a state file; a state database elsewhere (a URL) leaves them in
    the XDG state directory."""
    state = state or str(default_state_path())
    return (default_state_path() if "://" in state else Path(state)).parent / "oauth2"


# Keys whose value is a secret itself, refused in an account file to import: the state
# database is shared and backed up, and secrets never go into it (invariant 8).
INLINE_SECRETS = (("", "password"), ("oauth2", "client_secret"))


def parse_account_file(text: str, path: Path, state: str | None) -> list[tuple[AccountConfig, dict[str, Any]]]:
    """An account file for ``mailsyncd accounts import``: ``[[account]]`` tables only,
    each checked by the config file's own validator and refused if it holds an inline
    secret. Each account with its table as written, to store. Raises ConfigError."""
    document, top = _document(text, path)
    for name in document:
        if name != "account":
            raise top.error(name, "an account file holds [[account]] tables only; [general] stays in the config file")
    tables = document.get("account", [])
    if not isinstance(tables, list) or not tables:
        raise top.error("account", "expected one or more [[account]] tables")
    base, token_dir = path.parent.absolute(), _token_dir(state)
    parsed: list[tuple[AccountConfig, dict[str, Any]]] = []
    for index, table in enumerate(tables):
        account = _parse_account(table, index, path, base, token_dir, sticky=False)
        if state is not None and GeneralConfig(state=state).shared:
            _refuse_shared_mbox(account, path)
        for section, key in INLINE_SECRETS:
            holder = table.get(section, {}) if section else table
            if isinstance(holder, dict) and key in holder:
                where = ".".join(part for part in (f'account "{account.name}"', section, key) if part)
                raise ConfigError(path, where, "a secret is never stored in the state database; use "
                                  + ("password_command, password_file, password_env or keyring = true" if not section
                                     else "client_secret_command, client_secret_file or client_secret_env"))
        if any(account.name == done.name for done, _ in parsed):
            raise ConfigError(path, f'account "{account.name}".name', "duplicate name; names must be unique")
        parsed.append((account, table))
    return parsed


def with_stored_accounts(config: Config, generation: int, stored: Iterable[tuple[str, Mapping[str, Any], Path]],
                         where: str) -> Config:
    """The config with the accounts of the state database after its own: each ``(name,
    table, base)`` checked as the file's are. A name the file has too is shadowed (the
    file wins); a stored account that no longer passes on this machine (an unset $VAR in
    a path, say) is left out with one error line naming ``where`` it is, and the others
    go on."""
    token_dir = _token_dir(config.general.state)
    label = Path(f"the state database {where}")
    accounts, names, shadowed = list(config.accounts), {account.name for account in config.accounts}, []
    for index, (name, table, base) in enumerate(stored):
        if name in names:
            shadowed.append(name)
            continue
        try:
            found = _parse_account(dict(table), index, label, base, token_dir, config.general.sticky)
            if config.general.shared:
                _refuse_shared_mbox(found, label)
            accounts.append(found)
        except ConfigError as error:
            log.error("%s; the account is not synced until it is imported again", error)
    return dataclasses.replace(config, accounts=tuple(accounts), generation=generation, shadowed=tuple(shadowed),
                               stored=frozenset(account.name for account in accounts[len(config.accounts):]))


@dataclass(frozen=True)
class _Where:
    """A table's place in the file, for error messages: 'account "work".store'."""

    file: Path
    prefix: str

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, ".".join(part for part in (self.prefix, key) if part), problem)


def _parse_account(raw: object, index: int, path: Path, base: Path, token_dir: Path,
                   sticky: bool) -> AccountConfig:
    table = _expect_table(raw, _Where(path, f"account[{index}]"), "")
    name = table.get("name")
    valid_name = isinstance(name, str) and bool(_NAME.fullmatch(name)) and name not in (".", "..")
    where = _Where(path, f'account "{name}"' if valid_name else f"account[{index}]")
    if not valid_name and "name" in table:
        raise where.error("name", "expected a string of letters, digits, '_', '.' and '-', "
                                  f"got {_shown(name)}")
    values = _parse_table(table, "account", where, base)
    if "sticky" not in table:
        values["sticky"] = sticky
    store = _parse_table(values["store"], "account.store", _Where(path, f"{where.prefix}.store"), base)
    store["path"] = Path(str(store["path"]).replace("{account}", str(name)))

    if values["protocol"] == "pop3" and values["auth"] != "oauth2" and "auth" in table:
        raise where.error("auth", '"oauth2" is the only choice for protocol = "pop3", which otherwise logs in '
                                  "with APOP or USER/PASS by itself")
    oauth2 = None
    if values["auth"] == "oauth2":
        if values["oauth2"] is None:
            raise where.error("oauth2", 'missing; auth = "oauth2" needs an [account.oauth2] table with provider '
                                        "and client_id")
        oauth2 = _parse_oauth2(values, _Where(path, f"{where.prefix}.oauth2"), base, token_dir)
    source = _password_source(values, _PASSWORD_KEYS, where, required=oauth2 is None)
    if oauth2 is not None and source is not None:
        raise where.error(next(key for key in _PASSWORD_KEYS if values[key] not in (None, False)),
                          'auth = "oauth2" logs in with a token, not a password; remove this key '
                          "(a client secret goes into [account.oauth2])")

    if values["security"] == "plain" and not values["allow_plaintext"]:
        raise where.error("security", '"plain" sends the password unencrypted; use "tls" or "starttls", '
                                      "or set allow_plaintext = true to accept that")
    if "interval" in table and "cron" in table:
        raise where.error("cron", "interval and cron are both set; keep one of them")
    if values["cron"] is not None and len(values["cron"].split()) != 5:
        raise where.error("cron", "expected 5 fields (minute hour day month weekday), "
                                  f"got {len(values['cron'].split())}")
    if not values["folders"]:
        raise where.error("folders", 'lists no folder; use ["*"] for all of them')
    if values["delete_after_days"] is not None and not values["leave_on_server"]:
        raise where.error("delete_after_days", "has no effect with leave_on_server = false, which deletes "
                                               "at once; remove one of them")
    if values["mode"] == "mirror" and store["format"] == "mbox":
        raise where.error("mode", '"mirror" removes local copies, which an mbox store (append-only here) '
                                  'cannot do; use format = "maildir" or mode = "archive"')
    if values["mode"] == "sync" and store["format"] == "mbox":
        raise where.error("mode", '"sync" writes flags, moves and deletions into the local files, which an '
                                  'mbox store (append-only here) cannot do; use format = "maildir"')
    values["large_messages"] = _large_messages(values, "large_messages" in table, store["format"], where)
    port = values["port"] or default_port(values["protocol"], values["security"])
    # Keys named like their field go straight through; port, password and store are built above.
    same = {field.name: values[field.name] for field in fields(AccountConfig) if field.name in values}
    return AccountConfig(**{**same, "port": port, "password": source, "store": StoreConfig(**store),
                            "oauth2": oauth2})


def _password_source(values: Mapping[str, Any], keys: Mapping[str, PasswordKind], where: _Where,
                     *, required: bool) -> PasswordSource | None:
    """The one password source among ``keys`` that is set; None (if allowed) when none is."""
    sources = [key for key in keys if values[key] not in (None, False)]
    if not sources:
        if not required:
            return None
        names = ", ".join(f"{key} = true" if key == "keyring" else key for key in keys)
        raise where.error("", f"no password source; set one of: {names}")
    if len(sources) > 1:
        raise where.error(sources[1], "only one password source is allowed, "
                                      f"but {', '.join(sources)} are set")
    value = values[sources[0]]
    return PasswordSource(keys[sources[0]], "" if value is True else str(value))


def _parse_oauth2(account: Mapping[str, Any], where: _Where, base: Path, token_dir: Path) -> OAuth2Config:
    """The [account.oauth2] table with the provider's preset filled in."""
    values = _parse_table(account["oauth2"], "account.oauth2", where, base)
    provider = values["provider"]
    preset = PRESETS.get(provider)
    if preset is None:
        for name in ("token_url", "authorize_url"):
            if values[name] is None:
                raise where.error(name, 'missing; provider = "custom" names its endpoints: authorize_url and '
                                        "token_url (and device_url for --device)")
        if not values["scopes"]:
            raise where.error("scopes", 'missing; provider = "custom" needs the scopes to ask for')
        preset = Preset(values["authorize_url"], values["token_url"], values["device_url"], (), ())
    tenant = quote(values["tenant"], safe="")
    scopes = values["scopes"] or (preset.imap_scopes if account["protocol"] == "imap" else preset.pop3_scopes)
    return OAuth2Config(
        provider=provider, client_id=values["client_id"],
        client_secret=_password_source(values, _CLIENT_SECRET_KEYS, where, required=False),
        authorize_url=preset.authorize_url.format(tenant=tenant), token_url=preset.token_url.format(tenant=tenant),
        device_url=preset.device_url.format(tenant=tenant) if preset.device_url else None,
        scopes=tuple(scopes), mechanism=values["mechanism"],
        storage=values["storage"], token_file=values["token_file"] or token_dir / f"{account['name']}.json",
        authorize_params=preset.authorize_params, redirect_host=preset.redirect_host)


def _large_messages(values: Mapping[str, Any], given: bool, store_format: str, where: _Where) -> str:
    """large_messages, its default worked out, checked against the keys it depends on.

    A placeholder is later replaced in place by the whole message: a Maildir can do that
    atomically (a rename over the file), an mbox cannot without rewriting the file around
    it, and two-way mode would take the placeholder for a local message.
    """
    chosen: str | None = values["large_messages"] if given else None
    placeholders_possible = (store_format == "maildir" and values["mode"] != "sync"
                             and values["max_message_size"] is not None)
    if chosen == "headers" and store_format == "mbox":
        raise where.error("large_messages", '"headers" needs format = "maildir": a placeholder in an mbox '
                                            'cannot be replaced in place safely; use "skip"')
    if chosen == "headers" and values["mode"] == "sync":
        raise where.error("large_messages", '"headers" is not for mode = "sync", which would send a '
                                            'placeholder back as a message; use "skip"')
    if chosen is not None and values["max_message_size"] is None:
        raise where.error("large_messages", "has no effect without max_message_size; set both or neither")
    if values["fetch_parts"] == "text" and (chosen or ("headers" if placeholders_possible else "skip")) != "headers":
        raise where.error("fetch_parts", '"text" is for placeholders, which need large_messages = "headers"')
    return chosen or ("headers" if placeholders_possible else "skip")


def _parse_table(table: Mapping[str, object], section: Section, where: _Where, base: Path) -> dict[str, Any]:
    """Convert and check every key of one table against its declarations.

    The result maps every declared key to its value or default. It is typed ``Any``
    because each value's type follows from its declaration, which mypy cannot see.
    """
    declared = {key.name: key for key in KEYS if key.section == section}
    for name in table:
        if name not in declared:
            raise where.error(name, _unknown(name, list(declared)))
    values: dict[str, Any] = {}
    for key in declared.values():
        # "Not for this protocol" is the more useful error, so it comes before the value's
        # own check. KEYS declares protocol and format before the keys that depend on them.
        if key.only and key.name in table and values[key.only[0]] != key.only[1]:
            raise where.error(key.name, f'only for {key.only[0]} = "{key.only[1]}"')
        if key.name in table:
            try:
                values[key.name] = _convert(key, table[key.name], base)
            except ValueError as exc:
                raise where.error(key.name, str(exc)) from None
        elif key.required:
            raise where.error(key.name, f"missing; {key.help}")
        else:
            values[key.name] = key.default
    return values


def _convert(key: Key, raw: object, base: Path) -> Any:
    """One TOML value, checked against its declaration; ValueError says what is wrong."""
    match key.type:
        case "string":
            return _nonempty(raw)
        case "boolean":
            return _expect(raw, bool, "a boolean (true or false)")
        case "integer" | "port":
            number = _expect(raw, int, "an integer")
            high = 65535 if key.type == "port" else None
            if number < 1 or (high and number > high):
                raise ValueError(f"must be from 1 to {high}" if high else "must be at least 1")
            return number
        case "path":
            return _expand_path(_nonempty(raw), base)
        case "database":
            text = _nonempty(raw)
            return text if "://" in text else str(_expand_path(text, base))
        case "size":
            size = parse_size(_expect(raw, (str, int), 'a size ("50MB" or a number of bytes)'))
            if size < 1:
                raise ValueError("must be at least 1 byte")
            return size
        case "duration":
            seconds = parse_duration(_expect(raw, (str, int), 'a duration ("5m" or a number of seconds)'))
            # Only the schedule has a floor; a timeout may be short (tests, a local server).
            low = MIN_INTERVAL if key.name == "interval" else 1
            if seconds < low:
                raise ValueError(f"must be at least {low}s")
            return seconds
        case "strings":
            items = _expect(raw, list, "an array of strings")
            for item in items:
                if not isinstance(item, str):
                    raise ValueError(f"expected an array of strings, got an array holding {_a(item)}")
            return tuple(items)
        case "choice":
            choice = _expect(raw, str, "a string")
            if choice not in key.choices:
                allowed = ", ".join(f'"{option}"' for option in key.choices)
                raise ValueError(f"expected one of {allowed}, got {_shown(choice)}")
            return choice
        case "table":
            return _expect(raw, dict, "a table")
        case "url":
            return _url(_nonempty(raw))
        case "limit":
            return parse_deletion_limit(_expect(raw, (str, int), 'a limit ("50,25%" or a number of messages)'))


def _nonempty(raw: object) -> str:
    text: str = _expect(raw, str, "a string")
    if not text:
        raise ValueError("must not be empty")
    return text


def _url(text: str) -> str:
    """An endpoint URL: https, or plain http to this machine only (a local test server or
    a proxy), since what is sent there includes the refresh token."""
    parts = urlsplit(text)
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if not parts.hostname or parts.scheme not in ("https", "http") or (parts.scheme == "http" and not loopback):
        raise ValueError(f"expected an https:// URL (http:// only to 127.0.0.1 or localhost), got {_shown(text)}")
    return text


def _expand_path(text: str, base: Path) -> Path:
    """~ and $VAR or ${VAR} expanded, then anchored at ``base``. An unset variable is an
    error rather than left in place, so "$MAILDIR/work" never becomes a literal directory."""

    def substitute(match: re.Match[str]) -> str:
        variable = match[1] or match[2]
        if variable not in os.environ:
            raise ValueError(f"${variable} is not set in the environment")
        return os.environ[variable]

    try:
        return base / Path(re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, text)).expanduser()
    except RuntimeError as exc:  # ~user for an unknown user
        raise ValueError(str(exc)) from None


def _expect(raw: object, kind: type[Any] | tuple[type[Any], ...], expected: str) -> Any:
    # bool is an int in Python but not in TOML: "port = true" must not read as port 1.
    if isinstance(raw, kind) and not (isinstance(raw, bool) and kind is not bool):
        return raw
    raise ValueError(f"expected {expected}, got {_a(raw)}")


def _expect_table(raw: object, where: _Where, key: str) -> dict[str, object]:
    if not isinstance(raw, dict):
        raise where.error(key, f"expected a table, got {_a(raw)}")
    return raw


def _a(value: object) -> str:
    """The TOML type of a value, as a user would name it: 'an integer', 'a table'."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
             dict: "a table"}
    return names.get(type(value), "a date or time")


def _shown(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else _a(value)


def _unknown(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f"unknown key{hint}; allowed: {', '.join(allowed)}"
