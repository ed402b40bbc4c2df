"""A TCP proxy on loopback that delays every byte by half a round trip in each direction,
so that the benchmark shows what a real network's latency costs each tool, and counts the
round trips each tool makes.

TLS stays end to end (the proxy forwards bytes it cannot read); bandwidth is not limited,
only latency is added. Chunks keep their order: each is forwarded when its own delay is
up, one direction at a time, so a tool that pipelines pays the delay once per burst and
one that waits for every answer pays it per command, as on a real link.

Round trips are counted from direction alone, the same way for every tool: on each
connection, a *turn* is the server sending after the client has sent something since the
server last did, i.e. an answer the client may have waited for. A connection whose client
sends N commands one at a time, each after the last answer, makes N turns; N commands
written in one go make one. A server greeting sent before the client says anything is no
turn; a TLS 1.3 handshake is two (ServerHello after ClientHello, then whatever follows the
client's Finished: for implicit TLS, the greeting). TCP's own handshake is neither delayed
nor seen. Without added delay (``rtt_ms`` 0) a turn may also be counted where the client
wrote again without waiting but the server answered before that write arrived, so counts
with a delay are the ones to quote; the two agree for clients that write a burst at once.

``python latency.py`` checks the counter on a known exchange (see ``self_check``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

SETTLE_TIMEOUT = 10.0  # seconds to wait for a finished run's connections to close


@dataclass(frozen=True)
class Trips:
    """Totals since the proxy started; subtract two of them for one run's figures."""

    turns: int = 0
    connections: int = 0

    def __sub__(self, other: Trips) -> Trips:
        return Trips(self.turns - other.turns, self.connections - other.connections)


class _Connection:
    """Which side spoke last on one proxied connection."""

    def __init__(self, proxy: LatencyProxy) -> None:
        self._proxy = proxy
        self._client_spoke = False

    def client_sent(self) -> None:
        self._client_spoke = True

    def server_sent(self) -> None:
        if self._client_spoke:
            self._client_spoke = False
            self._proxy.turns += 1


class LatencyProxy:
    """Listens on 127.0.0.1 ports of its own, one per target port; ``port(target)`` says
    which. Runs its event loop on a daemon thread until ``close``; ``trips()`` gives the
    round trips counted so far, once every connection has closed."""

    def __init__(self, host: str, targets: list[int], rtt_ms: float) -> None:
        self.host = host
        self.delay = rtt_ms / 2000.0  # one way, seconds
        self.turns = 0  # changed on the event loop's thread only
        self.connections = 0
        self._open = 0
        self._ports: dict[int, int] = {}
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="latency", daemon=True)
        self._thread.start()
        for target in targets:
            server = asyncio.run_coroutine_threadsafe(self._listen(target), self._loop).result()
            self._servers.append(server)
            self._ports[target] = server.sockets[0].getsockname()[1]

    def port(self, target: int) -> int:
        return self._ports[target]

    def trips(self) -> Trips:
        """The totals, read on the loop's thread after the connections open now have closed
        (a tool that exited has closed its side; the server's last answers may still be in
        flight). Past SETTLE_TIMEOUT it returns what it has."""
        return asyncio.run_coroutine_threadsafe(self._settled(), self._loop).result()

    async def _settled(self) -> Trips:
        deadline = time.monotonic() + SETTLE_TIMEOUT + 2 * self.delay
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return Trips(self.turns, self.connections)

    def close(self) -> None:
        for server in self._servers:
            self._loop.call_soon_threadsafe(server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _listen(self, target: int) -> asyncio.base_events.Server:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(self.host, target)
            except OSError:
                writer.close()
                return
            self.connections += 1
            self._open += 1
            connection = _Connection(self)
            try:
                await asyncio.gather(self._pump(reader, up_writer, connection.client_sent),
                                     self._pump(up_reader, writer, connection.server_sent))
            finally:
                self._open -= 1

        return await asyncio.start_server(accepted, "127.0.0.1", 0)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    arrived: Callable[[], None]) -> None:
        """Read as it comes, note that this side spoke, deliver each chunk ``delay`` after it
        arrived, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                try:
                    data = await reader.read(1 << 16)
                except OSError:
                    data = b""
                if data:
                    arrived()
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await sender
        except OSError:
            sender.cancel()
        finally:
            with contextlib.suppress(OSError):
                writer.close()


def self_check(rtt_ms: float, commands: int = 5) -> None:
    """Count a known exchange through the proxy and raise AssertionError if the counter is
    wrong: a line server that greets and answers every line; a client that sends
    ``commands`` lines one at a time (``commands`` turns), then as many in one write (one
    turn), over two connections."""
    import socket

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK ready\r\n")
        while line := await reader.readline():
            writer.write(line.split(b" ", 1)[0] + b" OK done\r\n")
            await writer.drain()
        writer.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    target = server.sockets[0].getsockname()[1]
    proxy = LatencyProxy("127.0.0.1", [target], rtt_ms)
    try:
        def exchange(pipelined: bool) -> Trips:
            before = proxy.trips()
            with socket.create_connection(("127.0.0.1", proxy.port(target))) as sock, sock.makefile("rb") as lines:
                assert lines.readline().startswith(b"* OK")
                tags = [f"a{n}".encode() for n in range(commands)]
                if pipelined:
                    sock.sendall(b"".join(tag + b" NOOP\r\n" for tag in tags))
                for tag in tags:
                    if not pipelined:
                        sock.sendall(tag + b" NOOP\r\n")
                    assert lines.readline().startswith(tag + b" OK")
            return proxy.trips() - before

        one_by_one, pipelined = exchange(pipelined=False), exchange(pipelined=True)
        assert one_by_one == Trips(commands, 1), f"{commands} commands one by one counted as {one_by_one}"
        assert pipelined == Trips(1, 1), f"{commands} pipelined commands counted as {pipelined}"
    finally:
        proxy.close()
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


if __name__ == "__main__":
    for rtt in (0.0, 20.0):
        self_check(rtt)
        print(f"round-trip counter: ok at {rtt:g} ms")
    sys.exit(0)
