"""A live RealmService on 127.0.0.1:0, in a thread with its own event loop,
over a fresh store (SQLite and PostgreSQL, through `store_url`).

`module_live` is one server per test module and backend, for tables of
requests that must leave the store unchanged (each case checks that itself).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from realm.v1 import realm_service_pb2_grpc as sgrpc

from realm_service.config import Settings
from realm_service.server import RealmServer, build_server
from tests import conftest as root


@dataclass
class LiveServer:
    srv: RealmServer
    loop: asyncio.AbstractEventLoop
    address: str
    channel: grpc.Channel
    stub: sgrpc.RealmServiceStub

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run a synchronous function on the server loop's executor."""

        async def _run() -> Any:
            return await asyncio.to_thread(fn)

        return self.run(_run(), timeout)


def start_live_server(settings: Settings) -> tuple[LiveServer, Callable[[], None]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started: Future[RealmServer] = Future()

    async def _start() -> None:
        try:
            srv = build_server(settings)
            await srv.start()
            started.set_result(srv)
        except BaseException as e:
            started.set_exception(e)

    asyncio.run_coroutine_threadsafe(_start(), loop)
    srv = started.result(60)
    address = f"127.0.0.1:{srv.port}"
    channel = grpc.insecure_channel(address)
    live = LiveServer(srv, loop, address, channel, sgrpc.RealmServiceStub(channel))

    def stop() -> None:
        channel.close()
        if not srv.stopped.is_set():
            asyncio.run_coroutine_threadsafe(srv.drain_and_stop(), loop).result(60)
        # Store calls still running in the loop's executor threads (a release
        # at stream end, a claim) finish before the store is dropped.
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()  # its self-pipe sockets, else left to the garbage collector

    return live, stop


BASE = Settings(
    listen="127.0.0.1:0",
    lease_seconds=5.0,
    heartbeat_seconds=1.0,
    ping_seconds=2.0,
    drain_grace_seconds=2.0,
    max_file_size=64 * 1024,
)


@pytest.fixture
def server_settings(store_url: str) -> Settings:
    return replace(BASE, store_url=store_url)


@pytest.fixture
def live(server_settings: Settings) -> Iterator[LiveServer]:
    live, stop = start_live_server(server_settings)
    try:
        yield live
    finally:
        stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_store_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Like `store_url`, but one fresh store per test module and backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('store') / 'realm.db'}"
        return
    if not root._pg_available():
        reason = f"PostgreSQL unreachable at {root.PG_URL}: {root._pg_error}"
        if root.IN_CI:
            pytest.fail(f"PostgreSQL is required in CI; {reason}")
        pytest.skip(reason)
    import psycopg

    conninfo = root.PG_URL.replace("postgresql+psycopg://", "postgresql://")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield root.pg_schema_url(schema)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="module")
def module_live(module_store_url: str) -> Iterator[LiveServer]:
    live, stop = start_live_server(replace(BASE, store_url=module_store_url))
    try:
        yield live
    finally:
        stop()


@pytest.fixture
def live_with(store_url: str) -> Iterator[Callable[..., LiveServer]]:
    """Start servers over the test's store with some settings changed, e.g.
    `live_with(reserved_slots=0, lease_seconds=60)`; all stop at teardown."""
    stops: list[Callable[[], None]] = []

    def start(**overrides: Any) -> LiveServer:
        live, stop = start_live_server(replace(BASE, store_url=store_url, **overrides))
        stops.append(stop)
        return live

    try:
        yield start
    finally:
        for stop in reversed(stops):
            stop()
