"""A live RealmService on 127.0.0.1:0, in a thread with its own event loop,
over a fresh store (SQLite and PostgreSQL, through `store_url`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from realm.v1 import realm_service_pb2_grpc as sgrpc

from realm_service.config import Settings
from realm_service.server import RealmServer, build_server


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
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

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
