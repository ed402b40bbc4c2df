"""The protocol trace of ``-vv``: every line each way of an IMAP or POP3 connection, as
mbsync's ``-D`` shows it, with what must never reach a log left out. Credentials (the
arguments of LOGIN, AUTHENTICATE, PASS, APOP, AUTH and every answer to a SASL challenge)
and message contents (every literal, both ways) show as their size only.

Installed only when the ``mailsyncd.trace`` logger is at DEBUG, so a normal run pays
nothing for it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

log = logging.getLogger("mailsyncd.trace")

SHOWN = 300  # characters of one line; the rest is cut
_IMAP_COMMAND = re.compile(rb"^([!#-'*-Z^-z|~]+) ([A-Za-z]+)(?: (.*))?$", re.S)
_IMAP_SECRET = {b"LOGIN", b"AUTHENTICATE"}
_POP_COMMAND = re.compile(rb"^([A-Za-z]{3,4})(?: (.*))?$", re.S)
_POP_SECRET_ARGS = {b"PASS": 0, b"APOP": 1, b"AUTH": 1}  # how many words stay visible
_POP_COMMANDS = {b"USER", b"PASS", b"APOP", b"AUTH", b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE",
                 b"NOOP", b"RSET", b"QUIT", b"CAPA", b"STLS", b"UTF8"}
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")


def tracing() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def _shown(line: bytes) -> str:
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


def _hidden(words: list[bytes], visible: int, size: int) -> str:
    kept = b" ".join(words[:visible]).decode("ascii", "replace")
    return f"{kept} <{size} bytes left out>".lstrip()


class ImapTrace:
    """One IMAP connection's trace; the connection's own read and send call it."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._literal_follows = False  # the last command line announced a literal

    def sent(self, data: bytes) -> None:
        if data == b"\r\n":
            return  # the end of a command whose literal went before
        line = data.rstrip(b"\r\n")
        if self._literal_follows:
            self._literal_follows = False
            log.debug("%s > <literal of %d bytes left out>", self._host, len(data))
            return
        match = _IMAP_COMMAND.match(line)
        if line == b"DONE" or (match is not None and match.group(2).upper() not in _IMAP_SECRET):
            self._literal_follows = _LITERAL.search(line) is not None
            log.debug("%s > %s", self._host, _shown(line))
        elif match is not None:  # LOGIN or AUTHENTICATE: the command and the mechanism only
            visible = 3 if match.group(2).upper() == b"AUTHENTICATE" else 2
            log.debug("%s > %s", self._host, _hidden(line.split(b" "), visible, len(match.group(3) or b"")))
        else:  # an answer to a SASL challenge
            log.debug("%s > <%d bytes left out>", self._host, len(data))

    def received(self, line: bytes) -> None:
        log.debug("%s < %s", self._host, _shown(line))

    def literal_received(self, size: int) -> None:
        log.debug("%s < <literal of %d bytes left out>", self._host, size)


class PopTrace:
    """One POP3 connection's trace. Message bodies are never passed to it (the source
    reads them in blocks), so only commands, status lines and listings show."""

    def __init__(self, host: str) -> None:
        self._host = host

    def sent(self, line: bytes) -> None:
        match = _POP_COMMAND.match(line)
        word = match.group(1).upper() if match else b""
        if word in _POP_SECRET_ARGS:
            shown = _hidden(line.split(b" "), 1 + _POP_SECRET_ARGS[word], len(line))
        elif word in _POP_COMMANDS:
            shown = _shown(line)
        else:  # an answer to a SASL challenge
            shown = f"<{len(line)} bytes left out>"
        log.debug("%s > %s", self._host, shown)

    def received(self, line: bytes) -> None:
        log.debug("%s < %s", self._host, _shown(line))

    def wrap(self, putline: Callable[[bytes], None], getline: Callable[[], tuple[bytes, int]]
             ) -> tuple[Callable[[bytes], None], Callable[[], tuple[bytes, int]]]:
        """poplib's ``_putline`` and ``_getline`` of the connection, traced."""

        def put(line: bytes) -> None:
            self.sent(line)
            putline(line)

        def get() -> tuple[bytes, int]:
            line, octets = getline()
            self.received(line)
            return line, octets

        return put, get
