"""Hand-offs: an enqueue made while a stream waits for work claims a job for
that stream, in its transaction or right after its insert committed
(Dispatcher.enqueue, JobQueue.enqueue's `hand_off`). The claim's own order
picks the job, the reserved slots and the stream's filter hold as in a round,
and the credit set aside for it is settled however the enqueue ends."""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import pytest
from store_helpers import FakeClock, make_realm, waiting_stream, woken_calls

from realm_service.dispatcher import Dispatcher
from realm_service.domain import (
    SYSTEM,
    USER,
    Disposition,
    EnqueueResult,
    HandOff,
    JobKind,
    JobState,
    Lease,
)
from realm_service.errors import RealmNotFound
from realm_service.queue import JobQueue


@pytest.fixture(params=["shared store", "one instance"])
def queue(queue: JobQueue, request: pytest.FixtureRequest) -> JobQueue:
    """Each test twice: as when other instances may claim too, and as one
    instance alone, whose claims of one job are one statement on PostgreSQL
    (the candidate read and the writes fused)."""
    queue.db.others_alive = request.param == "shared store"
    return queue


def _offer(system_limit: int | None = None, min_priority: int = 0) -> HandOff:
    return HandOff(
        stream_id="s", worker="w", min_priority=min_priority, kinds=(), system_limit=system_limit
    )


def test_an_enqueue_offered_a_stream_starts_its_own_job(queue: JobQueue) -> None:
    make_realm(queue, "a")
    woken = woken_calls(queue)
    result = queue.enqueue("a", JobKind.FROM_SCRATCH, USER, hand_off=_offer())
    assert result.disposition is Disposition.INSERTED
    assert result.lease is not None and result.lease.job.job_id == result.job.job_id
    assert (result.job.state, result.job.worker, result.job.attempt) == (JobState.RUNNING, "w", 1)
    stored = queue.get_job(result.job.job_id)
    assert (stored.state, stored.worker) == (JobState.RUNNING, "w")
    assert [outcome for _, outcome in queue.attempts(stored.job_id)] == ["running"]
    if queue.db.others_alive and queue.db.backend == "postgresql":
        # Its insert committed first, announcing the job, and the claim
        # followed (JobQueue._hand_off_after): this process's dispatcher was
        # woken for the job, which a round may take first (not here: no
        # stream).
        assert woken
    else:
        # The work it announced was taken in the same unit of work: nobody
        # is woken to look for it.
        assert woken == []
    assert queue.claim(5, worker="other") == []


def test_the_claims_order_picks_the_job_ahead_of_the_enqueued_one(
    queue: JobQueue, clock: FakeClock
) -> None:
    for name in ("first", "later"):
        make_realm(queue, name)
    ahead = queue.enqueue("first", JobKind.FROM_SCRATCH, USER + 10).job
    clock.advance(1)
    woken = woken_calls(queue)
    result = queue.enqueue("later", JobKind.FROM_SCRATCH, USER, hand_off=_offer())
    assert result.lease is not None and result.lease.job.job_id == ahead.job_id
    assert result.job.state is JobState.QUEUED  # the enqueued job still waits
    assert woken == [1]  # and the dispatcher is told of it
    [lease] = queue.claim(5, worker="other")
    assert lease.job.job_id == result.job.job_id


def test_no_claim_when_the_enqueue_left_no_queued_job(queue: JobQueue) -> None:
    make_realm(queue, "a")
    queue.enqueue("a", JobKind.FROM_SCRATCH, USER)
    [running] = queue.claim(1, worker="w")
    # A reindex that does not say the content changed attaches to the
    # running job: nothing is queued, nothing is claimed.
    attached = queue.enqueue("a", JobKind.FROM_SCRATCH, USER, hand_off=_offer())
    assert (attached.disposition, attached.lease) == (Disposition.ATTACHED, None)
    # One that does queues a rerun, which waits for the running job.
    rerun = queue.enqueue("a", JobKind.FROM_SCRATCH, USER, content_changed=True, hand_off=_offer())
    assert rerun.disposition is Disposition.RERUN_SCHEDULED
    assert rerun.lease is None and rerun.job.state is JobState.QUEUED
    assert queue.get_job(running.job.job_id).state is JobState.RUNNING


def test_a_hand_off_keeps_the_reserved_slots(queue: JobQueue) -> None:
    make_realm(queue, "a")
    # No SYSTEM budget left: a SYSTEM job is enqueued, not started.
    result = queue.enqueue("a", JobKind.FROM_SCRATCH, SYSTEM, hand_off=_offer(system_limit=0))
    assert result.lease is None and result.job.state is JobState.QUEUED
    # With a budget, the first SYSTEM job in line starts.
    make_realm(queue, "b")
    second = queue.enqueue("b", JobKind.FROM_SCRATCH, SYSTEM, hand_off=_offer(system_limit=1))
    assert second.lease is not None and second.lease.job.job_id == result.job.job_id
    assert second.job.state is JobState.QUEUED


