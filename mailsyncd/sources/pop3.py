"""POP3 source on poplib: the only module that imports it.

poplib opens the connection, does STLS and the login; the multi-line answers that carry
messages (RETR, TOP) are read here, line by line, straight into one buffer, because
poplib keeps a list of lines and refuses lines over 2 KiB, which real mail has.

Identity (invariant 4): a message is known by its UIDL. A server without UIDL gets a
stand-in: ``hdr:`` + the SHA-256 of its header block (``TOP n 0``) without the headers
that servers rewrite as they go (Status:, X-UID:, ...). Message numbers are valid only
in the session whose listing named them, which is why this module never caches one.

Nothing here deletes for real: ``delete`` marks, and only a QUIT answered with +OK
makes the server expunge. Leaving the ``with`` block without ``quit`` just closes the
socket, which is how a POP3 server is told to roll every mark back.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import poplib
import re
import socket
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, cast

from mailsyncd import sasl
from mailsyncd.config import AccountConfig
from mailsyncd.domain import PopListing
from mailsyncd.errors import AccountError, AuthError, MessageError
from mailsyncd.message import to_lf
from mailsyncd.secrets import Secret
from mailsyncd.sources.progress import GuardedReader, Stalled
from mailsyncd.sources.tls import connecting, echoed, tls_context
from mailsyncd.sources.trace import PopTrace, tracing

log = logging.getLogger(__name__)

TIMEOUT = 60.0
READ_CHUNK = 64 * 1024
PIPELINE_WINDOW = 64  # commands in flight at once where the server offers PIPELINING
HEADER_ID_PREFIX = "hdr:"
# Headers that mbox-backed servers add or rewrite after delivery; leaving them out keeps
# a header digest stable while the message sits on the server.
REWRITTEN_HEADERS = frozenset({b"status", b"x-status", b"x-uid", b"x-keywords", b"content-length", b"lines"})
# The greeting's APOP challenge, matched as poplib itself matches it when it builds the digest.
_APOP_TIMESTAMP = re.compile(rb"\+OK.[^<]*(<.*>)")
_UIDL = re.compile(rb"[\x21-\x7e]{1,70}")
_TERMINATOR = re.compile(rb"\n\.\r?\n")  # the "." line that ends a multi-line answer


class _ServerSaid(Exception):
    """A -ERR (or garbage) status line from our own reader."""

    def __init__(self, line: bytes) -> None:
        super().__init__(_reply(line))


class _ConnectionLost(Exception):
    pass


def _reply(line: bytes | str) -> str:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    return echoed(text[4:].strip() or text if text.startswith("-ERR") else text)


def _is_eof(error: poplib.error_proto) -> bool:
    # poplib reports a closed connection as error_proto('-ERR EOF') with a str argument,
    # and a server's own -ERR with the bytes of the line.
    return bool(error.args) and error.args[0] == "-ERR EOF"


@contextlib.contextmanager
def _errors(account: str, host: str) -> Iterator[None]:
    """Library and socket errors become one clear line, scoped to the account."""
    try:
        yield
    except Stalled as error:
        raise AccountError(f"{account}: {error}") from error
    except _ConnectionLost as error:
        raise AccountError(f"{account}: connection to {host} lost: {error}") from error
    except (TimeoutError, OSError, EOFError) as error:
        raise AccountError(f"{account}: connection to {host} failed: {error}") from error
    except poplib.error_proto as error:
        if _is_eof(error):
            raise AccountError(f"{account}: connection to {host} lost: closed by the server") from error
        raise AccountError(f"{account}: {host} answered: {_reply(error.args[0] if error.args else '')}"
                           ) from error
    except _ServerSaid as error:
        raise AccountError(f"{account}: {host} answered: {error}") from error


def _capabilities(client: poplib.POP3) -> dict[str, list[str]] | None:
    """CAPA (RFC 2449), or None when the server predates it."""
    return _capability_answer(_answer(lambda: cast(Any, client)._longcmd("CAPA")))


def _capability_answer(answer: Any) -> dict[str, list[str]] | None:
    """The capabilities in a CAPA answer: name (upper case) -> arguments; None for -ERR."""
    if isinstance(answer, poplib.error_proto):
        return None
    found: dict[str, list[str]] = {}
    for line in answer[1]:
        words = line.decode("ascii", "replace").split()
        if words:
            found[words[0].upper()] = words[1:]
    return found


def connect(account: AccountConfig, password: Secret, deadline: float | None = None) -> Pop3Session:
    """Connect, secure the connection as the account says, and log in.

    TLS is verified (``tls_context``). The password never crosses an unencrypted
    connection unless the account has ``allow_plaintext``; even then APOP is used when
    the server offers it, so the password itself is not sent. From then on the server
    is read under deadlines (``progress_timeout``, and ``deadline``, a
    ``time.monotonic()`` value, for the run's ``timeout``).
    """
    encrypted = account.security in ("tls", "starttls")
    if not encrypted and not account.allow_plaintext:
        raise AccountError(f'{account.name}: security = "plain" needs allow_plaintext = true')
    with _errors(account.name, account.host), connecting(account):
        client: poplib.POP3
        if account.security == "tls":
            client = poplib.POP3_SSL(account.host, account.port, timeout=TIMEOUT,
                                     context=tls_context(account))
        else:
            client = poplib.POP3(account.host, account.port, timeout=TIMEOUT)
        try:
            trace = PopTrace(account.host) if tracing() else None
            if trace is not None:
                trace.received(client.getwelcome())
                wired = cast(Any, client)  # typeshed omits poplib's line functions
                wired._putline, wired._getline = trace.wrap(wired._putline, wired._getline)
            # Pipelined commands go out as written, not held back by Nagle until the
            # previous one is acknowledged, which would cost the round trip they save.
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            capabilities = _capabilities(client)
            if account.security == "starttls":
                if capabilities is None or "STLS" not in capabilities:
                    raise AccountError(f"{account.name}: {account.host} does not offer STLS; "
                                       "refusing to log in without TLS")
                client.stls(tls_context(account))
                # RFC 2595: what the server said before TLS is forgotten, and asked again.
                capabilities = _capabilities(client)
            if account.auth == "oauth2":
                method = _oauth2_login(client, account, password, capabilities)
            else:
                method = _login(client, account, password, encrypted, _pipelines(capabilities))
            _guard(client, account, deadline)
            # What the server offers after the login may differ (RFC 2449). A server that
            # pipelines is asked together with the listing, which needs it first.
            stale = _pipelines(capabilities)
            if not stale:
                capabilities = _capabilities(client)
        except BaseException:
            with contextlib.suppress(Exception):
                client.close()
            raise
    return Pop3Session(client, account.name, account.host, capabilities, method, trace, stale)


def _pipelines(capabilities: dict[str, list[str]] | None) -> bool:
    return capabilities is not None and "PIPELINING" in capabilities


def _guard(client: poplib.POP3, account: AccountConfig, deadline: float | None) -> None:
    """Every later read of ``client`` (poplib's and ours) goes through a GuardedReader,
    and every command sent restarts its progress clock. Installed after the login, when
    no STLS can replace the socket any more."""
    file, sock = cast(io.BufferedReader, client.file), client.sock
    reader = GuardedReader(lambda: (file, sock), account.host, account.progress_timeout, deadline)
    wired = cast(Any, client)  # poplib declares the attributes as the plain types they replace
    wired.file = reader
    wired.sock = _Sending(sock, reader)


class _Sending:
    """A socket whose ``sendall`` tells the reader that the server's turn starts."""

    def __init__(self, sock: socket.socket, reader: GuardedReader) -> None:
        self._sock = sock
        self._reader = reader

    def sendall(self, data: bytes) -> None:
        self._reader.sent()
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _login(client: poplib.POP3, account: AccountConfig, password: Secret, encrypted: bool,
           pipelining: bool) -> str:
    """APOP when the greeting carries a challenge, else USER/PASS (in one round trip
    where the server pipelines); returns the method."""
    refused: str | None = None
    if _APOP_TIMESTAMP.match(client.getwelcome()):
        try:
            client.apop(account.username, password.reveal())
            return "APOP"
        except poplib.error_proto as error:
            if _is_eof(error):
                raise
            refused = _reply(error.args[0] if error.args else "")
        if not encrypted:
            log.warning("%s: %s refused APOP (%s); sending the password unencrypted (allow_plaintext)",
                        account.name, account.host, refused)
    wired = cast(Any, client)  # poplib's line functions; typeshed omits them
    try:
        if pipelining:  # both in one round trip; the two answers are read in order
            wired._putcmd(f"USER {account.username}")
            wired._putcmd(f"PASS {password.reveal()}")
            answers = [_answer(wired._getresp) for _ in range(2)]
            for answer in answers:
                if isinstance(answer, poplib.error_proto):
                    raise answer
        else:
            client.user(account.username)
            client.pass_(password.reveal())
    except poplib.error_proto as error:
        if _is_eof(error):
            raise
        said = _reply(error.args[0] if error.args else "")
        tried = f"APOP: {refused}; USER/PASS: {said}" if refused else said
        raise AuthError(f"{account.name}: login refused by {account.host}: {tried}") from error
    return "USER"


def _answer(read: Callable[..., Any], *args: str) -> Any:
    """One answer of several in flight: a -ERR is returned, not raised, so that the
    answers behind it are still read and the session stays in step."""
    try:
        return read(*args)
    except poplib.error_proto as error:
        if _is_eof(error):
            raise
        return error


def _oauth2_login(client: poplib.POP3, account: AccountConfig, token: Secret,
                  capabilities: dict[str, list[str]] | None) -> str:
    """``AUTH XOAUTH2`` or ``AUTH OAUTHBEARER`` (RFC 5034) with the initial response on the
    command line; returns the mechanism. poplib has no AUTH command, so it is sent here.

    A refusal comes as a ``+`` challenge holding the server's base64 JSON error, which
    must be answered (see ``sasl``) before the server sends its -ERR.
    """
    offered = {mechanism.upper() for mechanism in (capabilities or {}).get("SASL", [])}
    wanted = account.oauth2.mechanism if account.oauth2 else "auto"
    mechanism = sasl.choose(lambda name: name in offered, wanted)
    first = sasl.initial_response(mechanism, account.username, token.reveal(), account.host, account.port)
    command: Callable[[str], bytes] = cast(Any, client)._shortcmd  # one line, one status line; typeshed omits it
    try:
        reply = command(f"AUTH {mechanism} {base64.b64encode(first).decode('ascii')}")
        if not reply.startswith(b"+OK"):
            command(base64.b64encode(sasl.AFTER_ERROR[mechanism]).decode("ascii"))
            raise AuthError(f"{account.name}: {account.host} took the answer to its error challenge as a login")
    except poplib.error_proto as error:
        if _is_eof(error):
            raise
        said = _reply(error.args[0] if error.args else "")
        raise AuthError(f"{account.name}: login refused by {account.host}: {said}") from error
    return mechanism


class Pop3Session:
    """One logged-in POP3 session. Use it as a context manager: leaving the block
    closes the socket (rolling back any DELE) unless ``quit`` already succeeded."""

    def __init__(self, client: poplib.POP3, account: str, host: str,
                 capabilities: dict[str, list[str]] | None, method: str, trace: PopTrace | None = None,
                 stale: bool = False) -> None:
        self._client = client
        self._trace = trace
        self._account = account
        self._host = host
        self.capabilities = capabilities
        self.login_method = method  # "APOP", "USER", "XOAUTH2" or "OAUTHBEARER": how this session logged in
        self._sizes: dict[int, int] = {}
        self._open = True
        self._stale = stale  # capabilities from before the login, to be asked again with LIST
        self._in_flight: deque[int] = deque()  # RETRs sent whose answers are not read yet
        self._marked = False  # a DELE was sent: QUIT must be confirmed

    def __enter__(self) -> Pop3Session:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection without QUIT: the server forgets every DELE."""
        if self._open:
            self._open = False
            with contextlib.suppress(Exception):
                self._client.close()

    def _offers(self, capability: str) -> bool | None:
        """True/False from CAPA; None when the server did not say (no CAPA)."""
        return None if self.capabilities is None else capability in self.capabilities

    # --- reading multi-line answers ---------------------------------------------------

    def _send(self, *commands: str) -> None:
        if self._trace is not None:
            for command in commands:
                self._trace.sent(command.encode("ascii"))
        self._client.sock.sendall(b"".join(command.encode("ascii") + b"\r\n" for command in commands))

    def _status(self) -> bytes:
        line = self._client.file.readline(READ_CHUNK)
        if self._trace is not None:
            self._trace.received(line)
        if not line:
            raise _ConnectionLost("closed by the server")
        if not line.startswith(b"+OK"):
            raise _ServerSaid(line)
        return line

    def _lines(self) -> Iterator[bytes]:
        """The body of a multi-line answer: line ends stripped, dot-stuffing undone, up to
        the terminating ``.``. Lines of any length; the caller bounds the total."""
        reader = self._client.file
        while True:
            line = reader.readline(READ_CHUNK)
            if not line.endswith(b"\n"):
                parts = [line]
                while line and not line.endswith(b"\n"):
                    line = reader.readline(READ_CHUNK)
                    parts.append(line)
                if not line:
                    raise _ConnectionLost("closed by the server in the middle of an answer")
                line = b"".join(parts)
            if line[:1] == b".":
                if line in (b".\r\n", b".\n"):
                    return
                line = line[1:]
            yield line[:-2] if line.endswith(b"\r\n") else line[:-1]

    # --- the Pop3Source contract --------------------------------------------------------

    def _settle(self) -> None:
        """Read and drop the answers to RETRs sent ahead that no batch took (one was cut
        short), so that the next answer read is the next command's."""
        while self._in_flight:
            self._retr_answer(self._in_flight.popleft())

    def stat(self) -> tuple[int, int]:
        """(messages, bytes) on the server."""
        with _errors(self._account, self._host):
            self._settle()
            return self._client.stat()

    def listing(self) -> PopListing:
        """LIST and UIDL (and CAPA after a pipelined login) in one round trip where the
        server pipelines, one after the other where it does not."""
        with _errors(self._account, self._host):
            self._settle()
            wired = cast(Any, self._client)
            together = self._offers("PIPELINING") is True and self._offers("UIDL") is not False
            asked = ["CAPA"] * self._stale + ["LIST"] + ["UIDL"] * together
            for command in asked:
                wired._putcmd(command)
            if self._stale:
                self.capabilities = _capability_answer(_answer(wired._getlongresp)) or self.capabilities
                self._stale = False
            _, lines, _ = wired._getlongresp()
            sizes: dict[int, int] = {}
            for line in lines:
                parts = line.split()
                if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                    sizes[int(parts[0])] = int(parts[1])
            self._sizes = sizes
            answer: Any = None
            if together:
                answer = _answer(wired._getlongresp)
            elif self._offers("UIDL") is not False:
                answer = _answer(wired._longcmd, "UIDL")
            # Not used where the server says it lacks UIDL, even if it answered.
            uidls = None if answer is None or self._offers("UIDL") is False else self._uidl_answer(answer)
            if uidls is not None:
                entries = {number: (uidls[number], size) for number, size in sizes.items() if number in uidls}
                has_uidl = True
            else:
                entries = self._header_identities(sizes)
                has_uidl = False
        unidentified = len(sizes) - len(entries)
        if unidentified:
            log.warning("%s: %d messages on %s have no usable identity; they are left alone",
                        self._account, unidentified, self._host)
        return PopListing(entries, has_uidl=has_uidl)

    def _uidl_answer(self, answer: Any) -> dict[int, str] | None:
        if isinstance(answer, poplib.error_proto):
            if self._offers("UIDL"):
                raise answer
            return None  # not offered, and UIDL turned out to be missing indeed
        found: dict[int, str] = {}
        for line in answer[1]:
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and _UIDL.fullmatch(parts[1]):
                found[int(parts[0])] = parts[1].decode("ascii")
        return found

    def _header_identities(self, sizes: dict[int, int]) -> dict[int, tuple[str, int]]:
        if self._offers("TOP") is False:
            raise AccountError(f"{self._account}: {self._host} offers neither UIDL nor TOP, so messages "
                               "cannot be told apart safely; refusing to sync this account")
        log.info("%s: %s has no UIDL; identifying messages by their headers", self._account, self._host)
        numbers = sorted(sizes)
        window = PIPELINE_WINDOW if self._offers("PIPELINING") else 1
        entries: dict[int, tuple[str, int]] = {}
        for start in range(0, len(numbers), window):
            chunk = numbers[start:start + window]
            # With PIPELINING the whole window is sent at once and the answers read in
            # order; without it, one command at a time.
            self._send(*(f"TOP {number} 0" for number in chunk))
            for number in chunk:
                try:
                    self._status()
                except _ServerSaid as error:
                    log.warning("%s: TOP %d refused by %s: %s", self._account, number, self._host, error)
                    continue
                entries[number] = (HEADER_ID_PREFIX + header_digest(self._lines()), sizes[number])
        return entries

    def retrieve(self, number: int) -> bytes:
        """RETR: the message with LF line ends (every line, the last one included).

        Raises MessageError when the server refuses this one message (e.g. expunged by
        another client), AccountError when the connection fails.
        """
        with _errors(self._account, self._host):
            self._settle()
            self._send(f"RETR {number}")
            answer = self._retr_answer(number)
        if isinstance(answer, MessageError):
            raise answer
        return answer

    def retrieve_many(self, numbers: Sequence[int], then: Sequence[int] = ()
                      ) -> Generator[bytes | MessageError, None, None]:
        """``retrieve`` for each number in turn, the message or the MessageError saying
        why the server refused it. Where the server offers PIPELINING (RFC 2449) up to
        PIPELINE_WINDOW RETRs are in flight, so a message costs no round trip of its own;
        one message is read at a time all the same.

        ``then`` names the numbers the next call will ask for: the window runs on into
        them, so the server keeps sending while the caller commits this batch, and the
        next call reads what is already on the wire. Answers nobody takes (a batch cut
        short, a different next call) are read and dropped before any other command."""
        window = PIPELINE_WINDOW if self._offers("PIPELINING") else 1
        queue = [*numbers, *then]
        with _errors(self._account, self._host):
            if list(self._in_flight) != queue[:len(self._in_flight)]:
                self._settle()
        sent = len(self._in_flight)
        for done, number in enumerate(numbers):
            with _errors(self._account, self._host):
                ahead = queue[sent:done + window]
                if ahead:
                    self._send(*(f"RETR {number}" for number in ahead))
                    self._in_flight.extend(ahead)
                    sent += len(ahead)
                self._in_flight.popleft()
                answer = self._retr_answer(number)
            yield answer

    def _retr_answer(self, number: int) -> bytes | MessageError:
        """The answer to one RETR already sent: the message, or the refusal."""
        try:
            self._status()
        except _ServerSaid as error:
            return MessageError(f"{self._account}: message {number}: {self._host} answered: {error}")
        # A server may count sizes loosely, but not by more than the CRs it adds.
        return self._body(number, 2 * self._sizes.get(number, 0) + READ_CHUNK)

    def header(self, number: int) -> bytes:
        """TOP n 0: the header block, with LF line ends; errors as for ``retrieve``."""
        with _errors(self._account, self._host):
            self._settle()
            self._send(f"TOP {number} 0")
            try:
                self._status()
            except _ServerSaid as error:
                raise MessageError(f"{self._account}: message {number}: {self._host} answered: {error}"
                                   ) from error
            return self._body(number, 2 * self._sizes.get(number, 0) + READ_CHUNK)

    def _body(self, number: int, limit: int) -> bytes:
        """The rest of a multi-line answer as one message: read in blocks up to the
        terminating ``.`` line (and not a byte further, so a pipelined answer behind it
        stays in the buffer), then dot-unstuffed and turned to LF in a few passes over
        the bytes, not a Python loop per line. A line ends at LF, with or without CR.
        At most about twice the message is in memory at any moment."""
        # poplib's file is sock.makefile("rb"), a BufferedReader, which can peek.
        reader = cast(io.BufferedReader, self._client.file)
        blocks: list[bytes] = []
        tail = b"\n"  # the end of what came before: a line start before the first line
        size = 0
        while True:
            block = reader.peek(READ_CHUNK)
            if not block:
                raise _ConnectionLost("closed by the server in the middle of a message")
            # The terminator may straddle two blocks; one wholly in ``tail`` was found before.
            match = _TERMINATOR.search(tail + block)
            if match is not None:
                used = match.end() - len(tail)
                blocks.append(reader.read(used))
                drop = match.end() - match.start() - 1  # the "." line; its LF before stays
                while drop:
                    if len(blocks[-1]) <= drop:
                        drop -= len(blocks.pop())
                    else:
                        blocks[-1], drop = blocks[-1][:-drop], 0
                break
            blocks.append(reader.read(len(block)))
            tail = (tail + block)[-3:]
            size += len(block)
            if size > limit:
                raise AccountError(f"{self._account}: {self._host} sent more for message {number} than "
                                   f"the {self._sizes.get(number, 0)} bytes it listed")
        body = b"".join(blocks)
        del blocks
        # Dot-unstuffing: every line the server began with "." got one more. One pass at
        # a time, each result replacing the last, so at most two copies are alive.
        if body.startswith(b"."):
            body = body[1:]
        body = body.replace(b"\n.", b"\n")
        return to_lf(body)

    def delete(self, number: int) -> None:
        """DELE: marks only; the server expunges after QUIT answers +OK."""
        with _errors(self._account, self._host):
            self._settle()
            self._marked = True
            try:
                self._client.dele(number)
            except poplib.error_proto as error:
                if _is_eof(error):
                    raise
                raise MessageError(f"{self._account}: DELE {number} refused by {self._host}: "
                                   f"{_reply(error.args[0] if error.args else '')}") from error

    def quit(self) -> None:
        """QUIT, and raise AccountError unless the server confirmed with +OK (then
        the marked messages were not deleted). With nothing marked there is nothing to
        confirm: QUIT goes out and the connection is closed without waiting."""
        if not self._marked:
            with contextlib.suppress(OSError):
                self._send("QUIT")
            self.close()
            return
        with _errors(self._account, self._host):
            self._settle()
            try:
                answer = self._client.quit()
            except poplib.error_proto as error:
                if _is_eof(error):
                    raise
                raise AccountError(f"{self._account}: {self._host} did not confirm QUIT: "
                                   f"{_reply(error.args[0] if error.args else '')}; nothing was deleted"
                                   ) from error
            finally:
                self.close()
        if not answer.startswith(b"+OK"):
            raise AccountError(f"{self._account}: {self._host} did not confirm QUIT; nothing was deleted")


def header_digest(lines: Iterator[bytes]) -> str:
    """SHA-256 of a header block (up to the first empty line), without the fields that
    servers rewrite, in LF form. Consumes ``lines`` to its end."""
    digest = hashlib.sha256()
    in_header = True
    skipping = False
    for line in lines:
        if not in_header:
            continue
        if not line:
            in_header = False
            continue
        if line[:1] in (b" ", b"\t"):
            if skipping:
                continue
        else:
            name = line.split(b":", 1)[0].strip().lower()
            skipping = name in REWRITTEN_HEADERS
            if skipping:
                continue
        digest.update(line + b"\n")
    return digest.hexdigest()
