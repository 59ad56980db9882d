"""The dispatcher's rounds: a claim given all it asked for may leave more
behind, so another round follows; one given less took all that was
claimable, and the loop waits for word of new work instead of claiming for
nothing."""

from __future__ import annotations

import asyncio
import gc

import pytest
from store_helpers import FakeClock, make_realm, waiting_stream

from realm_service.dispatcher import Dispatcher
from realm_service.domain import USER, JobKind, JobState, Lease
from realm_service.errors import StoreFull
from realm_service.queue import JobQueue


def test_a_round_given_less_than_it_asked_is_the_last(queue: JobQueue, clock: FakeClock) -> None:
    for name in ("a", "b"):
        make_realm(queue, name)
        clock.advance(1)
        queue.enqueue(name, JobKind.FROM_SCRATCH, USER)
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    dispatcher.add(waiting_stream(3, got))
    assert asyncio.run(dispatcher._round()) is False
    assert [lease.job.realm_id for lease in got] == ["a", "b"]
    assert all(lease.job.state is JobState.RUNNING for lease in got)


def test_a_round_given_all_it_asked_may_find_more(queue: JobQueue, clock: FakeClock) -> None:
    for name in ("a", "b", "c"):
        make_realm(queue, name)
        clock.advance(1)
        queue.enqueue(name, JobKind.FROM_SCRATCH, USER)
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    stream = waiting_stream(2, got)
    dispatcher.add(stream)
    assert asyncio.run(dispatcher._round()) is True
    assert [lease.job.realm_id for lease in got] == ["a", "b"]
    stream.grant(2)
    assert asyncio.run(dispatcher._round()) is False
    assert [lease.job.realm_id for lease in got] == ["a", "b", "c"]


def test_jobs_claimed_for_streams_gone_meanwhile_wait_for_the_reaper_if_the_store_refuses(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stream went away while its jobs were claimed: they go back at
    once, in the background. With the disk full, the release fails; the
    leases are kept for the reaper (released when the store takes writes
    again), and the failure is handled, not left in an unwatched task."""
    make_realm(queue, "a")
    queue.enqueue("a", JobKind.FROM_SCRATCH, USER)
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    stream = waiting_stream(1, got)
    dispatcher.add(stream)
    leases = queue.claim(1, worker="w")
    dispatcher.remove(stream)

    def disk_full(*_: object) -> None:
        raise StoreFull("the store's disk is full (disk full): writes cannot commit")

    monkeypatch.setattr(queue, "release", disk_full)
    unhandled: list[dict[str, object]] = []

    async def distribute() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: unhandled.append(ctx))
        dispatcher._distribute([stream], leases, [stream])
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not any(t is not asyncio.current_task() for t in asyncio.all_tasks()):
                break
        gc.collect()

    asyncio.run(distribute())
    assert got == [] and unhandled == []
    monkeypatch.undo()
    [job] = queue.release_deferred()
    assert (job.job_id, job.state) == (leases[0].job.job_id, JobState.QUEUED)
