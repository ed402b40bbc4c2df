"""The config parser: defaults, every kind of error, and that the docs cover every key."""

from __future__ import annotations

import logging
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsyncd.config import (
    KEYS,
    AccountConfig,
    Config,
    GeneralConfig,
    Key,
    PasswordSource,
    StoreConfig,
    default_config_path,
    default_port,
    default_state_path,
    load_config,
    parse_config,
    parse_deletion_limit,
    parse_duration,
    parse_size,
)
from mailsyncd.domain import DeletionLimit
from mailsyncd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "mailsyncd.example.toml"
README = ROOT / "README.md"
FILE = Path("/etc/mailsyncd/config.toml")

IMAP = {"name": '"work"', "protocol": '"imap"', "host": '"imap.example.org"', "username": '"me"',
        "password_env": '"PW"'}
POP3 = {**IMAP, "protocol": '"pop3"'}
STORE = {"format": '"maildir"', "path": '"/srv/mail/work"'}


def account(base: dict[str, str] = IMAP, store: dict[str, str] | None = None, drop: tuple[str, ...] = (),
            **keys: str) -> str:
    """One [[account]] in TOML; ``keys`` hold TOML literals, ``drop`` removes keys of ``base``."""
    kept = {key: value for key, value in base.items() if key not in drop}
    lines = [f"{key} = {value}" for key, value in {**kept, **keys}.items()]
    store_lines = [f"{key} = {value}" for key, value in (store or STORE).items() if key not in drop]
    return "\n".join(["[[account]]", *lines, "[account.store]", *store_lines, ""])


def with_line(text: str, line: str) -> str:
    """``line`` added to the account, before its [account.store] table."""
    return text.replace("[account.store]", f"{line}\n[account.store]")


def parse(text: str) -> Config:
    return parse_config(text, FILE)


def only_account(text: str) -> AccountConfig:
    (parsed,) = parse(text).accounts
    return parsed


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value


# --- what a valid config gives ---------------------------------------------------------


def test_minimal_imap_account_gets_the_documented_defaults() -> None:
    work = only_account(account())
    assert work == AccountConfig(
        name="work", protocol="imap", host="imap.example.org", port=993, username="me",
        password=PasswordSource("env", "PW"),
        store=StoreConfig(format="maildir", path=Path("/srv/mail/work")),
    )
    assert (work.security, work.allow_plaintext, work.tls_ca_file, work.tls_verify) == (
        "tls", False, None, True)
    assert (work.auth, work.interval, work.cron, work.mode) == ("login", 300, None, "archive")
    assert (work.folders, work.exclude, work.idle, work.max_message_size) == (("*",), (), (), None)
    assert (work.leave_on_server, work.delete_after_days, work.store.layout) == (True, None, "maildir++")


@pytest.mark.parametrize(("section", "dataclass"), [
    ("general", GeneralConfig), ("account", AccountConfig), ("account.store", StoreConfig)])
def test_declared_defaults_match_the_dataclass_defaults(section: str, dataclass: type) -> None:
    """Code that builds the dataclasses directly (tests, the demo) gets the same defaults."""
    defaults = {field.name: field.default for field in fields(dataclass)}
    computed = ("state", "port", "password")  # from the environment, the protocol, the source keys
    for key in KEYS:
        if key.section == section and key.name in defaults and key.name not in computed:
            assert defaults[key.name] == (MISSING if key.required else key.default), key.name


def test_keys_that_depend_on_another_are_declared_after_it() -> None:
    """The parser checks ``only`` as it goes, so the key it looks at must come first."""
    for position, key in enumerate(KEYS):
        if key.only:
            earlier = [(other.section, other.name) for other in KEYS[:position]]
            assert (key.section, key.only[0]) in earlier, key.name


def test_empty_config_is_valid_and_has_no_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/var/state")
    config = parse("")
    assert config.accounts == ()
    assert config.general.state == "/var/state/mailsyncd/state.db"
    assert (config.general.log_level, config.general.metrics_port) == ("info", None)


@pytest.mark.parametrize(("protocol", "security", "port"), [
    ("imap", "tls", 993), ("imap", "starttls", 143), ("imap", "plain", 143),
    ("pop3", "tls", 995), ("pop3", "starttls", 110), ("pop3", "plain", 110),
])
def test_port_defaults_by_protocol_and_security(protocol: str, security: str, port: int) -> None:
    assert default_port(protocol, security) == port
    text = account(protocol=f'"{protocol}"', security=f'"{security}"', allow_plaintext="true")
    assert only_account(text).port == port


