"""IMAP source on imapclient: the only module that imports it.

Pull is read-only (invariant 2): folders are opened with EXAMINE and bodies fetched with
BODY.PEEK[], so nothing here can set \\Seen or change the server. imapclient's
bytes-keyed dicts are turned into domain values before they leave this module.

The snapshot asks as little as it can. With CONDSTORE, an unchanged HIGHESTMODSEQ and
UIDNEXT mean nothing changed, so a no-op sync of a folder is one EXAMINE. New mail is
found with ``UID SEARCH UID n:*``, flag changes with ``SEARCH MODSEQ``, and expunges by
comparing the message count with what we recorded, falling back to a UID listing only
when the counts differ.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from imapclient import IMAPClient
from imapclient import exceptions as imap_errors

from mailsyncd.config import AccountConfig
from mailsyncd.domain import FolderInfo, FolderSnapshot, RemoteMessage, SnapshotBase
from mailsyncd.errors import AccountError, AuthError, FolderError
from mailsyncd.secrets import Secret

log = logging.getLogger(__name__)

# Dovecot's default command-line limit is 64 KiB; 4,000 UIDs stay well below it.
UID_CHUNK = 4000
META = [b"UID", b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"]
MESSAGE_ID_FIELD = b"BODY[HEADER.FIELDS (MESSAGE-ID)]"
TIMEOUT = 60.0


def tls_context(account: AccountConfig) -> ssl.SSLContext:
    """Verified TLS by default; ``tls_ca_file`` adds a trust anchor, it never removes one."""
    context = ssl.create_default_context()
    if account.tls_ca_file is not None:
        context.load_verify_locations(cafile=str(account.tls_ca_file))
    if not account.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _flags(values: Sequence[Any]) -> frozenset[str]:
    # \Recent is per session, not a property of the message.
    return frozenset(_text(flag) for flag in values if _text(flag).lower() != "\\recent")


def _internaldate(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _message_id(header: bytes | None) -> str | None:
    if not header:
        return None
    _, _, value = header.partition(b":")
    text = b" ".join(value.split()).decode("utf-8", "replace").strip()
    return text or None


@contextlib.contextmanager
def _errors(account: str, host: str) -> Iterator[None]:
    """Library and socket errors become one clear line, scoped to the account."""
    try:
        yield
    except imap_errors.LoginError as error:
        raise AuthError(f"{account}: login refused by {host}: {_text(error)}") from error
    except ssl.SSLCertVerificationError as error:
        raise AccountError(f"{account}: TLS certificate of {host} not trusted: {error.verify_message}; "
                           "set tls_ca_file if the server uses a private CA") from error
    except ssl.SSLError as error:
        raise AccountError(f"{account}: TLS with {host} failed: {error.reason or error}") from error
    except (TimeoutError, OSError, imap_errors.IMAPClientAbortError) as error:
        raise AccountError(f"{account}: connection to {host} failed: {error}") from error
    except imap_errors.IMAPClientError as error:
        raise AccountError(f"{account}: {host} answered: {error}") from error


def connect(account: AccountConfig, password: Secret) -> ImapSession:
    with _errors(account.name, account.host):
        if account.security == "tls":
            client = IMAPClient(account.host, account.port, ssl=True, ssl_context=tls_context(account),
                                timeout=TIMEOUT)
        else:
            client = IMAPClient(account.host, account.port, ssl=False, timeout=TIMEOUT)
            if account.security == "starttls":
                if not client.has_capability("STARTTLS"):
                    client.shutdown()
                    raise AccountError(f"{account.name}: {account.host} does not offer STARTTLS; "
                                       "refusing to log in without TLS")
                client.starttls(tls_context(account))
        client.normalise_times = False
        try:
            if account.auth == "plain":
                client.plain_login(account.username, password.reveal())
            else:
                client.login(account.username, password.reveal())
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
    return ImapSession(client, account.name, account.host)


class ImapSession:
    def __init__(self, client: IMAPClient, account: str, host: str) -> None:
        self._client = client
        self._account = account
        self._host = host
        self.condstore = client.has_capability("CONDSTORE") or client.has_capability("QRESYNC")
        if self.condstore:
            with _errors(account, host):
                client.enable("CONDSTORE")

    def __enter__(self) -> ImapSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.logout()
        with contextlib.suppress(Exception):
            self._client.shutdown()

    def list_folders(self) -> list[FolderInfo]:
        with _errors(self._account, self._host):
            listing = self._client.list_folders()
        folders = []
        for attributes, delimiter, name in listing:
            folders.append(FolderInfo(
                name=_text(name), delimiter=_text(delimiter) if delimiter else None,
                attributes=frozenset(_text(attribute) for attribute in attributes)))
        return folders

    def snapshot(self, name: str, base: SnapshotBase | None) -> FolderSnapshot:
        with self._folder_errors(name):
            status = self._client.select_folder(name, readonly=True)  # EXAMINE
            uidvalidity = int(status[b"UIDVALIDITY"])
            exists = int(status.get(b"EXISTS", 0))
            uidnext = int(status.get(b"UIDNEXT", 0))
            modseq = status.get(b"HIGHESTMODSEQ") if self.condstore else None
            highestmodseq = int(modseq) if modseq is not None else None
            if base is None or base.uidvalidity != uidvalidity:
                uids = self._client.search("ALL") if exists else []
                new = self._metadata(uids, with_message_id=base is not None)
                return FolderSnapshot(uidvalidity, uidnext or _next(new), highestmodseq, exists, new=new,
                                      present=frozenset(message.uid for message in new), full=True)
            return self._incremental(base, uidvalidity, uidnext, highestmodseq, exists)

    def _incremental(self, base: SnapshotBase, uidvalidity: int, uidnext: int, highestmodseq: int | None,
                     exists: int) -> FolderSnapshot:
        unchanged_modseq = highestmodseq is not None and highestmodseq == base.highestmodseq
        if unchanged_modseq and uidnext == base.uidnext and exists == base.present_count:
            return FolderSnapshot(uidvalidity, uidnext, highestmodseq, exists)
        new: tuple[RemoteMessage, ...] = ()
        if uidnext == 0 or uidnext > base.uidnext:
            found = [uid for uid in self._client.search(["UID", f"{base.uidnext}:*"]) if uid >= base.uidnext]
            new = self._metadata(found)
        changed: dict[int, frozenset[str]] = {}
        present: frozenset[int] | None = None
        if highestmodseq is not None and base.highestmodseq is not None:
            if not unchanged_modseq:
                changed_uids = [uid for uid in self._client.search(["MODSEQ", str(base.highestmodseq + 1)])
                                if uid < base.uidnext]
                changed = self._flags_of(changed_uids)
            if exists - len(new) != base.present_count:
                present = frozenset(uid for uid in self._client.search(["UID", f"1:{base.uidnext - 1}"])
                                    if uid < base.uidnext)
        else:
            # No CONDSTORE: one UID/FLAGS scan of the old messages tells both flag
            # changes and expunges.
            old = [uid for uid in self._client.search(["UID", f"1:{max(base.uidnext - 1, 1)}"])
                   if uid < base.uidnext]
            changed = self._flags_of(old)
            present = frozenset(old)
        return FolderSnapshot(uidvalidity, uidnext or _next(new), highestmodseq, exists, new=new,
                              changed_flags=changed, present=present)

    def _chunks(self, uids: Sequence[int], data: list[bytes]) -> Iterator[dict[int, dict[bytes, Any]]]:
        ordered = sorted(uids)
        for start in range(0, len(ordered), UID_CHUNK):
            yield self._client.fetch(ordered[start:start + UID_CHUNK], data)

    def _metadata(self, uids: Sequence[int], with_message_id: bool = False) -> tuple[RemoteMessage, ...]:
        data = META + ([b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"] if with_message_id else [])
        out = []
        for response in self._chunks(uids, data):
            for uid, item in response.items():
                out.append(RemoteMessage(
                    uid=uid, size=int(item.get(b"RFC822.SIZE", 0)), flags=_flags(item.get(b"FLAGS", ())),
                    internaldate=_internaldate(item.get(b"INTERNALDATE")),
                    message_id=_message_id(item.get(MESSAGE_ID_FIELD)) if with_message_id else None))
        return tuple(sorted(out, key=lambda message: message.uid))

    def _flags_of(self, uids: Sequence[int]) -> dict[int, frozenset[str]]:
        changed: dict[int, frozenset[str]] = {}
        for response in self._chunks(uids, [b"UID", b"FLAGS"]):
            changed.update((uid, _flags(item.get(b"FLAGS", ()))) for uid, item in response.items())
        return changed

    def fetch(self, name: str, uids: Sequence[int]) -> dict[int, bytes]:
        """Bodies of the selected folder's messages, raw as the server sent them.

        BODY.PEEK[] leaves \\Seen alone. A UID that comes back without a body was
        expunged meanwhile and is simply missing from the result.
        """
        with self._folder_errors(name):
            response = self._client.fetch(list(uids), [b"BODY.PEEK[]"])
        return {uid: item[b"BODY[]"] for uid, item in response.items() if item.get(b"BODY[]") is not None}

    @contextlib.contextmanager
    def _folder_errors(self, name: str) -> Iterator[None]:
        try:
            with _errors(self._account, self._host):
                yield
        except AccountError as error:
            if isinstance(error.__cause__, imap_errors.IMAPClientError) and not isinstance(
                    error.__cause__, imap_errors.IMAPClientAbortError):
                raise FolderError(f"{self._account}: folder {name!r}: {error.__cause__}") from error
            raise


def _next(messages: Sequence[RemoteMessage]) -> int:
    """UIDNEXT for servers that do not report it: one past the highest UID seen."""
    return max((message.uid for message in messages), default=0) + 1
