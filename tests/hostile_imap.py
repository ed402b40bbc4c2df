"""A small IMAP4rev1 server of the test suite's own, for answers no real server gives.

It speaks plain TCP on 127.0.0.1 and just enough of the protocol for a read-only sync:
CAPABILITY, LOGIN, LIST, EXAMINE/SELECT, UID SEARCH, UID FETCH, NOOP and LOGOUT. Folder
names are the raw bytes LIST sends, and each message can lie: about its RFC822.SIZE
(``announced``), or about its literal (``literal`` replaces the ``{n}`` line and the
bytes sent after it, and the server then closes the connection); a folder can refuse
to be opened, with a text of any length.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass, field
from types import TracebackType


@dataclass
class Message:
    body: bytes
    announced: int | None = None  # RFC822.SIZE to claim; the true size if None
    literal: bytes | None = None  # sent instead of "{n}\r\n<body>", then the connection is closed


@dataclass
class Folder:
    messages: dict[int, Message] = field(default_factory=dict)
    refusal: bytes | None = None  # EXAMINE is answered NO with this text
    uidnext: bool = True  # False: EXAMINE's answer leaves UIDNEXT out


_COMMAND = re.compile(rb"(\S+) (?:UID )?(\S+) ?(.*)", re.IGNORECASE)


def _uids(spec: bytes, known: list[int]) -> list[int]:
    """The UIDs of ``known`` in an IMAP sequence set such as ``1:3,7`` or ``5:*``."""
    chosen: set[int] = set()
    top = max(known, default=0)
    for part in spec.split(b","):
        low, _, high = part.partition(b":")
        first = top if low == b"*" else int(low)
        last = first if not high else top if high == b"*" else int(high)
        first, last = min(first, last), max(first, last)
        chosen.update(uid for uid in known if first <= uid <= last)
    return sorted(chosen)


class HostileImap:
    """A threaded server: ``folders`` maps raw folder names to their messages."""

    def __init__(self, folders: dict[bytes, Folder]) -> None:
        self.folders = folders
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def __enter__(self) -> HostileImap:
        self._listener.settimeout(0.05)
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._spawn(self._serve, client)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        with sock, contextlib.suppress(OSError), sock.makefile("rb") as reader:
            sock.sendall(b"* OK [CAPABILITY IMAP4rev1] hostile server ready\r\n")
            selected: Folder | None = None
            while not self._stopping.is_set():
                line = reader.readline()
                match = _COMMAND.match(line.rstrip(b"\r\n"))
                if match is None:
                    return
                tag, command, args = match.group(1), match.group(2).upper(), match.group(3)
                if command == b"LOGOUT":
                    sock.sendall(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                    return
                if command in (b"EXAMINE", b"SELECT"):
                    selected = self.folders.get(args.strip(b'"'))
                    if selected is None or selected.refusal is not None:
                        sock.sendall(tag + b" NO " + (selected.refusal if selected else b"no such folder")
                                     + b"\r\n")
                        continue
                    sock.sendall(b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n" % len(selected.messages)
                                 + (b"* OK [UIDNEXT %d] ok\r\n" % (max(selected.messages, default=0) + 1)
                                    if selected.uidnext else b""))
                elif command == b"CAPABILITY":
                    sock.sendall(b"* CAPABILITY IMAP4rev1\r\n")
                elif command == b"LIST":
                    sock.sendall(b"".join(b'* LIST () "/" "%s"\r\n' % name for name in self.folders))
                elif command == b"SEARCH" and selected is not None:
                    found = _uids(args.split()[-1], sorted(selected.messages)) if b":" in args \
                        else sorted(selected.messages)
                    sock.sendall(b"* SEARCH " + b" ".join(b"%d" % uid for uid in found) + b"\r\n")
                elif command == b"FETCH" and selected is not None:
                    spec, _, items = args.partition(b" ")
                    if not self._fetch(sock, selected, _uids(spec, sorted(selected.messages)), items):
                        return
                sock.sendall(tag + b" OK done\r\n")

    @staticmethod
    def _fetch(sock: socket.socket, folder: Folder, uids: list[int], items: bytes) -> bool:
        """Answer one UID FETCH; False when a lying literal ended the connection."""
        for number, uid in enumerate(uids, 1):
            message = folder.messages[uid]
            if b"RFC822.SIZE" in items:
                size = len(message.body) if message.announced is None else message.announced
                sock.sendall(b'* %d FETCH (UID %d FLAGS () INTERNALDATE "01-Jan-2024 00:00:00 +0000" '
                             b"RFC822.SIZE %d)\r\n" % (number, uid, size))
            elif message.literal is not None:
                sock.sendall(b"* %d FETCH (UID %d BODY[] " % (number, uid) + message.literal)
                return False
            else:
                sock.sendall(b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (number, uid, len(message.body))
                             + message.body + b")\r\n")
        return True
