"""A TCP proxy on loopback that delays every byte by half a round trip in each direction,
so that the benchmark shows what a real network's latency costs each tool.

TLS stays end to end (the proxy forwards bytes it cannot read); bandwidth is not limited,
only latency is added. Chunks keep their order: each is forwarded when its own delay is
up, one direction at a time, so a tool that pipelines pays the delay once per burst and
one that waits for every answer pays it per command, as on a real link.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class LatencyProxy:
    """Listens on 127.0.0.1 ports of its own, one per target port; ``port(target)`` says
    which. Runs its event loop on a daemon thread until ``close``."""

    def __init__(self, host: str, targets: list[int], rtt_ms: float) -> None:
        self.host = host
        self.delay = rtt_ms / 2000.0  # one way, seconds
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

    def close(self) -> None:
        for server in self._servers:
            self._loop.call_soon_threadsafe(server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _listen(self, target: int) -> asyncio.base_events.Server:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(self.host, target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

        return await asyncio.start_server(accepted, "127.0.0.1", 0)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read as it comes, deliver each chunk ``delay`` after it arrived, in order."""
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
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await sender
        except OSError:
            sender.cancel()
        finally:
            with contextlib.suppress(OSError):
                writer.close()
