"""A TCP proxy on loopback whose links can be cut or stalled on demand.

Workers and clients connect to the proxy instead of the server, so the fault
hits every connection at once, the way a broken network or an overloaded load
balancer would, while both ends stay alive. The proxy runs its own asyncio
loop in a daemon thread; the test thread drives it through blocking methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK = 64 * 1024
# Every blocking call into the loop gives up after this, so a wedged loop
# fails the test instead of hanging it.
CALL_TIMEOUT = 10.0


class Proxy:
    """Forwards 127.0.0.1:`port` to `upstream_host`:`upstream_port`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.cuts = 0
        self.stalls = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._flowing: asyncio.Event | None = None
        # Until this loop time, new connections are closed as soon as they come.
        self._refuse_until = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Proxy:
        self._thread.start()
        self.port = self._call(self._start())
        return self

    def cut(self, down_seconds: float = 0.0) -> int:
        """Reset every open link and refuse new ones for `down_seconds`;
        returns how many links were cut."""
        self.cuts += 1
        return self._call(self._cut(down_seconds))

    def stall(self, seconds: float) -> None:
        """Forward nothing, on any link old or new, for `seconds`; the bytes
        wait in the proxy and flow again afterwards. Blocks until then."""
        self.stalls += 1
        self._call(self._set_flowing(False))
        try:
            time.sleep(seconds)
        finally:
            self._call(self._set_flowing(True))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CALL_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- on the proxy's loop ------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT)

    async def _start(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if asyncio.get_running_loop().time() < self._refuse_until:
            _abort(client_w)
            return
        try:
            upstream_r, upstream_w = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), timeout=5.0
            )
        except (OSError, TimeoutError):
            # The server is down: the client sees its connection reset, as it
            # would see a refused connection without the proxy.
            _abort(client_w)
            return
        link = (client_w, upstream_w)
        self._links.add(link)
        try:
            await asyncio.gather(self._pump(client_r, upstream_w), self._pump(upstream_r, client_w))
        finally:
            self._links.discard(link)
            _abort(client_w)
            _abort(upstream_w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(CHUNK):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One direction ending ends the link: half-open links only
            # confuse gRPC's view of a connection that is gone.
            _abort(writer)

    async def _cut(self, down_seconds: float) -> int:
        self._refuse_until = asyncio.get_running_loop().time() + down_seconds
        links = list(self._links)
        for client_w, upstream_w in links:
            _abort(client_w)
            _abort(upstream_w)
        return len(links)

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut(0.0)
        assert self._flowing is not None
        self._flowing.set()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset, not a FIN: the peer learns at once that the link is gone."""
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