def test_explicit_values_are_kept() -> None:
    work = only_account(account(
        port="1993", security='"starttls"', tls_ca_file='"/etc/ca.pem"', tls_verify="false", auth='"plain"',
        interval='"1h30m"', folders='["INBOX", "Lists/*"]', exclude='["Junk"]', mode='"mirror"',
        max_message_size='"50MB"', idle='["INBOX"]',
        store={"format": '"maildir"', "path": '"/m"', "layout": '"fs"'},
    ))
    assert (work.port, work.security, work.tls_ca_file, work.tls_verify) == (
        1993, "starttls", Path("/etc/ca.pem"), False)
    assert (work.auth, work.interval, work.mode, work.max_message_size) == (
        "plain", 5400, "mirror", 50_000_000)
    assert (work.folders, work.exclude, work.idle) == (("INBOX", "Lists/*"), ("Junk",), ("INBOX",))
    assert work.store == StoreConfig(format="maildir", path=Path("/m"), layout="fs")


def test_sync_mode_gets_the_documented_guard_and_expunge() -> None:
    work = only_account(account(mode='"sync"'))
    assert (work.mode, work.expunge, work.max_deletions) == ("sync", "own", DeletionLimit(count=50, percent=25))
    strict = only_account(account(mode='"sync"', expunge='"never"', max_deletions='"10%"'))
    assert (strict.expunge, strict.max_deletions) == ("never", DeletionLimit(count=0, percent=10))


def test_pop3_account_with_mbox_store() -> None:
    old = only_account(account(POP3, store={"format": '"mbox"', "path": '"/m"'}, leave_on_server="true",
                               delete_after_days="30", cron='"0 * * * *"'))
    assert (old.protocol, old.port, old.leave_on_server, old.delete_after_days) == ("pop3", 995, True, 30)
    assert (old.cron, old.store.format) == ("0 * * * *", "mbox")
    assert old.store.mbox_status_headers  # mail readers see the server's flags unless asked not to
    exact = only_account(account(POP3, store={"format": '"mbox"', "path": '"/m"', "mbox_status_headers": "false"}))
    assert not exact.store.mbox_status_headers


def test_interval_accepts_seconds_as_an_integer() -> None:
    assert only_account(account(interval="90")).interval == 90


@pytest.mark.parametrize(("toml", "kind", "value"), [
    ('password_command = "pass show mail"', "command", "pass show mail"),
    ('password_env = "MAIL_PW"', "env", "MAIL_PW"),
    ('password_file = "/run/pw"', "file", "/run/pw"),
    ("keyring = true", "keyring", ""),
    ('password = "hunter2"', "inline", "hunter2"),
])
def test_each_password_source(toml: str, kind: str, value: str) -> None:
    work = only_account(with_line(account(drop=("password_env",)), toml))
    assert work.password == PasswordSource(kind, value)  # type: ignore[arg-type]


def test_keyring_false_is_no_source_at_all() -> None:
    text = account(drop=("password_env",), keyring="false", password_command='"true"')
    assert only_account(text).password.kind == "command"


def test_inline_password_is_hidden_in_repr() -> None:
    work = only_account(account(drop=("password_env",), password='"hunter2"'))
    assert repr(work.password) == "PasswordSource(kind='inline', value='***')"
    assert "hunter2" not in repr(work)
    assert repr(PasswordSource("env", "PW")) == "PasswordSource(kind='env', value='PW')"


def test_plaintext_is_allowed_when_asked_for() -> None:
    work = only_account(account(security='"plain"', allow_plaintext="true"))
    assert (work.security, work.port) == ("plain", 143)


def test_store_path_names_the_account_and_general_names_the_node() -> None:
    text = '[general]\nnode = "b"\nlease_time = "2m"\n' + account(
        store={"format": '"maildir"', "path": '"/srv/mail/{account}/Maildir"'})
    config = parse(text)
    assert config.accounts[0].store.path == Path(f"/srv/mail/{config.accounts[0].name}/Maildir")
    assert (config.general.node, config.general.lease_time) == ("b", 120)