def test_the_dispatcher_hands_the_lease_to_the_waiting_stream(queue: JobQueue) -> None:
    make_realm(queue, "a")
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    stream = waiting_stream(2, got)
    dispatcher.add(stream)
    assigned: list[Lease] = []
    dispatcher.on_assigned = assigned.extend

    async def reindex() -> None:
        result = await dispatcher.enqueue(
            USER,
            JobKind.FROM_SCRATCH,
            functools.partial(queue.enqueue_on_loop, "a", JobKind.FROM_SCRATCH, USER),
        )
        assert result.lease is not None
        assert got == [result.lease] == assigned
        assert stream.holds(result.lease.lease_id) and stream.credits == 1

    asyncio.run(reindex())


def test_no_offer_to_a_stream_whose_filter_refuses_the_job(queue: JobQueue) -> None:
    make_realm(queue, "a")
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    stream = waiting_stream(1, got, min_priority=USER + 1)
    dispatcher.add(stream)

    async def reindex() -> None:
        result = await dispatcher.enqueue(
            USER,
            JobKind.FROM_SCRATCH,
            functools.partial(queue.enqueue_on_loop, "a", JobKind.FROM_SCRATCH, USER),
        )
        assert result.lease is None and result.job.state is JobState.QUEUED
        assert got == [] and stream.credits == 1

    asyncio.run(reindex())


def test_a_failed_enqueue_gives_the_credit_back(queue: JobQueue) -> None:
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    stream = waiting_stream(1, got)
    dispatcher.add(stream)

    async def reindex() -> None:
        with pytest.raises(RealmNotFound):
            await dispatcher.enqueue(
                USER,
                JobKind.FROM_SCRATCH,
                functools.partial(queue.enqueue_on_loop, "missing", JobKind.FROM_SCRATCH, USER),
            )
        assert stream.credits == 1 and got == []

    asyncio.run(reindex())


def test_a_lease_for_a_stream_gone_meanwhile_goes_back_to_the_queue(queue: JobQueue) -> None:
    make_realm(queue, "a")
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    stream = waiting_stream(1, got)
    dispatcher.add(stream)

    async def enqueue_while_the_stream_closes(**kw: HandOff | None) -> EnqueueResult:
        dispatcher.remove(stream)
        return await queue.enqueue_on_loop("a", JobKind.FROM_SCRATCH, USER, **kw)  # type: ignore[arg-type]

    async def reindex() -> int:
        result = await dispatcher.enqueue(
            USER, JobKind.FROM_SCRATCH, enqueue_while_the_stream_closes
        )
        assert result.lease is not None
        for _ in range(1000):  # the release runs in the background
            await asyncio.sleep(0.01)
            if queue.get_job(result.job.job_id).state is JobState.QUEUED:
                break
        return result.job.job_id

    job_id = asyncio.run(reindex())
    assert got == []
    job = queue.get_job(job_id)
    assert job.state is JobState.QUEUED
    assert [outcome for _, outcome in queue.attempts(job_id)] == ["interrupted"]


def test_a_caller_that_goes_away_does_not_strand_the_lease(queue: JobQueue) -> None:
    make_realm(queue, "a")
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    stream = waiting_stream(1, got)
    dispatcher.add(stream)

    async def reindex_and_hang_up() -> None:
        call = asyncio.ensure_future(
            dispatcher.enqueue(
                USER,
                JobKind.FROM_SCRATCH,
                functools.partial(queue.enqueue_on_loop, "a", JobKind.FROM_SCRATCH, USER),
            )
        )
        await asyncio.sleep(0)  # the enqueue is under way
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(1000):
            if got:
                break
            await asyncio.sleep(0.01)

    asyncio.run(reindex_and_hang_up())
    [lease] = got
    assert stream.holds(lease.lease_id)
    assert queue.get_job(lease.job.job_id).state is JobState.RUNNING


def test_hand_offs_under_way_keep_the_reserved_slot(queue: JobQueue) -> None:
    """Two SYSTEM reindexes at once, one stream with two credits and one slot
    reserved: as in a round, one SYSTEM job starts and the other waits."""
    for name in ("a", "b"):
        make_realm(queue, name)
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=1)
    stream = waiting_stream(2, got)
    dispatcher.add(stream)

    async def storm() -> list[EnqueueResult]:
        return list(
            await asyncio.gather(
                *(
                    dispatcher.enqueue(
                        SYSTEM,
                        JobKind.FROM_SCRATCH,
                        functools.partial(
                            queue.enqueue_on_loop, name, JobKind.FROM_SCRATCH, SYSTEM
                        ),
                    )
                    for name in ("a", "b")
                )
            )
        )

    results = asyncio.run(storm())
    # Which of the two starts depends on which transaction commits first.
    assert len(got) == 1 and stream.system_running == 1
    assert (stream.credits, stream.aside) == (1, 0)
    states = [queue.get_job(r.job.job_id).state for r in results]
    assert sorted(states) == [JobState.QUEUED, JobState.RUNNING]


