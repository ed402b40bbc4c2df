"""OAuth2 for IMAP and POP3 logins: the first login, the stored refresh token, fresh access tokens.

The protocol part is small: an authorization-code login with PKCE through a loopback
redirect, or the device-code flow (RFC 8628), each ending in a refresh token; then one
POST to the token endpoint whenever an access token is needed. The standard library's
urllib does that. A generic OAuth2 library (authlib, requests-oauthlib) would bring an
HTTP stack and a larger surface for the same four requests, and the vendors' libraries
(msal, google-auth-oauthlib) cover one provider each, so none of them is used.

The refresh token lives in ``token_file`` (0600, in a 0700 directory) or, with
``storage = "keyring"``, in the system keyring; never in the config, the logs or the
state database. Each token, and the client secret, is registered for redaction
(``secrets.register``) the moment it is read or received. A rotated refresh token is
saved before the access token that came with it is used, so a crash cannot lose the
only valid one. Refreshes are serialised by a lock on the token file, within the
process (the daemon's IDLE threads) and across processes (``check`` beside the daemon).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.server
import json
import logging
import math
import os
import secrets as random
import ssl
import threading
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

from mailsyncd.config import AccountConfig, OAuth2Config
from mailsyncd.errors import AccountError, AuthError
from mailsyncd.fsio import PRIVATE_FILE, fsync_dir, make_private_dirs, write_new_file
from mailsyncd.secrets import Secret, password_for, register, resolve_password

log = logging.getLogger(__name__)

TIMEOUT = 30.0  # seconds for one request to the provider
MAX_RESPONSE = 1 << 20  # bytes: a token response is a few KiB
EXPIRY_MARGIN = 60.0  # seconds: an access token is renewed this long before it expires...
EXPIRY_SHARE = 0.8  # ...or, for short-lived ones, once this share of its lifetime has passed
LOGIN_TIMEOUT = 600.0  # seconds the browser login may take
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SLOW_DOWN = 5  # seconds added to the polling interval when the server asks (RFC 8628 3.5)

T = TypeVar("T")


class TokenRefused(AuthError):
    """The provider refused the refresh token (revoked, expired, or never issued): only a new
    ``mailsyncd auth`` helps, so retrying a login with another access token is pointless."""


@dataclass(frozen=True)
class Tokens:
    """What the token store holds, as JSON. Times are Unix seconds."""

    refresh_token: str
    issued_at: float  # when ``mailsyncd auth`` got the first refresh token
    access_token: str | None = None
    expires_at: float | None = None
    renew_at: float | None = None  # when a login should rather refresh first


@dataclass(frozen=True)
class TokenStatus:
    """For ``mailsyncd check``: when the login was made and until when the fresh access
    token is good. Holds no token."""

    issued: datetime
    expires: datetime | None


# -- the token file -------------------------------------------------------------------------------

_THREAD_LOCKS: dict[Path, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the token file's lock: a thread lock for this process, flock across processes.

    Two refreshes with the same rotating refresh token would make the second one fail
    (and some providers then revoke the whole grant), so only one runs at a time.
    """
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.setdefault(path, threading.Lock())
    make_private_dirs(path.parent)
    with lock:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def load_tokens(account: AccountConfig) -> Tokens | None:
    """The stored tokens, registered for redaction; None when there are none yet."""
    data = _read_keyring(account) if _config(account).storage == "keyring" else _read_file(account)
    if data is None:
        return None
    try:
        tokens = Tokens(**json.loads(data))
    except (ValueError, TypeError):  # the text may hold a token: it goes nowhere
        raise AuthError(f"{account.name}: the stored token ({token_location(account)}) is damaged; run "
                        f"`mailsyncd auth {account.name}` again") from None
    register(Secret(tokens.refresh_token))
    if tokens.access_token:
        register(Secret(tokens.access_token))
    return tokens


def save_tokens(account: AccountConfig, tokens: Tokens) -> None:
    """Replace the stored tokens: in the keyring, or in the token file, atomically and durably."""
    data = json.dumps(asdict(tokens))
    if _config(account).storage == "keyring":
        _write_keyring(account, data)
    else:
        _write_file(account, data.encode())


def token_location(account: AccountConfig) -> str:
    """Where the account's refresh token is kept, for messages."""
    config = _config(account)
    if config.storage == "keyring":
        return f'the keyring (service "{keyring_service(account)}", user "{account.username}")'
    return str(config.token_file)


