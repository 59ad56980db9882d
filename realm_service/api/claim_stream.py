"""The ClaimJobs stream: protocol checks, credits, leases, fenced results.

Reading happens in a task; writing happens in the handler's generator, fed by
an outbox queue. When the stream ends, the leases it still holds are
released as interrupted (they do not count as failures): at once when it
ended cleanly (the worker closed it, the server ended it), after the resume
grace when it broke (the call was cancelled, the connection lost, the worker
went silent), unless the worker reconnects meanwhile and re-attaches them
with the stream's resume token (DESIGN.md section 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service import metrics
from realm_service.api.convert import (
    JOB_STATE_TO_PB,
    KIND_FROM_PB,
    entry_from_pb,
    file_pb,
    job_pb,
    ts,
)
from realm_service.api.status import status_of
from realm_service.dispatcher import Dispatcher, WorkerStream, release_failed
from realm_service.domain import (
    PREEMPTED_FOR,
    IndexEntry,
    Job,
    JobKind,
    JobState,
    Lease,
    validate_path,
)
from realm_service.errors import (
    Conflict,
    InvalidArgument,
    JobNotFound,
    RealmError,
    StaleLease,
    Unavailable,
)
from realm_service.queue import JobQueue

log = logging.getLogger(__name__)
# Outcomes that end a lease, answered or refused (`ClaimSession._ending`).
_ENDING_OUTCOMES = frozenset(
    (
        spb.JobResult.OUTCOME_SUCCEEDED,
        spb.JobResult.OUTCOME_FAILED,
        spb.JobResult.OUTCOME_FAILED_PERMANENTLY,
    )
)

MAX_CREDITS = 10_000
MAX_ENTRIES_PER_BATCH = 1_000  # the contract's bound on IndexEntryBatch.entries
MAX_DELETED_PER_BATCH = 10_000
COMPLETE_BATCH = 500  # successful results completed per transaction
MAX_ID = 200
MAX_TOKEN = 64
# How long a stream that re-attaches leases waits for the stream they were
# held by (on this instance, not yet seen broken) to end.
SUPERSEDE_TIMEOUT = 5.0
# How long the end of a stream's requests waits to learn whether the call was
# cancelled (see ClaimSession._read).
CANCEL_SETTLE_SECONDS = 0.2
# How long a broken stream's detach waits for its heartbeats in flight.
HEARTBEAT_SETTLE_SECONDS = 2.0

T = TypeVar("T")


def _in_store_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """`fn` in a store thread, as asyncio.to_thread runs it, but as the
    executor's future itself: it runs to its end whatever happens to its
    awaiters (who shield it), and it can be waited for again."""
    return asyncio.get_running_loop().run_in_executor(
        None, functools.partial(contextvars.copy_context().run, fn)
    )


def _detach_failed(queue: JobQueue, held: list[str], detach: asyncio.Future[object]) -> None:
    """A detach that failed (the store is unreachable or full) leaves the
    leases to the reaper, which releases them as interruptions; only a
    failure that is not the store's is logged as an error."""
    if detach.cancelled():
        return
    error = detach.exception()
    if error is None:
        return
    queue.defer_release(held, "stream closed")
    if not isinstance(error, RealmError):
        log.error("detach failed; kept for the reaper", exc_info=error)


