"""The private Dovecot as the tests see it: the launcher plus ways to change and read a mailbox.

:class:`DevServer` adds to :class:`mailsyncd.testing.DovecotServer` what only tests (and the
benchmark's data set) need: folder and flag changes, expunges, UIDVALIDITY changes, and reading
the server's side back (flags, bytes, folder lists) to compare with what a sync stored. Like the
launcher it speaks stdlib :mod:`imaplib`, so it shares no protocol code with the client under test.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence

from imapclient import imap_utf7

from mailsyncd.testing import DovecotError, DovecotServer
from mailsyncd.testing.fill import check, mailbox

__all__ = ["DevServer", "decode_mutf7", "encode_mutf7"]

_LIST_LINE = re.compile(rb'\(([^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) ?(.*)')


def encode_mutf7(name: str) -> str:
    """A folder name in IMAP modified UTF-7 (RFC 3501 section 5.1.3), as text."""
    return imap_utf7.encode(name).decode("ascii")


def decode_mutf7(name: str) -> str:
    """The inverse of :func:`encode_mutf7`."""
    return imap_utf7.decode(name.encode("ascii"))


def _uid_set(uids: Iterable[int]) -> str:
    return ",".join(str(uid) for uid in sorted(set(uids)))


class DevServer(DovecotServer):
    """A private Dovecot whose mailboxes tests change and read back directly."""

    # -- changes -----------------------------------------------------------------------------------

    def create_folder(self, user: str, folder: str) -> None:
        with self.session(user) as conn:
            check(conn.create(mailbox(folder)), f"CREATE {folder!r}")

    def rename_folder(self, user: str, old: str, new: str) -> None:
        with self.session(user) as conn:
            check(conn.rename(mailbox(old), mailbox(new)), f"RENAME {old!r}")

    def delete_folder(self, user: str, folder: str) -> None:
        with self.session(user) as conn:
            check(conn.delete(mailbox(folder)), f"DELETE {folder!r}")

    def _store(self, user: str, folder: str, uids: Iterable[int], how: str, flags: Sequence[str]) -> None:
        if uid_set := _uid_set(uids):
            with self.session(user, folder) as conn:
                check(conn.uid("STORE", uid_set, how, f"({' '.join(flags)})"), "UID STORE")

    def set_flags(self, user: str, folder: str, uids: Iterable[int], flags: Sequence[str]) -> None:
        self._store(user, folder, uids, "FLAGS.SILENT", flags)

    def add_flags(self, user: str, folder: str, uids: Iterable[int], flags: Sequence[str]) -> None:
        self._store(user, folder, uids, "+FLAGS.SILENT", flags)

    def remove_flags(self, user: str, folder: str, uids: Iterable[int], flags: Sequence[str]) -> None:
        self._store(user, folder, uids, "-FLAGS.SILENT", flags)

    def expunge(self, user: str, folder: str, uids: Iterable[int]) -> None:
        """Expunge exactly these UIDs; UID EXPUNGE leaves other \\Deleted messages alone."""
        if uid_set := _uid_set(uids):
            with self.session(user, folder) as conn:
                check(conn.uid("STORE", uid_set, "+FLAGS.SILENT", r"(\Deleted)"), "UID STORE")
                check(conn.uid("EXPUNGE", uid_set), "UID EXPUNGE")

    def change_uidvalidity(self, user: str, folder: str) -> int:
        """Give the folder a new UIDVALIDITY, keeping every message and its bytes; returns it.

        ``doveadm mailbox update`` rewrites the index and dovecot-uidlist together, which is what a
        client sees after a server rebuilt or restored a mailbox. UIDs stay, but are new by rule.
        """
        new = self._uidvalidity(user, folder) % 0xFFFFFFFF + 1
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(new), folder)
        if self._uidvalidity(user, folder) != new:
            raise DovecotError(f"UIDVALIDITY of {folder!r} did not change")
        return new

    def _uidvalidity(self, user: str, folder: str) -> int:
        # doveadm takes decoded (UTF-8) folder names, not modified UTF-7.
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", user, "uidvalidity", folder)
        return int(out.split("uidvalidity=")[1].split()[0])

    def deliver(self, user: str, folder: str, data: bytes) -> None:
        """Store one message as a delivery agent would (doveadm save): no IMAP login, which
        tests that count a client's logins in the server's log would otherwise see."""
        self.doveadm("save", "-u", user, "-m", folder, data=data)

    def doveadm(self, *args: str, data: bytes | None = None) -> str:
        """Run doveadm against this instance's config; returns stdout."""
        done = subprocess.run(
            ["doveadm", "-c", str(self.config_file), *args], input=data, capture_output=True, timeout=60,
            check=False)
        if done.returncode != 0:
            raise DovecotError(f"doveadm {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode()

    # -- reading back ------------------------------------------------------------------------------

    def uids(self, user: str, folder: str) -> list[int]:
        with self.session(user, folder, readonly=True) as conn:
            found = check(conn.uid("SEARCH", "ALL"), "UID SEARCH")
            raw = found[0] if found and isinstance(found[0], bytes) else b""
            return sorted(int(uid) for uid in raw.split())

    def _fetch(self, user: str, folder: str, items: str) -> Sequence[object]:
        """UID FETCH of everything, read-only (EXAMINE, BODY.PEEK): inspecting changes no flag."""
        with self.session(user, folder, readonly=True) as conn:
            if conn.untagged_responses.get("EXISTS", [b"0"])[-1] == b"0":
                return []
            return check(conn.uid("FETCH", "1:*", items), "UID FETCH")

    def flags(self, user: str, folder: str) -> dict[int, set[str]]:
        """Flags per UID, without ``\\Recent``, which belongs to a session rather than a message."""
        result: dict[int, set[str]] = {}
        for item in self._fetch(user, folder, "(UID FLAGS)"):
            text = item.decode() if isinstance(item, bytes) else ""
            uid, flags = re.search(r"UID (\d+)", text), re.search(r"FLAGS \(([^)]*)\)", text)
            if uid and flags:
                result[int(uid.group(1))] = set(flags.group(1).split()) - {"\\Recent"}
        return result

    def fetch_all(self, user: str, folder: str) -> dict[int, bytes]:
        """Every message's full bytes as the server serves them (BODY.PEEK[])."""
        result: dict[int, bytes] = {}
        for item in self._fetch(user, folder, "(UID BODY.PEEK[])"):
            if isinstance(item, tuple):
                uid = re.search(rb"UID (\d+)", item[0])
                if uid is None:
                    raise DovecotError(f"FETCH response without UID: {item[0]!r}")
                result[int(uid.group(1))] = item[1]
        return result

    def list_folders(self, user: str) -> list[str]:
        """Decoded, sorted names of the selectable folders (LAYOUT=fs ``\\Noselect`` parents left out)."""
        names: list[str] = []
        with self.session(user) as conn:
            for item in check(conn.list('""', "*"), "LIST"):
                line, literal = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
                if not isinstance(line, bytes):
                    continue
                match = _LIST_LINE.match(line)
                if match is None or {b"\\noselect", b"\\nonexistent"} & set(match.group(1).lower().split()):
                    continue
                raw = literal if literal is not None else match.group(2)
                if raw.startswith(b'"'):
                    raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
                names.append(imap_utf7.decode(raw))
        return sorted(names)