def test_account_lookup_by_name() -> None:
    config = parse(account() + account(name='"home"'))
    assert config.account("home").name == "home"
    with pytest.raises(KeyError):
        config.account("nope")


# --- paths ---------------------------------------------------------------------------------


def test_paths_are_relative_to_the_config_directory_with_home_and_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/me")
    monkeypatch.setenv("MAILROOT", "/data/mail")
    config = parse_config(
        '[general]\nstate = "state.db"\n'
        + account(drop=("password_env",), password_file='"~/pw"', tls_ca_file='"certs/ca.pem"',
                  store={"format": '"maildir"', "path": '"${MAILROOT}/work"'})
        + account(name='"b"', store={"format": '"mbox"', "path": '"$MAILROOT/b"'}),
        Path("/etc/mailsyncd/config.toml"),
    )
    work, other = config.accounts
    assert config.general.state == "/etc/mailsyncd/state.db"
    assert work.password == PasswordSource("file", "/home/me/pw")
    assert work.tls_ca_file == Path("/etc/mailsyncd/certs/ca.pem")
    assert work.store.path == Path("/data/mail/work")
    assert other.store.path == Path("/data/mail/b")


def test_relative_config_path_still_gives_absolute_paths(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    text = account(store={"format": '"maildir"', "path": '"Mail"'})
    work = parse_config(text, Path("config.toml")).accounts[0]
    assert work.store.path == tmp_path / "Mail"


def test_state_url_is_kept_as_is() -> None:
    url = "postgresql+psycopg://mailsyncd@localhost/mailsyncd"
    assert parse(f'[general]\nstate = "{url}"').general.state == url


def test_unset_variable_in_a_path_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_VARIABLE", raising=False)
    problem = error(account(store={"format": '"maildir"', "path": '"$NO_SUCH_VARIABLE/x"'}))
    assert problem.key == 'account "work".store.path'
    assert "$NO_SUCH_VARIABLE is not set" in problem.problem


# --- errors: each names the file, the key path, and what is allowed ----------------------------

ERRORS = [
    # (config text, key path, words the message must hold)
    ("this is not toml", "", ["not valid TOML"]),
    ("[genral]", "genral", ['did you mean "general"', "allowed: general, account"]),
    ("[general]\nlog_levl = 'debug'", "general.log_levl", ['did you mean "log_level"', "allowed: state, "]),
    (account(pasword='"x"'), 'account "work".pasword', ['did you mean "password"', "password_command"]),
    (account(store={**STORE, "fromat": '"mbox"'}), 'account "work".store.fromat', ['did you mean "format"']),
    (account(port='"993"'), 'account "work".port', ["expected an integer, got a string"]),
    (account(port="true"), 'account "work".port', ["expected an integer, got a boolean"]),
    (account(port="99999"), 'account "work".port', ["from 1 to 65535"]),
    (account(tls_verify='"no"'), 'account "work".tls_verify', ["expected a boolean", "got a string"]),
    (account(folders='"INBOX"'), 'account "work".folders', ["expected an array of strings, got a string"]),
    (account(folders='["INBOX", 1]'), 'account "work".folders', ["holding an integer"]),
    (account(folders="[]"), 'account "work".folders', ['["*"]']),
    (account(host='""'), 'account "work".host', ["must not be empty"]),
    (account(interval="1.5"), 'account "work".interval', ["got a float"]),
    (account(drop=("host",)), 'account "work".host', ["missing", "host name"]),
    (account(drop=("name",)), "account[0].name", ["missing"]),
    ("[[account]]\nname = 'x'\nprotocol = 'imap'\nhost = 'h'\nusername = 'u'\npassword_env = 'P'",
     'account "x".store', ["missing", "[account.store]"]),
    (account(store={"path": '"/m"'}), 'account "work".store.format', ["missing"]),
    (account(store={**STORE, "format": '"mh"'}), 'account "work".store.format',
     ['expected one of "maildir", "mbox", got "mh"']),
    (account(security='"ssl"'), 'account "work".security',
     ['expected one of "tls", "starttls", "plain"', 'got "ssl"']),
    (account(mode='"two-way"'), 'account "work".mode', ['"archive", "mirror", "sync"']),
    ("[general]\nlog_level = 'loud'", "general.log_level", ['"debug", "info", "warning", "error"']),
    ("[general]\nmetrics_port = 0", "general.metrics_port", ["from 1 to 65535"]),
    ("general = 3", "general", ["expected a table, got an integer"]),
    ("[account]\nname = 'x'", "account", ["expected an array of tables ([[account]]), got a table"]),
    ("account = [1]", "account[0]", ["expected a table, got an integer"]),
    (account(drop=("password_env",)), 'account "work"',
     ["no password source", "password_command", "password_env", "password_file", "keyring = true",
      "password"]),
    (account(password_command='"pass x"'), 'account "work".password_env',
     ["only one password source", "password_command, password_env"]),
    (account(security='"plain"'), 'account "work".security', ["allow_plaintext = true", "unencrypted"]),
    (account(security='"plain"', allow_plaintext="false"), 'account "work".security', ["allow_plaintext"]),
    (account() + account(), 'account "work".name', ["duplicate name"]),
    (account(name='"my work"'), "account[0].name", ["letters, digits", '"my work"']),
    (account(name='".."'), "account[0].name", ["letters, digits"]),
    (account(name="7"), "account[0].name", ["got an integer"]),
    (account() + account(name='"a/b"'), "account[1].name", ['"a/b"']),
    (account(interval='"5m"', cron='"*/5 * * * *"'), 'account "work".cron', ["interval and cron"]),
    (account(cron='"*/5 * * *"'), 'account "work".cron', ["expected 5 fields", "got 4"]),
    (account(POP3, folders='["INBOX"]'), 'account "work".folders', ['only for protocol = "imap"']),
    (account(POP3, exclude='["x"]'), 'account "work".exclude', ['only for protocol = "imap"']),
    (account(POP3, idle='["INBOX"]'), 'account "work".idle', ['only for protocol = "imap"']),
    (account(POP3, mode='"mirror"'), 'account "work".mode', ['only for protocol = "imap"']),
    (account(POP3, auth='"plain"'), 'account "work".auth', ['"oauth2" is the only choice for protocol = "pop3"']),
    (account(POP3, mode='"sync"'), 'account "work".mode', ['only for protocol = "imap"']),
    (account(leave_on_server="false"), 'account "work".leave_on_server', ['only for protocol = "pop3"']),
    (account(delete_after_days="3"), 'account "work".delete_after_days', ['only for protocol = "pop3"']),
    (account(POP3, leave_on_server="false", delete_after_days="3"), 'account "work".delete_after_days',
     ["leave_on_server = false"]),
    (account(POP3, delete_after_days="0"), 'account "work".delete_after_days', ["at least 1"]),
    (account(store={"format": '"mbox"', "path": '"/m"', "layout": '"fs"'}), 'account "work".store.layout',
     ['only for format = "maildir"']),
    (account(store={"format": '"maildir"', "path": '"/m"', "mbox_status_headers": "false"}),
     'account "work".store.mbox_status_headers', ['only for format = "mbox"']),
    (account(max_message_size='"lots"'), 'account "work".max_message_size', ["not a size", "lots", "50MB"]),
    (account(max_message_size="0"), 'account "work".max_message_size', ["at least 1 byte"]),
    (account(max_message_size="-5"), 'account "work".max_message_size', ["not a size"]),
    (account(interval='"5 minutes"'), 'account "work".interval', ["not a duration", "5 minutes", "1h30m"]),
    (account(interval="5"), 'account "work".interval', ["at least 10s"]),
    (account(interval='"9s"'), 'account "work".interval', ["at least 10s"]),
    (account(mode='"mirror"', store={"format": '"mbox"', "path": '"/m"'}), 'account "work".mode',
     ['format = "maildir"', "append-only"]),
    (account(mode='"sync"', store={"format": '"mbox"', "path": '"/m"'}), 'account "work".mode',
     ['"sync"', 'format = "maildir"', "append-only"]),
    (account(expunge='"own"'), 'account "work".expunge', ['only for mode = "sync"']),
    (account(mode='"mirror"', max_deletions='"50"'), 'account "work".max_deletions', ['only for mode = "sync"']),
    (account(mode='"sync"', expunge='"all"'), 'account "work".expunge', ['expected one of "never", "own"']),
    (account(mode='"sync"', max_deletions='"lots"'), 'account "work".max_deletions',
     ["not a deletion limit", "lots", "50,25%"]),
    (account(mode='"sync"', max_deletions="true"), 'account "work".max_deletions', ["got a boolean"]),
]


@pytest.mark.parametrize(("text", "key", "words"), ERRORS)
def test_errors_name_the_file_and_the_key(text: str, key: str, words: list[str]) -> None:
    problem = error(text)
    assert (problem.path, problem.key) == (str(FILE), key)
    assert str(problem).startswith(f"{FILE}: {key}: " if key else f"{FILE}: ")
    for word in words:
        assert word in str(problem)


def test_unknown_key_lists_every_allowed_key() -> None:
    message = str(error(account(colour='"red"')))
    allowed = [key.name for key in KEYS if key.section == "account"]
    assert message.endswith("unknown key; allowed: " + ", ".join(allowed))


def test_errors_never_show_an_inline_password() -> None:
    problem = error(account(drop=("password_env",), password='"hunter2"', password_file='"/pw"'))
    assert "hunter2" not in str(problem)


# --- load_config -------------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(account(store={"format": '"maildir"', "path": '"Mail"'}))
    config = load_config(path)
    assert config.path == path
    assert config.accounts[0].store.path == tmp_path / "Mail"


def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    assert caught.value.key == ""
    assert str(caught.value) == (f"{tmp_path / 'nope.toml'}: no such file; create it "
                                 "(`mailsyncd example-config` prints an example) or pass --config")


def test_unreadable_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path)
    binary = tmp_path / "config.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


