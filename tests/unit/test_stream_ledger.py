"""The lease ledger of a stream (dispatcher.WorkerStream): what it holds,
how far its jobs are, and credits."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from realm_service.dispatcher import Dispatcher, WorkerStream, _plan
from realm_service.domain import SYSTEM, USER, Job, JobKind, JobState, Lease
from realm_service.queue import JobQueue

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def lease(lease_id: str, done: int, total: int, *, priority: int = SYSTEM) -> Lease:
    job = Job(
        job_id=1,
        realm_id="r",
        kind=JobKind.FROM_SCRATCH,
        priority=priority,
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


def _budget(*streams: WorkerStream, reserved: int = 1) -> int:
    """SYSTEM jobs a claim may take now (the dispatcher's reserved slots)."""
    dispatcher = Dispatcher(cast(JobQueue, None), reserved_slots=reserved)
    for stream in streams:
        dispatcher.streams[stream.stream_id] = stream
    return dispatcher.system_budget()


def test_a_finishing_user_job_leaves_its_slot_reserved_for_users() -> None:
    """Two slots, one reserved, during a storm: one SYSTEM job and one USER
    job run. The USER job ends and its worker grants the slot again while
    the server still records the result: the slot is the reserved one, so a
    claim for the credit may take no SYSTEM job."""
    stream = _stream("w", 2)
    stream.assign(lease("system", 0, 0))
    stream.assign(lease("user", 0, 0, priority=USER))
    assert _budget(stream) == 0
    stream.finish(["user"])
    stream.grant(1)
    assert (stream.busy_slots, stream.system_running, stream.held_leases) == (1, 1, 2)
    assert _budget(stream) == 0
    stream.drop("user")
    assert _budget(stream) == 0


def test_a_finishing_system_job_frees_its_slot_for_the_next_one() -> None:
    """One slot, one reserved (a small fleet runs one SYSTEM job at a time):
    the credit granted for a finished SYSTEM job may take the next one at
    once, while the result is still being recorded."""
    stream = _stream("w", 1)
    stream.assign(lease("system", 0, 0))
    stream.finish(["system"])
    stream.grant(1)
    assert _budget(stream) == 1


def test_a_finishing_lease_is_held_until_dropped() -> None:
    stream = _stream("w", 2)
    stream.assign(lease("a", 0, 0))
    stream.finish(["a", "not-held"])
    assert stream.finishing == {"a"}
    assert stream.holds("a") and stream.held_leases == 1 and stream.busy_slots == 0
    assert stream.revoke("a", "cancelled")
    assert stream.finishing == set()
    stream.assign(lease("b", 0, 0))
    stream.finish(["b"])
    assert stream.drop_all() == ["b"] and stream.finishing == set()


def test_the_system_budget_counts_shared_streams_that_do_not_drain() -> None:
    """Slots of the streams that take SYSTEM work and do not drain: free
    credits, credits set aside for hand-offs and running jobs; of them,
    SYSTEM jobs and hand-offs under way are busy. Idle streams add their
    credits only; a lane above SYSTEM and a draining stream add nothing."""
    holding = _stream("holding", 3)
    holding.assign(lease("system", 0, 0))
    holding.assign(lease("user", 0, 0, priority=USER))
    offered = _stream("offered", 2)
    offered.set_aside()
    idle = [_stream(f"idle-{i}", 0) for i in range(50)]
    lane = _stream("lane", 5)
    lane.min_priority = SYSTEM + 1
    lane.assign(lease("lane-job", 0, 0, priority=USER))
    draining = _stream("draining", 4)
    draining.draining = True
    # Slots 3 + 2 (one reserved), busy: one SYSTEM job, one hand-off.
    assert _budget(holding, offered, *idle, lane, draining) == 3 + 2 - 1 - 2
    assert _budget(holding, offered, *idle, lane, draining, reserved=3) == 3 + 2 - 3 - 2
    holding.finish(["system"])  # its slot is free: no longer busy, nor a slot
    assert _budget(holding, offered, *idle, lane, draining) == 2 + 2 - 1 - 1


def _plan_by_turns(members: list[WorkerStream]) -> list[WorkerStream]:
    """The claim plan's rule as it reads: one credit at a time to the stream
    with the most left; of those with as many left, the one given more in
    the plan, then the group's order."""
    left = [s.credits for s in members]
    given = [0] * len(members)
    plan = []
    while any(n > 0 for n in left):
        i = min(
            (i for i in range(len(members)) if left[i] > 0), key=lambda i: (-left[i], -given[i])
        )
        plan.append(members[i])
        left[i] -= 1
        given[i] += 1
    return plan


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=12), max_size=12))
def test_a_claim_plan_follows_its_rule_turn_by_turn(credits: list[int]) -> None:
    members = [_stream(f"w{i}", n) for i, n in enumerate(credits)]
    assert _plan(members) == _plan_by_turns(members)


def test_a_claim_plan_of_many_idle_streams_takes_them_in_order() -> None:
    members = [_stream(f"idle-{i}", 1) for i in range(1_000)]
    assert _plan(members) == members
    assert _plan([]) == [] and _plan([_stream("none", 0)]) == []