def _cancelled(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    try:
        return bool(context.cancelled())
    except Exception:  # a context that cannot say (never the case with grpc.aio)
        return False


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


class ProtocolError(InvalidArgument):
    """The worker broke the ClaimJobs protocol."""


class InternalError(RealmError):
    """internal error; see the server log"""


class ClaimSession:
    """One ClaimJobs call."""

    def __init__(
        self,
        queue: JobQueue,
        dispatcher: Dispatcher,
        *,
        heartbeat_seconds: float,
        ping_seconds: float,
    ) -> None:
        self.queue = queue
        self.dispatcher = dispatcher
        self.heartbeat_seconds = heartbeat_seconds
        self.ping_seconds = ping_seconds
        self.outbox: asyncio.Queue[spb.ClaimJobsResponse | None] = asyncio.Queue()
        self.stream: WorkerStream | None = None
        self.error: RealmError | None = None
        self.last_heard = time.monotonic()
        # Held leases this stream forwarded an entry batch for: the store may
        # hold entries of their attempts beyond those a result carries.
        self._batched: set[str] = set()
        # Resumable sessions: this stream's secret (none when leases of
        # broken streams are released at once), whether it broke (rather
        # than being closed by either side), and when it has ended.
        grace = queue.settings.resume_grace.total_seconds()
        self.resume_token = secrets.token_urlsafe(24) if grace > 0 else ""
        self.broken = False
        self.ended = asyncio.Event()
        self._resumed: list[spb.LeaseAck] = []
        # Its call is giving up what it holds (from then on a lease the store
        # gives back is not taken, and a takeover does not cancel it).
        self._closing = False
        # Heartbeats on their way to the store: a break waits for them before
        # it detaches, or one landing after would undo the grace's expiry.
        self._heartbeats: set[asyncio.Future[Any]] = set()
        self._task: asyncio.Task[object] | None = None
        self._context: grpc.aio.ServicerContext[Any, Any] | None = None
        # The recording of the last results message, under way: the messages
        # after it wait for it, but for credits (see `_read`).
        self._completing: asyncio.Task[None] | None = None

    # -- entry point ------------------------------------------------------------

    async def run(
        self,
        requests: AsyncIterator[spb.ClaimJobsRequest],
        context: grpc.aio.ServicerContext[spb.ClaimJobsRequest, spb.ClaimJobsResponse],
    ) -> None:
        """Serve the stream until either side ends it. Responses are written
        with `context.write`, not yielded: when the worker goes away, the
        cancel lands in this coroutine wherever it waits, and its holds are
        released at once (an abandoned async generator would release them
        only when the garbage collector finalized it)."""
        self._task = asyncio.current_task()
        self._context = context
        try:
            async with asyncio.timeout(30):
                first = await anext(requests)
        except (StopAsyncIteration, TimeoutError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
        stream = self._hello(first)
        if stream is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, self.error.message if self.error else "bad hello"
            )
        assert stream is not None
        self.stream = stream
        hello = first.hello
        reader: asyncio.Task[None] | None = None
        pinger: asyncio.Task[None] | None = None
        try:
            # Registered before it re-attaches anything: a lease revoked (its
            # job cancelled, preempted) while the handshake runs is found
            # here, and its word follows the settings. The stream has no
            # credits yet, so nothing is claimed for it meanwhile.
            self.dispatcher.add(stream)
            if hello.resume_token and hello.resume_lease_ids:
                try:
                    await self._reattach(stream, hello.resume_token, list(hello.resume_lease_ids))
                except ProtocolError as e:
                    self.error = e
                    await context.abort(status_of(e), e.message)
                except RealmError as e:
                    # The store failed mid-way: what was re-attached is kept
                    # again for the worker, which retries with the same token.
                    self.broken = True
                    await context.abort(status_of(e), e.message)
            log.info(
                "stream opened",
                extra={
                    "stream": stream.label,
                    "worker": stream.worker_id,
                    "lane": stream.min_priority,
                },
            )
            reader = asyncio.create_task(self._read(requests))
            pinger = asyncio.create_task(self._ping())
            await context.write(
                spb.ClaimJobsResponse(
                    settings=spb.StreamSettings(
                        lease_duration=_duration(
                            self.queue.settings.lease_duration.total_seconds()
                        ),
                        heartbeat_interval=_duration(self.heartbeat_seconds),
                        stream_id=stream.stream_id,
                        result_entries=True,
                        resume_token=self.resume_token,
                        resume_grace=_duration(
                            self.queue.settings.resume_grace.total_seconds()
                            if self.resume_token
                            else 0
                        ),
                        resumed=self._resumed,
                    )
                )
            )
            while True:
                message = await self.outbox.get()
                if message is None:
                    break
                await context.write(message)
            if self.error is not None:
                await context.abort(status_of(self.error), self.error.message)
        except asyncio.CancelledError:
            self.broken = True  # the call was cancelled: the worker went away
            raise
        finally:
            self._closing = True
            try:
                await self._close(stream, context, reader, pinger)
            finally:
                self.ended.set()

    async def _close(
        self,
        stream: WorkerStream,
        context: grpc.aio.ServicerContext[Any, Any],
        reader: asyncio.Task[None] | None,
        pinger: asyncio.Task[None] | None,
    ) -> None:
        """Give up what the stream holds: detached for its worker to resume
        when the stream broke, released otherwise."""
        for task in (reader, pinger, self._completing):
            if task is not None:
                task.cancel()
        self.dispatcher.remove(stream)
        held = stream.drop_all()
        if not self.broken and _cancelled(context):
            # Cancelled by the client or cut: its requests may have ended
            # before the cancel reached this coroutine.
            self.broken = True
        detached = False
        if held and self.broken and self.resume_token and self.error is None:
            if self._heartbeats:
                # Shielded futures of store threads: waiting cannot cancel them.
                await asyncio.wait(set(self._heartbeats), timeout=HEARTBEAT_SETTLE_SECONDS)
            detached = await self._detach(held, self.resume_token)
        if held and not detached:
            # Shielded: the call being torn down may cancel this task
            # again while the release waits for a thread, and a release
            # cancelled before it started would leave the jobs running
            # until their leases expire.
            release = asyncio.ensure_future(
                asyncio.to_thread(self.queue.release, held, "stream closed")
            )
            release.add_done_callback(
                functools.partial(release_failed, self.queue, held, "stream closed")
            )
            try:
                await asyncio.shield(release)
            except (Unavailable, Conflict) as e:
                # Recorded later by the reaper, still as interruptions:
                # an outage must not turn into failed attempts (the
                # callback above kept them).
                log.warning(
                    "release deferred",
                    extra={"stream": stream.label, "leases": len(held), "error": str(e)},
                )
            self.dispatcher.wake()
        log.info(
            "stream broken" if self.broken else "stream closed",
            extra={
                "stream": stream.label,
                "detached" if detached else "released": len(held),
            },
        )

    async def _detach(self, held: list[str], token: str) -> bool:
        """Keep a broken stream's leases for its worker to re-attach with
        `token`; False when the store could not record it (they are released
        instead)."""
        detach = asyncio.ensure_future(asyncio.to_thread(self.queue.detach, held, token))
        # Its failure is seen even when this task is cancelled meanwhile: the
        # leases are then kept for the reaper, as a release that failed.
        detach.add_done_callback(functools.partial(_detach_failed, self.queue, held))
        try:
            await asyncio.shield(detach)
        except RealmError as e:
            log.warning("detach failed; releasing", extra={"error": str(e)})
            return False
        return True

    async def _reattach(self, stream: WorkerStream, token: str, lease_ids: list[str]) -> None:
        """Re-attach the leases a broken stream of this worker held (its
        resume token quoted in the hello): those the store gives back are
        held by this stream at once (so that a break during the handshake
        detaches them again); StreamSettings.resumed answers for each."""
        if len(token) > MAX_TOKEN:
            raise ProtocolError(f"hello.resume_token is longer than {MAX_TOKEN} characters")
        if len(lease_ids) > MAX_CREDITS:
            raise ProtocolError(f"hello.resume_lease_ids: more than {MAX_CREDITS}")
        # One deadline for the whole handshake, well inside the worker's.
        deadline = time.monotonic() + SUPERSEDE_TIMEOUT
        old = self.dispatcher.stream_with_token(stream.worker_id, token)
        if old is not None and old.supersede is not None:
            # The worker saw the break before this server did: end that
            # stream as broken, which detaches its leases.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUPERSEDE_TIMEOUT):
                    await old.supersede()
        wanted = list(dict.fromkeys(lease[:64] for lease in lease_ids if lease))
        found: dict[str, Lease | tuple[str, JobState | None]] = {}
        asking = wanted
        while True:
            found.update(await self._reattach_some(stream, asking, token))
            # Leases still held by a stream of another instance that has not
            # seen the break yet: asked for again while it notices.
            asking = [
                lease_id
                for lease_id, got in found.items()
                if not isinstance(got, Lease) and got[1] is JobState.RUNNING
            ]
            if not asking or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        await self._recheck(stream, found)
        for lease_id in wanted:
            got = found[lease_id]
            if isinstance(got, Lease):
                self._resumed.append(
                    spb.LeaseAck(
                        lease_id=lease_id,
                        accepted=True,
                        lease_expire_time=ts(got.expire_time),
                        job_state=pb.Job.STATE_RUNNING,
                    )
                )
            else:
                reason, state = got
                self._resumed.append(
                    spb.LeaseAck(
                        lease_id=lease_id,
                        accepted=False,
                        reason=reason,
                        job_state=JOB_STATE_TO_PB[state] if state else pb.Job.STATE_UNSPECIFIED,
                    )
                )
        refused = sum(not a.accepted for a in self._resumed)
        if refused:
            metrics.LEASES_RESUMED.labels("refused").inc(refused)
        log.info(
            "stream resumed",
            extra={
                "stream": stream.label,
                "reattached": sum(a.accepted for a in self._resumed),
                "refused": sum(not a.accepted for a in self._resumed),
            },
        )

    async def _recheck(
        self, stream: WorkerStream, found: dict[str, Lease | tuple[str, JobState | None]]
    ) -> None:
        """A lease revoked (its job cancelled, preempted) after the store gave
        it back and before this stream held it found no holder for the word:
        such leases are answered as not resumed."""
        adopted = {lease_id: got for lease_id, got in found.items() if isinstance(got, Lease)}
        if not adopted:
            return
        beat = await self._extend(list(adopted))
        lost = [lease_id for lease_id, until in beat.items() if until is None]
        if not lost:
            return
        reasons = await asyncio.to_thread(self.queue.stale_reasons, lost)
        for lease_id in lost:
            stream.drop(lease_id)
            self._batched.discard(lease_id)
            try:
                job = await asyncio.to_thread(self.queue.get_job, adopted[lease_id].job.job_id)
            except JobNotFound:  # its realm was deleted meanwhile
                found[lease_id] = (reasons[lease_id], None)
            else:
                found[lease_id] = (reasons[lease_id], job.state)

    async def _extend(
        self, progress: dict[str, tuple[int, int]] | list[str]
    ) -> dict[str, datetime | None]:
        """queue.heartbeat in a store thread that a break waits for before it
        detaches (see `_heartbeats`); cancelling the caller leaves it running."""
        beat = _in_store_thread(functools.partial(self.queue.heartbeat, progress))
        self._heartbeats.add(beat)
        beat.add_done_callback(self._heartbeats.discard)
        return await asyncio.shield(beat)

    async def _reattach_some(
        self, stream: WorkerStream, lease_ids: list[str], token: str
    ) -> dict[str, Lease | tuple[str, JobState | None]]:
        """One round of re-attaching. The leases the store gives back are
        taken by this stream when the store answers, even if its call was
        cancelled meanwhile (or kept again for the worker if it has ended)."""
        ask = _in_store_thread(
            functools.partial(self.queue.reattach, lease_ids, worker=stream.worker_id, token=token)
        )
        ask.add_done_callback(functools.partial(self._reattached, stream, token))
        return await asyncio.shield(ask)

    def _reattached(
        self,
        stream: WorkerStream,
        token: str,
        ask: asyncio.Future[dict[str, Lease | tuple[str, JobState | None]]],
    ) -> None:
        if ask.cancelled() or ask.exception() is not None:
            return
        leases = [got for got in ask.result().values() if isinstance(got, Lease)]
        if not leases:
            return
        if self._closing:
            # The stream ended while the store answered: the worker may
            # still resume them with the token it quoted.
            ids = [lease.lease_id for lease in leases]
            detach = asyncio.ensure_future(asyncio.to_thread(self.queue.detach, ids, token))
            detach.add_done_callback(functools.partial(_detach_failed, self.queue, ids))
            return
        # The token is proven: it stays this stream's, so that a break at any
        # point of the handshake keeps the leases under the token the worker
        # holds (the settings repeat it).
        if self.resume_token:
            self.resume_token = token
            stream.resume_token = token
        for lease in leases:
            stream.adopt(lease)
            # Its earlier stream may have forwarded entry batches: its result
            # need not carry all of them.
            self._batched.add(lease.lease_id)

    async def _supersede(self) -> None:
        """End this stream as broken (its worker reconnected) and wait until
        its leases are detached. If it is still running after a second (a
        write to a dead connection may wait long), its call is cancelled."""
        self.broken = True
        self.outbox.put_nowait(None)
        try:
            async with asyncio.timeout(1.0):
                await self.ended.wait()
                return
        except TimeoutError:
            pass
        if self._task is not None and not self._closing:
            # A task already giving up its leases is not cancelled: that
            # would cut its detach short.
            self._task.cancel()
        await self.ended.wait()

    def _hello(self, message: spb.ClaimJobsRequest) -> WorkerStream | None:
        if message.WhichOneof("message") != "hello":
            self.error = ProtocolError("the first message must be hello")
            return None
        hello = message.hello
        if not hello.worker_id or len(hello.worker_id) > MAX_ID:
            self.error = ProtocolError(f"hello.worker_id is required, at most {MAX_ID} characters")
            return None
        if len(hello.incarnation_id) > MAX_ID:
            self.error = ProtocolError(f"hello.incarnation_id is longer than {MAX_ID} characters")
            return None
        kinds: list[JobKind] = []
        for k in hello.kinds:
            if k not in KIND_FROM_PB:
                self.error = ProtocolError(f"hello.kinds has an unknown kind {k}")
                return None
            kinds.append(KIND_FROM_PB[k])
        min_priority = hello.min_priority if hello.HasField("min_priority") else 0
        if not 0 <= min_priority <= 100:
            self.error = ProtocolError(f"hello.min_priority {min_priority} is out of range 0-100")
            return None
        return WorkerStream(
            worker_id=hello.worker_id,
            incarnation_id=hello.incarnation_id,
            kinds=tuple(sorted(set(kinds))),
            min_priority=min_priority,
            deliver=self._deliver,
            revoked=self._revoked,
            resume_token=self.resume_token,
            supersede=self._supersede,
        )

    def _deliver(self, leases: list[Lease]) -> None:
        self.outbox.put_nowait(
            spb.ClaimJobsResponse(
                assignments=spb.JobAssignments(
                    assignments=[
                        spb.JobAssignment(
                            job=job_pb(lease.job, max_paths=None),
                            lease_id=lease.lease_id,
                            lease_expire_time=ts(lease.expire_time),
                            trace_parent=lease.job.trace_parent,
                            files_included=lease.files is not None,
                            files=[
                                spb.FileChunk(file=file_pb(f), content=content, last=True)
                                for f, content in lease.files or ()
                            ],
                        )
                        for lease in leases
                    ]
                )
            )
        )

    def _revoked(self, lease_id: str, reason: str, requeued: bool) -> None:
        """Tell the worker to stop a job whose lease was revoked (CancelJob,
        DeleteRealm, a preemption): the refusal it already handles for a lost
        lease, with the job's state (QUEUED when it was handed back)."""
        self._batched.discard(lease_id)
        self.outbox.put_nowait(
            spb.ClaimJobsResponse(
                acks=spb.LeaseAcks(
                    acks=[
                        spb.LeaseAck(
                            lease_id=lease_id,
                            accepted=False,
                            reason=f"lease revoked: {reason}",
                            job_state=pb.Job.STATE_QUEUED if requeued else pb.Job.STATE_CANCELLED,
                        )
                    ]
                )
            )
        )

    def _fail(self, error: RealmError) -> None:
        """End the stream with `error`; the first error is the one reported
        (the reader and a recording of results may both fail)."""
        if self.error is None:
            self.error = error
        self.outbox.put_nowait(None)

    # -- reading --------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[spb.ClaimJobsRequest]) -> None:
        """Ends the stream with the status its error maps to: INVALID_ARGUMENT
        for a protocol violation (the worker gives up), UNAVAILABLE, ABORTED
        or RESOURCE_EXHAUSTED when the store failed (the worker reconnects
        with backoff), INTERNAL for a server bug (the worker reconnects)."""
        try:
            async for message in requests:
                self.last_heard = time.monotonic()
                if self.stream is not None:
                    self.stream.last_message = time.time()
                # A stream's messages take effect in order, but for credits:
                # a worker grants the slots of finished jobs right after
                # their results, and the claim for them runs while the
                # results are recorded (their leases count as finishing).
                if self._completing is not None and message.WhichOneof("message") != "credit":
                    await self._completed()
                if self.error is not None:
                    return  # recording the results ended the stream
                await self._handle(message)
        except RealmError as e:
            self._ended_by(e)
            return
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except grpc.RpcError:
            self.broken = True  # the call itself ended (the worker went away)
        except Exception as e:
            self._ended_by(e)
            return
        # Results read before the requests ended are recorded first.
        if self._completing is not None:
            await self._completed()
        if self.error is not None:
            return
        # The requests ended: the worker closed its side, or the call was
        # cancelled (cut, the worker gone), which the context may say only
        # a moment later. A stream still holding leases waits for that
        # moment (at most CANCEL_SETTLE_SECONDS): broken, its leases are kept
        # for the worker to re-attach; closed, they are released at once.
        if self.stream is not None and self.stream.held_leases and self._context is not None:
            deadline = time.monotonic() + CANCEL_SETTLE_SECONDS
            while time.monotonic() < deadline:
                if _cancelled(self._context):
                    self.broken = True
                    break
                await asyncio.sleep(0.01)
        self.outbox.put_nowait(None)

    def _label(self) -> str:
        return self.stream.label if self.stream is not None else "-"

    async def _completed(self) -> None:
        """Wait for the results under way (recording them may have ended
        the stream: `error`)."""
        assert self._completing is not None
        await self._completing
        self._completing = None

    async def _record(self, results: spb.JobResults) -> None:
        """`_results` as a task of its own, ending the stream as `_read`
        would on its error."""
        try:
            await self._results(results)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._ended_by(e)

    def _ended_by(self, error: Exception) -> None:
        """End the stream on an error of its messages: a RealmError with its
        own status (a store failure logged), anything else as INTERNAL."""
        if isinstance(error, RealmError):
            if not isinstance(error, InvalidArgument):
                log.warning("stream ended", extra={"error": str(error), "stream": self._label()})
            self._fail(error)
            return
        log.error("stream reader failed", exc_info=error, extra={"stream": self._label()})
        self._fail(InternalError())

    async def _handle(self, message: spb.ClaimJobsRequest) -> None:
        stream = self.stream
        assert stream is not None
        kind = message.WhichOneof("message")
        if kind == "hello":
            raise ProtocolError("hello may only be sent once, as the first message")
        if kind == "credit":
            n = message.credit.credits
            if n <= 0 or n > MAX_CREDITS:
                raise ProtocolError(f"credit.credits {n} is out of range 1-{MAX_CREDITS}")
            # Finishing leases are not counted: their slots are the ones the
            # worker grants again right after their results.
            if stream.credits + stream.aside + stream.busy_slots + n > MAX_CREDITS:
                raise ProtocolError(f"more than {MAX_CREDITS} credits outstanding")
            stream.grant(n)
            self.dispatcher.wake()
        elif kind == "heartbeat":
            await self._heartbeat(message.heartbeat)
        elif kind == "entries":
            await self._entries(message.entries)
        elif kind == "results":
            # The slots of the jobs these results end are free at the worker
            # from now on; recording them runs beside the next credit.
            stream.finish(self._ending(message.results))
            self._completing = asyncio.create_task(self._record(message.results))
        elif kind == "release":
            await self._release(message.release)
        elif kind == "ping":
            if not message.ping.reply:
                self.outbox.put_nowait(
                    spb.ClaimJobsResponse(ping=spb.Ping(nonce=message.ping.nonce, reply=True))
                )
        else:
            raise ProtocolError("empty message: set one of the message fields")

    def _refusal(self, lease_id: str, reason: str) -> spb.LeaseAck:
        # A lease ended by a preemption (its job queued again) says so in the
        # job state too, as the revocation does: the worker handed it back,
        # it did not lose it. The refusal may overtake the revocation.
        preempted = f"is not current: {PREEMPTED_FOR} " in reason
        return spb.LeaseAck(
            lease_id=lease_id[:64],
            accepted=False,
            reason=reason,
            job_state=pb.Job.STATE_QUEUED if preempted else pb.Job.STATE_UNSPECIFIED,
        )

    def _held(self, lease_id: str) -> bool:
        assert self.stream is not None
        return self.stream.holds(lease_id)

    async def _heartbeat(self, hb: spb.Heartbeat) -> None:
        progress: dict[str, tuple[int, int]] = {}
        acks: list[spb.LeaseAck] = []
        for lp in hb.leases[:MAX_CREDITS]:
            if self._held(lp.lease_id):
                progress[lp.lease_id] = (lp.progress.done, lp.progress.total)
                assert self.stream is not None
                self.stream.progressed(lp.lease_id, lp.progress.done, lp.progress.total)
            else:
                acks.append(self._refusal(lp.lease_id, "lease is not held by this stream"))
        if progress:
            result = await self._extend(progress)
            lost = [lease_id for lease_id, until in result.items() if until is None]
            reasons: dict[str, str] = {}
            if lost:
                with contextlib.suppress(RealmError):  # a courtesy; the refusal stands
                    reasons = await asyncio.to_thread(self.queue.stale_reasons, lost)
            for lease_id, until in result.items():
                if until is None:
                    self._drop(lease_id)
                    reason = reasons.get(lease_id, "lease is no longer current")
                    acks.append(self._refusal(lease_id, reason))
                else:
                    acks.append(
                        spb.LeaseAck(
                            lease_id=lease_id,
                            accepted=True,
                            lease_expire_time=ts(until),
                            job_state=pb.Job.STATE_RUNNING,
                        )
                    )
        if acks:
            self.outbox.put_nowait(spb.ClaimJobsResponse(acks=spb.LeaseAcks(acks=acks)))

    @staticmethod
    def _check_bounds(
        entries: Sequence[pb.IndexEntry], deleted_paths: Sequence[str], where: str
    ) -> None:
        """The contract's bounds of an entry batch (ProtocolError past them)."""
        if len(entries) > MAX_ENTRIES_PER_BATCH:
            raise ProtocolError(f"{where}entries: more than {MAX_ENTRIES_PER_BATCH} per batch")
        if len(deleted_paths) > MAX_DELETED_PER_BATCH:
            raise ProtocolError(
                f"{where}deleted_paths: more than {MAX_DELETED_PER_BATCH} per batch"
            )

    @staticmethod
    def _entries_of(
        entries: Sequence[pb.IndexEntry], deleted_paths: Sequence[str], prefix: str
    ) -> tuple[list[IndexEntry], list[str]]:
        """Entries and deleted paths of a batch, checked (InvalidArgument for
        a bad entry or path, the field named after `prefix`)."""
        return (
            [entry_from_pb(e, f"{prefix}entries[{i}]") for i, e in enumerate(entries)],
            [validate_path(p, f"{prefix}deleted_paths") for p in deleted_paths],
        )

    async def _complete(
        self,
        chunk: list[tuple[int, spb.JobResult]],
        inline: Mapping[str, tuple[list[IndexEntry], list[str]]],
    ) -> dict[str, Job | StaleLease | InvalidArgument]:
        """Complete a chunk of successes in one transaction. When the store
        refuses entries sent with one of them, each is completed alone, so
        the refusal fails that attempt only."""
        try:
            done: dict[str, Job | StaleLease | InvalidArgument] = dict(
                await self.queue.complete_many_async(
                    [(r.lease_id, r.entries_uploaded) for _, r in chunk],
                    files_done={
                        r.lease_id: max(r.progress.done, r.progress.total, 0)
                        for _, r in chunk
                        if r.HasField("progress")
                    },
                    entries={
                        r.lease_id: inline[r.lease_id] for _, r in chunk if r.lease_id in inline
                    },
                    whole={r.lease_id for _, r in chunk if r.lease_id not in self._batched},
                )
            )
            return done
        except InvalidArgument as e:
            if not any(r.lease_id in inline for _, r in chunk):
                raise
            if len(chunk) == 1:
                return {chunk[0][1].lease_id: e}
            alone: dict[str, Job | StaleLease | InvalidArgument] = {}
            for item in chunk:
                alone.update(await self._complete([item], inline))
            return alone

    async def _refused_entries(self, lease_id: str, reason: str) -> spb.LeaseAck:
        """Entries sent with a result were refused: the attempt ends as a
        counted failure, as for a refused entries message."""
        self._drop(lease_id)
        if await asyncio.to_thread(self.queue.refuse_entries, lease_id, reason) is not None:
            self.dispatcher.wake()
        return self._refusal(lease_id, reason)

    async def _entries(self, batch: spb.IndexEntryBatch) -> None:
        self._check_bounds(batch.entries, batch.deleted_paths, "entries.")
        if not self._held(batch.lease_id):
            self._ack([self._refusal(batch.lease_id, "lease is not held by this stream")])
            return
        self._batched.add(batch.lease_id)
        try:
            entries, deleted = self._entries_of(batch.entries, batch.deleted_paths, "")
        except InvalidArgument as e:
            await self._refuse_entries(batch.lease_id, e.message)
            return
        try:
            await asyncio.to_thread(self.queue.add_entries, batch.lease_id, entries, deleted)
            if batch.sequence:
                self._ack(
                    [
                        spb.LeaseAck(
                            lease_id=batch.lease_id,
                            accepted=True,
                            job_state=pb.Job.STATE_RUNNING,
                            entries_sequence=batch.sequence,
                        )
                    ]
                )
        except (StaleLease, InvalidArgument) as e:
            # Stale, or refused by the store (the queue has ended the attempt).
            self._drop(batch.lease_id)
            self._ack([self._refusal(batch.lease_id, e.message)])
        except (Unavailable, Conflict):
            raise
        except Exception:
            log.exception(
                "entry batch failed", extra={"lease": batch.lease_id[:40], "stream": self._label()}
            )
            await self._refuse_entries(
                batch.lease_id, "the server could not store the entries; see its log"
            )

    async def _refuse_entries(self, lease_id: str, reason: str) -> None:
        """A bad batch is a bad attempt of its job alone (the queue ends it,
        counted), never a reason to drop the worker's other jobs."""
        self._drop(lease_id)
        if await asyncio.to_thread(self.queue.refuse_entries, lease_id, reason) is not None:
            self.dispatcher.wake()
        self._ack([self._refusal(lease_id, reason)])

    @staticmethod
    def _ending(results: spb.JobResults) -> list[str]:
        """The leases these results end, whatever their answer: a success or
        a failure ends its lease (refused or not); a result without an
        outcome is refused and leaves it held. Only a lease's first result
        in the message counts, as in `_results`."""
        first: dict[str, bool] = {}
        for r in results.results[:MAX_CREDITS]:
            first.setdefault(r.lease_id, r.outcome in _ENDING_OUTCOMES)
        return [lease_id for lease_id, ends in first.items() if ends]

    async def _results(self, results: spb.JobResults) -> None:
        acks: dict[int, spb.LeaseAck] = {}
        succeeded: list[tuple[int, spb.JobResult]] = []
        inline: dict[str, tuple[list[IndexEntry], list[str]]] = {}
        seen: set[str] = set()
        for i, r in enumerate(results.results[:MAX_CREDITS]):
            if not self._held(r.lease_id) or r.lease_id in seen:
                acks[i] = self._refusal(r.lease_id, "lease is not held by this stream")
                continue
            seen.add(r.lease_id)
            if r.outcome == spb.JobResult.OUTCOME_SUCCEEDED:
                if r.entries or r.deleted_paths:
                    where = f"results.results[{i}]."
                    self._check_bounds(r.entries, r.deleted_paths, where)
                    try:
                        inline[r.lease_id] = self._entries_of(r.entries, r.deleted_paths, where)
                    except InvalidArgument as e:
                        acks[i] = await self._refused_entries(r.lease_id, e.message)
                        continue
                succeeded.append((i, r))
        # Successes share one transaction (and one dispatcher wake-up).
        for start in range(0, len(succeeded), COMPLETE_BATCH):
            chunk = succeeded[start : start + COMPLETE_BATCH]
            done = await self._complete(chunk, inline)
            for i, r in chunk:
                outcome = done[r.lease_id]
                if isinstance(outcome, InvalidArgument):
                    acks[i] = await self._refused_entries(r.lease_id, outcome.message)
                elif isinstance(outcome, StaleLease):
                    # Not current, or refused by the queue (which then ended
                    # the attempt): either way the stream no longer holds it.
                    self._drop(r.lease_id)
                    acks[i] = self._refusal(r.lease_id, outcome.message)
                else:
                    acks[i] = self._accepted(r.lease_id, outcome)
        for i, r in enumerate(results.results[:MAX_CREDITS]):
            if i in acks or r.outcome == spb.JobResult.OUTCOME_SUCCEEDED:
                continue
            if r.outcome not in (
                spb.JobResult.OUTCOME_FAILED,
                spb.JobResult.OUTCOME_FAILED_PERMANENTLY,
            ):
                acks[i] = self._refusal(r.lease_id, "result.outcome is unspecified")
                continue
            try:
                job = await asyncio.to_thread(
                    self.queue.fail,
                    r.lease_id,
                    r.error_message[:2000] or "failed without a message",
                    permanent=r.outcome == spb.JobResult.OUTCOME_FAILED_PERMANENTLY,
                )
            except StaleLease as e:
                self._drop(r.lease_id)
                acks[i] = self._refusal(r.lease_id, e.message)
                continue
            acks[i] = self._accepted(r.lease_id, job)
        self._ack([acks[i] for i in sorted(acks)])

    def _accepted(self, lease_id: str, job: Job) -> spb.LeaseAck:
        self._drop(lease_id)
        if job.state is JobState.QUEUED:
            self.dispatcher.wake()
        return spb.LeaseAck(lease_id=lease_id, accepted=True, job_state=JOB_STATE_TO_PB[job.state])

    async def _release(self, release: spb.ReleaseLeases) -> None:
        held = [lease for lease in release.lease_ids[:MAX_CREDITS] if self._held(lease)]
        acks = [
            self._refusal(lease, "lease is not held by this stream")
            for lease in release.lease_ids[:MAX_CREDITS]
            if lease not in held
        ]
        if held:
            await asyncio.to_thread(self.queue.release, held, "released by worker")
            for lease in held:
                self._drop(lease)
                acks.append(
                    spb.LeaseAck(lease_id=lease, accepted=True, job_state=pb.Job.STATE_QUEUED)
                )
            self.dispatcher.wake()
        self._ack(acks)

    def _drop(self, lease_id: str) -> None:
        self._batched.discard(lease_id)
        if self.stream is not None:
            self.stream.drop(lease_id)

    def _ack(self, acks: list[spb.LeaseAck]) -> None:
        if acks:
            self.outbox.put_nowait(spb.ClaimJobsResponse(acks=spb.LeaseAcks(acks=acks)))

    # -- liveness -------------------------------------------------------------------

    async def _ping(self) -> None:
        nonce = 0
        while True:
            await asyncio.sleep(self.ping_seconds)
            silent = time.monotonic() - self.last_heard
            if silent > self.ping_seconds * 3:
                log.warning(
                    "stream silent; closing",
                    extra={"stream": self._label(), "silent_s": round(silent, 1)},
                )
                self.broken = True
                self.outbox.put_nowait(None)
                return
            if silent >= self.ping_seconds:
                nonce += 1
                self.outbox.put_nowait(spb.ClaimJobsResponse(ping=spb.Ping(nonce=nonce)))

    def drain(self, grace_seconds: float) -> None:
        if self.stream is not None:
            self.stream.draining = True
        self.outbox.put_nowait(
            spb.ClaimJobsResponse(drain=spb.Drain(grace=_duration(grace_seconds)))
        )

    def close(self) -> None:
        self.outbox.put_nowait(None)
