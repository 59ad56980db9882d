"""Coalescing per realm and kind (DESIGN.md section 4): every rule, and what
each enqueue reports."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from store_helpers import make_realm

from realm_service.domain import (
    MAX_JOB_PATHS,
    SYSTEM,
    USER,
    Disposition,
    JobKind,
    JobState,
    PathChange,
)
from realm_service.errors import RealmNotFound
from realm_service.queue import JobQueue
from realm_service.store import enqueue_sql
from realm_service.store.db import Tx, open_database

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL


def upd(path: str) -> PathChange:
    return PathChange(path, False)


def rm(path: str) -> PathChange:
    return PathChange(path, True)


def active(queue: JobQueue, realm_id: str) -> list[tuple[JobKind, JobState]]:
    return sorted(
        (j.kind, j.state)
        for j in queue.list_jobs(realm_id=realm_id)
        if j.state in (JobState.QUEUED, JobState.RUNNING)
    )


def test_first_enqueue_inserts(queue: JobQueue) -> None:
    make_realm(queue, "r")
    result = queue.enqueue("r", FS, USER)
    assert result.disposition is Disposition.INSERTED
    assert (result.job.state, result.job.priority, result.job.kind) == (JobState.QUEUED, USER, FS)
    assert queue.get_job(result.job.job_id) == result.job


def test_enqueue_for_unknown_realm_is_refused(queue: JobQueue) -> None:
    with pytest.raises(RealmNotFound):
        queue.enqueue("nope", FS, USER)
    with pytest.raises(RealmNotFound):
        queue.enqueue("nope", INC, USER, paths=[PathChange("a.json", False)])
    # More paths than a job may list: escalated to from-scratch, still refused.
    many = [PathChange(f"f{i}.json", False) for i in range(MAX_JOB_PATHS + 1)]
    with pytest.raises(RealmNotFound):
        queue.enqueue("nope", INC, USER, paths=many)
    assert queue.list_jobs() == []


def test_from_scratch_onto_queued_merges_with_max_priority(queue: JobQueue) -> None:
    make_realm(queue, "r")
    first = queue.enqueue("r", FS, SYSTEM).job
    up = queue.enqueue("r", FS, 40)
    assert up.disposition is Disposition.MERGED
    assert (up.job.job_id, up.job.priority) == (first.job_id, 40)
    down = queue.enqueue("r", FS, 5)  # a lower request never lowers it
    assert down.disposition is Disposition.MERGED
    assert (down.job.job_id, down.job.priority) == (first.job_id, 40)
    assert queue.get_job(first.job_id).priority == 40
    assert active(queue, "r") == [(FS, JobState.QUEUED)]


def test_from_scratch_onto_running_attaches(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, USER).job
    [lease] = queue.claim(1)
    attached = queue.enqueue("r", FS, 90)
    assert attached.disposition is Disposition.ATTACHED
    assert attached.job.job_id == job.job_id
    assert attached.job.state is JobState.RUNNING
    assert active(queue, "r") == [(FS, JobState.RUNNING)]
    # The running job's result answers both requests.
    assert queue.complete(lease.lease_id).state is JobState.SUCCEEDED
    assert queue.get_job(attached.job.job_id).state is JobState.SUCCEEDED


def test_from_scratch_with_content_changed_schedules_one_rerun(queue: JobQueue) -> None:
    make_realm(queue, "r")
    running = queue.enqueue("r", FS, USER).job
    [lease] = queue.claim(1)
    rerun = queue.enqueue("r", FS, SYSTEM, content_changed=True)
    assert rerun.disposition is Disposition.RERUN_SCHEDULED
    assert rerun.job.job_id != running.job_id
    assert (rerun.job.state, rerun.job.priority) == (JobState.QUEUED, SYSTEM)
    again = queue.enqueue("r", FS, 30, content_changed=True)
    assert again.disposition is Disposition.MERGED
    assert (again.job.job_id, again.job.priority) == (rerun.job.job_id, 30)
    plain = queue.enqueue("r", FS, USER)  # a queued rerun exists: merge, not attach
    assert plain.disposition is Disposition.MERGED
    assert plain.job.job_id == rerun.job.job_id
    assert active(queue, "r") == [(FS, JobState.QUEUED), (FS, JobState.RUNNING)]
    # The rerun waits for the running job of its realm, then runs.
    assert queue.claim(5) == []
    queue.complete(lease.lease_id)
    [next_lease] = queue.claim(5)
    assert next_lease.job.job_id == rerun.job.job_id


def test_incremental_onto_queued_merges_paths_delete_wins(queue: JobQueue) -> None:
    make_realm(queue, "r")
    first = queue.enqueue("r", INC, SYSTEM, paths=[upd("a"), rm("b"), upd("c")]).job
    merged = queue.enqueue("r", INC, USER, paths=[rm("a"), upd("b"), upd("d")])
    assert merged.disposition is Disposition.MERGED
    assert merged.job.job_id == first.job_id
    assert merged.job.priority == USER
    expected = (rm("a"), rm("b"), upd("c"), upd("d"))
    assert merged.job.path_changes == expected
    assert queue.get_job(first.job_id).path_changes == expected
    lower = queue.enqueue("r", INC, SYSTEM, paths=[upd("a")])
    assert lower.job.priority == USER
    assert lower.job.path_changes == expected  # the delete of "a" still wins


def test_incremental_attaches_when_running_covers_every_path_and_op(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", INC, USER, paths=[upd("a"), rm("b"), upd("c")]).job
    [lease] = queue.claim(1)
    attached = queue.enqueue("r", INC, USER, paths=[upd("a"), rm("b")])
    assert attached.disposition is Disposition.ATTACHED
    assert attached.job.job_id == job.job_id
    assert attached.job.state is JobState.RUNNING
    assert active(queue, "r") == [(INC, JobState.RUNNING)]
    assert lease.job.path_changes == (upd("a"), rm("b"), upd("c"))


@pytest.mark.parametrize(
    "incoming",
    [
        [upd("z")],  # a path the running job does not have
        [rm("a")],  # the same path, another operation
        [upd("b")],  # an update of a path the running job deletes
        [upd("a"), upd("z")],  # partly covered
    ],
)
def test_incremental_not_covered_is_queued(queue: JobQueue, incoming: list[PathChange]) -> None:
    make_realm(queue, "r")
    running = queue.enqueue("r", INC, USER, paths=[upd("a"), rm("b")]).job
    queue.claim(1)
    queued = queue.enqueue("r", INC, USER, paths=incoming)
    assert queued.disposition is Disposition.RERUN_SCHEDULED
    assert queued.job.job_id != running.job_id
    assert queued.job.state is JobState.QUEUED
    assert queued.job.path_changes == tuple(sorted(incoming, key=lambda c: c.path))
    # A further uncovered change merges into that queued job.
    more = queue.enqueue("r", INC, SYSTEM, paths=[rm("y")])
    assert more.disposition is Disposition.MERGED
    assert more.job.job_id == queued.job.job_id
    assert rm("y") in more.job.path_changes
    assert active(queue, "r") == [(INC, JobState.QUEUED), (INC, JobState.RUNNING)]


def test_incremental_onto_queued_from_scratch_merges(queue: JobQueue) -> None:
    make_realm(queue, "r")
    scratch = queue.enqueue("r", FS, SYSTEM).job
    inc = queue.enqueue("r", INC, 50, paths=[upd("a")])
    assert inc.disposition is Disposition.MERGED
    assert inc.job.job_id == scratch.job_id
    assert inc.job.kind is FS
    assert inc.job.priority == 50
    assert active(queue, "r") == [(FS, JobState.QUEUED)]


def test_incremental_while_from_scratch_runs_is_a_new_job(queue: JobQueue) -> None:
    """A started from-scratch job may already have read the file: no merge."""
    make_realm(queue, "r")
    scratch = queue.enqueue("r", FS, USER).job
    queue.claim(1)
    inc = queue.enqueue("r", INC, USER, paths=[upd("a")])
    assert inc.disposition is Disposition.INSERTED
    assert inc.job.job_id != scratch.job_id
    assert inc.job.kind is INC
    assert active(queue, "r") == [(FS, JobState.RUNNING), (INC, JobState.QUEUED)]


def test_from_scratch_never_merges_into_incremental(queue: JobQueue) -> None:
    make_realm(queue, "r")
    inc = queue.enqueue("r", INC, USER, paths=[upd("a")]).job
    scratch = queue.enqueue("r", FS, SYSTEM)
    assert scratch.disposition is Disposition.INSERTED
    assert scratch.job.job_id != inc.job_id
    assert queue.get_job(inc.job_id).priority == USER  # untouched
    # ... nor attaches to a running incremental.
    queue.claim(1)  # takes the incremental (higher priority)
    assert queue.get_job(inc.job_id).state is JobState.RUNNING
    again = queue.enqueue("r", FS, 70)
    assert again.disposition is Disposition.MERGED
    assert again.job.job_id == scratch.job.job_id
    assert active(queue, "r") == [(FS, JobState.QUEUED), (INC, JobState.RUNNING)]


def test_realms_never_coalesce_with_each_other(queue: JobQueue) -> None:
    make_realm(queue, "r1")
    make_realm(queue, "r2")
    a = queue.enqueue("r1", FS, USER)
    b = queue.enqueue("r2", FS, USER)
    assert a.disposition is b.disposition is Disposition.INSERTED
    assert a.job.job_id != b.job.job_id


def test_enqueue_in_commits_with_the_callers_transaction(queue: JobQueue) -> None:
    make_realm(queue, "r")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), queue.db.transaction() as tx:
        queue.enqueue_in(tx, "r", FS, USER)
        raise Boom
    assert queue.list_jobs(realm_id="r") == []
    with queue.db.transaction() as tx:
        result = queue.enqueue_in(tx, "r", FS, USER)
    assert queue.get_job(result.job.job_id).state is JobState.QUEUED


@pytest.mark.parametrize(
    ("incoming", "stored"),
    [
        ([upd("a"), upd("a")], (upd("a"),)),
        ([upd("a"), rm("a")], (rm("a"),)),
        ([rm("a"), upd("a"), upd("b")], (rm("a"), upd("b"))),
    ],
)
def test_a_new_incremental_lists_each_path_once_delete_winning(
    queue: JobQueue, incoming: list[PathChange], stored: tuple[PathChange, ...]
) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", INC, USER, paths=incoming).job
    assert job.path_changes == stored
    assert queue.get_job(job.job_id).path_changes == stored


def test_an_update_and_delete_of_a_path_attaches_to_a_running_delete(queue: JobQueue) -> None:
    make_realm(queue, "r")
    running = queue.enqueue("r", INC, USER, paths=[rm("a")]).job
    queue.claim(1)
    result = queue.enqueue("r", INC, USER, paths=[upd("a"), rm("a")])
    assert result.disposition is Disposition.ATTACHED
    assert result.job.job_id == running.job_id


def test_a_fresh_file_change_never_attaches_to_a_running_incremental(queue: JobQueue) -> None:
    """content_changed: the file was just written or deleted, and the running
    job may have read it already, so its result cannot answer the change."""
    make_realm(queue, "r")
    running = queue.enqueue("r", INC, USER, paths=[upd("a"), rm("b")]).job
    queue.claim(1)
    follow = queue.enqueue("r", INC, USER, paths=[upd("a")], content_changed=True)
    assert follow.disposition is Disposition.RERUN_SCHEDULED
    assert follow.job.job_id != running.job_id
    assert follow.job.path_changes == (upd("a"),)
    again = queue.enqueue("r", INC, USER, paths=[rm("b")], content_changed=True)
    assert again.disposition is Disposition.MERGED
    assert again.job.job_id == follow.job.job_id


# -- enqueue_all: every realm, page by page, coalesced as one enqueue would ---------


REINDEX = 5  # between the queued from-scratch jobs' priorities below


def _setup_mixed(queue: JobQueue) -> dict[str, int]:
    """Twelve realms; a few with jobs in each state that matters. Returns the
    ids of the jobs that exist before the reindex."""
    for i in range(12):
        make_realm(queue, f"r{i:02d}")
    before = {
        "running-fs": queue.enqueue("r02", FS, 90).job.job_id,
        "running-inc": queue.enqueue("r03", INC, 80, paths=[upd("a")]).job.job_id,
    }
    queue.claim(2)  # both start: the highest priorities
    before["queued-fs-low"] = queue.enqueue("r01", FS, 1).job.job_id
    before["queued-fs-high"] = queue.enqueue("r05", FS, 40).job.job_id
    before["queued-inc"] = queue.enqueue("r04", INC, USER, paths=[upd("b")]).job.job_id
    return before


@pytest.mark.parametrize("batch", [5, 6, 500])
def test_enqueue_all_coalesces_every_realm_across_pages(queue: JobQueue, batch: int) -> None:
    before = _setup_mixed(queue)
    inserted, realms = queue.enqueue_all(REINDEX, batch=batch)
    assert (inserted, realms) == (9, 12)  # all but r01 and r05 (merged) and r02 (attached)
    jobs = queue.list_jobs()
    fs = {}
    for j in jobs:
        if j.kind is FS and j.state in (JobState.QUEUED, JobState.RUNNING):
            assert j.realm_id not in fs, f"two active from-scratch jobs for {j.realm_id}"
            fs[j.realm_id] = j
    assert sorted(fs) == [f"r{i:02d}" for i in range(12)]
    # Merged into the queued ones, the priority raised, never lowered:
    assert (fs["r01"].job_id, fs["r01"].priority) == (before["queued-fs-low"], REINDEX)
    assert (fs["r05"].job_id, fs["r05"].priority) == (before["queued-fs-high"], 40)
    # Attached to the running one:
    assert (fs["r02"].job_id, fs["r02"].state) == (before["running-fs"], JobState.RUNNING)
    # A realm running (or holding) an incremental job gets its own from-scratch job:
    assert fs["r03"].state is JobState.QUEUED and fs["r03"].job_id != before["running-inc"]
    assert queue.get_job(before["running-inc"]).state is JobState.RUNNING
    assert queue.get_job(before["queued-inc"]).state is JobState.QUEUED
    for realm_id in ["r00", "r03", "r04", *[f"r{i:02d}" for i in range(6, 12)]]:
        assert (fs[realm_id].state, fs[realm_id].priority) == (JobState.QUEUED, REINDEX)

    # A second pass adds nothing and changes no job.
    assert queue.enqueue_all(REINDEX, batch=batch) == (0, 12)
    assert queue.list_jobs() == jobs


def test_enqueue_all_jobs_are_claimed_in_realm_order(queue: JobQueue) -> None:
    ids = [f"r{i:02d}" for i in range(7)]
    for realm_id in ids:
        make_realm(queue, realm_id)
    assert queue.enqueue_all(SYSTEM, batch=3) == (7, 7)
    assert [lease.job.realm_id for lease in queue.claim(7)] == ids


def test_enqueue_all_on_a_store_with_no_realms(queue: JobQueue) -> None:
    assert queue.enqueue_all(SYSTEM) == (0, 0)


def test_enqueue_all_coalesces_with_a_job_inserted_under_it(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another enqueuer's job appearing between the page's read and its insert
    (possible on PostgreSQL) makes the page's insert fail on the unique index;
    the page is then coalesced realm by realm, onto that job."""
    for i in range(4):
        make_realm(queue, f"r{i}")
    real_insert = enqueue_sql.try_insert_from_scratch_jobs
    sneaked: list[int] = []

    def insert_after_another(tx: Tx, realm_ids: Sequence[str], **kw: Any) -> Any:
        if not sneaked:
            job = enqueue_sql.insert_job(
                tx, realm_id="r2", kind=FS, priority=USER, now=queue.clock()
            )
            sneaked.append(job.job_id)
        return real_insert(tx, realm_ids, **kw)

    monkeypatch.setattr(enqueue_sql, "try_insert_from_scratch_jobs", insert_after_another)
    assert queue.enqueue_all(SYSTEM) == (3, 4)
    fs = [j for j in queue.list_jobs() if j.kind is FS]
    assert sorted(j.realm_id for j in fs) == ["r0", "r1", "r2", "r3"]
    [r2] = [j for j in fs if j.realm_id == "r2"]
    assert (r2.job_id, r2.priority) == (sneaked[0], USER)


def test_enqueue_all_attaches_to_a_job_claimed_while_it_waits(pg_url: str) -> None:
    """PostgreSQL: another instance's claim holds a realm's queued from-scratch
    job and commits while the reindex waits for that row. The reindex must see
    the job running and attach to it, not take the realm for one with no job
    and queue a second from-scratch job."""
    import psycopg

    db = open_database(pg_url)
    queue = JobQueue(db)
    try:
        make_realm(queue, "r")
        job_id = queue.enqueue("r", FS, SYSTEM).job.job_id
        conninfo = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo) as claimer:  # a claim, not yet committed
            claimer.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            claimer.execute(
                "UPDATE jobs SET state = 'running', attempt = 1, lease_id = 'other' WHERE id = %s",
                (job_id,),
            )
            reindex: list[tuple[int, int]] = []
            thread = threading.Thread(target=lambda: reindex.append(queue.enqueue_all(USER)))
            thread.start()
            time.sleep(0.5)  # it now waits for the claimed row
            claimer.commit()
        thread.join(30)
        assert reindex == [(0, 1)]
        fs = [(j.job_id, j.state) for j in queue.list_jobs(realm_id="r", kind=FS)]
        assert fs == [(job_id, JobState.RUNNING)]
    finally:
        db.close()
