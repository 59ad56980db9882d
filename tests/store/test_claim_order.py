"""Which jobs a claim takes: priority, then age, then id; one running job per
realm; lanes (min_priority), kinds, and the cap on SYSTEM jobs per claim."""

from __future__ import annotations

import pytest
from store_helpers import FakeClock, make_realm

from realm_service.domain import SYSTEM, USER, JobKind, JobState, Lease, PathChange
from realm_service.queue import JobQueue
from realm_service.store.tables import JobRow


@pytest.fixture(params=["shared store", "one instance"])
def queue(queue: JobQueue, request: pytest.FixtureRequest) -> JobQueue:
    """Each test twice: as when other instances may claim too, and as one
    instance alone, whose claims of one job are one statement on PostgreSQL
    (the candidate read and the writes fused)."""
    queue.db.others_alive = request.param == "shared store"
    return queue


FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL


def ids(leases: list[Lease]) -> list[int]:
    return [lease.job.job_id for lease in leases]


def realms(queue: JobQueue, n: int, prefix: str = "r") -> list[str]:
    names = [f"{prefix}{i:03d}" for i in range(n)]
    for name in names:
        make_realm(queue, name)
    return names


def test_priority_first_then_oldest(queue: JobQueue, clock: FakeClock) -> None:
    names = realms(queue, 6)
    plan = [(0, 5), (1, 50), (2, 5), (3, 90), (4, 50), (5, SYSTEM)]
    job_ids = {}
    for i, priority in plan:
        clock.advance(1)
        job_ids[i] = queue.enqueue(names[i], FS, priority).job.job_id
    leases = queue.claim(10, worker="w")
    assert ids(leases) == [job_ids[i] for i in (3, 1, 4, 0, 2, 5)]
    assert all(lease.job.state is JobState.RUNNING for lease in leases)
    assert all(lease.expire_time == clock() + queue.settings.lease_duration for lease in leases)


def test_claims_in_small_batches_follow_the_same_order(queue: JobQueue, clock: FakeClock) -> None:
    names = realms(queue, 7)
    priorities = [10, 30, 10, 30, 20, 0, 20]
    expected = []
    for name, priority in zip(names, priorities, strict=True):
        clock.advance(1)
        expected.append((-priority, queue.enqueue(name, FS, priority).job.job_id))
    got: list[int] = []
    for limit in (2, 1, 3, 5):
        got += ids(queue.claim(limit))
    assert got == [job_id for _, job_id in sorted(expected)]


def test_equal_priority_and_time_is_broken_by_id(queue: JobQueue) -> None:
    names = realms(queue, 5)
    # The fake clock does not move: every job has the same enqueue time.
    job_ids = [queue.enqueue(name, FS, USER).job.job_id for name in reversed(names)]
    assert ids(queue.claim(10)) == sorted(job_ids)


def test_raised_priority_moves_a_job_ahead_but_keeps_its_age(
    queue: JobQueue, clock: FakeClock
) -> None:
    names = realms(queue, 3)
    a = queue.enqueue(names[0], FS, SYSTEM).job.job_id
    clock.advance(1)
    b = queue.enqueue(names[1], FS, USER).job.job_id
    clock.advance(1)
    c = queue.enqueue(names[2], FS, USER).job.job_id
    clock.advance(1)
    queue.enqueue(names[0], FS, USER)  # merged: priority USER, still the oldest
    assert ids(queue.claim(3)) == [a, b, c]


def test_one_running_job_per_realm_others_not_held_back(queue: JobQueue, clock: FakeClock) -> None:
    make_realm(queue, "busy")
    make_realm(queue, "free")
    inc = queue.enqueue("busy", INC, 80, paths=[PathChange("a", False)]).job.job_id
    clock.advance(1)
    scratch = queue.enqueue("busy", FS, 90).job.job_id
    clock.advance(1)
    other = queue.enqueue("free", FS, SYSTEM).job.job_id
    first = queue.claim(10)
    # The realm's second job waits; a lower-priority job of another realm runs.
    assert ids(first) == [scratch, other]
    assert queue.get_job(inc).state is JobState.QUEUED
    assert queue.claim(10) == []
    queue.complete(first[0].lease_id)
    second = queue.claim(10)
    assert ids(second) == [inc]
    running = queue.list_jobs(state=JobState.RUNNING)
    assert sorted(j.realm_id for j in running) == ["busy", "free"]