@pytest.mark.parametrize(("mode", "source", "warned"), [
    (0o644, 'password = "hunter2"', True),
    (0o640, 'password = "hunter2"', True),
    (0o600, 'password = "hunter2"', False),
    (0o644, 'password_env = "PW"', False),
])
def test_readable_file_with_inline_password_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, source: str, warned: bool) -> None:
    path = tmp_path / "config.toml"
    path.write_text(with_line(account(drop=("password_env",)), source))
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="mailsyncd.config"):
        load_config(path)
    messages = [record.getMessage() for record in caplog.records]
    assert bool(messages) == warned
    if warned:
        assert str(path) in messages[0]
        assert "chmod 600" in messages[0]
    assert all("hunter2" not in message for message in messages)


# --- default paths -------------------------------------------------------------------------------


def test_default_config_path() -> None:
    assert default_config_path({"MAILSYNCD_CONFIG": "/x.toml", "XDG_CONFIG_HOME": "/c"}) == Path("/x.toml")
    assert default_config_path({"XDG_CONFIG_HOME": "/c", "HOME": "/h"}) == Path("/c/mailsyncd/config.toml")
    assert default_config_path({"HOME": "/h"}) == Path("/h/.config/mailsyncd/config.toml")
    # The XDG spec says to ignore relative values.
    assert default_config_path({"XDG_CONFIG_HOME": "c", "HOME": "/h"}) == Path(
        "/h/.config/mailsyncd/config.toml")


