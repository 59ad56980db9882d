"""Preemption (DESIGN.md section 4): a running SYSTEM job handed back for a
waiting job of a user. Its attempt ends interrupted and uncounted, the job
goes to the head of its priority's line (aging), and a job is handed back at
most `max_preemptions` times. Also the read the dispatcher decides by: the
job a claim would take first."""

from __future__ import annotations

import pytest
from store_helpers import make_realm

from realm_service.domain import SYSTEM, USER, JobKind, JobState, PathChange
from realm_service.errors import StaleLease
from realm_service.queue import JobQueue, QueueSettings
from realm_service.store.db import Database

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL


def storm(queue: JobQueue, n: int) -> list[int]:
    """n realms, each with one queued SYSTEM job, oldest first."""
    ids = []
    for i in range(n):
        make_realm(queue, f"s{i}")
        ids.append(queue.enqueue(f"s{i}", FS, SYSTEM).job.job_id)
    return ids


def outcomes(queue: JobQueue, job_id: int) -> list[tuple[str, str]]:
    _, attempts, _, _ = queue.explain_reads(job_id)
    return [(a.outcome, a.error_message) for a in attempts]


def test_a_preempted_job_is_queued_again_at_the_head_of_its_line(queue: JobQueue) -> None:
    jobs = storm(queue, 4)
    first, second = queue.claim(2, system_limit=2)
    assert [first.job.job_id, second.job.job_id] == jobs[:2]

    back = queue.preempt(second.lease_id, "preempted for job 99 (priority 10)")
    assert back is not None and back.job_id == jobs[1] and back.state is JobState.QUEUED
    assert outcomes(queue, jobs[1]) == [("interrupted", "preempted for job 99 (priority 10)")]
    # Its lease is gone: the fence refuses what the stopped worker still
    # sends, and says why.
    why = f"lease {second.lease_id!r} is not current: preempted for job 99 (priority 10)"
    with pytest.raises(StaleLease) as refused:
        queue.complete(second.lease_id)
    assert refused.value.message == why
    assert queue.stale_reasons([second.lease_id]) == {second.lease_id: why}
    # Ahead of the SYSTEM jobs queued before it was handed back.
    (again,) = queue.claim(1, system_limit=1)
    assert again.job.job_id == jobs[1] and again.job.attempt == 2
    assert again.preemptions == 1
    # An interruption is not a failure: the attempts cap is untouched.
    assert queue.fail(again.lease_id, "boom").state is JobState.QUEUED


def test_aging_puts_a_preempted_job_ahead_of_older_system_jobs(queue: JobQueue) -> None:
    """The SYSTEM job queued first waits (its realm is busy) while a newer
    one runs; handed back, the newer one goes ahead of it."""
    make_realm(queue, "old")
    busy = queue.enqueue("old", INC, USER, paths=[PathChange("x", False)]).job
    (running,) = queue.claim(1)
    assert running.job.job_id == busy.job_id
    older = queue.enqueue("old", FS, SYSTEM).job
    (newer,) = storm(queue, 1)
    (lease,) = queue.claim(1, system_limit=1)
    assert lease.job.job_id == newer  # the older one's realm is busy
    queue.complete(running.lease_id)
    assert queue.preempt(lease.lease_id, "for a user") is not None
    got = queue.claim(2, system_limit=2)
    assert [x.job.job_id for x in got] == [newer, older.job_id]


def test_the_head_of_the_line_is_per_priority(queue: JobQueue) -> None:
    """Aging moves a job within its priority only: a USER job still comes first."""
    jobs = storm(queue, 2)
    make_realm(queue, "u")
    (lease,) = queue.claim(1, system_limit=1)
    user = queue.enqueue("u", FS, USER).job
    assert queue.preempt(lease.lease_id, "for u") is not None
    got = queue.claim(3, system_limit=3)
    assert [x.job.job_id for x in got] == [user.job_id, jobs[0], jobs[1]]


def test_only_system_jobs_are_preempted_and_only_while_current(queue: JobQueue) -> None:
    make_realm(queue, "u")
    user = queue.enqueue("u", FS, USER).job
    (lease,) = queue.claim(1)
    assert lease.job.job_id == user.job_id
    assert queue.preempt(lease.lease_id, "no") is None
    assert queue.get_job(user.job_id).state is JobState.RUNNING
    (sys_job,) = storm(queue, 1)
    (s,) = queue.claim(1)
    queue.complete(s.lease_id)
    assert queue.preempt(s.lease_id, "too late") is None
    assert queue.preempt("0" * 32, "no such lease") is None
    assert queue.get_job(sys_job).state is JobState.SUCCEEDED


