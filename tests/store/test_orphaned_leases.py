"""Who reaps an expired lease, and whether it counts: a server crash, or a
stream that closed while the store was unreachable, is an interruption of the
job, never a failed attempt; only a worker that went silent on a live stream
uses up an attempt."""

from __future__ import annotations

from datetime import timedelta

import pytest
from store_helpers import LEASE, MAX_ATTEMPTS, FakeClock, make_realm

from realm_service.domain import USER, JobKind, JobState
from realm_service.queue import JobQueue, QueueSettings
from realm_service.store.db import Database

FS = JobKind.FROM_SCRATCH
INSTANCE_TIMEOUT = timedelta(seconds=10)


def server(db: Database, clock: FakeClock) -> JobQueue:
    """The queue of one server instance, registered as a server does at start."""
    queue = JobQueue(
        db,
        settings=QueueSettings(
            lease_duration=LEASE, max_attempts=MAX_ATTEMPTS, instance_timeout=INSTANCE_TIMEOUT
        ),
        clock=clock,
    )
    queue.register_instance()
    return queue


def outcomes(queue: JobQueue, job_id: int) -> list[str]:
    return [outcome for _, outcome in queue.attempts(job_id)]


def counted(db: Database, job_id: int) -> int:
    from realm_service.store.tables import JobRow

    with db.session_for_tests() as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        return row.counted_failures


@pytest.fixture
def first(db: Database, clock: FakeClock) -> JobQueue:
    return server(db, clock)


def test_crashed_servers_leases_are_interruptions_however_often(
    db: Database, clock: FakeClock, first: JobQueue
) -> None:
    """The issue's repro in the store: the server holding the lease dies
    (stops refreshing its row) as many times as the attempts cap and more;
    the job is requeued each time and never fails."""
    make_realm(first, "r")
    job = first.enqueue("r", FS, USER).job
    holder = first
    for crash in range(MAX_ATTEMPTS + 1):
        [lease] = holder.claim(1)
        assert lease.job.job_id == job.job_id
        # The holder dies; its successor starts and keeps itself alive.
        successor = server(db, clock)
        clock.advance(LEASE + INSTANCE_TIMEOUT)
        successor.touch_instance()
        [reaped] = successor.reap_expired(held=set())
        assert reaped.state is JobState.QUEUED, f"crash {crash}"
        holder = successor
    assert outcomes(first, job.job_id) == ["interrupted"] * (MAX_ATTEMPTS + 1)
    assert counted(db, job.job_id) == 0
    done = holder.claim(1)[0]
    assert holder.complete(done.lease_id).state is JobState.SUCCEEDED


def test_a_live_instances_expired_leases_are_left_to_it(
    db: Database, clock: FakeClock, first: JobQueue
) -> None:
    """Only the holder knows whether its stream still holds the lease."""
    other = server(db, clock)
    make_realm(first, "r")
    job = first.enqueue("r", FS, USER).job
    [lease] = first.claim(1)
    clock.advance(LEASE + timedelta(seconds=1))
    first.touch_instance()  # alive
    assert other.reap_expired(held=set()) == []
    assert first.get_job(job.job_id).state is JobState.RUNNING
    # The holder itself, whose stream still holds it: the worker went silent.
    [reaped] = first.reap_expired(held={lease.lease_id})
    assert reaped.state is JobState.QUEUED
    assert outcomes(first, job.job_id) == ["expired"]
    assert counted(db, job.job_id) == 1


def test_own_lease_no_stream_holds_is_an_interruption(
    db: Database, clock: FakeClock, first: JobQueue
) -> None:
    make_realm(first, "r")
    job = first.enqueue("r", FS, USER).job
    first.claim(1)
    clock.advance(LEASE + timedelta(seconds=1))
    [reaped] = first.reap_expired(held=set())
    assert reaped.state is JobState.QUEUED
    assert outcomes(first, job.job_id) == ["interrupted"]
    assert counted(db, job.job_id) == 0


