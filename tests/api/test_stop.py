"""A stop always ends: background loops and streams give way to a cancel even
when it arrives in the same instant as the wake-up they were waiting for, and
a task that ignores its cancel cannot hold the stop forever."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from realm_service import server as server_module
from tests.api.conftest import LiveServer
from tests.api.helpers import create_realm

ENDS_WITHIN = 3.0


def _task(live: LiveServer, name: str) -> asyncio.Task[None]:
    return next(t for t in live.srv.tasks if t.get_name() == name)


def test_the_dispatcher_ends_on_a_cancel_that_meets_a_wake_up(live: LiveServer) -> None:
    dispatcher = live.srv.dispatcher

    async def race() -> tuple[bool, bool]:
        task = _task(live, "dispatcher")
        dispatcher.paused = True  # as during a drain: it only waits
        await asyncio.sleep(0.05)
        dispatcher.wake()  # the wake-up and the cancel land in one turn of the loop
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=ENDS_WITHIN)
        return task in done, task.cancelled()

    ended, cancelled = live.run(race())
    assert ended, "the dispatcher loop went on after its cancel"
    assert cancelled


def test_a_watch_ends_on_a_cancel_that_meets_a_change(live: LiveServer) -> None:
    job_id = int(create_realm(live.stub, "watched").job.job_id)  # stays queued: no worker
    watch = live.srv.watch

    async def race() -> tuple[int, bool, bool]:
        seen = 0

        async def follow() -> None:
            nonlocal seen
            async for _ in watch.follow(job_id):
                seen += 1

        task = asyncio.create_task(follow())
        async with asyncio.timeout(10):
            while seen == 0:  # the first snapshot is out: it now waits for a change
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        watch._changed(job_id)  # the change and the cancel land in one turn of the loop
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=ENDS_WITHIN)
        return seen, task in done, task.cancelled()

    seen, ended, cancelled = live.run(race())
    assert ended, f"the watch went on after its cancel ({seen} snapshots)"
    assert cancelled
    assert job_id not in watch._events  # its waiter was removed


def test_a_stop_does_not_wait_forever_on_a_task_that_ignores_its_cancel(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server_module, "STOP_TASKS_SECONDS", 0.5)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # a cancel it does not honour

    async def add() -> None:
        live.srv.tasks.append(asyncio.create_task(stubborn(), name="stubborn"))

    live.run(add())
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="realm_service.server"):
        live.run(live.srv.drain_and_stop(), timeout=30)
    assert live.srv.stopped.is_set()
    assert time.monotonic() - started < 20
    late = [r for r in caplog.records if r.getMessage() == "tasks still running after the stop"]
    assert late and "stubborn" in late[0].tasks  # type: ignore[attr-defined]
    live.loop.call_soon_threadsafe(release.set)  # let it end before the loop closes