def test_a_job_is_preempted_at_most_max_preemptions_times(db: Database) -> None:
    queue = JobQueue(db, settings=QueueSettings(max_preemptions=2))
    (job_id,) = storm(queue, 1)
    for n in (1, 2):
        (lease,) = queue.claim(1)
        assert lease.preemptions == n - 1
        assert queue.preempt(lease.lease_id, f"preemption {n}") is not None
    (lease,) = queue.claim(1)
    assert lease.preemptions == 2
    assert queue.preempt(lease.lease_id, "a third") is None
    assert queue.get_job(job_id).state is JobState.RUNNING
    assert [o for o, _ in outcomes(queue, job_id)] == ["interrupted", "interrupted", "running"]


def test_a_preempted_job_folds_into_a_job_queued_meanwhile(queue: JobQueue) -> None:
    """A write queued an incremental job of the realm while its SYSTEM
    incremental job ran: handed back, the running one folds into it, which
    takes the head of the line and the preemption count."""
    storm(queue, 2)
    make_realm(queue, "r")
    running = queue.enqueue("r", INC, SYSTEM, paths=[PathChange("a.json", False)]).job
    claimed = queue.claim(3, system_limit=3)
    lease = next(x for x in claimed if x.job.job_id == running.job_id)
    for other in claimed:
        if other is not lease:
            queue.complete(other.lease_id)
    later = queue.enqueue("r", INC, SYSTEM, paths=[PathChange("b.json", True)]).job
    assert later.job_id != running.job_id
    assert queue.preempt(lease.lease_id, "for a user") is not None
    assert queue.get_job(running.job_id).state is JobState.QUEUED  # shown as its successor
    (again,) = queue.claim(1, system_limit=1)
    assert again.job.job_id == later.job_id and again.preemptions == 1
    assert {(c.path, c.deleted) for c in again.job.path_changes} == {
        ("a.json", False),
        ("b.json", True),
    }


def test_first_waiting_is_what_a_claim_would_take_first(queue: JobQueue) -> None:
    storm(queue, 2)
    for realm in ("busy", "u1", "u2"):
        make_realm(queue, realm)
    assert queue.first_waiting(min_priority=USER) is None
    queue.enqueue("busy", INC, 50, paths=[PathChange("x", False)])
    (busy,) = queue.claim(1, min_priority=50)
    queue.enqueue("busy", FS, 60)  # waits: its realm has a running job
    u1 = queue.enqueue("u1", FS, USER).job
    u2 = queue.enqueue("u2", INC, USER, paths=[PathChange("x", False)]).job
    got = queue.first_waiting(min_priority=USER)
    assert got is not None and got.job_id == u1.job_id
    assert got == queue.first_waiting(min_priority=USER, kinds=[FS])
    only_inc = queue.first_waiting(min_priority=USER, kinds=[INC])
    assert only_inc is not None and only_inc.job_id == u2.job_id
    assert queue.first_waiting(min_priority=USER + 1) is None
    queue.complete(busy.lease_id)
    top = queue.first_waiting(min_priority=USER)
    assert top is not None and top.priority == 60 and top.realm_id == "busy"


def test_folded_into_a_job_of_another_priority_a_preempted_job_keeps_its_place(
    queue: JobQueue,
) -> None:
    """Aging moves a job within its own line: folded into a USER job of its
    realm queued meanwhile, it does not jump that USER job ahead of an older
    USER job (the one it may have been preempted for)."""
    storm(queue, 1)  # the head of the SYSTEM line, older than everything below
    make_realm(queue, "r")
    make_realm(queue, "w")
    waiting = queue.enqueue("w", FS, USER).job
    running = queue.enqueue("r", INC, SYSTEM, paths=[PathChange("a", False)]).job
    (lease,) = queue.claim(1, kinds=[INC])
    assert lease.job.job_id == running.job_id
    later = queue.enqueue("r", INC, USER, paths=[PathChange("b", False)]).job
    assert later.job_id != running.job_id
    assert queue.preempt(lease.lease_id, "for w", for_job=waiting.job_id) is not None
    got = queue.claim(2)
    assert [x.job.job_id for x in got] == [waiting.job_id, later.job_id]


def test_nothing_is_preempted_for_a_job_that_is_no_longer_queued(queue: JobQueue) -> None:
    """Between the dispatcher's read and the preemption a claim (maybe of
    another instance) took the waiting job: the SYSTEM job keeps running."""
    (system_job,) = storm(queue, 1)
    (lease,) = queue.claim(1)
    make_realm(queue, "u")
    user = queue.enqueue("u", FS, USER).job
    (taken,) = queue.claim(1, min_priority=USER)
    assert taken.job.job_id == user.job_id
    assert queue.preempt(lease.lease_id, "for u", for_job=user.job_id) is None
    assert queue.get_job(system_job).state is JobState.RUNNING
    assert outcomes(queue, system_job) == [("running", "")]
    queue.complete(taken.lease_id)
    assert queue.preempt(lease.lease_id, "for u", for_job=user.job_id) is None
    make_realm(queue, "v")
    other = queue.enqueue("v", FS, USER).job
    assert queue.preempt(lease.lease_id, "for v", for_job=other.job_id) is not None
