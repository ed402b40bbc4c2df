"""OAuth2 without a mail server: the SASL wire forms, the config table, the device-flow polling."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from mailsyncd import cli, oauth2, sasl
from mailsyncd.config import AccountConfig, Config, parse_config
from mailsyncd.errors import AccountError, AuthError, ConfigError
from tests.oauth_server import OAuthServer

FILE = Path("/etc/mailsyncd/config.toml")


def config(oauth2_lines: str, protocol: str = "imap", account_lines: str = 'auth = "oauth2"') -> str:
    return f"""
[general]
state = "/var/lib/mailsyncd/state.db"
[[account]]
name = "work"
protocol = "{protocol}"
host = "mail.example.org"
username = "me@example.org"
{account_lines}
[account.store]
format = "maildir"
path = "/srv/mail"
[account.oauth2]
{oauth2_lines}
"""


def parse(text: str) -> Config:
    return parse_config(text, FILE)


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value


# --- the wire forms, against the published examples ------------------------------------------


def test_xoauth2_matches_googles_example_byte_for_byte() -> None:
    # https://developers.google.com/gmail/imap/xoauth2-protocol, "initial client response"
    response = sasl.initial_response("XOAUTH2", "someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg",
                                     "imap.gmail.com", 993)
    assert base64.b64encode(response) == (b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRj"
                                          b"Mk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==")


def test_oauthbearer_matches_rfc_7628_example_byte_for_byte() -> None:
    # RFC 7628 section 4.1, the IMAP exchange's initial client response
    response = sasl.initial_response("OAUTHBEARER", "user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
                                     "server.example.com", 143)
    assert base64.b64encode(response) == (b"bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQz"
                                          b"AWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB")


def test_oauthbearer_escapes_the_user_name() -> None:
    assert sasl.initial_response("OAUTHBEARER", "a,b=c", "t", "h", 1).startswith(b"n,a=a=2Cb=3Dc,\x01")


@pytest.mark.parametrize(("mechanism", "answer"), [("XOAUTH2", b""), ("OAUTHBEARER", b"\x01")])
def test_the_error_challenge_is_answered_not_sent_the_token_again(mechanism: sasl.Mechanism, answer: bytes) -> None:
    respond = sasl.responder(b"first", mechanism)
    assert respond(b"") == b"first"
    assert respond(b'{"status":"401","schemes":"bearer","scope":"mail"}') == answer


@pytest.mark.parametrize(("offered", "wanted", "chosen"), [
    ({"XOAUTH2", "OAUTHBEARER"}, "auto", "XOAUTH2"), ({"OAUTHBEARER"}, "auto", "OAUTHBEARER"),
    (set(), "auto", "XOAUTH2"), ({"XOAUTH2"}, "oauthbearer", "OAUTHBEARER")])
def test_mechanism_choice(offered: set[str], wanted: str, chosen: str) -> None:
    assert sasl.choose(lambda name: name in offered, wanted) == chosen


# --- the config table ----------------------------------------------------------------------------


def only(text: str) -> AccountConfig:
    (account,) = parse(text).accounts
    return account


def test_microsoft_preset_fills_endpoints_scopes_and_the_token_file() -> None:
    account = only(config('provider = "microsoft"\nclient_id = "abc"\ntenant = "contoso.onmicrosoft.com"',
                          protocol="pop3"))
    assert account.password is None and account.oauth2 is not None
    settings = account.oauth2
    assert settings.token_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert settings.device_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode"
    assert settings.scopes == ("https://outlook.office.com/POP.AccessAsUser.All", "offline_access")
    assert settings.client_secret is None
    assert settings.token_file == Path("/var/lib/mailsyncd/oauth2/work.json")


def test_google_preset_asks_for_offline_access_and_has_no_device_flow() -> None:
    account = only(config('provider = "google"\nclient_id = "abc"\nclient_secret_command = "pass google"'))
    assert account.oauth2 is not None
    assert account.oauth2.scopes == ("https://mail.google.com/",)
    assert ("access_type", "offline") in account.oauth2.authorize_params
    assert account.oauth2.device_url is None
    assert account.oauth2.client_secret is not None and account.oauth2.client_secret.kind == "command"


@pytest.mark.parametrize(("text", "key", "words"), [
    (config('provider = "custom"\nclient_id = "x"\ntoken_url = "https://a/t"\nscopes = ["s"]'),
     'account "work".oauth2.authorize_url', ['provider = "custom"']),
    (config('provider = "custom"\nclient_id = "x"\ntoken_url = "https://a/t"\nauthorize_url = "https://a/a"'),
     'account "work".oauth2.scopes', ["scopes"]),
    (config('provider = "custom"\nclient_id = "x"\ntoken_url = "http://idp.example.org/t"'),
     'account "work".oauth2.token_url', ["https://", "127.0.0.1"]),
    (config('provider = "yahoo"\nclient_id = "x"'), 'account "work".oauth2.provider',
     ['"google", "microsoft", "custom"']),
    (config('provider = "google"\nclient_id = "x"\ntenant = "t"'), 'account "work".oauth2.tenant',
     ['only for provider = "microsoft"']),
    (config('provider = "google"\nclient_id = "x"\ntoken_url = "https://a/t"'), 'account "work".oauth2.token_url',
     ['only for provider = "custom"']),
    (config('provider = "google"'), 'account "work".oauth2.client_id', ["missing"]),
    (config('provider = "google"\nclient_id = "x"\nclient_secret = "a"\nclient_secret_env = "B"'),
     'account "work".oauth2.client_secret', ["only one"]),
    (config('provider = "google"\nclient_id = "x"', account_lines='auth = "oauth2"\npassword = "pw"'),
     'account "work".password', ["logs in with a token"]),
    (config('provider = "google"\nclient_id = "x"', account_lines='password = "pw"'),
     'account "work".oauth2', ['only for auth = "oauth2"']),
    (config('provider = "google"\nclient_id = "x"\nmechanism = "plain"'), 'account "work".oauth2.mechanism',
     ['"auto", "xoauth2", "oauthbearer"']),
])
def test_config_errors_name_the_key_and_what_is_allowed(text: str, key: str, words: list[str]) -> None:
    problem = error(text)
    assert problem.key == key
    assert "\n" not in str(problem)
    for word in words:
        assert word in str(problem)


def test_auth_oauth2_without_its_table_says_what_to_add() -> None:
    text = config("", account_lines='auth = "oauth2"').replace("[account.oauth2]\n", "")
    problem = error(text)
    assert problem.key == 'account "work".oauth2' and "[account.oauth2]" in str(problem)


# --- tokens and the device flow ------------------------------------------------------------------


def custom_account(tmp_path: Path, server: OAuthServer, device: bool = True) -> AccountConfig:
    lines = (f'provider = "custom"\nclient_id = "{server.client_id}"\nauthorize_url = "{server.url}/authorize"\n'
             f'token_url = "{server.url}/token"\nscopes = ["mail"]\ntoken_file = "{tmp_path}/t/work.json"\n'
             + (f'device_url = "{server.url}/device"\n' if device else ""))
    return only(config(lines))


def test_device_flow_waits_slows_down_and_saves_privately(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[dict[str, Any]] = [
        {"device_code": "dev", "user_code": "ABC", "verification_uri": "https://x/d", "interval": 1},
        {"error": "authorization_pending"}, {"error": "slow_down"}, {"error": "authorization_pending"},
        {"access_token": "access-1", "refresh_token": "refresh-1", "expires_in": 3600}]
    monkeypatch.setattr(oauth2, "_token_request", lambda account, form, url=None: answers.pop(0))
    slept: list[float] = []
    said: list[str] = []
    with OAuthServer() as server:
        account = custom_account(tmp_path, server)
    tokens = oauth2.authorize_on_device(account, said.append, sleep=slept.append)
    assert slept == [1, 1, 6, 6]
    assert "enter the code ABC" in said[0]
    assert tokens.refresh_token == "refresh-1"
    path = tmp_path / "t" / "work.json"
    assert json.loads(path.read_text())["refresh_token"] == "refresh-1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_device_flow_expired_code_says_to_start_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[dict[str, Any]] = [{"device_code": "dev", "user_code": "ABC", "verification_uri": "https://x/d"},
                                     {"error": "expired_token"}]
    monkeypatch.setattr(oauth2, "_token_request", lambda account, form, url=None: answers.pop(0))
    with OAuthServer() as server:
        account = custom_account(tmp_path, server)
    with pytest.raises(AuthError, match=r"run `mailsyncd auth work --device` again"):
        oauth2.authorize_on_device(account, lambda text: None, sleep=lambda seconds: None)


def test_a_rotated_refresh_token_is_saved_and_a_kept_one_stays(tmp_path: Path) -> None:
    with OAuthServer() as server:
        account = custom_account(tmp_path, server)
        first = server.grant("me")
        oauth2.save_tokens(account, oauth2.Tokens(refresh_token=first, issued_at=1.0))
        oauth2.access_token(account)
        rotated = oauth2.load_tokens(account)
        assert rotated is not None and rotated.refresh_token != first and rotated.issued_at == 1.0
        server.rotate = False
        oauth2.access_token(account, refresh=True)
        kept = oauth2.load_tokens(account)
        assert kept is not None and kept.refresh_token == rotated.refresh_token


def test_unreachable_token_endpoint_is_one_line_without_the_token(tmp_path: Path) -> None:
    with OAuthServer() as server:
        account = custom_account(tmp_path, server)
        oauth2.save_tokens(account, oauth2.Tokens(refresh_token="refresh-secret", issued_at=1.0))
    with pytest.raises(AccountError) as caught:  # the server is gone
        oauth2.access_token(account)
    assert "cannot reach the OAuth2 endpoint 127.0.0.1" in str(caught.value)
    assert "refresh-secret" not in str(caught.value) and caught.value.__cause__ is None


def test_google_has_no_device_flow_and_says_what_to_do_instead(tmp_path: Path) -> None:
    account = only(config('provider = "google"\nclient_id = "abc"\nclient_secret = "s"'))
    with pytest.raises(AuthError, match=r"--no-browser"):
        oauth2.authorize_on_device(account, lambda text: None)


def test_auth_on_a_password_account_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config("", account_lines='password = "pw"').replace("[account.oauth2]\n", ""))
    path.chmod(0o600)
    assert cli.main(["--config", str(path), "auth", "work"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'account "work".auth' in err[0] and 'auth = "oauth2"' in err[0]
