"""IMAP source on imapclient: the only module that imports it.

Pull is read-only (invariant 2): folders are opened with EXAMINE and bodies fetched with
BODY.PEEK[], so nothing here can set \\Seen or change the server. imapclient's
bytes-keyed dicts are turned into domain values before they leave this module.

The snapshot asks as little as it can, and waits as seldom as it can: on a real network
each wait for an answer costs a round trip, whatever the command. The commands that do
not depend on the EXAMINE's answer are sent right behind it, so a changed folder usually
costs one round trip before its bodies:

- with QRESYNC (RFC 7162), the EXAMINE itself names the last sync's UIDVALIDITY and
  HIGHESTMODSEQ, and its answer carries the flags of every message changed since and the
  UIDs expunged since (VANISHED (EARLIER));
- with CONDSTORE only, ``UID FETCH 1:n-1 (FLAGS) (CHANGEDSINCE m)`` follows it;
- without either, ``UID FETCH 1:n-1 (FLAGS)`` of every older message tells flag changes
  and expunges at once;
- new mail is ``UID FETCH n:* (UID FLAGS INTERNALDATE RFC822.SIZE)``, without a SEARCH,
  sent ahead when LIST-STATUS showed there are few (a first sync of a small folder is
  ``UID FETCH 1:*`` the same way), else after the EXAMINE's count.

Expunges are then told by the message count (``SnapshotBase.accounts_for``): a
``UID SEARCH`` of the older UIDs is sent only when the count says that messages
vanished which nothing reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.header
import functools
import imaplib
import logging
import select
import socket
import ssl
import time
from array import array
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from imapclient import IMAPClient, imap_utf7, tls
from imapclient import exceptions as imap_errors
from imapclient.imap4 import IMAP4WithTimeout
from imapclient.imapclient import _quote
from imapclient.response_parser import parse_fetch_response, parse_response

from mailsyncd import sasl
from mailsyncd.config import AccountConfig
from mailsyncd.domain import (
    FolderInfo,
    FolderSnapshot,
    MimePart,
    PartialMessage,
    RemoteMessage,
    ServerStatus,
    SnapshotBase,
    shared_flags,
)
from mailsyncd.errors import AccountError, AuthError, FolderError, MessageError
from mailsyncd.message import message_id, to_crlf
from mailsyncd.secrets import Secret
from mailsyncd.sources.progress import GuardedReader, Stalled
from mailsyncd.sources.tls import connecting, echoed, tls_context
from mailsyncd.sources.trace import ImapTrace, tracing

log = logging.getLogger(__name__)

# UIDs per metadata FETCH: far below Dovecot's 64 KiB command line, and it bounds the
# memory one parsed response takes however large the folder.
UID_CHUNK = 1000
# Messages a first sync of a large folder lists, plans and fetches at a time
# (``first_listing``): what it holds of the listing stays the same however large the folder.
LISTING_SLICE = 5 * UID_CHUNK
META = [b"UID", b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"]
MESSAGE_ID_ITEM = b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"
MESSAGE_ID_FIELD = b"BODY[HEADER.FIELDS (MESSAGE-ID)]"
TIMEOUT = 60.0
IDLE_RENEW = 29 * 60.0  # RFC 2177: servers may drop an IDLE after 30 minutes, so re-issue it before
# A literal's limit when max_message_size is unset: no literal larger than this is ever
# read into memory, whatever the server announces.
LITERAL_CEILING = 512 * 1024 * 1024
# Announced sizes above this are lies; clamping them keeps sums within SQLite's integers.
SIZE_CEILING = 1 << 40
MAX_LINE = 1_000_000  # bytes; imaplib's own limit for one line


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# One frozenset per combination of flags (shared_flags) and one tzinfo, UTC, for every
# date: most of what keeps a listing of tens of thousands of messages small.
def _flags(values: Sequence[Any]) -> frozenset[str]:
    # \Recent is per session, not a property of the message.
    return shared_flags(frozenset(_text(flag) for flag in values if _text(flag).lower() != "\\recent"))


def _internaldate(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _size(value: Any) -> int:
    """An announced RFC822.SIZE as a sane integer: what arrives is checked again later."""
    try:
        return min(max(int(value), 0), SIZE_CEILING)
    except (TypeError, ValueError):
        return 0


def _decoded(name: bytes | str) -> str | None:
    """A folder name from LIST decoded from modified UTF-7, or None when it is not that."""
    if isinstance(name, str):
        return name  # imapclient already turned a number-like name into text
    try:
        return str(imap_utf7.decode(name))
    except ValueError:  # UnicodeDecodeError, binascii.Error
        return None


class _Greeted(imaplib.IMAP4):
    """imaplib takes the server's capabilities from the greeting's CAPABILITY response
    code when it has one (RFC 3501 7.1; Dovecot's has), instead of asking with a
    CAPABILITY command: one round trip less per connection."""

    def _get_capabilities(self) -> None:
        greeting = self.untagged_responses.pop("CAPABILITY", None)
        if not greeting or not isinstance(greeting[-1], bytes):
            super()._get_capabilities()  # type: ignore[misc]  # typeshed omits the private method
            return
        self.capabilities = tuple(str(greeting[-1], "ascii", "replace").upper().split())


class _GreetedTLS(tls.IMAP4_TLS, _Greeted):  # type: ignore[misc]  # untyped; its __init__ first
    pass


class _GreetedPlain(IMAP4WithTimeout, _Greeted):  # type: ignore[misc]  # untyped
    pass


class _Client(IMAPClient):  # type: ignore[misc]  # imapclient ships no type hints
    """IMAPClient that opens folders whose names are not modified UTF-7 by their bytes,
    and connects without asking for capabilities the greeting already gave.

    imapclient encodes every folder name it sends; ``raw_names`` maps the text such a
    folder goes by (see ``ImapSession.list_folders``) back to the bytes the server uses.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.raw_names: dict[str, bytes] = {}
        super().__init__(*args, **kwargs)

    def _create_IMAP4(self) -> imaplib.IMAP4:  # imapclient's name
        timeout = getattr(self._timeout, "connect", None)
        if self.ssl:
            return _GreetedTLS(self.host, self.port, self.ssl_context, timeout)  # type: ignore[call-arg]
        return _GreetedPlain(self.host, self.port, timeout)

    def _normalise_folder(self, folder_name: Any) -> Any:
        raw = self.raw_names.get(folder_name) if isinstance(folder_name, str) else None
        if raw is None:
            return super()._normalise_folder(folder_name)
        return _quote(raw.decode("ascii"))


class _Refused(bytes):
    """Stands for a literal over the limit, which was read and thrown away.

    It holds no bytes but claims the announced length, which imapclient's parser checks.
    """

    reason: str
    size: int

    def __new__(cls, size: int, reason: str) -> _Refused:
        refused = super().__new__(cls)
        refused.size = size
        refused.reason = reason
        return refused

    def __len__(self) -> int:
        return self.size


class _CutShort(ConnectionError):
    """The server closed the connection inside a refused literal. An OSError, which
    imaplib lets through unchanged, so the line can say what was refused."""


class _ReadGuard:
    """Takes over imaplib's ``read``, ``readline`` and ``send`` of one connection, which is
    where every byte from the server enters, to enforce what no announcement can:

    - no literal larger than the limit (``max_message_size``, else LITERAL_CEILING) is
      held in memory: it is read in chunks and thrown away, the connection stays in
      step, and the message's body becomes a ``_Refused``;
    - the progress deadline and the run's deadline (``GuardedReader``).

    It also counts the round trips: every first line read after something was sent is
    one wait for the server, however many commands went out together before it.

    IDLE's non-blocking reads (imapclient's ``idle_check``) are passed through untouched.
    """

    def __init__(self, client: IMAPClient, account: AccountConfig, deadline: float | None) -> None:
        self._imap: Any = client._imap  # imaplib.IMAP4, whose attributes typeshed types loosely
        self._host = account.host
        self._limit = account.max_message_size or LITERAL_CEILING
        self._limit_name = "max_message_size" if account.max_message_size else "the limit for one message"
        self._reader = GuardedReader(lambda: (self._imap.file, self._imap.sock), account.host,
                                     account.progress_timeout, deadline)
        self._readline: Callable[[], bytes] = self._imap.readline
        self._send: Callable[[bytes], None] = self._imap.send
        self._trace = ImapTrace(account.host) if tracing() else None
        self.round_trips = 0
        self._waiting = False  # something was sent and no answer read since
        self._imap.read = self.read
        self._imap.readline = self.readline
        self._imap.send = self.send

    def renew(self, deadline: float | None) -> None:
        self._reader.renew(deadline)

    @contextlib.contextmanager
    def whole(self, lifted: bool) -> Iterator[None]:
        """While in the block, and if ``lifted``: literals up to LITERAL_CEILING."""
        limit = self._limit
        if lifted:
            self._limit = max(limit, LITERAL_CEILING)
        try:
            yield
        finally:
            self._limit = limit

    def send(self, data: bytes) -> None:
        if self._trace is not None:
            self._trace.sent(data)
        self._reader.sent()
        self._waiting = True
        self._send(data)

    def readline(self) -> bytes:
        if self._waiting:
            self._waiting = False
            self.round_trips += 1
        if self._imap.sock.gettimeout() == 0.0:
            line = self._readline()
        else:
            line = self._reader.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                raise self._imap.abort(f"{self._host} sent a line of more than {MAX_LINE} bytes")
        if self._trace is not None and line:
            self._trace.received(line)
        return line

    def read(self, size: int) -> bytes:
        if self._trace is not None:
            self._trace.literal_received(size)
        if size <= self._limit:
            return self._reader.read(size)
        over = f"{size} bytes, over {self._limit_name} ({self._limit} bytes)"
        # Counted and thrown away: never more than one chunk in memory.
        if sum(len(chunk) for chunk in self._reader.chunks(size)) < size:
            raise _CutShort(f"{self._host} announced a message of {over}, and closed the connection")
        return _Refused(size, f"{self._host} sent {over}")


def _quiet(client: IMAPClient) -> None:
    """Switch off imaplib's debug output, which imapclient switches on: imaplib then
    formats every line and literal it reads (a copy of every fetched body) for a logger
    that drops them, a quarter of a first sync's CPU."""
    client._imap.debug = 0


@contextlib.contextmanager
def _errors(account: str, host: str) -> Iterator[None]:
    """Library and socket errors become one clear line, scoped to the account."""
    try:
        yield
    except imap_errors.LoginError as error:
        # imapclient hands over str() of the server's bytes: "b'[AUTHENTICATIONFAILED] ...'".
        reason = _text(error.args[0]) if error.args else "no reason given"
        if reason[:2] in ("b'", 'b"') and reason[-1:] == reason[1]:
            reason = reason[2:-1]
        raise AuthError(f"{account}: login refused by {host}: {echoed(reason)}") from error
    except Stalled as error:
        raise AccountError(f"{account}: {error}") from error
    except (TimeoutError, OSError, imap_errors.IMAPClientAbortError) as error:
        raise AccountError(f"{account}: connection to {host} failed: {echoed(str(error))}") from error
    except imap_errors.IMAPClientError as error:
        raise AccountError(f"{account}: {host} answered: {echoed(str(error))}") from error


def connect(account: AccountConfig, password: Secret, deadline: float | None = None) -> ImapSession:
    """Connect, secure the connection as the account says, and log in.

    ``deadline`` (a ``time.monotonic()`` value) ends the session with AccountError when
    it is reached, wherever the session is: the whole-run ``timeout``.
    """
    with _errors(account.name, account.host), connecting(account):
        if account.security == "tls":
            client = _Client(account.host, account.port, ssl=True, ssl_context=tls_context(account),
                             timeout=TIMEOUT)
        else:
            client = _Client(account.host, account.port, ssl=False, timeout=TIMEOUT)
        _quiet(client)
        # Commands written one behind the other (``_settle``, the EXAMINE burst) go out as
        # written, not held back by Nagle until the first is answered: that would cost
        # the round trip they save.
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        guard = _ReadGuard(client, account, deadline)
        if account.security == "starttls":
            if not client.has_capability("STARTTLS"):
                client.shutdown()
                raise AccountError(f"{account.name}: {account.host} does not offer STARTTLS; "
                                   "refusing to log in without TLS")
            client.starttls(tls_context(account))
        client.normalise_times = False
        try:
            if account.auth == "oauth2":
                _oauth2_login(client, account, password)
            elif account.auth == "plain":
                client.plain_login(account.username, password.reveal())
            else:
                client.login(account.username, password.reveal())
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
    return ImapSession(client, account.name, account.host, guard)


def _oauth2_login(client: IMAPClient, account: AccountConfig, token: Secret) -> None:
    """AUTHENTICATE XOAUTH2 or OAUTHBEARER with the access token ``token``.

    The session is checked to be authenticated before anything else is sent: a client
    that goes on after a refused login meets "LIST illegal in state NONAUTH" instead of
    the reason.
    """
    wanted = account.oauth2.mechanism if account.oauth2 else "auto"
    mechanism = sasl.choose(lambda name: bool(client.has_capability(f"AUTH={name}")), wanted)
    first = sasl.initial_response(mechanism, account.username, token.reveal(), account.host, account.port)
    client.sasl_login(mechanism, sasl.responder(first, mechanism))
    if client._imap.state not in ("AUTH", "SELECTED"):
        raise AuthError(f"{account.name}: {account.host} answered AUTHENTICATE {mechanism} without logging in")


_DESELECTING = frozenset({"UNSELECT", "CLOSE"})
SETTLE_TIMEOUT = 15.0  # for the answers a kept connection still owes


class ImapSession:
    def __init__(self, client: IMAPClient, account: str, host: str, guard: _ReadGuard) -> None:
        self._client = client
        self._guard = guard
        self._account = account
        self._host = host
        self.qresync = bool(client.has_capability("QRESYNC"))
        self.condstore = bool(client.has_capability("CONDSTORE")) or self.qresync
        self._statuses: dict[str, ServerStatus] = {}
        # Commands sent ahead whose answers are read before the next command's (``_settle``).
        self._pending: list[tuple[str, bytes]] = []
        self._extension = "QRESYNC" if self.qresync else "CONDSTORE"  # QRESYNC implies CONDSTORE
        if self.condstore:
            with _errors(account, host):
                # Sent now, answered before the next command's answer is read (``_settle``):
                # it travels with LIST instead of costing a round trip of its own.
                self._pending.append(("ENABLE", client._imap._command("ENABLE", self._extension)))

    def _settle(self) -> None:
        """Read the answers to the commands sent ahead, if they are still to come."""
        pending, self._pending = self._pending, []
        imap = self._client._imap
        for command, tag in pending:
            typ, data = imap._command_complete(command, tag)
            if typ != "OK":
                raise imap_errors.IMAPClientError(f"{command} refused: {data!r}")
            if command in _DESELECTING:
                imap.state = "AUTH"

    @property
    def round_trips(self) -> int:
        """How often this session has waited for the server's answer so far."""
        return self._guard.round_trips

    def __enter__(self) -> ImapSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.logout()
        with contextlib.suppress(Exception):
            self._client.shutdown()

    def keep(self) -> bool:
        """Ready the connection to wait for the next run; False when it cannot.

        The folder last opened is closed: a server answers STATUS (and LIST-STATUS) for
        the selected folder from what it told this session, so the next run would miss
        what arrived meanwhile. UNSELECT, or CLOSE where the folder is read-only (CLOSE
        expunges a writable one): sent now, its answer read when the connection is used
        again, so it costs no wait. TCP keepalive then finds a peer that vanished
        silently (and keeps a NAT's memory of us) while no command is sent.
        """
        imap = self._client._imap
        if imap.state == "SELECTED":
            if self._client.has_capability("UNSELECT"):
                command = "UNSELECT"
            elif imap.is_readonly:
                command = "CLOSE"
            else:
                return False
            with _errors(self._account, self._host):
                self._pending.append((command, imap._command(command)))
        _keepalive(self._client.socket())
        return True

    def reusable(self) -> bool:
        """True when the connection can carry the next run as it is, judged without a
        round trip: nothing arrived while it waited. A server that closed it (BYE, EOF),
        a reset, a dead peer found by keepalive, or anything unasked for (which would be
        taken for the answer to the next command) all make it unusable."""
        with contextlib.suppress(Exception):
            self._guard.renew(time.monotonic() + SETTLE_TIMEOUT)
            self._settle()
            return not _readable(self._client.socket(), 0.0)
        return False

    def renew(self, deadline: float | None) -> None:
        """A new run on this kept connection, under its own ``timeout``."""
        self._guard.renew(deadline)

    def noop(self, deadline: float) -> None:
        """NOOP, answered by ``deadline``: keeps a waiting connection alive and proves it is.
        Raises AccountError when it is not."""
        self._guard.renew(deadline)
        with _errors(self._account, self._host):
            self._settle()
            self._client.noop()

    def list_folders(self) -> list[FolderInfo]:
        """The server's folders. Names are decoded here rather than by imapclient, which
        raises on the first name that is not valid modified UTF-7 and so loses them all;
        such a name is kept as the server spelt it (see ``_Client``)."""
        with _errors(self._account, self._host):
            self._client.folder_encode = False  # names are decoded below, one by one
            try:
                listing = self._list(bool(self._client.has_capability("LIST-STATUS")))
            finally:
                self._client.folder_encode = True
        folders = []
        decoded = {_decoded(name) for _, _, name in listing} - {None}
        for attributes, delimiter, name in listing:
            text = _decoded(name)
            if text is None:
                text = self._keep_undecodable(name, decoded)
                if text is None:
                    continue
            folders.append(FolderInfo(
                name=text, delimiter=_text(delimiter) if delimiter else None,
                attributes=frozenset(_text(attribute) for attribute in attributes)))
        return folders

    def _list(self, with_status: bool) -> list[tuple[Any, Any, Any]]:
        """LIST, sent before the answers to what went ahead of it (ENABLE) are read, so
        it costs no round trip of its own. ``with_status`` (LIST-STATUS, RFC 5819) asks
        for the state of every folder in the same answer, kept for ``statuses``: a folder
        that did not change then costs no EXAMINE round trip."""
        items = "MESSAGES UIDNEXT UIDVALIDITY" + (" HIGHESTMODSEQ" if self.condstore else "")
        imap = self._client._imap
        tag = imap._command("LIST", '""', '"*"', *(("RETURN", f"(STATUS ({items}))") if with_status else ()))
        self._settle()
        typ, data = imap._command_complete("LIST", tag)
        if typ != "OK":
            raise imap_errors.IMAPClientError(f"LIST command error: {typ} {data!r}")
        _, listed = imap._untagged_response(typ, data, "LIST")
        self._statuses = {}
        if not with_status:
            return list(self._client._proc_folder_list(listed))
        _, answers = imap._untagged_response(typ, data, "STATUS")
        for answer in answers if answers != [None] else []:
            name, values = parse_response([answer])
            text = _decoded(name) if isinstance(name, bytes | str) else None
            pairs = dict(zip(values[::2], values[1::2], strict=False))
            if text is None or not all(isinstance(pairs.get(key), int)
                                       for key in (b"UIDVALIDITY", b"UIDNEXT", b"MESSAGES")):
                continue  # opened with EXAMINE as without LIST-STATUS
            modseq = pairs.get(b"HIGHESTMODSEQ")
            self._statuses[text] = ServerStatus(pairs[b"UIDVALIDITY"], pairs[b"UIDNEXT"], pairs[b"MESSAGES"],
                                                modseq if isinstance(modseq, int) else None)
        return list(self._client._proc_folder_list(listed))

    def statuses(self) -> dict[str, ServerStatus]:
        """What the last ``list_folders`` learnt of each folder's state without opening
        it; empty when the server offers no LIST-STATUS."""
        return self._statuses

    def _keep_undecodable(self, name: bytes, decoded: set[str | None]) -> str | None:
        """The name a folder whose name is not modified UTF-7 goes by: its bytes as ASCII
        text, mapped back to the same bytes whenever the folder is opened. Skipped (with
        one line) when that text is also the decoded name of another folder."""
        raw = _text(name)
        if not name.isascii() or raw in decoded:
            log.warning("%s: folder %s on %s: the name is not valid modified UTF-7 (RFC 3501) and cannot be "
                        "kept apart from the others; skipped", self._account, echoed(repr(raw)), self._host)
            return None
        log.warning("%s: folder %r on %s: the name is not valid modified UTF-7 (RFC 3501); synced under "
                    "the name as the server spelt it", self._account, raw, self._host)
        self._client.raw_names[raw] = name
        return raw

    def snapshot(self, name: str, base: SnapshotBase | None, *, message_ids: bool = False) -> FolderSnapshot:
        return self._snapshot(name, base, readonly=True, with_message_id=base is not None or message_ids)

    def first_listing(self, name: str) -> tuple[FolderSnapshot, Iterator[tuple[RemoteMessage, ...]]]:
        with self._folder_errors(name):
            self._settle()
            opened = self._open(name, None, True, META)
            return self._sliced(name, opened, META)

    def _snapshot(self, name: str, base: SnapshotBase | None, *, readonly: bool,
                  with_message_id: bool) -> FolderSnapshot:
        items = META + ([MESSAGE_ID_ITEM] if with_message_id else [])
        with self._folder_errors(name):
            self._settle()
            opened = self._open(name, base, readonly, items)
            if base is None or base.uidvalidity != opened.uidvalidity:
                snapshot, more = self._sliced(name, opened, items)
                rest = tuple(message for listed in more for message in listed)
                return dataclasses.replace(snapshot, new=snapshot.new + rest) if rest else snapshot
            return self._changes(base, opened, items)

    def _open(self, name: str, base: SnapshotBase | None, readonly: bool, items: list[bytes]) -> _Opened:
        """EXAMINE (SELECT unless ``readonly``) the folder, with what can be asked before its
        answer is known sent right behind it (see the module's docstring), all in one burst.

        The commands sent ahead assume the UIDVALIDITY is still the base's; when it is
        not, their answers are read and thrown away."""
        status = self._statuses.get(name)
        first = base.uidnext if base is not None else 1
        expected = None
        if status is not None and (base is None or status.uidvalidity == base.uidvalidity):
            expected = status.messages if first == 1 else status.uidnext - first
        qresync = self.qresync and base is not None and base.highestmodseq is not None
        ahead_new = expected is not None and expected <= UID_CHUNK
        ahead: list[tuple[str, ...]] = []
        if ahead_new:
            ahead.append(("UID", "FETCH", f"{first}:*", _items(items)))
        if base is not None and first > 1 and not qresync:
            if self.condstore and base.highestmodseq is not None:
                ahead.append(("UID", "FETCH", f"1:{first - 1}", "(UID FLAGS)", f"(CHANGEDSINCE {base.highestmodseq})"))
            else:
                ahead.append(("UID", "FETCH", f"1:{first - 1}", "(UID FLAGS)"))

        imap = self._client._imap
        command = "EXAMINE" if readonly else "SELECT"
        arguments = [self._client._normalise_folder(name)]
        if qresync and base is not None:
            arguments.append(f"(QRESYNC ({base.uidvalidity} {base.highestmodseq}))")
        imap.untagged_responses = {}  # as imaplib's select: nothing of the last folder is kept
        imap.is_readonly = readonly
        tag = imap._command(command, *arguments)
        imap.state = "SELECTED"  # imaplib refuses to send a FETCH before; a failed EXAMINE undoes it
        tags = [imap._command(*words) for words in ahead]
        try:
            typ, data = imap._command_complete(command, tag)
            if typ != "OK":
                imap.state = "AUTH"  # a failed EXAMINE leaves no folder open (RFC 3501 6.3.1)
                raise imap_errors.IMAPClientError(f"{command.lower()} failed: {_text(data[0] if data else '')}")
        except BaseException:
            self._drain(tags)
            raise
        examined = imap.untagged_responses.pop("FETCH", [])  # QRESYNC: what changed since the base
        vanished = [line for line in imap.untagged_responses.pop("VANISHED", []) if isinstance(line, bytes)]
        selected = self._client._process_select_response(imap.untagged_responses)
        for sent in tags:
            self._complete("FETCH", sent)
        fetched = imap.untagged_responses.pop("FETCH", [])
        uidvalidity = int(selected[b"UIDVALIDITY"])
        modseq = selected.get(b"HIGHESTMODSEQ") if self.condstore else None
        opened = _Opened(uidvalidity, int(selected.get(b"UIDNEXT", 0)), int(modseq) if modseq is not None else None,
                         int(selected.get(b"EXISTS", 0)), first if ahead_new else None)
        if base is None or uidvalidity != base.uidvalidity:
            if base is not None:
                opened.first = None  # fetched from the old UIDNEXT on: not a listing of this UIDVALIDITY
            else:
                opened.new = self._new_messages(fetched, first, items)
            return opened
        opened.new = self._new_messages(fetched, first, items) if ahead_new else ()
        opened.older = {uid: _flags(item.get(b"FLAGS", ())) for uid, item in
                        _fetched([*examined, *fetched]) if uid < first and b"FLAGS" in item}
        opened.vanished = frozenset(uid for line in vanished for uid in _uid_range(line, below=first))
        opened.listed_older = first > 1 and not qresync and not (self.condstore and base.highestmodseq is not None)
        return opened

    def _complete(self, command: str, tag: bytes) -> None:
        """Read up to the answer to a command sent earlier; raise unless it is OK."""
        typ, data = self._client._imap._command_complete(command, tag)
        if typ != "OK":
            raise imap_errors.IMAPClientError(f"{command} failed: {_text(data[0] if data else '')}")

    def _drain(self, tags: Sequence[bytes]) -> None:
        """Read the answers to commands sent behind one that failed, so the connection
        stays in step for the next folder; their own failures are expected."""
        for tag in tags:
            try:
                self._client._imap._command_complete("FETCH", tag)
            except imap_errors.IMAPClientAbortError:
                raise
            except imap_errors.IMAPClientError:
                continue  # expected: no folder is open
        self._client._imap.untagged_responses.pop("FETCH", None)

    def _listed(self, first: int, items: list[bytes]) -> tuple[RemoteMessage, ...]:
        """Every message from UID ``first`` on, in one ``UID FETCH first:*`` (no SEARCH)."""
        self._complete("FETCH", self._client._imap._command("UID", "FETCH", f"{first}:*", _items(items)))
        return self._new_messages(self._client._imap.untagged_responses.pop("FETCH", []), first, items)

    def _new_messages(self, raw: list[Any], first: int, items: list[bytes]) -> tuple[RemoteMessage, ...]:
        """The messages from UID ``first`` on in raw FETCH answers to ``items``; ``n:*``
        also names the highest UID when it is below n (RFC 3501 6.4.8), which is left out."""
        with_message_id = MESSAGE_ID_ITEM in items
        found = {uid: _remote(uid, item, with_message_id) for uid, item in _fetched(raw)
                 if uid >= first and b"RFC822.SIZE" in item}
        return tuple(found[uid] for uid in sorted(found))

    def _sliced(self, name: str, opened: _Opened, items: list[bytes]
                ) -> tuple[FolderSnapshot, Iterator[tuple[RemoteMessage, ...]]]:
        """First sync, or a new UIDVALIDITY: every message is new. A large folder is
        listed (UID SEARCH ALL, its UIDs kept as an array of machine integers), then
        described LISTING_SLICE messages at a time: the snapshot holds the first slice,
        the iterator describes each further one when it is asked for."""
        if opened.first == 1:
            new, uids = opened.new, array("L")
        elif opened.exists == 0:
            new, uids = (), array("L")
        elif opened.exists <= UID_CHUNK:
            new, uids = self._listed(1, items), array("L")
        else:
            uids = array("L", sorted(self._client.search("ALL")))
            new = self._metadata(uids[:LISTING_SLICE], items)
        uidnext = opened.uidnext or _next(new, uids[-1] + 1 if uids else 1)
        return (FolderSnapshot(opened.uidvalidity, uidnext, opened.highestmodseq, opened.exists, new=new,
                               present=frozenset()),
                self._slices(name, uids[LISTING_SLICE:], items))

    def _slices(self, name: str, uids: Sequence[int], items: list[bytes]) -> Iterator[tuple[RemoteMessage, ...]]:
        for start in range(0, len(uids), LISTING_SLICE):
            yield self._described(name, uids[start:start + LISTING_SLICE], items)

    def _described(self, name: str, uids: Sequence[int], items: list[bytes]) -> tuple[RemoteMessage, ...]:
        with self._folder_errors(name):
            return self._metadata(uids, items)

    def _changes(self, base: SnapshotBase, opened: _Opened, items: list[bytes]) -> FolderSnapshot:
        """What changed since ``base``, of which ``_open`` already has the flags and
        expunges and perhaps the new messages."""
        uidvalidity, uidnext, highestmodseq, exists = (opened.uidvalidity, opened.uidnext, opened.highestmodseq,
                                                       opened.exists)
        if (highestmodseq is not None and highestmodseq == base.highestmodseq and uidnext == base.uidnext
                and exists == base.present_count):
            return FolderSnapshot(uidvalidity, uidnext, highestmodseq, exists)
        new = opened.new
        if opened.first is None and (uidnext == 0 or uidnext > base.uidnext):
            if uidnext and uidnext - base.uidnext <= UID_CHUNK:
                new = self._listed(base.uidnext, items)
            else:
                found = [uid for uid in self._client.search(["UID", f"{base.uidnext}:*"]) if uid >= base.uidnext]
                new = self._metadata(found, items)
        present: frozenset[int] | None = None
        if opened.listed_older or base.uidnext <= 1:
            present = frozenset(opened.older)  # every older UID was listed (or there are none)
        elif not base.accounts_for(exists, len(new), len(opened.vanished)):
            present = frozenset(uid for uid in self._client.search(["UID", f"1:{base.uidnext - 1}"])
                                if uid < base.uidnext)
        return FolderSnapshot(uidvalidity, uidnext or _next(new, base.uidnext), highestmodseq, exists, new=new,
                              changed_flags=opened.older, present=present, vanished=opened.vanished)

    def _chunks(self, uids: Sequence[int], data: list[bytes]) -> Iterator[dict[int, dict[bytes, Any]]]:
        ordered = sorted(uids)
        for start in range(0, len(ordered), UID_CHUNK):
            yield self._client.fetch(ordered[start:start + UID_CHUNK], data)

    def _metadata(self, uids: Sequence[int], items: list[bytes]) -> tuple[RemoteMessage, ...]:
        with_message_id = MESSAGE_ID_ITEM in items
        out = [_remote(uid, item, with_message_id) for response in self._chunks(uids, items)
               for uid, item in response.items()]
        return tuple(sorted(out, key=lambda message: message.uid))

    def _flags_of(self, uids: Sequence[int]) -> dict[int, frozenset[str]]:
        changed: dict[int, frozenset[str]] = {}
        for response in self._chunks(uids, [b"UID", b"FLAGS"]):
            changed.update((uid, _flags(item.get(b"FLAGS", ()))) for uid, item in response.items())
        return changed

    def fetch(self, name: str, uids: Sequence[int], whole: bool = False) -> dict[int, bytes | MessageError]:
        """Bodies of the selected folder's messages, raw as the server sent them.

        BODY.PEEK[] leaves \\Seen alone. A UID that comes back without a body was
        expunged meanwhile and is simply missing from the result; one whose body was
        over the size limit maps to the MessageError that reports it. ``whole`` lifts
        max_message_size (not the ceiling) for messages the user asked for in full.
        """
        with self._folder_errors(name), self._guard.whole(whole):
            response = self._client.fetch(list(uids), [b"BODY.PEEK[]"])
        bodies: dict[int, bytes | MessageError] = {}
        for uid, item in response.items():
            body = item.get(b"BODY[]")
            if isinstance(body, _Refused):
                bodies[uid] = MessageError(f"{self._account}: folder {name!r}: UID {uid}: {body.reason}; skipped")
            elif body is not None:
                bodies[uid] = body
        return bodies

    def examine(self, name: str) -> int:
        with self._folder_errors(name):
            self._settle()
            return int(self._client.select_folder(name, readonly=True)[b"UIDVALIDITY"])

    def fetch_partial(self, name: str, uids: Sequence[int], text_budget: int | None
                      ) -> dict[int, PartialMessage]:
        with self._folder_errors(name):
            response = self._client.fetch(list(uids), [b"RFC822.SIZE", b"BODY.PEEK[HEADER]", b"BODYSTRUCTURE"])
            partial: dict[int, PartialMessage] = {}
            for uid, item in response.items():
                header = item.get(b"BODY[HEADER]")
                if not isinstance(header, bytes):
                    continue  # expunged meanwhile
                structure = item.get(b"BODYSTRUCTURE")
                parts = tuple(_leaves(structure)) if structure is not None else None
                multipart = bool(structure is not None and structure.is_multipart)
                texts = self._texts(uid, parts, text_budget) if parts and multipart and text_budget else {}
                partial[uid] = PartialMessage(header, _size(item.get(b"RFC822.SIZE", 0)), parts, texts)
        return partial

    def _texts(self, uid: int, parts: Sequence[MimePart], budget: int) -> dict[str, tuple[bytes, bytes]]:
        """The text parts of one message that fit in ``budget`` together, in order."""
        chosen: list[str] = []
        for part in parts:
            if part.text and part.size <= budget:
                chosen.append(part.section)
                budget -= part.size
        if not chosen:
            return {}
        wanted = [item for section in chosen for item in (f"BODY.PEEK[{section}.MIME]", f"BODY.PEEK[{section}]")]
        item = self._client.fetch([uid], wanted).get(uid, {})
        texts: dict[str, tuple[bytes, bytes]] = {}
        for section in chosen:
            mime, body = item.get(f"BODY[{section}.MIME]".encode()), item.get(f"BODY[{section}]".encode())
            if isinstance(mime, bytes) and isinstance(body, bytes) and not isinstance(body, _Refused):
                texts[section] = (mime, body)
        return texts

    def fetch_ahead(self, name: str, batches: Iterable[Sequence[int]], whole: bool = False
                    ) -> Generator[dict[int, bytes | MessageError], None, None]:
        """``fetch`` for each batch of UIDs in turn, batch k+1 on a helper thread while
        the caller writes batch k: the network and the disk overlap, and at most two
        batches are in memory at once. Only that thread uses the connection until it is
        joined, which closing the iterator does; so the caller uses the session for
        nothing else until the iterator is exhausted or closed."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch") as fetcher:
            upcoming = iter(batches)
            batch = next(upcoming, None)
            pending = fetcher.submit(self.fetch, name, batch, whole) if batch is not None else None
            try:
                while pending is not None:
                    following = next(upcoming, None)
                    bodies = pending.result()  # raise fetch errors here, before the next request
                    pending = fetcher.submit(self.fetch, name, following, whole) if following is not None else None
                    yield bodies
            finally:
                if pending is not None:
                    pending.cancel()
                    with contextlib.suppress(Exception):
                        pending.result()  # the connection is ours again only after this

    def watch(self, folder: str, renew: float = IDLE_RENEW) -> IdleWatcher:
        """Give this connection over to watching ``folder`` (opened read-only with
        EXAMINE); the watcher closes the session when it is closed. Raises FolderError
        when the folder cannot be opened. Check ``supports_idle`` before calling ``wait``."""
        with self._folder_errors(folder):
            self._settle()
            self._client.select_folder(folder, readonly=True)  # EXAMINE: watching changes nothing
            supports_idle = bool(self._client.has_capability("IDLE"))
        return IdleWatcher(self._client, functools.partial(_errors, self._account, self._host), self.close,
                           folder, supports_idle, renew)

    @contextlib.contextmanager
    def _folder_errors(self, name: str) -> Iterator[None]:
        try:
            with _errors(self._account, self._host):
                yield
        except AccountError as error:
            if isinstance(error.__cause__, imap_errors.IMAPClientError) and not isinstance(
                    error.__cause__, imap_errors.IMAPClientAbortError):
                raise FolderError(f"{self._account}: folder {name!r}: {echoed(str(error.__cause__))}"
                                  ) from error
            raise

    # --- two-way: the only writes to the server (mode = "sync") ----------------------------

    @property
    def uidplus(self) -> bool:
        """UID EXPUNGE, APPENDUID and COPYUID (RFC 4315): without it mailsyncd expunges nothing."""
        return bool(self._client.has_capability("UIDPLUS"))

    @property
    def moves_away(self) -> bool:
        """Whether ``move`` removes the message from its folder (MOVE, or COPY then UID EXPUNGE)."""
        return bool(self._client.has_capability("MOVE")) or self.uidplus

    def open_writable(self, name: str, base: SnapshotBase | None, *, readonly: bool = False) -> FolderSnapshot:
        """``snapshot`` for two-way sync: the folder is opened read-write (SELECT; EXAMINE
        for a dry run, ``readonly``), and every new message comes with its Message-ID, by
        which an unpaired file is recognised. Pull modes never call this (invariant 2)."""
        return self._snapshot(name, base, readonly=readonly, with_message_id=True)

    def select(self, name: str) -> None:
        """Open a folder read-write (SELECT) for the two-way writes that follow."""
        with self._folder_errors(name):
            self._settle()
            self._client.select_folder(name)

    def store_flags(self, name: str, uids: Sequence[int], flags: Iterable[str], add: bool,
                    unchangedsince: int | None) -> frozenset[int]:
        """UID STORE +FLAGS.SILENT (``add``) or -FLAGS.SILENT on the selected folder, never
        a replace, so another client's change to other flags survives. With
        ``unchangedsince`` (CONDSTORE) a message changed since that modseq is left alone;
        those UIDs are returned (the ``[MODIFIED ...]`` answer) to be merged again."""
        if not uids:
            return frozenset()
        action = ("+" if add else "-") + "FLAGS.SILENT"
        if unchangedsince is not None:
            action = f"(UNCHANGEDSINCE {unchangedsince}) {action}"
        with self._folder_errors(name):
            text = self._tagged("UID", "STORE", _uid_set(uids), action, f"({' '.join(sorted(flags))})")
            self._client._imap.untagged_responses.pop("FETCH", None)
        modified = _response_code(text, "MODIFIED")
        return frozenset(_parse_uid_set(modified[0])) if modified else frozenset()

    def append(self, name: str, data: bytes, flags: Iterable[str], when: datetime) -> tuple[int, int] | None:
        """APPEND a message (LF line ends; sent as CRLF) with these flags and INTERNALDATE;
        returns (UIDVALIDITY, UID) from APPENDUID, or None when the server does not say
        (no UIDPLUS): then ``find_uploaded`` finds it."""
        with self._folder_errors(name):
            text = _text(self._client.append(name, to_crlf(data), sorted(flags), when))
        # Without UIDPLUS announced, APPENDUID is not relied upon (RFC 4315).
        found = _response_code(text, "APPENDUID") if self._client.has_capability("UIDPLUS") else None
        if not found or len(found) < 2:
            return None
        return int(found[0]), int(found[1])

    def move(self, name: str, uid: int, target: str) -> int | None:
        """Move one UID of the selected folder to ``target``: UID MOVE (RFC 6851), else
        UID COPY + \\Deleted + UID EXPUNGE of that UID alone. Returns the UID in the
        target from COPYUID, or None when the server does not say."""
        with self._folder_errors(name):
            if self._client.has_capability("MOVE"):
                text = self._tagged("UID", "MOVE", str(uid), self._client._normalise_folder(target))
            else:
                text = self._tagged("UID", "COPY", str(uid), self._client._normalise_folder(target))
            untagged = [_text(line) for line in self._client._imap.untagged_responses.pop("OK", [])]
        if not self._client.has_capability("MOVE"):
            self.store_flags(name, [uid], ["\\Deleted"], add=True, unchangedsince=None)
            self.expunge_uids(name, [uid])
        for line in [text, *untagged] if self._client.has_capability("UIDPLUS") else []:
            found = _response_code(line, "COPYUID")
            if found and len(found) >= 3:
                return int(found[2].split(",")[0].split(":")[0])
        return None

    def expunge_uids(self, name: str, uids: Sequence[int]) -> None:
        """Remove exactly these UIDs of the selected folder (UID EXPUNGE, RFC 4315); never
        a plain EXPUNGE, which would also remove what other clients marked \\Deleted.
        Without UIDPLUS the messages stay marked, which is all that is safe."""
        if not uids:
            return
        if not self._client.has_capability("UIDPLUS"):
            log.warning("%s: folder %r: %s has no UIDPLUS: %d messages stay marked \\Deleted, not expunged",
                        self._account, name, self._host, len(uids))
            return
        with self._folder_errors(name):
            self._tagged("UID", "EXPUNGE", _uid_set(uids))

    def find_uploaded(self, name: str, since_uid: int, found_id: str | None, size: int) -> list[int]:
        """UIDs at or above ``since_uid`` in ``name`` (which this selects) that may be a
        message we uploaded: the same Message-ID (when it has one) and the same size. The
        caller compares bytes (``fetch``) before it adopts one."""
        with self._folder_errors(name):
            self._settle()
            self._client.select_folder(name)
            criteria: list[Any] = ["UID", f"{max(since_uid, 1)}:*"]
            if found_id:
                criteria += ["HEADER", "Message-ID", found_id]
            uids = [uid for uid in self._client.search(criteria) if uid >= since_uid]
            sizes = {uid: _size(item.get(b"RFC822.SIZE")) for uid, item in
                     (self._client.fetch(uids, [b"RFC822.SIZE"]) if uids else {}).items()}
        return sorted(uid for uid, found_size in sizes.items() if found_size == size)

    def flags(self, name: str, uids: Sequence[int]) -> dict[int, frozenset[str]]:
        """The flags of these UIDs in ``name`` (which this selects); an expunged UID is missing."""
        with self._folder_errors(name):
            self._settle()
            self._client.select_folder(name)
            return self._flags_of(uids)

    def create_folder(self, name: str) -> None:
        """CREATE a folder first made locally (name encoded to modified UTF-7)."""
        with self._folder_errors(name):
            self._client.create_folder(name)

    def _tagged(self, *words: str) -> str:
        """Send one command and return the text of its tagged OK (imaplib's ``uid``
        throws that text away, and it holds MODIFIED and COPYUID)."""
        kind, data = self._client._imap._simple_command(*words)
        if kind != "OK":
            raise imap_errors.IMAPClientError(f"{' '.join(words[:2])} failed: {_text(data[0] if data else '')}")
        return _text(data[0]) if data and data[0] else ""


@dataclass
class _Opened:
    """A folder just opened, with the answers to what was sent behind the EXAMINE."""

    uidvalidity: int
    uidnext: int  # 0 when the server did not say
    highestmodseq: int | None
    exists: int
    first: int | None  # ``new`` lists every message from this UID on; None: not asked yet
    new: tuple[RemoteMessage, ...] = ()
    older: dict[int, frozenset[str]] = field(default_factory=dict)  # flags below the base's UIDNEXT
    listed_older: bool = False  # ``older`` holds every UID below the base's UIDNEXT
    vanished: frozenset[int] = frozenset()


def _items(items: Sequence[bytes]) -> str:
    return "(" + " ".join(item.decode("ascii") for item in items) + ")"


def _remote(uid: int, item: dict[bytes, Any], with_message_id: bool) -> RemoteMessage:
    header = item.get(MESSAGE_ID_FIELD)
    return RemoteMessage(
        uid=uid, size=_size(item.get(b"RFC822.SIZE", 0)), flags=_flags(item.get(b"FLAGS", ())),
        internaldate=_internaldate(item.get(b"INTERNALDATE")),
        message_id=message_id(header) if with_message_id and isinstance(header, bytes) else None)


def _fetched(raw: Sequence[Any]) -> Iterator[tuple[int, dict[bytes, Any]]]:
    """(UID, items) of each FETCH response in imaplib's raw untagged data, parsed
    UID_CHUNK responses at a time, so that the parsed form of a large answer never exists
    whole. imaplib keeps a response as its (line, literal) pairs, if any, then the bytes
    of the rest of its line: a response ends at each element that is not a pair. A
    response without a UID (an unsolicited flag change) is left out."""
    batch: list[Any] = []
    count = 0
    for part in raw:
        batch.append(part)
        if not isinstance(part, tuple):
            count += 1
            if count == UID_CHUNK:
                yield from _by_uid(batch)
                batch, count = [], 0
    if batch:
        yield from _by_uid(batch)


def _by_uid(batch: list[Any]) -> Iterator[tuple[int, dict[bytes, Any]]]:
    for item in parse_fetch_response(batch, False, False).values():
        uid = item.get(b"UID")
        if isinstance(uid, int):
            yield uid, item


def _uid_range(line: bytes, below: int) -> Iterator[int]:
    """The UIDs below ``below`` in a VANISHED response's data (``(EARLIER) 3:5,9``): only
    those can be recorded, which also bounds what a hostile range can cost."""
    words = parse_response([line])
    for part in _text(words[-1] if not isinstance(words[-1], tuple) else b"").split(","):
        low, _, high = part.partition(":")
        if low.isdigit() and (not high or high.isdigit()):
            start, stop = sorted((int(low), int(high or low)))
            yield from range(max(start, 1), min(stop, below - 1) + 1)


def _uid_set(uids: Iterable[int]) -> str:
    return ",".join(str(uid) for uid in sorted(set(uids)))


def _parse_uid_set(text: str) -> list[int]:
    uids: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition(":")
        if first.isdigit() and (not last or last.isdigit()):
            uids.extend(range(int(first), int(last or first) + 1))
    return uids


def _response_code(text: str, code: str) -> list[str] | None:
    """The arguments of a response code such as ``[APPENDUID 38505 3955]``, or None."""
    start = text.upper().find(f"[{code} ")
    if start < 0:
        return None
    end = text.find("]", start)
    return text[start + len(code) + 2:end if end > 0 else None].split()


def _leaves(body: Any, section: str = "") -> Iterator[MimePart]:
    """The leaves of a parsed BODYSTRUCTURE with their IMAP part numbers; a
    message/rfc822 part counts as one leaf. Never raises on a malformed structure."""
    if body.is_multipart:
        for index, child in enumerate(body[0], 1):
            yield from _leaves(child, f"{section}.{index}" if section else str(index))
        return
    try:
        kind = f"{_text(body[0])}/{_text(body[1])}".lower()
        size = _size(body[6])
    except (IndexError, TypeError):
        yield MimePart(section or "1", "application/octet-stream", 0)
        return
    # The disposition's place depends on the type (text and message/rfc822 have more
    # fields before it), so it is found by its shape: ("attachment", (params)).
    disposition = next((field for field in body[7:] if isinstance(field, tuple) and len(field) == 2
                        and isinstance(field[0], bytes) and isinstance(field[1], tuple | type(None))), None)
    names = {**_params(body[2]), **(_params(disposition[1]) if disposition else {})}
    filename = names.get("filename") or names.get("name")
    yield MimePart(section or "1", kind, size, _decoded_word(filename) if filename else None,
                   bool(disposition and _text(disposition[0]).lower() == "attachment"))


def _params(values: Any) -> dict[str, str]:
    """A BODYSTRUCTURE parameter list (name, value, name, value...) as a dict."""
    if not isinstance(values, tuple):
        return {}
    return {_text(key).lower(): _text(value) for key, value in zip(values[::2], values[1::2], strict=False)}


def _decoded_word(text: str) -> str:
    """A file name as a person reads it: RFC 2047 encoded words decoded, if any."""
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def _next(messages: Sequence[RemoteMessage], known: int = 1) -> int:
    """UIDNEXT for servers that do not report it: one past the highest UID seen, and
    never below ``known``, the UIDNEXT of the last sync (UIDs only grow)."""
    return max(known, max((message.uid for message in messages), default=0) + 1)


# --- IDLE (RFC 2177): the daemon's push notifications ---------------------------------

_CHANGES = frozenset({b"EXISTS", b"EXPUNGE", b"FETCH", b"VANISHED"})


def watch_folder(account: AccountConfig, password: Secret, folder: str, renew: float = IDLE_RENEW) -> IdleWatcher:
    """A connection of its own that watches ``folder`` (opened read-only with EXAMINE).

    Raises AccountError (or AuthError) when it cannot connect or log in, FolderError when
    the folder cannot be opened. Check ``supports_idle`` before calling ``wait``.
    """
    session = connect(account, password)
    try:
        return session.watch(folder, renew)
    except BaseException:
        session.close()
        raise


class IdleWatcher:
    """Waits for changes to one folder with IDLE; use it as a context manager.

    ``wait`` returns True when the server reported new, expunged or changed messages
    (EXISTS, EXPUNGE, FETCH), False when the timeout passed quietly. A change that
    happened while no IDLE was running (between two ``wait`` calls, or while the daemon
    synced) is not lost: the server reports it as soon as IDLE starts again. A lost
    connection (BYE, EOF, a reset, a silent peer found by TCP keepalive) raises
    AccountError, so the caller reconnects.
    """

    def __init__(self, client: IMAPClient, errors: Callable[[], contextlib.AbstractContextManager[None]],
                 close: Callable[[], None], folder: str, supports_idle: bool, renew: float = IDLE_RENEW) -> None:
        self._client = client
        self._errors = errors  # the session's wording of connection errors
        self._close = close  # ends the session the connection belongs to
        self.folder = folder
        self.supports_idle = supports_idle
        self.renew = renew
        self._idle_since: float | None = None  # monotonic time of the running IDLE command
        _keepalive(self._client.socket())

    def __enter__(self) -> IdleWatcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """End IDLE and log out politely, but never wait long for a server that is gone."""
        with contextlib.suppress(Exception):
            self._client.socket().settimeout(5.0)
            if self._idle_since is not None:
                self._idle_since = None
                self._client.idle_done()
        self._close()

    def wait(self, timeout: float) -> bool:
        with self._errors(), _closed_is_lost():
            renew_due = self._idle_since is not None and time.monotonic() - self._idle_since >= self.renew
            if renew_due and self._end_idle():
                return True
            if self._idle_since is None:
                self._client.idle()
                self._idle_since = time.monotonic()
            remaining = min(timeout, max(0.0, self._idle_since + self.renew - time.monotonic()))
            if not _readable(self._client.socket(), remaining):
                return False
            responses = self._client.idle_check(0)
            if not responses:
                # Readable without a line: the server closed the connection (imapclient
                # swallows the EOF), or only TLS housekeeping arrived. DONE tells which.
                return self._end_idle()
            return self._changed(responses)

    def _end_idle(self) -> bool:
        self._idle_since = None
        _, responses = self._client.idle_done()
        return self._changed(responses)

    def _changed(self, responses: Sequence[Any]) -> bool:
        for response in responses:
            if response and response[0] == b"BYE":
                text = b" ".join(part for part in response[1:] if isinstance(part, bytes))
                raise imap_errors.IMAPClientAbortError(f"server said BYE: {_text(text)}")
        # "* 3 EXPUNGE" is (3, b"EXPUNGE"); with QRESYNC enabled, "* VANISHED 7" is (b"VANISHED", 7).
        return any(response and (response[0] == b"VANISHED" or (len(response) > 1 and response[1] in _CHANGES))
                   for response in responses)


@contextlib.contextmanager
def _closed_is_lost() -> Iterator[None]:
    """A TLS EOF in the middle of IDLE is a dropped connection, not a TLS problem."""
    try:
        yield
    except ssl.SSLEOFError as error:
        raise imap_errors.IMAPClientAbortError("the server closed the connection") from error


def _readable(sock: Any, timeout: float) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # already decrypted, so poll() would not see it
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _keepalive(sock: Any) -> None:
    """Find a silently dead peer (a NAT that forgot us, a server that lost power) within
    about two minutes instead of at the next IDLE renewal."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 20)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