def test_default_state_path() -> None:
    assert default_state_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == Path("/s/mailsyncd/state.db")
    assert default_state_path({"HOME": "/h"}) == Path("/h/.local/state/mailsyncd/state.db")


# --- sizes, durations and limits --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    (1234, 1234), ("1234", 1234), ("0", 0), ("12B", 12), ("10k", 10240), ("10K", 10240), ("10KB", 10_000),
    ("10kib", 10240), ("50MB", 50_000_000), ("50M", 50 * 2**20), ("50MiB", 50 * 2**20), ("2GB", 2 * 10**9),
    ("1.5 GiB", 3 * 2**29), (" 1.5g ", 3 * 2**29), ("0.5KB", 500), ("1.0001k", 1024),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "limit"), [
    (50, DeletionLimit(50, 0)), ("50", DeletionLimit(50, 0)), ("25%", DeletionLimit(0, 25)),
    ("50,25%", DeletionLimit(50, 25)), ("25%, 50", DeletionLimit(50, 25)), (" 0 ", DeletionLimit(0, 0)),
    ("100%", DeletionLimit(0, 100)),
])
def test_parse_deletion_limit(text: str | int, limit: DeletionLimit) -> None:
    assert parse_deletion_limit(text) == limit


@pytest.mark.parametrize("text", ["", "%", "lots", "50,60", "10%,20%", "101%", "-1", -1, True, "5.5%", "50;25%",
                                  "50,", "٣"])
