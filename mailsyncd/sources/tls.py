"""TLS and connection failures, the same for every protocol source.

The TLS context is built one way for IMAP and POP3, and the errors a connection can end
in (a certificate for another name, TLS spoken to a plain port, a refused connection)
get one wording, naming the host and port and what to change. This module imports no
protocol library, so the POP3 adapter need not import the IMAP one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

from mailsyncd.config import AccountConfig
from mailsyncd.errors import AccountError
from mailsyncd.sources.progress import Stalled

log = logging.getLogger(__name__)

# Where a server's text ends up in an error line, it is cut to this many characters: a
# hostile or broken server must not flood the log (or the database) through it.
ECHO_LIMIT = 200
# The implicit-TLS port of each protocol, for the hint when TLS meets a plain port.
TLS_PORTS = {"imap": 993, "pop3": 995}
_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
_IP_MISMATCH = 64  # X509_V_ERR_IP_ADDRESS_MISMATCH
_PROBE_TIMEOUT = 10.0  # seconds, for the second look at a certificate


def tls_context(account: AccountConfig) -> ssl.SSLContext:
    """Verified TLS by default; ``tls_ca_file`` adds a trust anchor, it never removes one.

    Where the system has a hashed CA directory, it is used instead of the CA bundle
    file: OpenSSL then reads only the CA it needs, where loading the bundle costs about
    50 ms, a third of a no-op sync. Verification is the same.
    """
    capath = ssl.get_default_verify_paths().capath
    if capath and Path(capath).is_dir():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        context.load_verify_locations(capath=capath)
    else:
        context = ssl.create_default_context()
    if account.tls_ca_file is not None:
        context.load_verify_locations(cafile=str(account.tls_ca_file))
    if not account.tls_verify:
        log.warning("%s: tls_verify = false: the server's certificate is not checked, so anyone on the path "
                    "can read the password and the mail", account.name)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def echoed(text: str) -> str:
    """A server's words as they may appear in an error line: one line, cut to ECHO_LIMIT."""
    line = " ".join(text.split())
    return line if len(line) <= ECHO_LIMIT else line[:ECHO_LIMIT] + "..."


@contextlib.contextmanager
def connecting(account: AccountConfig) -> Iterator[None]:
    """Socket and TLS errors while connecting become AccountError with one clear line."""
    try:
        yield
    except Stalled:
        raise  # the source words it: it is about the server's pace, not the connection
    except OSError as error:
        raise AccountError(connection_problem(account, error)) from error


def connection_problem(account: AccountConfig, error: OSError) -> str:
    """The one line for a connection that failed at the socket or TLS level.

    ``error`` is what the socket or ssl module raised; the line names the host and port
    and, where the cause is a setting, the setting to change.
    """
    where = f"{account.host} port {account.port}"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"{account.name}: {_certificate_problem(account, error)}"
    if isinstance(error, ssl.SSLError):
        if error.reason == "WRONG_VERSION_NUMBER":
            security = "starttls" if account.security == "tls" else "tls"
            return (f"{account.name}: {where} does not speak TLS; use security = {security} or port "
                    f"{TLS_PORTS[account.protocol]}")
        return f"{account.name}: TLS with {where} failed: {error.reason or error}"
    if isinstance(error, ConnectionRefusedError):
        return f"{account.name}: {where} refused the connection; check host and port"
    if isinstance(error, TimeoutError):
        return f"{account.name}: no answer from {where} in time"
    return f"{account.name}: connection to {where} failed: {error.strerror or error}"


def _certificate_problem(account: AccountConfig, error: ssl.SSLCertVerificationError) -> str:
    if error.verify_code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        names = _certificate_names(account)
        holds = f"it names {', '.join(names)}" if names else "see its subjectAltName"
        return (f"the TLS certificate of {account.host} port {account.port} is not valid for the name "
                f"{account.host!r} ({holds}); set host to a name it holds")
    hint = ("check that tls_ca_file is the CA that signed it" if account.tls_ca_file is not None
            else "set tls_ca_file if the server uses a private CA")
    return f"TLS certificate of {account.host} not trusted: {error.verify_message}; {hint}"


def _certificate_names(account: AccountConfig) -> list[str]:
    """The names the server's certificate holds, or [] when they cannot be learnt.

    The failed handshake does not hand over the certificate, so this makes one more
    connection that checks the certificate against the trusted CAs but not its name.
    Only for implicit TLS: with STARTTLS the protocol would have to be spoken first.
    """
    if account.security != "tls":
        return []
    context = tls_context(account)
    context.check_hostname = False
    try:
        with socket.create_connection((account.host, account.port), timeout=_PROBE_TIMEOUT) as sock, \
                context.wrap_socket(sock) as tls:
            certificate = tls.getpeercert()
    except OSError:
        return []
    names: tuple[tuple[str, str], ...] = (certificate or {}).get("subjectAltName", ())  # type: ignore[assignment]
    return [value for _, value in names]
