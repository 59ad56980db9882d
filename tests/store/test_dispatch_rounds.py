"""The dispatcher's rounds: a claim given all it asked for may leave more
behind, so another round follows; one given less took all that was
claimable, and the loop waits for word of new work instead of claiming for
nothing."""

from __future__ import annotations

import asyncio

from store_helpers import FakeClock, make_realm

from realm_service.dispatcher import Dispatcher, WorkerStream
from realm_service.domain import USER, JobKind, JobState, Lease
from realm_service.queue import JobQueue


def _stream(credits: int, got: list[Lease]) -> WorkerStream:
    stream = WorkerStream(
        worker_id="w", incarnation_id="i", kinds=(), min_priority=0, deliver=got.extend
    )
    stream.grant(credits)
    return stream


def test_a_round_given_less_than_it_asked_is_the_last(queue: JobQueue, clock: FakeClock) -> None:
    for name in ("a", "b"):
        make_realm(queue, name)
        clock.advance(1)
        queue.enqueue(name, JobKind.FROM_SCRATCH, USER)
    got: list[Lease] = []
    dispatcher = Dispatcher(queue, reserved_slots=0)
    dispatcher.add(_stream(3, got))
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
    stream = _stream(2, got)
    dispatcher.add(stream)
    assert asyncio.run(dispatcher._round()) is True
    assert [lease.job.realm_id for lease in got] == ["a", "b"]
    stream.grant(2)
    assert asyncio.run(dispatcher._round()) is False
    assert [lease.job.realm_id for lease in got] == ["a", "b", "c"]
