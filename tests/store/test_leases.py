"""Leases: fencing of every write, attempts and their outcomes, the attempts
cap, release, expiry and the reaper, and where a requeued job goes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from store_helpers import LEASE, MAX_ATTEMPTS, FakeClock, entry, get_realm, index_of, make_realm

from realm_service.domain import (
    SYSTEM,
    USER,
    Disposition,
    Job,
    JobKind,
    JobState,
    Lease,
    PathChange,
    RealmState,
)
from realm_service.errors import StaleLease
from realm_service.queue import JobQueue

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL


def claim_one(queue: JobQueue, job_id: int) -> Lease:
    [lease] = queue.claim(1)
    assert lease.job.job_id == job_id
    return lease


def outcomes(queue: JobQueue, job_id: int) -> list[str]:
    return [outcome for _, outcome in queue.attempts(job_id)]


def stale_leases(queue: JobQueue, clock: FakeClock) -> tuple[Job, dict[str, str]]:
    """A job whose lease history holds one lease per way of going stale."""
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    released = claim_one(queue, job.job_id).lease_id
    queue.release([released])
    failed = claim_one(queue, job.job_id).lease_id
    queue.fail(failed, "boom")
    expired = claim_one(queue, job.job_id).lease_id
    clock.advance(LEASE + timedelta(seconds=1))
    assert [j.job_id for j in queue.reap_expired()] == [job.job_id]
    return queue.get_job(job.job_id), {
        "released": released,
        "failed": failed,
        "expired": expired,
        "unknown": "0" * 32,
        "empty": "",
    }


def test_stale_leases_are_fenced_and_change_nothing(queue: JobQueue, clock: FakeClock) -> None:
    job, stale = stale_leases(queue, clock)
    assert job.state is JobState.QUEUED  # two bad attempts: below the cap
    # A newer attempt holds the job now: stale writes must not touch it.
    current = claim_one(queue, job.job_id)
    queue.add_entries(current.lease_id, [entry("keep.json", "m/A", "Keep")])
    before = (queue.list_jobs(), [queue.attempts(j.job_id) for j in queue.list_jobs()])
    for name, lease_id in stale.items():
        assert queue.heartbeat([lease_id]) == {lease_id: None}, name
        assert queue.heartbeat({lease_id: (5, 9)}) == {lease_id: None}, name
        with pytest.raises(StaleLease):
            queue.add_entries(lease_id, [entry("evil.json", "m/Evil", "Evil")])
        with pytest.raises(StaleLease):
            queue.complete(lease_id)
        with pytest.raises(StaleLease):
            queue.fail(lease_id, "late failure")
        assert queue.release([lease_id]) == []
    after = (queue.list_jobs(), [queue.attempts(j.job_id) for j in queue.list_jobs()])
    assert after == before
    done = queue.complete(current.lease_id, entries_uploaded=1)
    assert done.state is JobState.SUCCEEDED
    assert [e.path for e in index_of(queue, "r")] == ["keep.json"]


def test_a_completed_lease_is_stale(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    lease = claim_one(queue, job.job_id)
    queue.complete(lease.lease_id)
    finished = queue.get_job(job.job_id)
    with pytest.raises(StaleLease):
        queue.complete(lease.lease_id)
    with pytest.raises(StaleLease):
        queue.fail(lease.lease_id, "x")
    assert queue.heartbeat([lease.lease_id]) == {lease.lease_id: None}
    assert queue.release([lease.lease_id]) == []
    assert queue.get_job(job.job_id) == finished
    assert outcomes(queue, job.job_id) == ["completed"]


def test_a_stale_lease_says_how_it_ended(queue: JobQueue, clock: FakeClock) -> None:
    """A worker refused for a stale lease is told why, from the attempt's end:
    its log then names a cancellation, an expiry, a completion."""
    for name in ("done", "cancelled", "expired", "released"):
        make_realm(queue, name)
        queue.enqueue(name, FS, USER)
    claimed = queue.claim(4)
    leases = {lease.job.realm_id: lease.lease_id for lease in claimed}
    jobs = {lease.job.realm_id: lease.job.job_id for lease in claimed}
    queue.complete(leases["done"])
    queue.cancel(jobs["cancelled"], "realm retired")
    queue.release([leases["released"]])
    clock.advance(LEASE.total_seconds() + 1)
    queue.reap_expired()
    with pytest.raises(StaleLease) as raised:
        queue.fail(leases["cancelled"], "x")
    assert raised.value.message.endswith("is not current: cancelled: realm retired")
    assert queue.stale_reasons([*leases.values(), "nope"]) == {
        leases["done"]: f"lease {leases['done']!r} is not current: its job completed",
        leases["cancelled"]: (
            f"lease {leases['cancelled']!r} is not current: cancelled: realm retired"
        ),
        leases["expired"]: f"lease {leases['expired']!r} is not current: it expired",
        leases["released"]: (
            f"lease {leases['released']!r} is not current: its attempt was released as interrupted"
        ),
        "nope": "lease 'nope' is not current: no such lease",
    }
    [refused] = queue.complete_many([(leases["expired"], 0)]).values()
    assert isinstance(refused, StaleLease) and refused.message.endswith("it expired")


def test_a_re_leased_job_fences_the_previous_lease(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    old = claim_one(queue, job.job_id)
    queue.release([old.lease_id])
    new = claim_one(queue, job.job_id)
    assert new.lease_id != old.lease_id
    with pytest.raises(StaleLease):
        queue.complete(old.lease_id)
    assert queue.get_job(job.job_id).state is JobState.RUNNING
    assert queue.complete(new.lease_id).state is JobState.SUCCEEDED


def test_heartbeat_extends_live_leases_and_records_progress(
    queue: JobQueue, clock: FakeClock
) -> None:
    make_realm(queue, "a")
    make_realm(queue, "b")
    ja = queue.enqueue("a", FS, USER).job
    jb = queue.enqueue("b", FS, USER).job
    la, lb = queue.claim(2)
    clock.advance(20)
    beat = queue.heartbeat({la.lease_id: (3, 10), "gone": (1, 1)})
    assert beat == {la.lease_id: clock() + LEASE, "gone": None}
    assert (queue.get_job(ja.job_id).progress_done, queue.get_job(ja.job_id).progress_total) == (
        3,
        10,
    )
    clock.advance(15)  # 35 s after the claim: b expired, a was extended to 50 s
    assert [j.job_id for j in queue.reap_expired()] == [jb.job_id]
    assert queue.get_job(ja.job_id).state is JobState.RUNNING
    assert queue.heartbeat([lb.lease_id]) == {lb.lease_id: None}
    assert queue.heartbeat([la.lease_id]) == {la.lease_id: clock() + LEASE}


def test_attempt_outcomes_are_recorded(queue: JobQueue, clock: FakeClock) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    leases = []
    lease = claim_one(queue, job.job_id)
    leases.append(lease.lease_id)
    queue.release([lease.lease_id], reason="stream closed")
    lease = claim_one(queue, job.job_id)
    leases.append(lease.lease_id)
    queue.fail(lease.lease_id, "parse error")
    lease = claim_one(queue, job.job_id)
    leases.append(lease.lease_id)
    clock.advance(LEASE + timedelta(seconds=1))
    queue.reap_expired()
    lease = claim_one(queue, job.job_id)
    leases.append(lease.lease_id)
    assert queue.attempts(job.job_id) == list(
        zip(leases, ["interrupted", "failed", "expired", "running"], strict=True)
    )
    done = queue.complete(lease.lease_id)
    assert done.attempt == 4
    assert queue.attempts(job.job_id)[-1] == (lease.lease_id, "completed")


def test_release_does_not_count_toward_the_cap(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    for _ in range(MAX_ATTEMPTS * 2):
        released = queue.release([claim_one(queue, job.job_id).lease_id], reason="drain")
        assert [j.state for j in released] == [JobState.QUEUED]
    for _ in range(MAX_ATTEMPTS - 1):
        assert queue.fail(claim_one(queue, job.job_id).lease_id, "e").state is JobState.QUEUED
    last = claim_one(queue, job.job_id)
    assert queue.complete(last.lease_id).state is JobState.SUCCEEDED
    assert outcomes(queue, job.job_id).count("interrupted") == MAX_ATTEMPTS * 2


def test_failures_and_expiries_reach_the_cap(queue: JobQueue, clock: FakeClock) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    assert queue.fail(claim_one(queue, job.job_id).lease_id, "first").state is JobState.QUEUED
    claim_one(queue, job.job_id)
    clock.advance(LEASE * 2)
    assert [j.state for j in queue.reap_expired()] == [JobState.QUEUED]
    final = queue.fail(claim_one(queue, job.job_id).lease_id, "third")
    assert final.state is JobState.FAILED
    assert final.finish_time == clock()
    assert "3 failed attempts" in final.error_message and "third" in final.error_message
    assert queue.get_job(job.job_id) == final
    assert outcomes(queue, job.job_id) == ["failed", "expired", "failed"]
    assert queue.claim(5) == []
    # The realm never had an index: it reports that its index failed.
    assert get_realm(queue, "r").state is RealmState.INDEX_FAILED


def test_expiry_alone_reaches_the_cap(queue: JobQueue, clock: FakeClock) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    for n in range(1, MAX_ATTEMPTS + 1):
        claim_one(queue, job.job_id)
        clock.advance(LEASE + timedelta(microseconds=1))
        [reaped] = queue.reap_expired()
        assert reaped.state is (JobState.FAILED if n == MAX_ATTEMPTS else JobState.QUEUED)
    assert "lease expired" in queue.get_job(job.job_id).error_message
    assert outcomes(queue, job.job_id) == ["expired"] * MAX_ATTEMPTS


def test_permanent_failure_ends_at_once(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    failed = queue.fail(claim_one(queue, job.job_id).lease_id, "realm.json missing", permanent=True)
    assert failed.state is JobState.FAILED
    assert failed.error_message == "realm.json missing"


def test_failure_of_a_realm_with_an_index_keeps_it_ready(queue: JobQueue) -> None:
    make_realm(queue, "r")
    first = queue.enqueue("r", FS, USER).job
    queue.complete(claim_one(queue, first.job_id).lease_id)
    second = queue.enqueue("r", FS, USER).job
    queue.fail(claim_one(queue, second.job_id).lease_id, "bad", permanent=True)
    assert get_realm(queue, "r").state is RealmState.READY


def test_reap_only_touches_expired_leases(queue: JobQueue, clock: FakeClock) -> None:
    make_realm(queue, "old")
    make_realm(queue, "new")
    old = queue.enqueue("old", FS, USER).job
    queue.claim(1)
    clock.advance(LEASE - timedelta(seconds=5))
    new = queue.enqueue("new", FS, USER).job
    queue.claim(1)
    assert queue.reap_expired() == []  # nothing is past its expiry yet
    clock.advance(LEASE)  # old: 55 s after its claim, new: 30 s (exactly at expiry)
    assert [j.job_id for j in queue.reap_expired()] == [old.job_id]
    assert queue.get_job(new.job_id).state is JobState.RUNNING
    clock.advance(timedelta(microseconds=1))
    assert [j.job_id for j in queue.reap_expired()] == [new.job_id]
    assert queue.reap_expired() == []


def test_reap_respects_its_limit(queue: JobQueue, clock: FakeClock) -> None:
    for i in range(5):
        make_realm(queue, f"r{i}")
        queue.enqueue(f"r{i}", FS, USER)
    queue.claim(5)
    clock.advance(LEASE * 2)
    assert len(queue.reap_expired(limit=2)) == 2
    assert len(queue.reap_expired(limit=10)) == 3
    assert len(queue.list_jobs(state=JobState.QUEUED)) == 5


@pytest.mark.parametrize("how", ["release", "fail", "expire"])
def test_a_requeued_job_keeps_its_place_in_line(
    queue: JobQueue, clock: FakeClock, how: str
) -> None:
    for name in ("a", "b", "c"):
        make_realm(queue, name)
    a = queue.enqueue("a", FS, USER).job.job_id
    lease = claim_one(queue, a)
    clock.advance(1)
    b = queue.enqueue("b", FS, USER).job.job_id
    clock.advance(1)
    c = queue.enqueue("c", FS, USER).job.job_id
    if how == "release":
        queue.release([lease.lease_id])
    elif how == "fail":
        queue.fail(lease.lease_id, "x")
    else:
        clock.advance(LEASE * 2)
        queue.reap_expired()
    assert [x.job.job_id for x in queue.claim(3)] == [a, b, c]


@pytest.mark.parametrize("how", ["release", "fail", "expire"])
def test_requeue_folds_into_a_job_queued_meanwhile(
    queue: JobQueue, clock: FakeClock, how: str
) -> None:
    make_realm(queue, "r")
    make_realm(queue, "other")
    first = queue.enqueue("r", FS, 30).job
    lease = claim_one(queue, first.job_id)
    clock.advance(1)
    other = queue.enqueue("other", FS, 30).job
    clock.advance(1)
    rerun = queue.enqueue("r", FS, SYSTEM, content_changed=True)
    assert rerun.disposition is Disposition.RERUN_SCHEDULED
    if how == "release":
        [requeued] = queue.release([lease.lease_id])
    elif how == "fail":
        requeued = queue.fail(lease.lease_id, "x")
    else:
        clock.advance(LEASE * 2)
        [requeued] = queue.reap_expired()
    assert requeued.state is JobState.QUEUED
    # One queued job is left for the realm: the successor, with the better
    # priority and the older place in line of the two.
    queued = queue.list_jobs(realm_id="r", state=JobState.QUEUED)
    assert [j.job_id for j in queued] == [rerun.job.job_id]
    assert queued[0].priority == 30
    old_view = queue.get_job(first.job_id)
    assert (old_view.job_id, old_view.state) == (first.job_id, JobState.QUEUED)
    # Same priority as "other"'s job, and older (the first job's place in
    # line), although its id is newer.
    [next_lease] = queue.claim(1)
    assert next_lease.job.job_id == rerun.job.job_id
    assert [lease.job.job_id for lease in queue.claim(1)] == [other.job_id]
    running = queue.get_job(first.job_id)
    assert running.state is JobState.RUNNING
    assert running.attempt == next_lease.job.attempt
    queue.complete(next_lease.lease_id)
    assert queue.get_job(first.job_id).state is JobState.SUCCEEDED
    assert queue.get_job(rerun.job.job_id).state is JobState.SUCCEEDED
    assert queue.get_job(first.job_id).job_id == first.job_id


def test_folded_incremental_paths_are_merged(queue: JobQueue) -> None:
    make_realm(queue, "r")
    first = queue.enqueue("r", INC, USER, paths=[PathChange("a", False)]).job
    lease = claim_one(queue, first.job_id)
    later = queue.enqueue("r", INC, USER, paths=[PathChange("b", True)]).job
    assert later.job_id != first.job_id
    queue.release([lease.lease_id])
    [next_lease] = queue.claim(1)
    assert next_lease.job.job_id == later.job_id
    assert next_lease.job.path_changes == (PathChange("a", False), PathChange("b", True))
    assert queue.get_job(first.job_id).path_changes == next_lease.job.path_changes


def test_release_many_skips_stale_and_requeues_the_rest(queue: JobQueue) -> None:
    for name in ("a", "b"):
        make_realm(queue, name)
        queue.enqueue(name, FS, USER)
    la, lb = queue.claim(2)
    queue.complete(lb.lease_id)
    released = queue.release([la.lease_id, lb.lease_id, "nope"])
    assert [j.job_id for j in released] == [la.job.job_id]
    assert queue.get_job(la.job.job_id).state is JobState.QUEUED
    assert queue.get_job(lb.job.job_id).state is JobState.SUCCEEDED
