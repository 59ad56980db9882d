"""PostgreSQL connections for statements run on the event loop.

The one-statement paths of a create and of a reindex into an idle realm
(`Database.loop_statements`) run on the server's event loop over psycopg's
AsyncConnection instead of in a store thread: the two hops between the loop
and a thread were about a tenth of a create's time (bench/README.md, "A
create and an idle reindex on the event loop"). This is the pool of those
connections, in autocommit, each owned by the loop that opened it.

It keeps the rules of the engine's pool of the store threads (`Database`):
a connection is opened when none is idle, and a server that refuses it
fails that call at once (StoreUnavailable at the store's edge); a
connection idle for over `PING_AFTER_IDLE_S` is pinged before it is handed
out; and a connection found broken (by that ping or by a statement) takes
every idle one with it, as stale as itself. psycopg_pool does not fit: it
keeps its minimum of connections open from background tasks, makes a
caller wait out its timeout while it cannot connect, and checks a
connection on every checkout or never.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg import AsyncConnection


class LoopConnections:
    """At most `2 * size` connections out at once (the engine's pool size
    and overflow), `size` of them kept idle between calls; a call beyond
    that waits for one to come back. Once closed, it hands out none."""

    def __init__(self, conninfo: str, *, size: int, ping_after_s: float) -> None:
        self._conninfo = conninfo
        self._size = size
        self._ping_after_s = ping_after_s
        self._idle: list[tuple[AsyncConnection[Any], float]] = []  # the last one back first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.BoundedSemaphore(2 * size)
        # The slot each connection out was taken from (a new loop gets new
        # slots; a connection of the old one gives its slot back there).
        self._taken_from: dict[int, asyncio.BoundedSemaphore] = {}
        self.closed = False
        self.opened = 0  # connections opened in all (tests, benches)

    async def acquire(self) -> AsyncConnection[Any]:
        """A connection in autocommit, with no transaction open; `release`
        it after. psycopg's errors (a server that refuses it) pass through."""
        import psycopg

        if self.closed:
            raise psycopg.OperationalError("the store's connections are closed")
        self._bind_loop()
        slots = self._slots
        await slots.acquire()
        try:
            conn = await self._idle_or_new()
        except BaseException:
            slots.release()
            raise
        self._taken_from[id(conn)] = slots
        return conn

    async def release(self, conn: AsyncConnection[Any]) -> None:
        """Back to the idle ones, or closed: one that broke (and with it every
        idle one), one left in a transaction or mid-statement, one more than
        the pool keeps, or any once the pool is closed."""
        from psycopg.pq import TransactionStatus

        slots = self._taken_from.pop(id(conn), None)
        try:
            if conn.broken:
                self._drop_idle()
            if (
                self.closed
                or conn.closed
                or conn.broken
                or conn.info.transaction_status != TransactionStatus.IDLE
                or len(self._idle) >= self._size
                or self._loop is not asyncio.get_running_loop()
            ):
                conn.pgconn.finish()
            else:
                self._idle.append((conn, time.monotonic()))
        finally:
            if slots is not None:
                slots.release()

    def close(self) -> None:
        """No more connections; the idle ones are closed now (their sockets,
        without a wait), those still out as they come back."""
        self.closed = True
        self._drop_idle()

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def _idle_or_new(self) -> AsyncConnection[Any]:
        import psycopg

        while self._idle:
            conn, since = self._idle.pop()
            if time.monotonic() - since < self._ping_after_s:
                return conn
            try:
                await conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                # The server went away (or restarted): the others idle as
                # long are as stale; a new connection is made.
                conn.pgconn.finish()
                self._drop_idle()
            except BaseException:  # cancelled mid-ping: its state is unknown
                conn.pgconn.finish()
                raise
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, connect_timeout=5
        )
        self.opened += 1
        return conn

    def _bind_loop(self) -> None:
        """Connections belong to the loop that opened them: on another loop
        (a server started again in the same process, tests) the idle ones of
        the last are dropped, and the new loop gets slots of its own."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._drop_idle()
        self._loop = loop
        self._slots = asyncio.BoundedSemaphore(2 * self._size)

    def _drop_idle(self) -> None:
        """Close the idle connections without a wait (their sockets only:
        nothing is sent)."""
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.pgconn.finish()
