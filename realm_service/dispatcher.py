"""Hands queued jobs to connected worker streams, in priority order.

One asyncio task owns dispatching. It wakes on new work (an in-process signal,
or PostgreSQL NOTIFY from another instance), on new credits, and on a polling
fallback. Streams with the same filter (kinds, minimum priority) are served by
one claim for their summed credits, so a thousand idle streams cost one query
per wake-up, not a thousand.

Reserved slots: across the streams that accept SYSTEM-level work, at most
`slots - reserved` of them run SYSTEM jobs at once, so a USER job finds a free
slot immediately during a storm. When all such streams together have no more
slots than are reserved, one SYSTEM job may still run, so the backlog never
starves.

Preemption: when a job of USER priority or above waits, no stream that would
take it has a free slot, and SYSTEM jobs hold slots of such streams, the
SYSTEM job with the least progress is handed back (JobQueue.preempt) and its
worker told to stop; the freed slot takes the waiting job. A preempted job
goes to the head of the SYSTEM line and is preempted at most
`max_preemptions` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from realm_service.domain import (
    SYSTEM,
    USER,
    EnqueueResult,
    HandOff,
    Job,
    JobKind,
    Lease,
    WorkerInfo,
    preemption_reason,
)
from realm_service.errors import Conflict, RealmError, Unavailable
from realm_service.queue import JobQueue, job_fields

log = logging.getLogger(__name__)

_ids = itertools.count(1)
# The dispatcher looks for a waiting job to preempt for (one read of the
# queue's head above SYSTEM) when new work was announced, at most every
# PREEMPT_CHECK_SECONDS, and at least every PREEMPT_RECHECK_SECONDS while
# SYSTEM jobs hold slots; a waiting job a preemption was made for is left
# PREEMPT_PENDING_SECONDS to take the freed slot before another is made.
PREEMPT_CHECK_SECONDS = 0.01
PREEMPT_RECHECK_SECONDS = 0.9  # under the 1 s poll: each poll looks
PREEMPT_PENDING_SECONDS = 5.0
_EPOCH = datetime.fromtimestamp(0, UTC)


def release_failed(
    queue: JobQueue, held: list[str], reason: str, release: asyncio.Future[object]
) -> None:
    """Done-callback of a release run in the background: one that failed with
    an outage (a full disk included) is kept for the reaper, which releases
    the leases as interruptions once the store takes writes; any other
    failure is logged, and the leases kept too, so their jobs do not wait for
    their leases to expire."""
    if release.cancelled():
        return
    error = release.exception()
    if error is None:
        return
    queue.defer_release(held, reason)
    if not isinstance(error, (Unavailable, Conflict)):
        log.error("release failed; kept for the reaper", exc_info=error)


@dataclass(eq=False)
class WorkerStream:
    """Server-side state of one ClaimJobs stream, and the ledger of its leases
    and credits. The ledger changes only through the methods below (used by
    the dispatcher, the reaper and the ClaimJobs handler), which keep one
    rule: a stream never holds more leases than it was granted credits.
    `credits` are the free ones; `aside` those set aside for hand-offs under
    way, each settled as a lease or given back. `finishing` are held leases
    whose results are being recorded: their slots are free at the worker,
    which may grant them again meanwhile, so they count as neither busy
    slots nor SYSTEM work (reserved slots, preemption)."""

    worker_id: str
    incarnation_id: str
    kinds: tuple[JobKind, ...]
    min_priority: int
    deliver: Callable[[list[Lease]], None]
    stream_id: str = field(default_factory=lambda: f"s{next(_ids)}")
    credits: int = 0
    aside: int = 0
    outstanding: dict[str, Lease] = field(default_factory=dict)
    finishing: set[str] = field(default_factory=set)
    draining: bool = False
    # Tells the worker a lease it holds was revoked: (lease id, reason, and
    # whether the job went back to the queue rather than being cancelled).
    revoked: Callable[[str, str, bool], None] = lambda lease_id, reason, requeued: None
    # Share of its work each held job reported done (heartbeats), by lease.
    progress: dict[str, float] = field(default_factory=dict)
    connect_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Wall-clock time of the worker's last message (time.time()).
    last_message: float = field(default_factory=time.time)
    # The secret its worker quotes to re-attach this stream's leases should
    # it break ("" when leases of broken streams are released at once), and
    # how to end it as broken when its worker reconnects before this server
    # noticed the break (its leases are then detached, ready to re-attach).
    resume_token: str = ""
    supersede: Callable[[], Awaitable[None]] | None = None

    def grant(self, n: int) -> None:
        self.credits += n

    def set_aside(self) -> None:
        """Set one free credit aside for a job an enqueue may claim for this
        stream (a HandOff); `settle_aside` settles it."""
        self.credits -= 1
        self.aside += 1

    def settle_aside(self, lease: Lease | None) -> None:
        """A hand-off ended: its lease takes the credit set aside, or the
        credit is free again."""
        self.aside -= 1
        if lease is None:
            self.credits += 1
        else:
            self.outstanding[lease.lease_id] = lease

    def assign(self, lease: Lease) -> None:
        """Hold a lease handed to this stream; it uses one credit."""
        self.credits -= 1
        self.outstanding[lease.lease_id] = lease

    def adopt(self, lease: Lease) -> None:
        """Hold a lease re-attached from a stream of this worker that broke:
        it was granted a credit there, so it uses none here. Its progress
        is the one last recorded (preemption spares the jobs furthest on)."""
        self.outstanding[lease.lease_id] = lease
        done, total = lease.job.progress_done, lease.job.progress_total
        self.progress[lease.lease_id] = done / total if total > 0 else 0.0

    def holds(self, lease_id: str) -> bool:
        return lease_id in self.outstanding

    def finish(self, lease_ids: list[str]) -> None:
        """Results for these held leases are being recorded: each stays held
        until its result is answered (`drop`), but its slot is free."""
        self.finishing.update(lease_id for lease_id in lease_ids if lease_id in self.outstanding)

    def drop(self, lease_id: str) -> None:
        """Forget a lease that ended (result, release, refusal, reap)."""
        self.outstanding.pop(lease_id, None)
        self.progress.pop(lease_id, None)
        self.finishing.discard(lease_id)

    def revoke(self, lease_id: str, reason: str, *, requeued: bool = False) -> bool:
        """A held lease was revoked (its job cancelled, deleted, or handed
        back: `requeued`): forget it and tell the worker to stop."""
        if self.outstanding.pop(lease_id, None) is None:
            return False
        self.progress.pop(lease_id, None)
        self.finishing.discard(lease_id)
        self.revoked(lease_id, reason, requeued)
        return True

    def progressed(self, lease_id: str, done: int, total: int) -> None:
        """A held job's progress, as its worker reported it."""
        if lease_id in self.outstanding:
            self.progress[lease_id] = done / total if total > 0 else 0.0

    def accepts(self, job: Job) -> bool:
        """Whether this stream's filter (kinds, minimum priority) takes the job."""
        return job.priority >= self.min_priority and (not self.kinds or job.kind in self.kinds)

    def info(self, instance_id: str) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            incarnation_id=self.incarnation_id,
            instance_id=instance_id,
            stream_id=self.stream_id,
            kinds=self.kinds,
            min_priority=self.min_priority,
            credits=self.credits + self.aside,
            jobs_held=self.held_leases,
            connect_time=self.connect_time,
            last_message_time=datetime.fromtimestamp(self.last_message, UTC),
        )

    def drop_all(self) -> list[str]:
        """Forget every lease (the stream is closing); returns them."""
        held = list(self.outstanding)
        self.outstanding.clear()
        self.progress.clear()
        self.finishing.clear()
        return held

    @property
    def held_leases(self) -> int:
        return len(self.outstanding)

    @property
    def busy_slots(self) -> int:
        """Held leases whose jobs still run (not finishing)."""
        return len(self.outstanding) - len(self.finishing)

    @property
    def system_running(self) -> int:
        """Held SYSTEM-level jobs that still run (not finishing)."""
        return sum(
            1
            for lease_id, lease in self.outstanding.items()
            if lease.job.priority <= SYSTEM and lease_id not in self.finishing
        )

    @property
    def label(self) -> str:
        return f"{self.worker_id}/{self.incarnation_id[:8]}/{self.stream_id}"


