"""Following a job's changes: in-process signals, with polling as the fallback
for changes made by other server instances."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from realm_service.domain import Job
from realm_service.queue import JobQueue


class JobWatch:
    def __init__(self, queue: JobQueue, *, poll_seconds: float = 0.5) -> None:
        self.queue = queue
        self.poll_seconds = poll_seconds
        self._events: dict[int, set[asyncio.Event]] = {}
        # Final values of followed jobs that finished here (no read needed).
        self._finished: dict[int, Job] = {}
        # The value a change here left a followed job with, when the change
        # knew it (a claim), until the follower takes it; a change without
        # one drops it (the follower reads instead).
        self._latest: dict[int, Job] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue.on_job_change(self._changed_threadsafe)

    def _changed_threadsafe(self, job_id: int, value: Job | None) -> None:
        if self._loop is not None and job_id in self._events:
            self._loop.call_soon_threadsafe(self._changed, job_id, value)

    def _changed(self, job_id: int, value: Job | None = None) -> None:
        events = self._events.get(job_id)
        if not events:
            return
        if value is None:
            self._latest.pop(job_id, None)
        elif value.state.terminal:
            self._finished[job_id] = value
        else:
            self._latest[job_id] = value
        for event in events:
            event.set()

    async def follow(self, job_id: int) -> AsyncGenerator[Job, None]:
        """Snapshots of the job until (and including) a terminal one."""
        event = asyncio.Event()
        self._events.setdefault(job_id, set()).add(event)
        try:
            while True:
                event.clear()
                # A job that finished in this process comes with its final
                # value, a claim here with the started job's; anything else
                # is read (changes of other instances, merges, polls). A
                # value overtaken by a change committed on another thread in
                # the same instant is set right by the next poll.
                job = self._finished.get(job_id) or self._latest.pop(job_id, None)
                if job is None:
                    job = await asyncio.to_thread(self.queue.get_job, job_id)
                yield job
                if job.state.terminal:
                    return
                # asyncio.timeout, not wait_for, which on Python 3.11 drops a
                # cancel (the caller went away) arriving with the change.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await event.wait()
        finally:
            waiters = self._events.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._events[job_id]
                    self._finished.pop(job_id, None)
                    self._latest.pop(job_id, None)

    async def wait_terminal(self, job_id: int, timeout: float | None) -> Job:
        """The job once terminal, or as it is when the timeout passes. A small
        margin (at most 0.2 s) is kept so the answer beats the caller's deadline."""
        last: Job | None = None
        limit = None if timeout is None else max(0.0, timeout - min(0.2, timeout / 5))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                async for job in self.follow(job_id):
                    last = job
        if last is None:
            last = await asyncio.to_thread(self.queue.get_job, job_id)
        return last
