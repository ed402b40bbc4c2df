"""Turning a PasswordSource into the password, and keeping secrets out of sight.

This is the only module that reads secrets (design invariant 8). A password travels as a
``Secret``, whose repr is ``Secret('***')``, so a stray log line, traceback or f-string
shows nothing; the source adapter takes the text out with ``reveal()`` at the moment it
logs in. Error messages say which source failed and why, but never carry what a command
printed on stdout or what a file holds, since either may be the password.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import NoReturn, assert_never

from mailsyncd.config import AccountConfig, PasswordSource
from mailsyncd.errors import SecretError

log = logging.getLogger("mailsyncd.secrets")

COMMAND_TIMEOUT = 30  # seconds; long enough for a pinentry prompt or a hardware token
REDACT_WORD = 16  # characters: longer words of a command's error message may be secrets
REDACT_LINE = 120  # characters of that message shown at most

_REVEALED: set[str] = set()  # every password resolved so far, scrubbed from every log record


class Secret:
    """A password that does not show itself: repr and str are ``Secret('***')``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The password itself; call it where the login command is built, nowhere else."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling (and copy) would write the password to wherever the pickle goes.
        raise TypeError("a Secret cannot be pickled")


def keyring_service(account: str) -> str:
    """The keyring service name for an account; the keyring user name is its username.

    Users store a password with ``keyring set mailsyncd:<account> <username>``.
    """
    return f"mailsyncd:{account}"


def resolve_password(source: PasswordSource, account: str, username: str) -> Secret:
    """Fetch the password from its source; SecretError says what failed, never the password."""
    if source.kind == "command":
        return Secret(_from_command(source.value, account))
    if source.kind == "env":
        return Secret(_from_env(source.value, account))
    if source.kind == "file":
        return Secret(_from_file(source.value, account))
    if source.kind == "keyring":
        return Secret(_from_keyring(account, username))
    if source.kind == "inline":
        return Secret(source.value)
    assert_never(source.kind)


def _from_command(command: str, account: str) -> str:
    """Run ``command`` with /bin/sh and take the first line it prints.

    The command runs in its own process group, so that on a timeout the whole group is
    killed: a grandchild left holding the stdout pipe would otherwise keep us waiting.
    A command that reads /dev/tty itself is therefore not supported; prompts through
    gpg-agent's pinentry work, since the agent, not the command, owns the pinentry.
    """
    try:
        process = subprocess.Popen(
            ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, process_group=0,
        )
    except OSError as exc:
        raise SecretError(f'account "{account}": cannot run password_command: {exc.strerror}') from None
    with process:
        try:
            stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            timed_out = True
        else:
            timed_out = False
    # Raised outside the except block, so that no chained exception carries the output.
    if timed_out:
        raise SecretError(f'account "{account}": password_command did not finish within {COMMAND_TIMEOUT} s')
    if process.returncode != 0:
        status = (f"was killed by signal {-process.returncode}" if process.returncode < 0
                  else f"exited with status {process.returncode}")
        said = _redacted(stderr.decode("utf-8", "replace").strip().split("\n", 1)[0])
        raise SecretError(f'account "{account}": password_command {status}' + (f": {said}" if said else ""))
    return _first_line(stdout, account, "password_command printed")


def _redacted(line: str) -> str:
    """What may be shown of a failing command's message: a command may print a token
    there, so every word that holds a digit or is longer than a plain word becomes
    ``***``, and the line is cut short."""
    words = ["***" if len(word) > REDACT_WORD or any(char.isdigit() for char in word) else word
             for word in line.split()]
    text = " ".join(words)
    return text if len(text) <= REDACT_LINE else text[:REDACT_LINE] + "..."


def _from_env(variable: str, account: str) -> str:
    value = os.environ.get(variable)
    if not value:
        state = "not set" if value is None else "empty"
        raise SecretError(f'account "{account}": password_env: the variable {variable} is {state}')
    return value


def _from_file(name: str, account: str) -> str:
    try:
        path = Path(name).expanduser()
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            line = handle.readline()
    except OSError as exc:
        raise SecretError(f'account "{account}": cannot read password_file {name}: {exc.strerror}') from None
    except RuntimeError:  # ~user for an unknown user
        raise SecretError(f'account "{account}": cannot expand ~ in password_file {name}') from None
    # A warning, not an error: the file may be private by other means (an encrypted home).
    if mode & 0o044:
        log.warning("password_file %s is readable by other users; run: chmod 600 %s", path, path)
    return _first_line(line, account, f"password_file {path} holds")


def _from_keyring(account: str, username: str) -> str:
    # Imported here because importing keyring probes for backends (D-Bus and the like),
    # which every run would otherwise pay for, even with no account using a keyring.
    try:
        import keyring
        import keyring.errors
    except ImportError:
        raise SecretError(f'account "{account}": keyring = true, but the keyring package '
                          "is not installed") from None
    service = keyring_service(account)
    try:
        password: str | None = keyring.get_password(service, username)
    except keyring.errors.KeyringError as exc:
        raise SecretError(f'account "{account}": the keyring failed: {exc}') from None
    if not password:
        raise SecretError(f'account "{account}": no password in the keyring for service "{service}" and user '
                          f'"{username}"; store it with: keyring set {service} {username}')
    return password


def _first_line(data: bytes, account: str, what: str) -> str:
    """The first line of ``data`` without its line ending; the rest is ignored."""
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    text = _decode(line)
    if text is None:
        raise SecretError(f'account "{account}": {what} something that is not UTF-8')
    if not text:
        raise SecretError(f'account "{account}": {what} an empty first line')
    return text


def _decode(data: bytes) -> str | None:
    # The UnicodeDecodeError would hold the bytes, that is the password, so it is not
    # allowed to leave this function, not even as the context of another exception.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def password_for(account: AccountConfig) -> Secret:
    """The account's password, registered for redaction (``redact``) before anyone can log it."""
    if account.password is None:  # the config allows that only with auth = "oauth2"
        raise SecretError(f'account "{account.name}": auth = "{account.auth}" has no password')
    return register(resolve_password(account.password, account.name, account.username))


def register(secret: Secret) -> Secret:
    """Scrub ``secret`` from every log record from now on (``redact``); returns it.

    Every password, client secret and OAuth2 token goes through here as soon as it is known.
    """
    if len(secret.reveal()) >= 3:  # scrubbing "a" from every line would hide more than it protects
        _REVEALED.add(secret.reveal())
    return secret


def redact(text: str) -> str:
    """``text`` with every password resolved so far replaced by ``***``.

    The log's last line of defence (invariant 8), behind the rule that no code logs one.
    """
    for secret in tuple(_REVEALED):  # the daemon's threads may add to it meanwhile
        text = text.replace(secret, "***")
    return text
