"""Minimal raw-socket IMAP and POP3 clients over implicit TLS.

Two jobs:

* the network lower bound: ``python rawmail.py imap ...`` logs in, EXAMINEs every folder and
  streams every body with one ``UID FETCH 1:* BODY.PEEK[]`` per folder over ONE connection,
  reading the literals into a reused buffer and discarding them (``pop3`` does the same with
  pipelined RETR). Nothing is parsed, stored or recorded: no real sync tool can be faster.
* the benchmark's own view of the server (folder list, STATUS fingerprint, per-message flags and
  SHA-256 of the CRLF->LF normalized body) for the correctness checks. It shares no code with any
  tool under test.

The password comes from the environment variable BENCH_PASSWORD, never from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BufferedReader

_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")
_UID = re.compile(rb"UID (\d+)")
_CHUNK = 1 << 20

# (line up to the literal, literal size, reader) -> the sink must consume exactly `size` bytes
LiteralSink = Callable[[bytes, int, BufferedReader], None]


def normalize(data: bytes) -> bytes:
    """The comparison form of a message: CRLF turned into LF, nothing else changed."""
    return data.replace(b"\r\n", b"\n")


def digest(data: bytes) -> str:
    return hashlib.sha256(normalize(data)).hexdigest()


def _connect(host: str, port: int, cafile: str, timeout: float) -> tuple[ssl.SSLSocket, BufferedReader]:
    context = ssl.create_default_context(cafile=cafile)
    sock = context.wrap_socket(socket.create_connection((host, port), timeout=timeout), server_hostname=host)
    return sock, sock.makefile("rb", buffering=_CHUNK)  # type: ignore[return-value]


def _discard(reader: BufferedReader, size: int, buffer: memoryview) -> None:
    left = size
    while left:
        got = reader.readinto(buffer[: min(left, len(buffer))])
        if not got:
            raise ConnectionError("connection closed inside a literal")
        left -= got


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class ServerMessage:
    uid: int
    flags: frozenset[str]
    sha256: str
    size: int


class Imap:
    """Just enough IMAP4rev1 for LOGIN, LIST, STATUS, EXAMINE and UID FETCH with literals."""

    def __init__(self, host: str, port: int, cafile: str, timeout: float = 600) -> None:
        self.sock, self.reader = _connect(host, port, cafile, timeout)
        self._tag = 0
        self._scratch = memoryview(bytearray(_CHUNK))  # literals nobody wants are read into this
        if not self.reader.readline().startswith(b"* OK"):
            raise ConnectionError("no IMAP greeting")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.command("LOGOUT")
        self.sock.close()

    def __enter__(self) -> Imap:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def command(self, text: str, sink: LiteralSink | None = None) -> list[bytes]:
        """Send one tagged command; return its untagged lines (literals replaced by ``{}``)."""
        self._tag += 1
        tag = b"B%d" % self._tag
        self.sock.sendall(tag + b" " + text.encode("utf-8") + b"\r\n")
        untagged: list[bytes] = []
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError(f"connection closed during {text.split()[0]}")
            while match := _LITERAL.search(line):
                size = int(match.group(1))
                if sink is None:
                    _discard(self.reader, size, self._scratch)
                else:
                    sink(line[: match.start()], size, self.reader)
                line = line[: match.start()] + b"{}" + self.reader.readline()
            if line.startswith(tag + b" "):
                if not line[len(tag) + 1 :].startswith(b"OK"):
                    raise ConnectionError(f"{text.split()[0]} failed: {line!r}")
                return untagged
            untagged.append(line)

    def login(self, user: str, password: str) -> None:
        self.command(f"LOGIN {_quote(user)} {_quote(password)}")

    def folders(self) -> list[str]:
        """Selectable folders (names as sent, modified UTF-7), in LIST order."""
        names = []
        for line in self.command('LIST "" "*"'):
            match = re.match(rb'\* LIST \(([^)]*)\) (?:"[^"]*"|NIL) (.*)\r\n$', line)
            if match is None or b"\\noselect" in match.group(1).lower():
                continue
            raw = match.group(2)
            if raw.startswith(b'"'):
                raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
            names.append(raw.decode("ascii"))
        return names

    def status(self, folder: str) -> str:
        lines = self.command(f"STATUS {_quote(folder)} (MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)")
        return b" ".join(line.strip() for line in lines).decode("ascii", "replace")

    def examine(self, folder: str) -> int:
        """EXAMINE (read-only); returns EXISTS."""
        exists = 0
        for line in self.command(f"EXAMINE {_quote(folder)}"):
            match = re.match(rb"\* (\d+) EXISTS", line)
            if match:
                exists = int(match.group(1))
        return exists

    def stream_bodies(self, folder: str) -> tuple[int, int]:
        """The lower bound: every body of a folder read and thrown away; (messages, bytes)."""
        if not self.examine(folder):
            return 0, 0
        count = total = 0

        def sink(_line: bytes, size: int, reader: BufferedReader) -> None:
            nonlocal count, total
            _discard(reader, size, self._scratch)
            count += 1
            total += size

        self.command("UID FETCH 1:* BODY.PEEK[]", sink)
        return count, total

    def messages(self, folder: str) -> Iterator[ServerMessage]:
        """Every message of a folder with flags and body digest (read-only, \\Seen untouched)."""
        if not self.examine(folder):
            return
        found: list[ServerMessage] = []

        def sink(line: bytes, size: int, reader: BufferedReader) -> None:
            data = reader.read(size)
            uid, flags = _UID.search(line), _FLAGS.search(line)
            if uid is None or flags is None or len(data) != size:
                raise ConnectionError(f"unexpected FETCH response: {line[:200]!r}")
            names = frozenset(flags.group(1).decode("ascii").split()) - {"\\Recent"}
            found.append(ServerMessage(int(uid.group(1)), names, digest(data), size))

        self.command("UID FETCH 1:* (UID FLAGS BODY.PEEK[])", sink)
        yield from found


class Pop3:
    """Just enough POP3 for USER/PASS, STAT, UIDL and pipelined RETR."""

    def __init__(self, host: str, port: int, cafile: str, timeout: float = 600) -> None:
        self.sock, self.reader = _connect(host, port, cafile, timeout)
        self._ok()

    def _ok(self) -> bytes:
        line = self.reader.readline()
        if not line.startswith(b"+OK"):
            raise ConnectionError(f"POP3 error: {line!r}")
        return line

    def _send(self, text: str) -> None:
        self.sock.sendall(text.encode("ascii") + b"\r\n")

    def login(self, user: str, password: str) -> None:
        self._send(f"USER {user}")
        self._ok()
        self._send(f"PASS {password}")
        self._ok()

    def stat(self) -> int:
        self._send("STAT")
        return int(self._ok().split()[1])

    def _multiline_size(self) -> int:
        """Consume one dot-terminated response body; returns its byte count (stuffing included)."""
        total = 0
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError("connection closed in a multi-line response")
            if line == b".\r\n":
                return total
            total += len(line)

    def stream_all(self, window: int = 64) -> tuple[int, int]:
        """RETR every message, ``window`` commands in flight; (messages, bytes)."""
        count = self.stat()
        total = 0
        for first in range(1, count + 1, window):
            numbers = range(first, min(first + window, count + 1))
            self.sock.sendall(b"".join(b"RETR %d\r\n" % n for n in numbers))
            for _ in numbers:
                self._ok()
                total += self._multiline_size()
        return count, total

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send("QUIT")
            self._ok()
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=("imap", "pop3"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--user", required=True)
    args = parser.parse_args(argv)
    password = os.environ["BENCH_PASSWORD"]
    if args.protocol == "imap":
        count = total = 0
        with Imap(args.host, args.port, args.cafile) as imap:
            imap.login(args.user, password)
            for folder in imap.folders():
                got, size = imap.stream_bodies(folder)
                count, total = count + got, total + size
    else:
        pop = Pop3(args.host, args.port, args.cafile)
        pop.login(args.user, password)
        count, total = pop.stream_all()
        pop.close()
    json.dump({"messages": count, "bytes": total}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