def _plan(members: list[WorkerStream]) -> list[WorkerStream]:
    """Which stream each claimed job goes to, in claim order: one credit at a
    time to the stream with the most left, so jobs spread over the group. Of
    streams with as many left, the one given more in this plan goes first: a
    claim that gets less than planned (the SYSTEM budget of reserved slots)
    then fills streams' batches whole rather than sending one job to a
    stream that holds a batch already, which would come back as a result
    and a claim of one job each."""
    # Each stream's turns come with 1 less left each time and as many more
    # given, so the turns, in the order above, are those of every level of
    # credits left, highest first; within a level, the streams with more
    # credits in all (given more), then the group's order. Those that reach
    # a level are a head of the streams sorted by credits (a stable sort
    # keeps the group's order): one slice a level rather than a heap pop
    # per credit, as a round over a thousand idle streams has a thousand
    # credits or more.
    ranked = sorted((s for s in members if s.credits > 0), key=lambda s: -s.credits)
    plan: list[WorkerStream] = []
    reach = 0
    for level in range(ranked[0].credits if ranked else 0, 0, -1):
        while reach < len(ranked) and ranked[reach].credits >= level:
            reach += 1
        plan.extend(ranked[:reach])
    return plan


def lease_fields(lease: Lease) -> dict[str, object]:
    return {**job_fields(lease.job), "lease": lease.lease_id}


