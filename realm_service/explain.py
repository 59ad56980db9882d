"""ExplainJob: why a job is where it is, from the store and the live streams.

A queued job's reasons come from its place in the claim order (the store),
its realm's running job (the store), and the workers connected to every
instance (this dispatcher's streams, and on PostgreSQL the presence rows
other instances publish): lanes, credits, the reserved slots, a drain.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from datetime import datetime

from realm_service.dispatcher import Dispatcher
from realm_service.domain import (
    SYSTEM,
    Attempt,
    Job,
    JobState,
    WorkerInfo,
)
from realm_service.queue import JobQueue


class WaitCode(enum.Enum):
    JOBS_AHEAD = "jobs-ahead"
    REALM_BUSY = "realm-busy"
    NO_WORKERS = "no-workers"
    NO_MATCHING_WORKER = "no-matching-worker"
    RESERVED_SLOTS = "reserved-slots"
    ALL_SLOTS_BUSY = "all-slots-busy"
    DRAINING = "draining"


@dataclass(frozen=True)
class WaitReason:
    code: WaitCode
    message: str


@dataclass(frozen=True)
class Running:
    worker: str
    stream_id: str
    instance_id: str
    lease_expire_time: datetime | None
    last_heartbeat_time: datetime | None


@dataclass(frozen=True)
class Explanation:
    job: Job
    summary: str
    reasons: tuple[WaitReason, ...] = ()
    jobs_ahead: int = 0
    ahead: tuple[Job, ...] = ()
    running: Running | None = None
    attempts: tuple[Attempt, ...] = ()


async def explain(
    queue: JobQueue, dispatcher: Dispatcher, job_id: int, *, draining: bool
) -> Explanation:
    """Store reads in a worker thread; the streams are read on the event
    loop, which owns them."""
    job, attempts, place, lease = await asyncio.to_thread(queue.explain_reads, job_id)
    if job.state is JobState.QUEUED and place is not None:
        others = await asyncio.to_thread(queue.other_instances_workers)
        workers = [*dispatcher.workers(), *others]
        reasons = _queued_reasons(job, place.ahead, place.first_ahead, place.realm_running)
        reasons += _worker_reasons(job, workers, dispatcher, draining)
        summary = (
            "; ".join(r.message for r in reasons)
            if reasons
            else "it is next in line and starts as soon as a slot takes it"
        )
        return Explanation(
            job,
            f"Job {job.job_id} is queued: {summary}.",
            tuple(reasons),
            place.ahead,
            place.first_ahead,
            attempts=tuple(attempts),
        )
    if job.state is JobState.RUNNING:
        stream = next(
            (
                s
                for s in dispatcher.streams.values()
                if any(lease.job.job_id == job.job_id for lease in s.outstanding.values())
            ),
            None,
        )
        expire = lease.lease_expire_time if lease else None
        beat = expire - queue.settings.lease_duration if expire is not None else None
        running = Running(
            worker=stream.worker_id if stream else (lease.worker if lease else ""),
            stream_id=stream.stream_id if stream else "",
            instance_id=lease.instance_id if lease else "",
            lease_expire_time=expire,
            last_heartbeat_time=beat,
        )
        progress = (
            f"{job.progress_done}/{job.progress_total} files"
            if job.progress_total
            else "no progress reported yet"
        )
        broke = ""
        if lease is not None and lease.detached and expire is not None:
            broke = (
                f"; its stream broke, and the worker has until {expire.isoformat()} to "
                "re-attach it before it is queued again"
            )
        return Explanation(
            job,
            f"Job {job.job_id} is running on worker {running.worker} "
            f"(attempt {job.attempt}, {progress}){broke}.",
            running=running,
            attempts=tuple(attempts),
        )
    ended = {
        JobState.SUCCEEDED: "succeeded",
        JobState.FAILED: "failed",
        JobState.CANCELLED: "was cancelled",
    }.get(job.state, job.state.value)
    tail = f": {job.error_message}" if job.error_message else ""
    return Explanation(
        job,
        f"Job {job.job_id} {ended} after {len(attempts)} attempt(s){tail}.",
        attempts=tuple(attempts),
    )


def _queued_reasons(
    job: Job, ahead: int, first: tuple[Job, ...], realm_running: Job | None
) -> list[WaitReason]:
    reasons: list[WaitReason] = []
    if ahead:
        head = first[0]
        reasons.append(
            WaitReason(
                WaitCode.JOBS_AHEAD,
                f"{ahead} queued job(s) come first (higher priority, or as high and older); "
                f"the first is job {head.job_id} of realm {head.realm_id} at priority "
                f"{head.priority}",
            )
        )
    if realm_running is not None:
        reasons.append(
            WaitReason(
                WaitCode.REALM_BUSY,
                f"job {realm_running.job_id} of the same realm is running "
                f"(a realm runs one job at a time)",
            )
        )
    return reasons


def _worker_reasons(
    job: Job, workers: list[WorkerInfo], dispatcher: Dispatcher, draining: bool
) -> list[WaitReason]:
    if draining:
        return [WaitReason(WaitCode.DRAINING, "this server is draining and assigns nothing")]
    if not workers:
        return [WaitReason(WaitCode.NO_WORKERS, "no worker is connected")]
    matching = [
        w
        for w in workers
        if job.priority >= w.min_priority and (not w.kinds or job.kind in w.kinds)
    ]
    if not matching:
        lanes = sorted(
            {
                f"priority >= {w.min_priority}"
                + (f" ({', '.join(k.value for k in w.kinds)})" if w.kinds else "")
                for w in workers
            }
        )
        return [
            WaitReason(
                WaitCode.NO_MATCHING_WORKER,
                f"no connected worker takes a {job.kind.value} job at priority {job.priority}; "
                f"the lanes are: {'; '.join(lanes)}",
            )
        ]
    free = sum(w.credits for w in matching)
    if free == 0:
        slots = sum(w.jobs_held for w in matching)
        handed_back = (
            "; a SYSTEM job was preempted for it: it takes that slot once the worker gives it back"
            if dispatcher.preempted_for(job.job_id)
            else ""
        )
        return [
            WaitReason(
                WaitCode.ALL_SLOTS_BUSY,
                f"every slot of the {len(matching)} worker stream(s) that would take it is "
                f"busy ({slots} job(s) held){handed_back}",
            )
        ]
    if job.priority <= SYSTEM and dispatcher.system_budget() == 0:
        return [
            WaitReason(
                WaitCode.RESERVED_SLOTS,
                f"{dispatcher.reserved_slots} slot(s) are kept free for user work, and SYSTEM "
                f"jobs hold the rest ({free} slot(s) free)",
            )
        ]
    return []