def test_parse_deletion_limit_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match="not a deletion limit"):
        parse_deletion_limit(text)


@pytest.mark.parametrize(("limit", "deletions", "folder", "allowed"), [
    (DeletionLimit(50, 25), 50, 10, True), (DeletionLimit(50, 25), 51, 200, False),
    (DeletionLimit(50, 25), 51, 204, True), (DeletionLimit(50, 25), 100, 400, True),
    (DeletionLimit(50, 25), 101, 400, False), (DeletionLimit(0, 25), 1, 7, True), (DeletionLimit(0, 25), 2, 7, False),
    (DeletionLimit(5, 0), 5, 1000, True), (DeletionLimit(5, 0), 6, 1000, False), (DeletionLimit(0, 0), 0, 0, True),
])
def test_deletion_limit_is_the_larger_of_count_and_share(limit: DeletionLimit, deletions: int, folder: int,
                                                        allowed: bool) -> None:
    assert limit.allows(deletions, folder) is allowed


@pytest.mark.parametrize("text", ["", "MB", "lots", "5 TB", "1,5MB", "-1", -1, True, "1e3", "1.MB", "٣MB"])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "seconds"), [
    (300, 300), ("300", 300), ("90s", 90), ("5m", 300), ("1h", 3600), ("1d", 86400), ("1h30m", 5400),
    ("1d 2h 3m 4s", 93784), ("0s", 0), ("90m", 5400),
])
def test_parse_duration(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", " ", "m", "5 minutes", "30m1h", "1h1h", "1.5h", "-5m", -5, True,
                                  "1w", "٣s"])
def test_parse_duration_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


SIZE_FACTORS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20,
                "GiB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30}


@given(st.integers(0, 10**7), st.sampled_from(sorted(SIZE_FACTORS)), st.booleans(), st.booleans())
def test_sizes_round_trip(number: int, unit: str, lower: bool, spaced: bool) -> None:
    text = f"{number}{' ' if spaced else ''}{unit.lower() if lower else unit}"
    assert parse_size(text) == number * SIZE_FACTORS[unit]


@given(st.lists(st.tuples(st.sampled_from("dhms"), st.integers(0, 10**4)), min_size=1, max_size=4,
                unique_by=lambda part: part[0]),
       st.booleans())
def test_durations_round_trip(parts: list[tuple[str, int]], spaced: bool) -> None:
    parts.sort(key=lambda part: "dhms".index(part[0]))
    text = (" " if spaced else "").join(f"{number}{unit}" for unit, number in parts)
    scale = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    assert parse_duration(text) == sum(number * scale[unit] for unit, number in parts)


# --- the docs cover every key --------------------------------------------------------------------

SECTION_HEADERS = {"general": "[general]", "account": "[[account]]", "account.store": "[account.store]",
                   "account.oauth2": "[account.oauth2]"}


def test_example_config_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/me")
    config = load_config(EXAMPLE)
    imap, pop3, gmail = config.accounts
    assert (imap.protocol, imap.store.format, imap.password.kind) == ("imap", "maildir", "command")
    assert (pop3.protocol, pop3.store.format, pop3.password.kind) == ("pop3", "mbox", "env")
    assert imap.store.path == Path("/home/me/Mail/personal")
    assert (gmail.auth, gmail.password, gmail.oauth2 and gmail.oauth2.provider) == ("oauth2", None, "google")


def keys_by_section(text: str) -> set[tuple[str, str]]:
    """(section header, key) for every key set or commented out in a TOML file."""
    found: set[tuple[str, str]] = set()
    header = ""
    for line in text.splitlines():
        if re.fullmatch(r"\[\[?[\w.]+\]\]?", line.strip()):
            header = line.strip()
            found.add(("", header))
        elif match := re.match(r"\s*#?\s*(\w+)\s*=", line):
            found.add((header, match[1]))
    return found


@pytest.mark.parametrize("key", KEYS, ids=lambda key: f"{key.section}.{key.name}")
def test_every_key_is_in_the_example_config(key: Key) -> None:
    found = keys_by_section(EXAMPLE.read_text())
    if key.type == "table":
        assert ("", f"[{key.section}.{key.name}]") in found
    else:
        assert (SECTION_HEADERS[key.section], key.name) in found