def test_no_hand_off_while_a_rounds_claim_is_under_way(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round's claim planned the stream's free credits: a hand-off made
    meanwhile would take one from under it, and the round's older job would
    go back to the queue while a newer one starts."""
    for name in ("older", "newer"):
        make_realm(queue, name)
    older = queue.enqueue("older", JobKind.FROM_SCRATCH, USER).job
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    stream = waiting_stream(1, got)
    dispatcher.add(stream)
    claiming, go_on = threading.Event(), threading.Event()

    def slow_claim(*args: Any, **kwargs: Any) -> list[Lease]:
        claiming.set()
        assert go_on.wait(10)
        return queue.claim(*args, **kwargs)

    async def claim_in_thread(*args: Any, **kwargs: Any) -> list[Lease]:
        # The round's claim in a store thread (as on PostgreSQL, or on SQLite
        # when another unit holds the writes' turn), held there a while.
        return await asyncio.to_thread(slow_claim, *args, **kwargs)

    monkeypatch.setattr(queue, "claim_async", claim_in_thread)

    async def round_and_reindex() -> EnqueueResult:
        round_ = asyncio.ensure_future(dispatcher._round())
        assert await asyncio.to_thread(claiming.wait, 10)
        reindex = asyncio.ensure_future(
            dispatcher.enqueue(
                USER,
                JobKind.FROM_SCRATCH,
                functools.partial(queue.enqueue_on_loop, "newer", JobKind.FROM_SCRATCH, USER),
            )
        )
        result = await reindex
        go_on.set()
        await round_
        return result

    result = asyncio.run(round_and_reindex())
    assert result.lease is None and result.job.state is JobState.QUEUED
    assert [lease.job.job_id for lease in got] == [older.job_id]
    assert [outcome for _, outcome in queue.attempts(older.job_id)] == ["running"]


def test_a_hand_off_leaves_a_dedicated_lanes_jobs_to_it(queue: JobQueue) -> None:
    """A lane (minimum priority 80) and a shared stream each have a credit; a
    job at 90 waits for the next round. A SYSTEM reindex is offered the
    shared stream's credit, and its claim must not take the lane's job."""
    for name in ("urgent", "routine"):
        make_realm(queue, name)
    urgent = queue.enqueue("urgent", JobKind.FROM_SCRATCH, 90).job
    lane_got: list[Lease] = []
    shared_got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    dispatcher.add(waiting_stream(1, lane_got, min_priority=80))
    dispatcher.add(waiting_stream(1, shared_got))

    async def reindex() -> EnqueueResult:
        return await dispatcher.enqueue(
            SYSTEM,
            JobKind.FROM_SCRATCH,
            functools.partial(queue.enqueue_on_loop, "routine", JobKind.FROM_SCRATCH, SYSTEM),
        )

    result = asyncio.run(reindex())
    assert [lease.job.job_id for lease in shared_got] == [result.job.job_id]
    assert queue.get_job(urgent.job_id).state is JobState.QUEUED
    asyncio.run(dispatcher._round())
    assert [lease.job.job_id for lease in lane_got] == [urgent.job_id]


def test_no_hand_off_past_a_lane_that_takes_some_of_the_streams_kinds(queue: JobQueue) -> None:
    """A lane (minimum 50) runs incremental jobs only; a shared stream runs
    every kind. A from-scratch reindex at 60 can go to the shared stream
    only, and a round would give it that job before the older one at 10. A
    bound on priority cannot keep a hand-off to that (it would skip the job
    at 60 and start the one at 10): no hand-off is made, and the round that
    follows gives the job at 60 first."""
    for name in ("older", "hot"):
        make_realm(queue, name)
    queue.enqueue("older", JobKind.FROM_SCRATCH, 10)
    lane_got: list[Lease] = []
    shared_got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    dispatcher.add(
        waiting_stream(1, lane_got, min_priority=50, kinds=(JobKind.INCREMENTAL,), worker_id="lane")
    )
    dispatcher.add(waiting_stream(1, shared_got))

    async def reindex() -> EnqueueResult:
        result = await dispatcher.enqueue(
            60,
            JobKind.FROM_SCRATCH,
            functools.partial(queue.enqueue_on_loop, "hot", JobKind.FROM_SCRATCH, 60),
        )
        await dispatcher._round()
        return result

    result = asyncio.run(reindex())
    assert result.lease is None
    assert [lease.job.job_id for lease in shared_got] == [result.job.job_id]
    assert lane_got == []
