"""The lease ledger of a stream (dispatcher.WorkerStream): what it holds,
how far its jobs are, and credits."""

from __future__ import annotations

from datetime import UTC, datetime

from realm_service.dispatcher import WorkerStream, _plan
from realm_service.domain import SYSTEM, Job, JobKind, JobState, Lease

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def lease(lease_id: str, done: int, total: int) -> Lease:
    job = Job(
        job_id=1,
        realm_id="r",
        kind=JobKind.FROM_SCRATCH,
        priority=SYSTEM,
        state=JobState.RUNNING,
        attempt=1,
        create_time=NOW,
        progress_done=done,
        progress_total=total,
    )
    return Lease(lease_id=lease_id, job=job, expire_time=NOW)


def test_an_adopted_lease_keeps_its_recorded_progress_and_uses_no_credit() -> None:
    """A lease re-attached from a broken stream is as far on as its job was
    recorded: preemption, which spares the jobs furthest on, sees that, not
    a job just started."""
    stream = WorkerStream(
        worker_id="w", incarnation_id="i", kinds=(), min_priority=0, deliver=lambda leases: None
    )
    stream.adopt(lease("far", 9, 10))
    stream.adopt(lease("new", 0, 0))
    assert stream.holds("far") and stream.holds("new")
    assert stream.progress == {"far": 0.9, "new": 0.0}
    assert stream.credits == 0
    stream.drop("far")
    assert stream.progress == {"new": 0.0}


def test_a_credit_set_aside_is_settled_as_a_lease_or_given_back() -> None:
    """A hand-off sets a free credit aside; it becomes the lease's, or free
    again. Either way the stream never holds more than it was granted."""
    stream = WorkerStream(
        worker_id="w", incarnation_id="i", kinds=(), min_priority=0, deliver=print
    )
    stream.grant(2)
    stream.set_aside()
    stream.set_aside()
    assert (stream.credits, stream.aside, stream.held_leases) == (0, 2, 0)
    stream.settle_aside(lease("l1", 0, 0))
    stream.settle_aside(None)
    assert (stream.credits, stream.aside, stream.held_leases) == (1, 0, 1)
    assert stream.holds("l1")
    assert stream.info("instance").credits == 1


def _stream(name: str, credits: int) -> WorkerStream:
    stream = WorkerStream(
        worker_id=name, incarnation_id="i", kinds=(), min_priority=0, deliver=lambda leases: None
    )
    stream.grant(credits)
    return stream


def test_a_claim_plan_spreads_jobs_over_streams_with_as_many_credits() -> None:
    a, b = _stream("a", 3), _stream("b", 3)
    assert [s.worker_id for s in _plan([a, b])] == ["a", "b", "a", "b", "a", "b"]
    c = _stream("c", 1)
    assert [s.worker_id for s in _plan([a, c, b])][:2] == ["a", "b"]


def test_a_claim_plan_fills_a_stream_before_handing_a_crumb_to_another() -> None:
    """A stream holding a batch with its reserved slot free (one credit) is
    planned after a stream whose whole batch is free, even at the tie: a
    claim cut short by the SYSTEM budget (64 here) then fills the free
    stream's batch and sends the other no single job."""
    holding, free = _stream("holding", 1), _stream("free", 64)
    plan = _plan([holding, free])
    assert len(plan) == 65
    assert {s.worker_id for s in plan[:64]} == {"free"}
    assert plan[64].worker_id == "holding"