def keyring_service(account: AccountConfig) -> str:
    """The keyring service the tokens are kept under; the keyring user is the username."""
    return f"mailsyncd-oauth2:{account.name}"


def _read_file(account: AccountConfig) -> bytes | None:
    path = _config(account).token_file
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise AccountError(f"{account.name}: cannot read the token file {path}: {error.strerror}") from None


def _write_file(account: AccountConfig, data: bytes) -> None:
    """Written 0600 under a temporary name, fsync'd, renamed over the old file, and the
    directory fsync'd: a crash leaves the old tokens or the new ones, never neither."""
    path = _config(account).token_file
    make_private_dirs(path.parent)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        scratch.unlink(missing_ok=True)
        write_new_file(scratch, data)
        scratch.replace(path)
    except OSError as error:
        scratch.unlink(missing_ok=True)
        raise AccountError(f"{account.name}: cannot write the token file {path}: {error.strerror}") from None
    fsync_dir(path.parent)


def _read_keyring(account: AccountConfig) -> str | None:
    # Imported here, as in secrets: importing keyring probes for backends.
    import keyring
    import keyring.errors

    try:
        value: str | None = keyring.get_password(keyring_service(account), account.username)
    except keyring.errors.KeyringError as error:
        raise AccountError(f"{account.name}: the keyring failed: {error}") from None
    return value


def _write_keyring(account: AccountConfig, data: str) -> None:
    import keyring
    import keyring.errors

    try:
        keyring.set_password(keyring_service(account), account.username, data)
    except keyring.errors.KeyringError as error:
        raise AccountError(f"{account.name}: cannot store the token in the keyring: {error}") from None


def _config(account: AccountConfig) -> OAuth2Config:
    if account.oauth2 is None:  # callers check auth first; this is a bug, not a user's mistake
        raise ValueError(f"{account.name} has no [account.oauth2]")
    return account.oauth2


# -- access tokens for logins ---------------------------------------------------------------------


def log_in(account: AccountConfig, connect: Callable[[Secret], T]) -> T:
    """``connect`` with the account's credentials: its password, or an OAuth2 access token.

    An access token the server refuses (AuthError) is refreshed once and tried again: the
    provider may have revoked it early, or a clock be off. A refused refresh token is not
    retried. This is the one place where a login meets the token store, for the sync,
    ``check`` and the daemon's IDLE watches alike.
    """
    if account.auth != "oauth2":
        return connect(password_for(account))
    try:
        return connect(access_token(account))
    except TokenRefused:
        raise
    except AuthError as error:
        log.info("%s: the server refused the access token (%s); refreshing it once", account.name, error)
    return connect(access_token(account, refresh=True))


def login_good_until(account: AccountConfig) -> float:
    """Until when (``time.time()``) a session that logged in just now may carry runs: a
    password login for good; an OAuth2 login until its access token is due for renewal,
    since a provider may end sessions whose token expired."""
    if account.auth != "oauth2":
        return math.inf
    tokens = load_tokens(account)
    return tokens.renew_at if tokens is not None and tokens.renew_at else math.inf


def access_token(account: AccountConfig, *, refresh: bool = False) -> Secret:
    """A valid access token: the stored one while it is fresh, else a refreshed one (saved
    first). ``refresh`` forces a refresh even when the stored one looks fresh."""
    path = _config(account).token_file
    with _locked(path):
        tokens = _stored(account)
        if not refresh and tokens.access_token and tokens.renew_at and time.time() < tokens.renew_at:
            return Secret(tokens.access_token)
        tokens = _refreshed(account, tokens)
        save_tokens(account, tokens)
    log.debug("%s: access token refreshed, good for %.0f s", account.name, (tokens.expires_at or 0) - time.time())
    return Secret(tokens.access_token or "")


def token_status(account: AccountConfig) -> TokenStatus:
    """Refresh the access token now, to prove the refresh token works (``check``)."""
    access_token(account, refresh=True)
    tokens = _stored(account)
    return TokenStatus(datetime.fromtimestamp(tokens.issued_at, UTC),
                       datetime.fromtimestamp(tokens.expires_at, UTC) if tokens.expires_at else None)


def _stored(account: AccountConfig) -> Tokens:
    tokens = load_tokens(account)
    if tokens is None:
        raise TokenRefused(f"{account.name}: no OAuth2 login yet; run `mailsyncd auth {account.name}`")
    return tokens