def test_a_deferred_release_is_recorded_later_as_an_interruption(
    db: Database, clock: FakeClock, first: JobQueue
) -> None:
    """A stream that closed while the store was down hands its leases to the
    queue; they are released once the store answers, even if they expired
    meanwhile, and whichever comes first, nothing is counted."""
    make_realm(first, "a")
    make_realm(first, "b")
    a = first.enqueue("a", FS, USER).job
    b = first.enqueue("b", FS, USER).job
    leases = {lease.job.job_id: lease.lease_id for lease in first.claim(2)}
    first.defer_release([leases[a.job_id], leases[b.job_id]], "stream closed")
    # The reaper sees b's lease expired before the release is retried: the
    # deferral makes it an interruption even though this instance is alive.
    clock.advance(LEASE + timedelta(seconds=1))
    reaped = first.reap_expired(held={leases[a.job_id], leases[b.job_id]})
    assert {j.job_id for j in reaped} == {a.job_id, b.job_id}
    assert all(j.state is JobState.QUEUED for j in reaped)
    assert first.release_deferred() == []  # settled by the reap: nothing left
    for job in (a, b):
        assert outcomes(first, job.job_id) == ["interrupted"]
        assert counted(db, job.job_id) == 0


def test_release_deferred_requeues_before_expiry(
    db: Database, clock: FakeClock, first: JobQueue
) -> None:
    make_realm(first, "a")
    a = first.enqueue("a", FS, USER).job
    [lease] = first.claim(1)
    first.defer_release([lease.lease_id], "stream closed")
    [released] = first.release_deferred()
    assert released.job_id == a.job_id and released.state is JobState.QUEUED
    assert first.release_deferred() == []
    assert outcomes(first, a.job_id) == ["interrupted"]


def test_unregistered_instance_is_gone_at_once(
    db: Database, clock: FakeClock, first: JobQueue
) -> None:
    """A server that stopped cleanly deleted its row; any lease it left (its
    release failed) is an interruption without waiting for the timeout."""
    other = server(db, clock)
    make_realm(first, "r")
    job = first.enqueue("r", FS, USER).job
    first.claim(1)
    first.unregister_instance()
    clock.advance(LEASE + timedelta(seconds=1))
    other.touch_instance()
    [reaped] = other.reap_expired(held=set())
    assert reaped.job_id == job.job_id and reaped.state is JobState.QUEUED
    assert outcomes(first, job.job_id) == ["interrupted"]


def test_touch_re_registers_a_forgotten_instance(
    db: Database, clock: FakeClock, first: JobQueue
) -> None:
    """An instance cut off from the store for long is forgotten by the others;
    once it can write again it is back, and its leases are its own again."""
    other = server(db, clock)
    clock.advance(INSTANCE_TIMEOUT * 20 + LEASE * 20)
    other.touch_instance()
    assert other.forget_dead_instances() == 1
    first.touch_instance()
    make_realm(first, "r")
    first.enqueue("r", FS, USER)
    first.claim(1)
    clock.advance(LEASE + timedelta(seconds=1))
    first.touch_instance()
    other.touch_instance()
    assert other.reap_expired(held=set()) == []


def test_crash_reason_names_the_stopped_instance(
    db: Database, clock: FakeClock, first: JobQueue
) -> None:
    from realm_service.store.tables import JobAttemptRow

    make_realm(first, "r")
    job = first.enqueue("r", FS, USER).job
    first.claim(1)
    successor = server(db, clock)
    clock.advance(LEASE + INSTANCE_TIMEOUT)
    successor.touch_instance()
    successor.reap_expired(held=set())
    with db.session_for_tests() as s:
        attempt = s.query(JobAttemptRow).filter_by(job_id=job.job_id).one()
        assert attempt.instance_id == first.instance_id
        assert attempt.error_message == f"server instance {first.instance_id} stopped"
