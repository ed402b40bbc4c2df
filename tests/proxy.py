"""A loopback TCP proxy that cuts connections on demand, for fault-injection tests.

Point the client at ``proxy.port`` instead of the server. ``cut_all()`` drops every current
connection on both sides at once; ``cut_after_bytes(n)`` makes each later connection drop once n
bytes have gone from the server to the client, i.e. in the middle of a response;
``trickle_after_bytes(n, rate)`` lets the rest through at ``rate`` bytes per second instead. TLS passes through
untouched, so certificate checks behave exactly as they would against the server itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType


class _Link:
    """One client connection and its upstream connection, pumped by two threads."""

    def __init__(self, client: socket.socket, upstream: socket.socket, cut_after: int | None,
                 trickle: tuple[int, int] | None = None) -> None:
        self.client, self.upstream = client, upstream
        self.cut_after = cut_after
        self.trickle = trickle  # (after this many bytes to the client, bytes per second)
        self.to_client = 0
        self._lock = threading.Lock()
        self._pumps_left = 2
        self._cut = False

    def cut(self) -> None:
        """Shut both sockets down at once; the blocked pump threads wake up and finish.

        shutdown() rather than close(): closing a socket another thread is blocked on does not
        reliably wake that thread, and its file descriptor number could be reused meanwhile.
        """
        with self._lock:
            if self._cut:
                return
            self._cut = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def pump_done(self) -> bool:
        """Count a finished pump; True for the last one, which then closes both sockets."""
        with self._lock:
            self._pumps_left -= 1
            if self._pumps_left:
                return False
        self.client.close()
        self.upstream.close()
        return True


class CutProxy:
    """Forward ``listen_host``:``port`` to ``target_host``:``target_port``, cutting on demand.

    Any 127.x.y.z address is loopback on Linux: listening on another one than the
    server's gives a name its certificate does not hold."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        # Bound at once, so the port can go into client config before start().
        self._listener = socket.create_server((listen_host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._cut_after: int | None = None
        self._trickle: tuple[int, int] | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0  # accepted so far, for tests that count reconnects
        self.bytes_to_client = 0  # every byte the server sent through the proxy, for tests that measure

    def start(self) -> None:
        self._listener.settimeout(0.05)  # so the accept loop notices stop() promptly
        self._spawn(self._accept_loop)

    def stop(self) -> None:
        """Stop accepting, cut every connection and wait for the threads; idempotent."""
        self._stopping.set()
        if self._threads:
            self._threads[0].join(timeout=5)  # the accept loop: no new links after this
        self.cut_all()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def cut_all(self) -> None:
        """Abruptly end all current connections, both towards the client and the server."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.cut()

    def cut_after_bytes(self, limit: int) -> None:
        """Cut each connection made from now on once ``limit`` bytes went server -> client."""
        with self._lock:
            self._cut_after = limit

    def trickle_after_bytes(self, limit: int, rate: int) -> None:
        """Each connection made from now on sends the server's bytes past ``limit`` to the
        client at ``rate`` bytes per second, a few bytes at a time."""
        with self._lock:
            self._trickle = (limit, rate)

    def reset(self) -> None:
        """Stop cutting or slowing new connections; existing ones keep their limits."""
        with self._lock:
            self._cut_after = None
            self._trickle = None

    def __enter__(self) -> CutProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                link = _Link(client, upstream, self._cut_after, self._trickle)
                self._links.add(link)
                self.connections += 1
            self._spawn(self._pump, link, client, upstream, False)
            self._spawn(self._pump, link, upstream, client, True)

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket, to_client: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    # A normal close: pass the half-close on and let the other direction finish.
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    break
                if to_client:
                    with self._lock:
                        self.bytes_to_client += len(data)
                if to_client and link.cut_after is not None:
                    allowed = link.cut_after - link.to_client
                    if len(data) >= allowed:
                        sink.sendall(data[:allowed])
                        link.to_client += allowed
                        link.cut()
                        break
                    link.to_client += len(data)
                if to_client and link.trickle is not None:
                    _trickle(link, sink, data)
                    continue
                sink.sendall(data)
        except OSError:
            link.cut()
        finally:
            if link.pump_done():
                with self._lock:
                    self._links.discard(link)


def _trickle(link: _Link, sink: socket.socket, data: bytes) -> None:
    """Send ``data`` on, slowed to the link's rate once its byte allowance is used up."""
    assert link.trickle is not None
    after, rate = link.trickle
    fast = max(0, min(len(data), after - link.to_client))
    sink.sendall(data[:fast])
    link.to_client += fast
    piece = max(1, rate // 8)
    for start in range(fast, len(data), piece):
        time.sleep(piece / rate)
        sink.sendall(data[start:start + piece])
        link.to_client += len(data[start:start + piece])
