"""The overview's numbers, read once per tick however many pages watch
them: queue depth by priority and kind (kept for the chart), the oldest
waiting job per priority, jobs finished per second by outcome, workers and
their lanes, instances, health and drain state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from realm_service.dispatcher import Dispatcher
from realm_service.domain import JobState, WorkerInfo
from realm_service.queue import JobQueue

log = logging.getLogger(__name__)

HISTORY_SECONDS = 600.0  # the chart's span
WATCHED_TICK = 1.0  # while a page is open, at the fastest
READ_SHARE = 0.04  # and its reads take at most this share of the time (big queues read slowly)
IDLE_TICK = 5.0  # otherwise: the chart keeps its history at a slower pace


@dataclass(frozen=True)
class Snapshot:
    time: datetime
    depth: dict[str, int]  # "priority kind" -> queued jobs
    running: int
    oldest: list[tuple[int, float]]  # priority, seconds waiting
    finished_per_second: dict[str, float]  # outcome -> jobs/s over the last minute
    finished_last_hour: dict[str, int]
    workers: list[WorkerInfo]
    instances: list[str]
    this_instance: str
    store: str
    serving: bool
    draining: bool
    error: str = ""


@dataclass
class Overview:
    queue: JobQueue
    dispatcher: Dispatcher
    store: str
    serving: Callable[[], bool]
    draining: Callable[[], bool]
    history: deque[tuple[float, dict[str, int]]] = field(default_factory=deque)
    latest: Snapshot | None = None
    watchers: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="web-overview")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def watch(self) -> None:
        """A page opened: read at the watched pace from now on, not after
        the idle tick."""
        self.watchers += 1
        self._wake.set()

    def unwatch(self) -> None:
        self.watchers -= 1

    async def next(self, after: Snapshot | None) -> Snapshot:
        """The snapshot after `after` (the latest one when there is a newer)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.latest not in (None, after))
            latest = self.latest
            assert latest is not None
            return latest

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                snapshot = await self.read()
            except Exception as e:  # the store is away: the page says so
                log.warning("web console read failed", extra={"error": str(e)})
                snapshot = self._unavailable(str(e))
            async with self._changed:
                self.latest = snapshot
                self._changed.notify_all()
            took = time.monotonic() - started
            tick = max(WATCHED_TICK, took / READ_SHARE) if self.watchers else IDLE_TICK
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)
            self._wake.clear()

    async def read(self) -> Snapshot:
        stats = await asyncio.to_thread(self.queue.stats)
        others = await asyncio.to_thread(self.queue.other_instances_workers)
        now = datetime.now(UTC)
        depth: dict[str, int] = {}
        running = 0
        for state, kind, priority, count in stats.counts:
            if state is JobState.QUEUED:
                key = f"{priority} {kind.value}"
                depth[key] = depth.get(key, 0) + count
            elif state is JobState.RUNNING:
                running += count
        mono = time.monotonic()
        self.history.append((mono, depth))
        while self.history and self.history[0][0] < mono - HISTORY_SECONDS:
            self.history.popleft()
        workers = sorted(
            [*self.dispatcher.workers(), *others],
            key=lambda w: (w.instance_id, w.worker_id, w.stream_id),
        )
        this = self.queue.instance_id
        instances = sorted({this, *(w.instance_id for w in others)})
        return Snapshot(
            time=now,
            depth=depth,
            running=running,
            oldest=[
                (priority, max(0.0, (now - created).total_seconds()))
                for priority, created in sorted(stats.oldest, reverse=True)
            ],
            finished_per_second={
                state.value: count / 60.0 for state, count in sorted(stats.last_minute.items())
            },
            finished_last_hour={state.value: n for state, n in sorted(stats.last_hour.items())},
            workers=workers,
            instances=instances,
            this_instance=this,
            store=self.store,
            serving=self.serving(),
            draining=self.draining(),
        )

    def _unavailable(self, error: str) -> Snapshot:
        return Snapshot(
            time=datetime.now(UTC),
            depth={},
            running=0,
            oldest=[],
            finished_per_second={},
            finished_last_hour={},
            workers=self.dispatcher.workers(),
            instances=[self.queue.instance_id],
            this_instance=self.queue.instance_id,
            store=self.store,
            serving=self.serving(),
            draining=self.draining(),
            error=error,
        )

    def series(self) -> dict[str, object]:
        """The chart's data: seconds ago, and one line per priority and kind."""
        if not self.history:
            return {"t": [], "lines": {}}
        now = self.history[-1][0]
        keys = sorted({k for _, d in self.history for k in d}, key=_series_order)
        return {
            "t": [round(t - now, 1) for t, _ in self.history],
            "lines": {k: [d.get(k, 0) for _, d in self.history] for k in keys},
        }


def _series_order(key: str) -> tuple[int, str]:
    priority, _, kind = key.partition(" ")
    return (-int(priority), kind)