def test_a_busy_head_of_queue_does_not_hide_later_realms(queue: JobQueue, clock: FakeClock) -> None:
    """Many queued jobs of running realms ahead of a claimable one: the claim
    looks past them however long that head is."""
    names = realms(queue, 150, "busy")
    for name in names:
        queue.enqueue(name, INC, 50, paths=[PathChange("x", False)])
    assert len(queue.claim(1000)) == 150  # every realm now has a running job
    for name in names:
        clock.advance(0.001)
        queue.enqueue(name, INC, 50, paths=[PathChange("y", False)])
    make_realm(queue, "late")
    clock.advance(1)
    late = queue.enqueue("late", FS, SYSTEM).job.job_id
    assert ids(queue.claim(1)) == [late]


def test_min_priority_lane(queue: JobQueue, clock: FakeClock) -> None:
    names = realms(queue, 4)
    storm = queue.enqueue(names[0], FS, SYSTEM).job.job_id
    clock.advance(1)
    user = queue.enqueue(names[1], FS, USER).job.job_id
    clock.advance(1)
    low = queue.enqueue(names[2], FS, 5).job.job_id
    clock.advance(1)
    high = queue.enqueue(names[3], FS, 60).job.job_id
    assert ids(queue.claim(10, min_priority=USER)) == [high, user]
    assert ids(queue.claim(10, min_priority=USER)) == []
    assert ids(queue.claim(10, min_priority=1)) == [low]
    assert ids(queue.claim(10)) == [storm]


def test_kinds_filter(queue: JobQueue, clock: FakeClock) -> None:
    names = realms(queue, 3)
    inc_a = queue.enqueue(names[0], INC, 50, paths=[PathChange("a", False)]).job.job_id
    clock.advance(1)
    fs_b = queue.enqueue(names[1], FS, 90).job.job_id
    clock.advance(1)
    fs_c = queue.enqueue(names[2], FS, 10).job.job_id
    assert ids(queue.claim(10, kinds=[INC])) == [inc_a]
    assert ids(queue.claim(1, kinds=[FS])) == [fs_b]
    assert ids(queue.claim(10, kinds=[INC])) == []
    assert ids(queue.claim(10, kinds=[FS, INC])) == [fs_c]


def test_kinds_filter_skips_a_realms_other_kind(queue: JobQueue, clock: FakeClock) -> None:
    """A realm's queued job of a kind the worker cannot run does not block its
    other kind for that worker."""
    make_realm(queue, "r")
    queue.enqueue("r", INC, 90, paths=[PathChange("a", False)])
    clock.advance(1)
    fs = queue.enqueue("r", FS, 10).job.job_id
    assert ids(queue.claim(5, kinds=[FS])) == [fs]


def test_system_limit_caps_system_jobs_per_claim(queue: JobQueue, clock: FakeClock) -> None:
    storm = realms(queue, 8, "storm")
    users = realms(queue, 3, "user")
    storm_ids = []
    for name in storm:
        clock.advance(1)
        storm_ids.append(queue.enqueue(name, FS, SYSTEM).job.job_id)
    user_ids = []
    for name in users:
        clock.advance(1)
        user_ids.append(queue.enqueue(name, FS, USER).job.job_id)
    # The user jobs are newer, yet all are taken, and at most 2 storm jobs.
    first = queue.claim(6, system_limit=2)
    assert ids(first) == user_ids + storm_ids[:2]
    # No user work left: the cap still applies per claim.
    assert ids(queue.claim(6, system_limit=2)) == storm_ids[2:4]
    # system_limit=0 reserves every slot from SYSTEM work.
    assert queue.claim(6, system_limit=0) == []
    make_realm(queue, "late-user")
    late = queue.enqueue("late-user", FS, 1).job.job_id
    assert ids(queue.claim(6, system_limit=0)) == [late]
    # Without a cap the rest of the storm is taken in order.
    assert ids(queue.claim(10)) == storm_ids[4:]


def test_system_limit_with_a_full_batch_of_higher_work(queue: JobQueue, clock: FakeClock) -> None:
    storm = realms(queue, 3, "storm")
    users = realms(queue, 3, "user")
    for name in storm:
        queue.enqueue(name, FS, SYSTEM)
    clock.advance(1)
    user_ids = [queue.enqueue(name, FS, USER).job.job_id for name in users]
    assert ids(queue.claim(2, system_limit=5)) == user_ids[:2]


def test_system_limit_respects_the_lane_floor(queue: JobQueue) -> None:
    names = realms(queue, 2)
    queue.enqueue(names[0], FS, SYSTEM)
    user = queue.enqueue(names[1], FS, USER).job.job_id
    assert ids(queue.claim(5, min_priority=USER, system_limit=3)) == [user]
    assert queue.claim(5, min_priority=USER, system_limit=3) == []