def _refreshed(account: AccountConfig, tokens: Tokens) -> Tokens:
    config = _config(account)
    form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token, "client_id": config.client_id}
    answer = _token_request(account, form)
    if "error" in answer:
        if answer["error"] == "invalid_grant":
            raise TokenRefused(f"{account.name}: the provider refused the refresh token "
                               f"({_said(answer)}); run `mailsyncd auth {account.name}` again")
        raise AuthError(f"{account.name}: the token endpoint refused a refresh ({_said(answer)})")
    return _received(account, answer, tokens.issued_at, tokens.refresh_token)


def _received(account: AccountConfig, answer: dict[str, Any], issued_at: float, refresh_token: str | None) -> Tokens:
    """The tokens a successful token response carries, registered for redaction. A response
    without a new refresh token keeps the old one (only rotating providers send one)."""
    access, expires_in = answer.get("access_token"), answer.get("expires_in", 3600)
    refresh = answer.get("refresh_token") or refresh_token
    if not isinstance(access, str) or not access:
        raise AuthError(f"{account.name}: the token endpoint answered without an access token")
    if not isinstance(refresh, str) or not refresh:
        raise AuthError(f"{account.name}: the provider gave no refresh token; check that the scopes allow "
                        "offline access (Microsoft: offline_access)")
    register(Secret(access))
    register(Secret(refresh))
    try:
        lifetime = max(float(expires_in), 1.0)
    except (TypeError, ValueError):
        lifetime = 3600.0
    now = time.time()
    return Tokens(refresh_token=refresh, issued_at=issued_at, access_token=access, expires_at=now + lifetime,
                  renew_at=now + max(lifetime - EXPIRY_MARGIN, lifetime * EXPIRY_SHARE))


def _said(answer: dict[str, Any]) -> str:
    """The error code and the first line of its description, shortened: one line."""
    error = str(answer.get("error", "error"))
    description = str(answer.get("error_description") or "").strip().split("\n", 1)[0]
    if len(description) > 160:
        description = description[:160] + "..."
    return f"{error}: {description}" if description else error


def _client_form(account: AccountConfig, form: dict[str, str]) -> dict[str, str]:
    """``form`` with the client secret added where the app type has one."""
    config = _config(account)
    if config.client_secret is not None:
        secret = register(resolve_password(config.client_secret, account.name, account.username))
        form = {**form, "client_secret": secret.reveal()}
    return form