class Dispatcher:
    def __init__(
        self, queue: JobQueue, *, reserved_slots: int = 1, poll_seconds: float = 1.0
    ) -> None:
        self.queue = queue
        self.reserved_slots = reserved_slots
        self.poll_seconds = poll_seconds
        self.streams: dict[str, WorkerStream] = {}
        self.paused = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_assigned: Callable[[list[Lease]], None] = lambda leases: None
        # Preemption: when the queue's head above SYSTEM was last read, a
        # wake-up set for the end of that pause, and the waiting jobs that
        # preemptions were made for (job id -> time.monotonic()).
        self._preempt_checked = 0.0
        self._preempt_later: asyncio.TimerHandle | None = None
        self._preempted_for: dict[int, float] = {}
        # New work was announced since the last look (set from any thread).
        self._new_work = True
        # Claim rounds begun (a hand-off's settling asks whether one ran),
        # and rounds' claims under way (no hand-off is offered meanwhile).
        self._rounds = 0
        self._claims_in_flight = 0

    # -- registration -------------------------------------------------------

    def add(self, stream: WorkerStream) -> None:
        self.streams[stream.stream_id] = stream
        self.wake()

    def remove(self, stream: WorkerStream) -> None:
        self.streams.pop(stream.stream_id, None)

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- hand-offs --------------------------------------------------------------

    async def enqueue(
        self,
        priority: int,
        kind: JobKind,
        enqueue: Callable[..., Awaitable[EnqueueResult]],
    ) -> EnqueueResult:
        """Run `enqueue` (a coroutine function: `JobQueue.enqueue_on_loop`
        runs what it can on the loop, the rest in a store thread) with the
        offer of an idle stream's credit when one would take a job of this
        priority and kind: the enqueue then claims a job for that stream,
        which gets it right after the claim commits, without waiting for a
        claim round. The enqueue runs to its end, and the offer is settled,
        however the call ends: a caller that goes away meanwhile does not
        strand the lease."""
        hand_off = self._offer(priority, kind)
        call = asyncio.ensure_future(enqueue(hand_off=hand_off))
        # The settling first, then the caller's callback: the worker's
        # assignment is under way before the caller resumes to send its reply.
        if hand_off is not None:
            call.add_done_callback(functools.partial(self._settle, hand_off, self._rounds))
        return await asyncio.shield(call)

    def _offer(self, priority: int, kind: JobKind) -> HandOff | None:
        """A credit of the stream a round would serve first among those that
        take such a job: a dedicated lane (higher minimum priority) before
        shared streams, then the most credits."""
        if self.paused or self._claims_in_flight:
            # A round's claim under way planned the free credits: an offer
            # could take one from under it (its job then handed back).
            return None
        stream: WorkerStream | None = None
        for s in self.streams.values():
            if (
                s.credits > 0
                and not s.draining
                and priority >= s.min_priority
                and (not s.kinds or kind in s.kinds)
                and (
                    stream is None
                    or (s.min_priority, s.credits) > (stream.min_priority, stream.credits)
                )
            ):
                stream = s
        if stream is None:
            return None
        budget = self._system_budget() if stream.min_priority <= SYSTEM else None
        if priority <= SYSTEM and budget == 0:
            return None  # its claim could not take this job (reserved slots)
        # Jobs a dedicated lane with free credits would take are its own: a
        # round serves it first (this job is below its minimum, or the lane
        # would have been offered the credit). A lane that takes every kind
        # the stream does caps the claim below its minimum; one that takes
        # none of them is no matter; one that takes some of them cannot be
        # kept to by a priority bound, and no offer is made.
        ceiling: int | None = None
        for lane in self.streams.values():
            if lane.min_priority <= stream.min_priority or lane.credits <= 0 or lane.draining:
                continue
            if not lane.kinds or (stream.kinds and set(stream.kinds) <= set(lane.kinds)):
                bound = lane.min_priority - 1
                ceiling = bound if ceiling is None else min(ceiling, bound)
            elif not stream.kinds or set(stream.kinds) & set(lane.kinds):
                return None
        stream.set_aside()
        return HandOff(
            stream_id=stream.stream_id,
            worker=stream.worker_id,
            min_priority=stream.min_priority,
            kinds=stream.kinds,
            system_limit=budget,
            max_priority=ceiling,
        )

    def _settle(self, hand_off: HandOff, rounds: int, call: asyncio.Future[EnqueueResult]) -> None:
        """The enqueue offered `hand_off` ended: its lease (if it claimed one)
        goes to the stream, or back to the queue when the stream went away
        meanwhile. An unused credit is the stream's again; if a round ran
        while it was set aside (`rounds` counts them), another looks for the
        work that round may have left for want of it."""
        lease = None
        if not call.cancelled() and call.exception() is None:
            lease = call.result().lease
        stream = self.streams.get(hand_off.stream_id)
        if stream is None or stream.draining:
            if stream is not None:
                stream.settle_aside(None)
            if lease is not None:
                self._give_back([lease.lease_id])
            return
        stream.settle_aside(lease)
        if lease is None:
            if rounds != self._rounds:
                self.wake()
            return
        self._deliver(stream, [lease])
        self.on_assigned([lease])

    def wake_threadsafe(self) -> None:
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _new_work_threadsafe(self) -> None:
        self._new_work = True
        self.wake_threadsafe()

    # -- the loop -------------------------------------------------------------

    def revoke_threadsafe(self, lease_id: str, reason: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._revoke, lease_id, reason)

    def _revoke(self, lease_id: str, reason: str) -> None:
        for stream in list(self.streams.values()):
            if stream.revoke(lease_id, reason):
                log.info("lease revoked", extra={"stream": stream.label, "reason": reason})
                self.wake()  # its slot is free
                return

    def stream_with_token(self, worker_id: str, token: str) -> WorkerStream | None:
        """This instance's stream of `worker_id` whose resume token is `token`."""
        for stream in self.streams.values():
            if (
                token
                and stream.worker_id == worker_id
                and secrets.compare_digest(stream.resume_token.encode(), token.encode())
            ):
                return stream
        return None

    def workers(self) -> list[WorkerInfo]:
        """This instance's connected streams."""
        return [s.info(self.queue.instance_id) for s in self.streams.values()]

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.queue.on_lease_revoked(self.revoke_threadsafe)
        self.queue.on_new_work(self._new_work_threadsafe)
        failing = False
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a
            # cancel that arrives together with the wake-up, and a stop would
            # wait forever on this loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()
            if self.paused:
                continue
            try:
                while await self._round():
                    pass
                await self._preempt()
                failing = False
            except asyncio.CancelledError:
                raise
            except RealmError as e:
                # The store is unreachable or busy: say so once, not once per
                # round, and keep trying at the polling pace.
                if not failing:
                    log.warning("dispatch paused; retrying", extra={"error": str(e)})
                failing = True
                await asyncio.sleep(self.poll_seconds)
            except Exception:
                log.exception("dispatch round failed; retrying")
                await asyncio.sleep(0.2)

    async def _round(self) -> bool:
        """One claim per stream filter; True if another round may find more:
        some claim was given all it asked for. A claim given less took all
        it could then: work that becomes claimable later (an enqueue, a
        finished job of a busy realm, another instance's claim that left
        rows) wakes this loop, and a round right after it would find nothing
        more. A job passed over because another transaction held its row (a
        write merging into it, a cancel) is announced by nobody: the next
        poll (`poll_seconds`) takes it, as a round right after would mostly
        not have (that transaction is still open)."""
        self._rounds += 1
        ready = [s for s in self.streams.values() if s.credits > 0 and not s.draining]
        if not ready:
            return False
        groups: dict[tuple[tuple[JobKind, ...], int], list[WorkerStream]] = {}
        for s in ready:
            groups.setdefault((s.kinds, s.min_priority), []).append(s)
        more = False
        # Dedicated lanes (higher minimum priority) pick first: they can take
        # nothing else, while shared streams can.
        for (kinds, min_priority), members in sorted(groups.items(), key=lambda g: -g[0][1]):
            plan = _plan(members)
            self._claims_in_flight += 1
            try:
                leases = await self.queue.claim_async(
                    len(plan),
                    worker=[s.worker_id for s in plan],
                    min_priority=min_priority,
                    kinds=list(kinds) or None,
                    system_limit=self._system_budget() if min_priority <= SYSTEM else None,
                )
            finally:
                self._claims_in_flight -= 1
            if leases:
                self._distribute(members, leases, plan)
                more = more or len(leases) >= len(plan)
        return more

    async def _preempt(self) -> None:
        """Hand back SYSTEM jobs for waiting jobs of users that no free slot
        would take (see the module's docstring). One read of the queue per
        stream filter holding SYSTEM jobs when new work was announced, at
        most every PREEMPT_CHECK_SECONDS; a wake-up in between is answered
        once that pause ends. Without new work it looks again after
        PREEMPT_RECHECK_SECONDS (a job that was waiting for its realm)."""
        cap = self.queue.settings.max_preemptions
        if cap <= 0:
            return
        victims = [
            (s, lease)
            for s in self.streams.values()
            if not s.draining
            for lease in s.outstanding.values()
            if lease.job.priority <= SYSTEM
            and lease.preemptions < cap
            and lease.lease_id not in s.finishing
        ]
        if not victims:
            return
        now = time.monotonic()
        if not self._new_work and now - self._preempt_checked < PREEMPT_RECHECK_SECONDS:
            return  # nothing new waits; the poll brings the next look
        pause = self._preempt_checked + PREEMPT_CHECK_SECONDS - now
        if pause > 0:
            if self._preempt_later is None and self._loop is not None:
                self._preempt_later = self._loop.call_later(pause, self._wake_after_pause)
            return
        self._preempt_checked = now
        self._new_work = False
        self._preempted_for = {
            job_id: at
            for job_id, at in self._preempted_for.items()
            if now - at < PREEMPT_PENDING_SECONDS
        }
        for kinds, min_priority in {(s.kinds, s.min_priority) for s, _ in victims}:
            waiting = await asyncio.to_thread(
                self.queue.first_waiting,
                min_priority=max(USER, min_priority),
                kinds=list(kinds) or None,
            )
            if waiting is None or waiting.job_id in self._preempted_for:
                continue
            if any(
                s.credits + s.aside + len(s.finishing) > 0 and not s.draining and s.accepts(waiting)
                for s in self.streams.values()
            ):
                # A free slot takes it in the next round, or a hand-off under
                # way (its claim takes the best job in line) or the round
                # after it; so does a slot whose job's result is being
                # recorded (its worker grants it again right after).
                continue
            held = [
                (s, lease)
                for s, lease in victims
                if s.accepts(waiting)
                and s.holds(lease.lease_id)
                and lease.lease_id not in s.finishing
            ]
            if not held:
                continue
            # The least progress (the share of its work done); of equals, the
            # job that started last (its claim's time).
            stream, lease = min(
                held,
                key=lambda h: (
                    h[0].progress.get(h[1].lease_id, 0.0),
                    -(h[1].job.start_time or _EPOCH).timestamp(),
                ),
            )
            reason = preemption_reason(waiting.job_id, waiting.priority)
            preempted = await asyncio.to_thread(
                self.queue.preempt, lease.lease_id, reason, for_job=waiting.job_id
            )
            if preempted is None:
                continue  # it ended meanwhile, or a claim took the waiting job
            self._preempted_for[waiting.job_id] = now
            stream.revoke(lease.lease_id, reason, requeued=True)
            victims = [(s, v) for s, v in victims if v.lease_id != lease.lease_id]

    def preempted_for(self, job_id: int) -> bool:
        """Whether a SYSTEM job was preempted here for this waiting job in
        the last PREEMPT_PENDING_SECONDS (ExplainJob says so)."""
        at = self._preempted_for.get(job_id)
        return at is not None and time.monotonic() - at < PREEMPT_PENDING_SECONDS

    def _wake_after_pause(self) -> None:
        self._preempt_later = None
        self.wake()

    def system_budget(self) -> int:
        """SYSTEM jobs this instance's streams may take now (reserved slots)."""
        return self._system_budget()

    def _system_budget(self) -> int:
        # One pass over the streams, and no look into those that hold no
        # lease: every enqueue offered a hand-off asks, on the event loop,
        # and an instance may serve a thousand idle streams.
        slots = busy = 0
        for s in self.streams.values():
            if s.draining or s.min_priority > SYSTEM:
                continue
            # A hand-off under way may take a SYSTEM job: counted as one.
            slots += s.credits + s.aside
            busy += s.aside
            if s.outstanding:
                slots += s.busy_slots
                busy += s.system_running
        allowed = slots - self.reserved_slots if slots > self.reserved_slots else min(slots, 1)
        return max(0, allowed - busy)

    def _distribute(
        self, members: list[WorkerStream], leases: list[Lease], plan: list[WorkerStream]
    ) -> None:
        """Hand the leases out as planned (the store recorded each one's
        worker by the plan); a stream that went away or ran out of credits
        meanwhile is replaced by the one with most credits left."""
        batches: dict[str, list[Lease]] = {s.stream_id: [] for s in members}
        live = [s for s in members if s.stream_id in self.streams]
        pending = list(leases)
        planned = list(plan)
        while pending and live:
            target = planned.pop(0) if planned else live[0]
            if target.stream_id not in self.streams or target.credits <= 0:
                live.sort(key=lambda s: -s.credits)
                target = live[0]
            if target.credits <= 0:
                break
            lease = pending.pop(0)
            target.assign(lease)
            batches[target.stream_id].append(lease)
        if pending:  # every stream went away meanwhile: give the jobs back at once
            self._give_back([p.lease_id for p in pending])
        for s in live:
            batch = batches[s.stream_id]
            if batch:
                self._deliver(s, batch)
        self.on_assigned(leases)

    def _give_back(self, held: list[str]) -> None:
        """Release leases claimed for streams that went away, in the background."""
        release = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.queue.release, held, "no stream")
        )
        release.add_done_callback(functools.partial(release_failed, self.queue, held, "no stream"))

    @staticmethod
    def _deliver(stream: WorkerStream, batch: list[Lease]) -> None:
        stream.deliver(batch)
        if log.isEnabledFor(logging.INFO):
            # One record, one line per job (realm_common.logs).
            log.info(
                "job running",
                extra={"each": [lease_fields(lease) for lease in batch],
                       "worker": stream.worker_id, "stream": stream.label},
            )  # fmt: skip
