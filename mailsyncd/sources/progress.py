"""Reading from a server under deadlines, the same for every protocol source.

A socket timeout alone does not stop a server that trickles a byte now and then, so a
connection's buffered reader is read here in steps, each given only the time left:

- progress: after a command is sent, every complete line and every PROGRESS_CHUNK bytes
  of a longer answer must come within ``progress_timeout`` seconds of the last;
- the run's ``deadline`` (a ``time.monotonic()`` value), if the account has a timeout.

Either ends the connection with ``Stalled``, a TimeoutError: the connection is then in
the middle of an answer and is not used again.
"""

from __future__ import annotations

import functools
import io
import socket
import time
from collections.abc import Callable, Iterator

# Bytes of a long answer that count as progress, so a slow but moving link goes on
# (64 KiB per progress_timeout: about 550 bytes/s at the default) while a trickle ends.
PROGRESS_CHUNK = 64 * 1024


class Stalled(TimeoutError):
    """The server made no progress in time, or the run's time was up. A TimeoutError,
    which imaplib and poplib let through unchanged."""


class GuardedReader:
    """The reading side of one connection, under deadlines.

    ``current`` returns the connection's reader and socket as they are now: STARTTLS
    replaces both in the middle of a session.
    """

    def __init__(self, current: Callable[[], tuple[io.BufferedReader, socket.socket]], host: str,
                 progress_timeout: float, deadline: float | None) -> None:
        self._current = current
        self._host = host
        self._progress_timeout = progress_timeout
        self._deadline = deadline
        self._last_progress = time.monotonic()
        self._bytes_since = 0  # bytes read since the last progress, short of PROGRESS_CHUNK

    def renew(self, deadline: float | None) -> None:
        """A new run on a kept connection: its own deadline, and progress counted from now."""
        self._deadline = deadline
        self._progress()

    def sent(self) -> None:
        """A command went out: the server's turn, and its time, start now."""
        self._progress()

    def _progress(self) -> None:
        self._last_progress = time.monotonic()
        self._bytes_since = 0

    def _moved(self, count: int) -> None:
        """``count`` more bytes arrived; every PROGRESS_CHUNK of them, over any number of
        reads, is progress."""
        self._bytes_since += count
        if self._bytes_since >= PROGRESS_CHUNK:
            self._progress()

    def readline(self, limit: int) -> bytes:
        """One line with its line end, or up to ``limit`` bytes of it (b"" at EOF)."""
        reader, _ = self._current()
        parts: list[bytes] = []
        length = 0
        while length < limit:
            block = self._step(functools.partial(reader.peek, 1))
            if not block:
                break
            end = block.find(b"\n", 0, limit - length)
            part = reader.read(end + 1 if end >= 0 else min(len(block), limit - length))
            parts.append(part)
            length += len(part)
            if end >= 0:
                self._progress()
                break
            self._moved(len(part))
        return b"".join(parts)

    def peek(self, size: int) -> bytes:
        """What is buffered, reading once from the socket if nothing is (b"" at EOF)."""
        reader, _ = self._current()
        return self._step(functools.partial(reader.peek, size))

    def read(self, size: int) -> bytes:
        """``size`` bytes, or fewer at EOF, gathered in one growing buffer whose bytes are
        handed over without a copy: joining a list of the pieces would hold a large
        message twice over at the end."""
        buffer = io.BytesIO()
        for chunk in self.chunks(size):
            buffer.write(chunk)
        return buffer.getvalue()

    def chunks(self, size: int) -> Iterator[bytes]:
        """The next ``size`` bytes in the pieces they arrive in, never all in memory at once."""
        reader, _ = self._current()
        left = size
        while left:
            chunk = self._step(functools.partial(reader.read1, min(left, PROGRESS_CHUNK)))
            if not chunk:
                break
            left -= len(chunk)
            self._moved(len(chunk))
            yield chunk

    def close(self) -> None:
        """Close the reader, for a library that closes the file it stands in for."""
        reader, _ = self._current()
        reader.close()

    def _step(self, reading: Callable[[], bytes]) -> bytes:
        """One read, which may wait for the socket only as long as the nearer deadline allows."""
        now = time.monotonic()
        left = self._last_progress + self._progress_timeout - now
        run_left = float("inf") if self._deadline is None else self._deadline - now
        stalled = Stalled(
            f"the run took longer than its timeout; {self._host} is left for the next run" if run_left < left
            else f"{self._host} made no progress for {self._progress_timeout:g} s (progress_timeout); "
                 "giving up on the connection")
        left = min(left, run_left)
        if left <= 0:
            raise stalled
        _, sock = self._current()
        sock.settimeout(left)
        try:
            return reading()
        except TimeoutError:
            # A socket cannot be read after a timeout, and the session is mid-answer.
            raise stalled from None