def _token_request(account: AccountConfig, form: dict[str, str], url: str | None = None) -> dict[str, Any]:
    """POST ``form`` (client secret added) to the token endpoint, or to ``url``; the JSON
    answer, error or not. AccountError when there is no usable answer at all.

    Errors are raised ``from None`` and name the host only: the request holds tokens.
    """
    target = url or _config(account).token_url
    host = urlsplit(target).hostname
    body = urlencode(_client_form(account, form)).encode()
    # S310: the config lets only https:// through, or http:// to this machine (config._url).
    request = urllib.request.Request(target, data=body, method="POST", headers={  # noqa: S310
        "Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"})
    status = 200
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT,  # noqa: S310  # see above
                                    context=ssl.create_default_context()) as response:
            data = response.read(MAX_RESPONSE)
    except urllib.error.HTTPError as error:
        status, data = error.code, error.read(MAX_RESPONSE)
        error.close()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise AccountError(f"{account.name}: cannot reach the OAuth2 endpoint {host}: {reason}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or (status != 200 and "error" not in answer):
        raise AccountError(f"{account.name}: the OAuth2 endpoint {host} answered HTTP {status} without "
                           "an OAuth2 response")
    return answer


# -- the first login ------------------------------------------------------------------------------


def _fresh_tokens(account: AccountConfig, answer: dict[str, Any], what: str) -> Tokens:
    if "error" in answer:
        raise AuthError(f"{account.name}: {what} failed ({_said(answer)})")
    return _received(account, answer, time.time(), None)


class _Redirect(http.server.BaseHTTPRequestHandler):
    """The loopback redirect's one page: takes the query, tells the browser it may close."""

    server: _RedirectServer

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        values = {name: items[0] for name, items in query.items()}
        mine = values.get("state") == self.server.state
        self.send_response(200 if mine else 404)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        if not mine:  # a favicon, a scanner, a stale tab
            self.wfile.write(b"not found\n")
            return
        self.server.result = values
        self.wfile.write(b"mailsyncd: the login is done" if "code" in values
                         else b"mailsyncd: the login failed; see the terminal")
        self.wfile.write(b"; you can close this window.\n")

    def log_message(self, format: str, *args: Any) -> None:
        """The request line holds the authorization code: it is not logged."""


class _RedirectServer(http.server.HTTPServer):
    def __init__(self, port: int, state: str) -> None:
        super().__init__(("127.0.0.1", port), _Redirect)
        self.state = state
        self.result: dict[str, str] | None = None


def authorize_in_browser(account: AccountConfig, say: Callable[[str], None], *, open_browser: bool = True,
                         port: int = 0) -> Tokens:
    """The authorization-code flow with PKCE (RFC 7636) and a loopback redirect (RFC 8252).

    Prints the URL (``say``), opens it in a browser unless told not to, and waits on
    127.0.0.1:``port`` (0: any free port) for the browser to come back with the code.
    The tokens are saved before they are returned.
    """
    config = _config(account)
    verifier = random.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = random.token_urlsafe(16)
    try:
        server = _RedirectServer(port, state)
    except OSError as error:
        raise AccountError(f"{account.name}: cannot listen on 127.0.0.1:{port} for the login: "
                           f"{error.strerror}") from None
    with server:
        redirect_uri = f"http://{config.redirect_host}:{server.server_address[1]}/"
        query = {"response_type": "code", "client_id": config.client_id, "redirect_uri": redirect_uri,
                 "scope": " ".join(config.scopes), "state": state, "code_challenge": challenge,
                 "code_challenge_method": "S256", "login_hint": account.username, **dict(config.authorize_params)}
        url = f"{config.authorize_url}{'&' if '?' in config.authorize_url else '?'}{urlencode(query)}"
        say(f"Log in to {account.name} ({account.username}) at this URL; the browser then comes back to "
            f"{redirect_uri}:\n\n{url}\n")
        if open_browser:
            webbrowser.open(url)
        server.timeout = 1.0
        deadline = time.monotonic() + LOGIN_TIMEOUT
        while server.result is None:
            if time.monotonic() > deadline:
                raise AuthError(f"{account.name}: no login within {LOGIN_TIMEOUT:.0f} s")
            server.handle_request()
        result = server.result
    if "code" not in result:
        raise AuthError(f"{account.name}: the login was refused ({_said(result)})")
    answer = _token_request(account, {"grant_type": "authorization_code", "code": result["code"],
                                      "redirect_uri": redirect_uri, "client_id": config.client_id,
                                      "code_verifier": verifier})
    tokens = _fresh_tokens(account, answer, "the login")
    with _locked(config.token_file):
        save_tokens(account, tokens)
    return tokens


def authorize_on_device(account: AccountConfig, say: Callable[[str], None],
                        sleep: Callable[[float], None] = time.sleep) -> Tokens:
    """The device-code flow (RFC 8628): the user logs in on another device with a short
    code while this polls the token endpoint. The tokens are saved before they are returned."""
    config = _config(account)
    if config.device_url is None:
        hint = (" (Google allows it only for a few scopes, and not for mail)" if config.provider == "google"
                else "; set device_url")
        raise AuthError(f"{account.name}: provider {config.provider} has no device login{hint}; use "
                        f"`mailsyncd auth {account.name} --no-browser` with an SSH port forward instead")
    grant = _token_request(account, {"client_id": config.client_id, "scope": " ".join(config.scopes)},
                           config.device_url)
    if "error" in grant or not isinstance(grant.get("device_code"), str):
        raise AuthError(f"{account.name}: the device login could not start ({_said(grant)})")
    device_code = grant["device_code"]
    register(Secret(device_code))
    # Google names it verification_url; RFC 8628 verification_uri.
    where = grant.get("verification_uri_complete") or grant.get("verification_uri") or grant.get("verification_url")
    say(f"On any device, open {where} and enter the code {grant.get('user_code')}; waiting for the login...")
    interval = float(grant.get("interval") or 5)
    deadline = time.monotonic() + float(grant.get("expires_in") or 900)
    while time.monotonic() < deadline:
        sleep(interval)
        answer = _token_request(account, {"grant_type": DEVICE_GRANT, "device_code": device_code,
                                          "client_id": config.client_id})
        error = answer.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += SLOW_DOWN
            continue
        if error == "expired_token":
            break
        tokens = _fresh_tokens(account, answer, "the device login")
        with _locked(config.token_file):
            save_tokens(account, tokens)
        return tokens
    raise AuthError(f"{account.name}: the code expired before the login was done; run "
                    f"`mailsyncd auth {account.name} --device` again")
