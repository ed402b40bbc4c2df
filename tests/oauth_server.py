"""A local OAuth2 authorization server for the tests, on 127.0.0.1 over plain HTTP.

It plays the provider (Google, Microsoft) and the resource server's token check at once:

- ``/authorize``: the browser login. It logs the user in at once and redirects back to
  the client's ``redirect_uri`` with a code bound to the PKCE challenge (S256 only).
- ``/token``: the authorization-code grant (checks the PKCE verifier and the redirect URI),
  the refresh grant (rotates the refresh token unless ``rotate`` is off; a revoked or
  rotated-away one gets ``invalid_grant``) and the device grant (``authorization_pending``
  until ``approve``, ``slow_down`` when polled too fast, ``expired_token``).
- ``/device``: the device authorization request.
- ``/introspect``: RFC 7662 introspection, which the test Dovecot's oauth2 passdb asks for
  every token a client sends; an expired or unknown access token is inactive.

Access tokens live ``lifetime`` seconds. Counters and the log of requests let the tests see
what the client did; the tokens issued are kept so that tests can look for them in logs.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class _Device:
    user: str
    user_code: str
    expires: float
    approved: bool = False
    last_poll: float = 0.0


@dataclass
class OAuthServer:
    """Start with ``start()`` (or ``with``); ``url`` is its base URL."""

    client_id: str = "mailsyncd-test"
    client_secret: str | None = None
    lifetime: float = 3600.0  # seconds an access token is valid
    rotate: bool = True
    device_interval: int = 1
    device_lifetime: float = 60.0
    user: str = ""  # whom /authorize and the device flow log in
    access: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (user, expiry)
    refresh: dict[str, str] = field(default_factory=dict)  # live refresh token -> user
    issued: list[str] = field(default_factory=list)  # every token ever handed out
    counts: dict[str, int] = field(default_factory=dict)
    _codes: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # code -> (user, challenge, uri)
    _devices: dict[str, _Device] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _http: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._http is not None
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> OAuthServer:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._get(self)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = {key: values[0] for key, values in parse_qs(self.rfile.read(length).decode()).items()}
                status, body = server._post(urlsplit(self.path).path, form)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                data = json.dumps(body).encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> OAuthServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- what tests do -----------------------------------------------------------------------------

    def grant(self, user: str) -> str:
        """A refresh token for ``user``, as if they had logged in."""
        token = self._new("refresh")
        with self._lock:
            self.refresh[token] = user
        return token

    def revoke(self, user: str) -> None:
        """Revoke every refresh and access token of ``user``."""
        with self._lock:
            self.refresh = {token: owner for token, owner in self.refresh.items() if owner != user}
            self.access = {token: value for token, value in self.access.items() if value[0] != user}

    def expire_access_tokens(self) -> None:
        """Make every access token handed out so far inactive, as an early revocation would."""
        with self._lock:
            self.access = {token: (user, 0.0) for token, (user, _) in self.access.items()}

    def approve(self, user_code: str) -> None:
        with self._lock:
            for device in self._devices.values():
                if device.user_code == user_code:
                    device.approved = True

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    # -- the endpoints -----------------------------------------------------------------------------

    def _new(self, kind: str) -> str:
        token = f"{kind}-{secrets.token_urlsafe(24)}"
        self.issued.append(token)
        return token

    def _bump(self, name: str) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    def _get(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        self._bump(parts.path)
        if parts.path != "/authorize":
            handler.send_error(404)
            return
        if (query.get("client_id") != self.client_id or query.get("code_challenge_method") != "S256"
                or not query.get("code_challenge") or query.get("response_type") != "code"):
            handler.send_error(400, "bad authorization request")
            return
        code = self._new("code")
        with self._lock:
            self._codes[code] = (self.user, query["code_challenge"], query["redirect_uri"])
        back = {"code": code, "state": query.get("state", "")}
        handler.send_response(302)
        handler.send_header("Location", f"{query['redirect_uri']}?{urlencode(back)}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _post(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self._bump(path)
        if path == "/introspect":
            with self._lock:
                user, expiry = self.access.get(form.get("token", ""), ("", 0.0))
            self._bump("introspect-active" if time.time() < expiry else "introspect-inactive")
            return 200, ({"active": True, "username": user} if time.time() < expiry else {"active": False})
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client"}
        if path == "/device":
            device_code, user_code = self._new("device"), secrets.token_hex(3).upper()
            with self._lock:
                self._devices[device_code] = _Device(self.user, user_code, time.time() + self.device_lifetime)
            return 200, {"device_code": device_code, "user_code": user_code, "expires_in": self.device_lifetime,
                         "verification_uri": f"{self.url}/device-login", "interval": self.device_interval}
        if path != "/token":
            return 404, {"error": "not_found"}
        grant = form.get("grant_type")
        if grant == "refresh_token":
            return self._refresh_grant(form)
        if grant == "authorization_code":
            return self._code_grant(form)
        if grant == DEVICE_GRANT:
            return self._device_grant(form)
        return 400, {"error": "unsupported_grant_type"}

    def _tokens(self, user: str, refresh: str | None) -> dict[str, Any]:
        access = self._new("access")
        with self._lock:
            self.access[access] = (user, time.time() + self.lifetime)
            if refresh is None:
                refresh = self._new("refresh")
                self.refresh[refresh] = user
        answer = {"access_token": access, "token_type": "Bearer", "expires_in": self.lifetime}
        return {**answer, "refresh_token": refresh}

    def _refresh_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            user = self.refresh.get(form.get("refresh_token", ""))
            if user is None:
                return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
            if self.rotate:
                del self.refresh[form["refresh_token"]]
        answer = self._tokens(user, None if self.rotate else form["refresh_token"])
        if not self.rotate:
            del answer["refresh_token"]  # as Google does: the old one stays valid
        return 200, answer

    def _code_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            found = self._codes.pop(form.get("code", ""), None)
        if found is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown or used code"}
        user, challenge, redirect_uri = found
        verifier = form.get("code_verifier", "")
        computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if computed != challenge:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        if form.get("redirect_uri") != redirect_uri:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri mismatch"}
        return 200, self._tokens(user, None)

    def _device_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            device = self._devices.get(form.get("device_code", ""))
            if device is None:
                return 400, {"error": "invalid_grant"}
            now = time.time()
            if now > device.expires:
                return 400, {"error": "expired_token"}
            too_soon = now - device.last_poll < self.device_interval * 0.9
            device.last_poll = now
            if too_soon:
                return 400, {"error": "slow_down"}
            if not device.approved:
                return 400, {"error": "authorization_pending"}
            del self._devices[form["device_code"]]
        return 200, self._tokens(device.user, None)
