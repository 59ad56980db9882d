"""PostgreSQL connections for statements run on the event loop.

A create's one statement (`Database.loop_statements`) runs on the server's
event loop over psycopg's AsyncConnection instead of in a store thread: the
two hops between the loop and a thread were about a tenth of a create's
time (bench/README.md, "A create on the event loop"). This is the pool of
those connections, in autocommit, each owned by the loop that opened it.

It behaves as the engine's pool of the store threads does (`Database`):
a connection is opened when none is idle, and an unreachable server fails
that call at once (StoreUnavailable at the store's edge); a connection idle
for over `PING_AFTER_IDLE_S` is pinged before it is handed out, and when the
ping fails every idle connection goes, as stale as that one. psycopg_pool
does neither: it keeps its minimum of connections open from background
tasks, makes a caller wait out its timeout while it cannot connect, and
checks a connection on every checkout or never.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg import AsyncConnection


class LoopConnections:
    """At most `2 * size` connections open at once (the engine's pool size
    and overflow), `size` of them kept idle between calls; a call beyond
    that waits for a connection to come back."""

    def __init__(self, conninfo: str, *, size: int, ping_after_s: float) -> None:
        self._conninfo = conninfo
        self._size = size
        self._ping_after_s = ping_after_s
        self._idle: list[tuple[AsyncConnection[Any], float]] = []  # the last one back first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(2 * size)
        self.opened = 0  # connections opened in all (tests, benches)

    async def acquire(self) -> AsyncConnection[Any]:
        """A connection in autocommit, with no transaction open. psycopg's
        errors (an unreachable server) pass through; `release` it after."""
        import psycopg

        self._bind_loop()
        await self._slots.acquire()
        try:
            while self._idle:
                conn, since = self._idle.pop()
                if time.monotonic() - since < self._ping_after_s:
                    return conn
                try:
                    await conn.execute("SELECT 1")
                    return conn
                except psycopg.Error:
                    # The server went away (or restarted): the others idle
                    # as long are as stale; a new connection is made.
                    await conn.close()
                    await self._close_idle()
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=5
            )
            self.opened += 1
            return conn
        except BaseException:
            self._slots.release()
            raise

    async def release(self, conn: AsyncConnection[Any]) -> None:
        """Back to the idle ones, or closed: one that broke, that was left in
        a transaction or mid-statement (a cancelled call), or one more than
        the pool keeps."""
        from psycopg.pq import TransactionStatus

        try:
            if (
                conn.closed
                or conn.broken
                or conn.info.transaction_status != TransactionStatus.IDLE
                or len(self._idle) >= self._size
                or self._loop is not asyncio.get_running_loop()
            ):
                await conn.close()
            else:
                self._idle.append((conn, time.monotonic()))
        finally:
            self._slots.release()

    async def close(self) -> None:
        """Close the idle connections (those still out close on release)."""
        await self._close_idle()

    def discard(self) -> None:
        """Close the idle connections' sockets at once, from any thread (the
        store's close, after its loop may have ended)."""
        for conn, _ in self._idle:
            conn.pgconn.finish()
        self._idle.clear()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _bind_loop(self) -> None:
        """Connections belong to the loop that opened them: on another loop
        (a server started again in the same process, tests) the idle ones
        of the last are dropped, their sockets closed without a wait."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self.discard()
        self._loop = loop
        self._slots = asyncio.Semaphore(2 * self._size)

    async def _close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            await conn.close()