def test_one_claim_serves_both_lanes_and_takes_one_job_a_realm(
    queue: JobQueue, clock: FakeClock
) -> None:
    """With a SYSTEM budget one statement looks at both lanes: a realm whose
    USER job is taken gives no SYSTEM job to the same claim, however old."""
    mixed, storm = realms(queue, 2, "lanes")
    old_inc = queue.enqueue(mixed, INC, SYSTEM, paths=[PathChange("a", False)]).job.job_id
    storm_job = queue.enqueue(storm, FS, SYSTEM).job.job_id
    clock.advance(1)
    user_fs = queue.enqueue(mixed, FS, USER).job.job_id
    assert ids(queue.claim(5, system_limit=5)) == [user_fs, storm_job]
    # The realm is busy now: its SYSTEM job waits for the USER one to end.
    assert queue.claim(5, system_limit=5) == []
    assert queue.get_job(old_inc).state is JobState.QUEUED


def test_claim_limit_zero_or_empty_queue(queue: JobQueue) -> None:
    make_realm(queue, "r")
    assert queue.claim(5) == []
    queue.enqueue("r", FS, USER)
    assert queue.claim(0) == []
    assert queue.claim(-1) == []
    assert len(queue.claim(1)) == 1


def test_claim_records_worker_and_attempt(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    [lease] = queue.claim(1, worker="w-1")
    assert lease.job.attempt == 1
    assert lease.job.start_time == queue.clock()
    assert queue.attempts(job.job_id) == [(lease.lease_id, "running")]
    with queue.db.session_for_tests() as s:
        row = s.get(JobRow, job.job_id)
        assert row is not None
        assert (row.worker, row.lease_id) == ("w-1", lease.lease_id)


def test_claims_of_one_job_keep_every_rule(queue: JobQueue, clock: FakeClock) -> None:
    """Claims of one job each (a hand-off, a stream with one credit; for a
    lone instance on PostgreSQL one statement) keep the order, the lanes,
    the kinds, the SYSTEM cap and one running job a realm."""
    names = realms(queue, 5)
    storm = queue.enqueue(names[0], FS, SYSTEM).job.job_id
    clock.advance(1)
    inc = queue.enqueue(names[1], INC, 50, paths=[PathChange("a", False)]).job.job_id
    clock.advance(1)
    user = queue.enqueue(names[2], FS, USER).job.job_id
    clock.advance(1)
    top = queue.enqueue(names[3], FS, 90).job.job_id
    clock.advance(1)
    low = queue.enqueue(names[4], FS, 5).job.job_id

    [first] = queue.claim(1, worker="w-1")
    assert first.job.job_id == top
    assert (first.job.attempt, first.job.worker, first.job.state) == (1, "w-1", JobState.RUNNING)
    assert queue.attempts(top) == [(first.lease_id, "running")]
    # The realm of the running job is busy: its new job waits, ahead or not.
    clock.advance(1)
    blocked = queue.enqueue(names[3], INC, 95, paths=[PathChange("b", False)]).job.job_id
    assert ids(queue.claim(1, kinds=[FS], min_priority=USER)) == [user]
    assert ids(queue.claim(1, min_priority=60)) == []
    assert ids(queue.claim(1, system_limit=0, kinds=[FS])) == [low]
    assert queue.claim(1, system_limit=0, kinds=[FS]) == []
    assert ids(queue.claim(1, system_limit=1)) == [inc]
    assert ids(queue.claim(1, system_limit=1)) == [storm]
    assert queue.claim(1) == []
    queue.complete(first.lease_id)
    [again] = queue.claim(1, worker="w-2")
    assert (again.job.job_id, again.job.worker) == (blocked, "w-2")


def test_a_head_of_several_jobs_a_realm_is_looked_past_and_workers_keep_their_places(
    queue: JobQueue,
) -> None:
    """Two queued jobs a realm, side by side at the head: the first scan
    finds fewer realms than the claim wants, so it looks further. The n-th
    job taken goes to the n-th worker named."""
    names = realms(queue, 10, "pair")
    for i, name in enumerate(names):
        queue.enqueue(name, INC, 90 - 2 * i, paths=[PathChange("a", False)])
        queue.enqueue(name, FS, 89 - 2 * i)
    make_realm(queue, "late")
    late = queue.enqueue("late", FS, SYSTEM).job.job_id
    workers = [f"w{i}" for i in range(11)]
    leases = queue.claim(11, worker=workers, system_limit=1)
    assert [lease.job.realm_id for lease in leases] == [*names, "late"]
    assert leases[-1].job.job_id == late
    assert [lease.job.worker for lease in leases] == workers
    for lease in leases:
        stored = queue.get_job(lease.job.job_id)
        assert (stored.state, stored.worker, stored.attempt) == (
            JobState.RUNNING,
            lease.job.worker,
            1,
        )
        assert queue.heartbeat([lease.lease_id])[lease.lease_id] is not None
    assert len({lease.lease_id for lease in leases}) == 11
    # One job a realm: the realms' second jobs wait.
    assert queue.claim(11, system_limit=1) == []