def readme_configuration() -> str:
    text = README.read_text()
    start = text.index("## Configuration")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.parametrize("key", KEYS, ids=lambda key: f"{key.section}.{key.name}")
def test_every_key_is_in_the_readme(key: Key) -> None:
    row = rf"^\|\s*`?{re.escape(SECTION_HEADERS[key.section])}`?\s*\|\s*`{re.escape(key.name)}`\s*\|"
    assert re.search(row, readme_configuration(), re.MULTILINE), f"README.md has no row for {key.name}"


# --- large messages ----------------------------------------------------------------------


def test_placeholders_are_the_default_where_a_store_can_replace_them() -> None:
    limited = {"max_message_size": '"2MB"'}
    assert only_account(account(**limited)).large_messages == "headers"
    assert only_account(account()).large_messages == "skip"  # no limit: nothing is large
    mbox = {"format": '"mbox"', "path": '"/srv/mail/work"'}
    assert only_account(account(store=mbox, **limited)).large_messages == "skip"
    assert only_account(account(POP3, **limited)).large_messages == "headers"
    assert only_account(account(mode='"sync"', **limited)).large_messages == "skip"
    text = only_account(account(fetch_parts='"text"', **limited))
    assert (text.large_messages, text.fetch_parts) == ("headers", "text")


@pytest.mark.parametrize(("keys", "store", "wanted"), [
    ({"large_messages": '"headers"', "max_message_size": '"2MB"'}, {"format": '"mbox"', "path": '"/m"'},
     'account "work".large_messages: "headers" needs format = "maildir"'),
    ({"large_messages": '"headers"', "max_message_size": '"2MB"', "mode": '"sync"'}, None,
     'account "work".large_messages: "headers" is not for mode = "sync"'),
    ({"large_messages": '"headers"'}, None, 'account "work".large_messages: has no effect without max_message_size'),
    ({"large_messages": '"bodies"', "max_message_size": '"2MB"'}, None,
     'account "work".large_messages: expected one of "headers", "skip"'),
    ({"fetch_parts": '"text"', "large_messages": '"skip"', "max_message_size": '"2MB"'}, None,
     'account "work".fetch_parts: "text" is for placeholders'),
])
def test_large_message_keys_refused_in_one_line(keys: dict[str, str], store: dict[str, str] | None,
                                                wanted: str) -> None:
    problem = str(error(account(store=store, **keys)))
    assert wanted in problem and "\n" not in problem


def test_fetch_parts_is_for_imap() -> None:
    problem = str(error(account(POP3, fetch_parts='"text"', max_message_size='"2MB"')))
    assert 'fetch_parts: only for protocol = "imap"' in problem


# --- a shared state --------------------------------------------------------------------

SHARED = '[general]\nstate = "postgresql+psycopg://mailsyncd@localhost/mailsyncd"\n'


def test_mbox_with_a_shared_state_is_refused_unless_the_store_is_local() -> None:
    """Any daemon may take the account over, and mbox's locks do not hold across
    machines: the mbox store must be said to be one node's local disk."""
    mbox = account(store={"format": '"mbox"', "path": '"/mail/work.mbox"'})
    problem = error(SHARED + mbox)
    assert problem.key == 'account "work".store.format'
    assert "shared_store = false" in problem.problem and '"maildir"' in problem.problem
    local = account(store={"format": '"mbox"', "path": '"/mail/work.mbox"', "shared_store": "false"})
    assert parse(SHARED + local).accounts[0].store.shared_store is False
    assert parse(mbox).accounts[0].store.format == "mbox"  # a state of one machine: no question
    assert parse(SHARED + account()).accounts[0].store.format == "maildir"


def test_sticky_and_host_logins() -> None:
    general = parse(SHARED.replace("\n", "\nsticky = true\nhost_logins = 4\n", 1) + account())
    assert general.general.host_logins == 4 and general.accounts[0].sticky is True
    assert parse(SHARED.replace("\n", "\nsticky = true\n", 1) + account(sticky="false")).accounts[0].sticky is False
    assert parse(SHARED + account()).accounts[0].sticky is False and parse(SHARED).general.host_logins is None
