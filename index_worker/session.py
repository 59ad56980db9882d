"""A worker's jobs over a ClaimJobs stream: slots, credits, jobs, heartbeats
and drain, and carrying on over a new stream after a break.

Credit accounting keeps one invariant: jobs held + jobs unwinding + credits
granted but not yet used <= concurrency. A credit is consumed by each job the
server assigns and given back only once the job's slot is free again (its
result sent, or its work cancelled after the lease was lost), because acks do
not return credit.

Resumable sessions (DESIGN.md section 5): when the server gives a resume
token, a stream that breaks does not cost the jobs. They keep running (an
upload waits for the next stream), the runner reconnects and quotes the token
with the leases still held, and `attach` carries on over the new stream with
those the server re-attached: entry batches it did not acknowledge and
results it did not answer are sent again (storing them twice is harmless:
entries are stored by path, results are fenced). Jobs whose leases were not
re-attached stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from index_worker import metrics
from index_worker.client import ClaimStream, StreamBrokenError
from index_worker.config import WorkerConfig
from index_worker.indexer import IndexEntry
from index_worker.jobs import (
    MAX_BATCH_BYTES,
    RESULT_ENTRIES_BYTES,
    FileSource,
    JobLimits,
    execute_job,
)
from index_worker.model import (
    Assignment,
    DrainNotice,
    JobOutcome,
    LeaseAck,
    Outcome,
    Progress,
    StreamClosedError,
    StreamSettings,
)
from realm_common import tracing

logger = logging.getLogger(__name__)

# How long to wait for the server to end the call after we half-close it.
CLOSE_TIMEOUT = 5.0
# Used when the server's settings leave the heartbeat interval unset.
DEFAULT_HEARTBEAT_INTERVAL = 10.0
# Progress reaches the server at most this often (seconds) per stream.
PROGRESS_INTERVAL = 1.0


@dataclass
class _HeldJob:
    assignment: Assignment
    progress: Progress = field(default_factory=Progress)
    task: asyncio.Task[None] | None = None


class Session:
    """Runs jobs received on one stream until it breaks or has been drained."""

    def __init__(
        self,
        stream: ClaimStream,
        files: FileSource,
        config: WorkerConfig,
        settings: StreamSettings,
    ) -> None:
        self._stream = stream
        self._files = files
        self._config = config
        self._settings = settings
        self._limits = JobLimits(
            batch_size=config.batch_size, files_per_second=config.files_per_second
        )
        self._held: dict[str, _HeldJob] = {}
        self._unwinding = 0
        self._outstanding_credits = 0
        self._draining = False
        self._drain_deadline: float | None = None
        self._drain_changed = asyncio.Event()
        self._pending_results: list[JobOutcome] = []
        # "job finished" lines of successes, written with the next flush as
        # one record (one line per job: realm_common.logs).
        self._pending_finished: list[dict[str, object]] = []
        self._flush_scheduled = False
        # Resumable sessions: whether the stream broke with jobs to carry
        # over; set (and replaced) when a new stream is attached; entry
        # batches not acknowledged yet, by lease and number; the last number
        # per lease; results sent but not answered.
        self._detached = False
        self._stream_changed = asyncio.Event()
        self._batches: dict[str, dict[int, tuple[Sequence[IndexEntry], Sequence[str]]]] = {}
        self._sequence: dict[str, int] = {}
        self._unanswered: dict[str, JobOutcome] = {}

    @property
    def busy_slots(self) -> int:
        """Slots with a job running or still unwinding."""
        return len(self._held) + self._unwinding

    @property
    def detached(self) -> bool:
        """The stream broke and the jobs wait for `attach` (or `abandon`)."""
        return self._detached

    def resume_request(self) -> tuple[str, list[str]]:
        """The broken stream's resume token and the leases to re-attach."""
        return self._settings.resume_token, [*self._held, *self._unanswered]

    def attach(self, stream: ClaimStream, settings: StreamSettings) -> None:
        """Carry on over a new stream whose hello asked to re-attach this
        session's leases: jobs whose leases came back go on, the others stop;
        what the server may have missed is sent again."""
        self._stream = stream
        self._settings = settings
        self._outstanding_credits = 0  # credits belong to a stream
        self._detached = False
        answers = {ack.lease_id: ack for ack in settings.resumed}
        for lease_id in list(self._unanswered):
            ack = answers.get(lease_id)
            if ack is not None and ack.accepted:
                continue  # sent again below
            # Answered by the server's record: applied before the break
            # (SUCCEEDED), or the lease ended; either way it is settled.
            self._forget(lease_id)
            logger.info(
                "result settled across the break",
                extra={"lease": lease_id, "applied": bool(ack and ack.succeeded)},
            )
        for lease_id, held in list(self._held.items()):
            ack = answers.get(lease_id)
            if ack is None or not ack.accepted:
                reason = ack.reason if ack is not None else "not re-attached"
                logger.warning("job lease lost", extra={**self._fields(held.assignment),
                                                        "reason": reason})  # fmt: skip
                metrics.LEASES_TAKEN.labels("lost").inc()
                self._drop(held)
        for lease_id, batches in self._batches.items():
            for number in sorted(batches):
                entries, deleted = batches[number]
                stream.send_entries(lease_id, entries, deleted, number)
        if self._unanswered:
            stream.send_results(list(self._unanswered.values()))
        changed, self._stream_changed = self._stream_changed, asyncio.Event()
        changed.set()
        logger.info(
            "session resumed",
            extra={**self._worker(), "jobs": len(self._held), "results": len(self._unanswered)},
        )

    async def abandon(self) -> None:
        """Give up on a detached session: its jobs stop (the server releases
        their leases once the resume grace is over)."""
        self._detached = False
        jobs = list(self._held.values())
        for held in jobs:
            logger.info("job abandoned with the stream", extra=self._fields(held.assignment))
            self._drop(held)
        await asyncio.gather(*(h.task for h in jobs if h.task is not None), return_exceptions=True)
        self._unanswered.clear()
        self._batches.clear()

    def _forget(self, lease_id: str) -> None:
        self._unanswered.pop(lease_id, None)
        self._batches.pop(lease_id, None)
        self._sequence.pop(lease_id, None)

    async def _upload(
        self, lease_id: str, entries: Sequence[IndexEntry], deleted: Sequence[str]
    ) -> None:
        """Send an entry batch. With a resume token it is numbered and kept
        until acknowledged; on a broken stream it waits for the next one
        (`attach` sends it again)."""
        if not self._settings.resume_token:
            await self._stream.upload(lease_id, entries, deleted)
            return
        number = self._sequence.get(lease_id, 0) + 1
        self._sequence[lease_id] = number
        self._batches.setdefault(lease_id, {})[number] = (tuple(entries), tuple(deleted))
        stream = self._stream
        try:
            await stream.upload(lease_id, entries, deleted, number)
        except StreamClosedError:
            while self._stream is stream:
                await self._stream_changed.wait()

    @property
    def free_slots(self) -> int:
        return (
            self._config.concurrency - len(self._held) - self._unwinding - self._outstanding_credits
        )

    def request_drain(self, timeout: float, reason: str) -> None:
        """Stop taking jobs; finish those held within `timeout` s, then release them.

        A second request can only bring the deadline closer.
        """
        deadline = asyncio.get_running_loop().time() + max(0.0, timeout)
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline
            logger.info(
                "draining",
                extra={"reason": reason, "timeout_s": round(timeout, 3), **self._worker()},
            )
        self._draining = True
        self._drain_changed.set()

    async def run(self) -> None:
        """Return after a drain (or a stream the server ended while we drained).

        Raises StreamBrokenError or FatalStreamError when the stream fails; held
        jobs are then cancelled, since the server requeues them on its side.
        """
        serve = asyncio.create_task(self._stream.serve(self), name="claim-stream")
        beat = asyncio.create_task(self._heartbeat_loop(), name="heartbeats")
        try:
            self._grant_free()
            drain_requested = asyncio.create_task(self._drain_changed.wait())
            try:
                done, _ = await asyncio.wait(
                    {serve, beat, drain_requested}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                drain_requested.cancel()
            if serve in done or beat in done:
                try:
                    _raise_if_failed(serve, beat)
                except StreamBrokenError:
                    self._detached = self._resumable()
                    raise
                if not self._draining:
                    self._detached = self._resumable()
                    raise StreamBrokenError("the server ended the stream without a drain")
                logger.info("stream ended during drain", extra=self._worker())
                return
            if not await self._finish_or_release(serve, beat):
                return
            self._flush()
            self._stream.close()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await serve
            except TimeoutError:
                logger.warning("server kept the stream open after close", extra=self._worker())
            except StreamBrokenError as exc:
                logger.info("stream ended after close", extra={"error": str(exc)})
        finally:
            await self._teardown(serve, beat)

    # StreamHandler: called by the stream's reader on the event loop.

    def on_assignments(self, assignments: list[Assignment]) -> None:
        refused: list[str] = []
        started: list[dict[str, object]] = []
        for assignment in assignments:
            if assignment.lease_id in self._held:
                logger.warning("duplicate assignment ignored", extra=self._fields(assignment))
                continue
            if self._outstanding_credits <= 0:
                # The server broke the credit rule; running the job would
                # overcommit this worker, so give it straight back.
                logger.warning("assignment beyond credits", extra=self._fields(assignment))
                refused.append(assignment.lease_id)
                continue
            self._outstanding_credits -= 1
            if self._draining:
                logger.info("job released unstarted", extra=self._fields(assignment))
                refused.append(assignment.lease_id)
                continue
            self._start(assignment)
            started.append(self._job_fields(assignment))
        if started and logger.isEnabledFor(logging.INFO):
            # One record for the message's jobs, one line per job.
            logger.info("job started", extra={"each": started, "worker": self._config.worker_id})
        if refused:
            self._stream.send_release(refused)

    def on_acks(self, acks: list[LeaseAck]) -> None:
        for ack in acks:
            if ack.entries_sequence:
                batches = self._batches.get(ack.lease_id)
                if batches:
                    for number in [n for n in batches if n <= ack.entries_sequence]:
                        del batches[number]
                continue
            if not ack.running and ack.lease_id in self._unanswered:
                self._forget(ack.lease_id)  # its result was answered
            held = self._held.get(ack.lease_id)
            if ack.accepted or held is None:
                continue
            fields = {**self._fields(held.assignment), "reason": ack.reason}
            if ack.requeued:
                # Preempted: the server queued the job again, for later.
                logger.info("job handed back", extra=fields)
                metrics.LEASES_TAKEN.labels("handed_back").inc()
            else:
                logger.warning("job lease lost", extra=fields)
                metrics.LEASES_TAKEN.labels("lost").inc()
            self._drop(held)

    def on_drain(self, notice: DrainNotice) -> None:
        # Keep a margin so that results reach the server before it requeues.
        margin = min(1.0, notice.grace * 0.2)
        self.request_drain(notice.grace - margin, reason="server")

    # Jobs.

    def _start(self, assignment: Assignment) -> None:
        held = _HeldJob(assignment)
        self._held[assignment.lease_id] = held
        held.task = asyncio.create_task(self._run_job(held), name=f"job-{assignment.job_id}")

    async def _run_job(self, held: _HeldJob) -> None:
        assignment = held.assignment
        lease_id = assignment.lease_id

        async def upload(entries: Sequence[IndexEntry], deleted: Sequence[str]) -> None:
            await self._upload(lease_id, entries, deleted)

        if self._config.noop_for_benchmarks:
            outcome = JobOutcome(lease_id, Outcome.SUCCEEDED)
        else:
            try:
                with tracing.continued_span(
                    "index job", assignment.trace_parent, self._fields(assignment)
                ) as span:
                    outcome = await execute_job(
                        assignment,
                        self._files.for_lease(lease_id),
                        upload,
                        held.progress,
                        self._limits,
                        result_entries=self._settings.result_entries,
                    )
                    if span is not None:
                        span.set_attribute("outcome", outcome.outcome.value)
                        span.set_attribute("entries", outcome.entries_uploaded)
            except StreamClosedError:
                return  # the session is ending; the server requeues the job
        # No await between the outcome and this bookkeeping, so a lost-lease
        # ack cannot slip in and have both a result and a release sent.
        if self._held.get(lease_id) is not held:
            return
        del self._held[lease_id]
        if outcome.outcome is Outcome.INTERRUPTED:
            # Not the job's fault: give the lease back uncounted, so the job
            # runs again once the server can serve its files.
            self._stream.send_release([lease_id])
            self._forget(lease_id)
        else:
            self._pending_results.append(outcome)
        self._schedule_flush()
        fields = {**self._job_fields(assignment), "outcome": outcome.outcome.value}
        fields["entries"] = outcome.entries_uploaded
        metrics.job_finished(str(fields["kind"]), outcome.outcome.value)
        if outcome.outcome is Outcome.SUCCEEDED:
            self._pending_finished.append(fields)
        else:
            fields["error"] = outcome.error_message
            logger.warning("job finished", extra={**fields, "worker": self._config.worker_id})

    def _drop(self, held: _HeldJob) -> None:
        """Forget a job without a result; its slot frees once its work has stopped."""
        del self._held[held.assignment.lease_id]
        self._forget(held.assignment.lease_id)
        task = held.task
        if task is None or task.done():
            self._schedule_flush()
            return
        self._unwinding += 1
        task.cancel()

        def unwound(_: asyncio.Task[None]) -> None:
            self._unwinding -= 1
            self._schedule_flush()

        task.add_done_callback(unwound)

    async def _finish_or_release(self, serve: asyncio.Task[None], beat: asyncio.Task[None]) -> bool:
        """Wait for held jobs until the drain deadline, then release the rest.

        Returns False when the stream ended meanwhile (nothing left to close).
        """
        loop = asyncio.get_running_loop()
        while self._held and self._drain_deadline is not None:
            remaining = self._drain_deadline - loop.time()
            if remaining <= 0:
                break
            self._drain_changed.clear()
            changed = asyncio.create_task(self._drain_changed.wait())
            jobs = {h.task for h in self._held.values() if h.task is not None}
            try:
                await asyncio.wait(
                    {*jobs, serve, beat, changed},
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                changed.cancel()
            if serve.done() or beat.done():
                _raise_if_failed(serve, beat)
                logger.info("stream ended during drain", extra=self._worker())
                return False
        leftovers = list(self._held.values())
        for held in leftovers:
            logger.info("job released", extra=self._fields(held.assignment))
            self._drop(held)
        tasks = [h.task for h in leftovers if h.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if leftovers:
            self._stream.send_release([h.assignment.lease_id for h in leftovers])
        return True

    def _resumable(self) -> bool:
        """Whether a break is worth carrying over: the server keeps a broken
        stream's leases for its worker, and there are some."""
        return bool(self._settings.resume_token) and bool(self._held or self._unanswered)

    async def _teardown(self, serve: asyncio.Task[None], beat: asyncio.Task[None]) -> None:
        if self._detached:
            # The jobs carry on; only this stream's tasks end.
            for task in (serve, beat):
                task.cancel()
            await asyncio.gather(serve, beat, return_exceptions=True)
            self._stream.cancel()
            return
        jobs = list(self._held.values())
        for held in jobs:
            logger.info("job abandoned with the stream", extra=self._fields(held.assignment))
            self._drop(held)
        for task in (serve, beat):
            task.cancel()
        pending = [serve, beat, *(h.task for h in jobs if h.task is not None)]
        await asyncio.gather(*pending, return_exceptions=True)
        self._stream.cancel()

    # Credits, results, heartbeats.

    def _grant_free(self) -> None:
        if self._draining:
            return
        free = self.free_slots
        if free > 0:
            self._outstanding_credits += free
            self._stream.send_credit(free)

    def _schedule_flush(self) -> None:
        # Deferred by one loop turn so jobs finishing together share one
        # JobResults and one CreditGrant.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending_results:
            results, self._pending_results = self._pending_results, []
            if self._settings.resume_token:
                for result in results:
                    self._unanswered[result.lease_id] = result
            # Entries sent with results are at most RESULT_ENTRIES_BYTES a
            # job: a message carries so many of them as fit MAX_BATCH_BYTES.
            per_message = MAX_BATCH_BYTES // RESULT_ENTRIES_BYTES
            message: list[JobOutcome] = []
            carrying = 0
            for result in results:
                heavy = bool(result.entries or result.deleted)
                if heavy and carrying == per_message:
                    self._stream.send_results(message)
                    message, carrying = [], 0
                message.append(result)
                carrying += heavy
            self._stream.send_results(message)
        self._grant_free()
        if self._pending_finished:
            finished, self._pending_finished = self._pending_finished, []
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "job finished", extra={"each": finished, "worker": self._config.worker_id}
                )

    async def _heartbeat_loop(self) -> None:
        """Heartbeats every interval for all held leases; in between, at most
        every PROGRESS_INTERVAL, one for the leases whose progress moved, so
        watchers see a job advance (a heartbeat carries progress)."""
        interval = self._settings.heartbeat_interval
        if interval <= 0:
            lease = self._settings.lease_duration
            interval = lease / 3 if lease > 0 else DEFAULT_HEARTBEAT_INTERVAL
        interval = max(interval, 0.01)
        tick = min(interval, PROGRESS_INTERVAL)
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + interval
        reported: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(tick)
            if not self._held:
                reported.clear()
                continue
            now = loop.time()
            due = now >= next_beat - tick / 10
            if due:
                next_beat = now + interval
            leases = [
                (lease_id, held.progress)
                for lease_id, held in self._held.items()
                if due or reported.get(lease_id) != (held.progress.done, held.progress.total)
            ]
            if leases:
                self._stream.send_heartbeat(leases)
            reported = {
                lease_id: (held.progress.done, held.progress.total)
                for lease_id, held in self._held.items()
            }

    def _worker(self) -> dict[str, str]:
        return {"worker": self._config.worker_id, "stream": self._settings.stream_id}

    def _fields(self, assignment: Assignment) -> dict[str, object]:
        return {**self._job_fields(assignment), "worker": self._config.worker_id}

    def _job_fields(self, assignment: Assignment) -> dict[str, object]:
        return {
            "job": assignment.job_id,
            "realm": assignment.realm_id,
            "lease": assignment.lease_id,
            "kind": assignment.kind.value if assignment.kind else "unknown",
            "priority": assignment.priority,
        }


def _raise_if_failed(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled():
            task.result()
