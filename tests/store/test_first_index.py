"""A realm's first index: the mount pipeline's rule (ensure_first_index) and
the unique indexes that make "exactly one" hold in the store itself."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import exc, insert
from store_helpers import make_realm

from realm_service.domain import SYSTEM, USER, Job, JobKind, JobState, PathChange
from realm_service.errors import RealmAlreadyExists
from realm_service.queue import JobQueue
from realm_service.realms import CreateResult, Realms
from realm_service.store import realms_sql
from realm_service.store.db import Tx, open_database
from realm_service.store.tables import JobRow

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL


def ensure(queue: JobQueue, realm_id: str, priority: int) -> Job | None:
    with queue.db.transaction() as tx:
        return queue.ensure_first_index(tx, realm_id, priority)


def from_scratch_jobs(queue: JobQueue, realm_id: str) -> list[Job]:
    return queue.list_jobs(realm_id=realm_id, kind=FS)


def test_first_mount_adds_one_job_at_the_given_priority(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = ensure(queue, "r", 42)
    assert job is not None
    assert (job.kind, job.priority, job.state) == (FS, 42, JobState.QUEUED)
    assert ensure(queue, "r", 42) is None
    assert ensure(queue, "r", SYSTEM) is None
    assert [j.job_id for j in from_scratch_jobs(queue, "r")] == [job.job_id]


def test_a_queued_job_is_raised_never_lowered(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, SYSTEM).job
    assert ensure(queue, "r", USER) is None
    assert queue.get_job(job.job_id).priority == USER
    assert ensure(queue, "r", SYSTEM) is None
    assert queue.get_job(job.job_id).priority == USER
    assert ensure(queue, "r", 70) is None
    assert queue.get_job(job.job_id).priority == 70
    assert [j.job_id for j in from_scratch_jobs(queue, "r")] == [job.job_id]


@pytest.mark.parametrize("state", ["running", "succeeded"])
def test_no_job_when_one_runs_or_succeeded(queue: JobQueue, state: str) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", FS, SYSTEM).job
    [lease] = queue.claim(1)
    if state == "succeeded":
        queue.complete(lease.lease_id)
    before = queue.list_jobs(realm_id="r")
    assert ensure(queue, "r", 90) is None
    assert queue.list_jobs(realm_id="r") == before
    assert queue.get_job(job.job_id).priority == SYSTEM  # a started job keeps its priority


def test_a_queued_incremental_does_not_count_as_a_first_index(queue: JobQueue) -> None:
    make_realm(queue, "r")
    inc = queue.enqueue("r", INC, USER, paths=[PathChange("a", False)]).job
    job = ensure(queue, "r", USER)
    assert job is not None and job.job_id != inc.job_id and job.kind is FS


def test_racing_mounts_in_one_transaction_each_add_one_job(queue: JobQueue) -> None:
    """Boot mount and lazy mount of the same realm, one after the other."""
    make_realm(queue, "r")
    results = [ensure(queue, "r", p) for p in (SYSTEM, USER, SYSTEM)]
    assert [r is not None for r in results] == [True, False, False]
    [job] = from_scratch_jobs(queue, "r")
    assert job.priority == USER


def job_row(realm_id: str, kind: JobKind, state: str) -> dict[str, object]:
    now = datetime(2026, 11, 29, tzinfo=UTC)
    return {
        "realm_id": realm_id,
        "kind": kind.value,
        "priority": USER,
        "state": state,
        "seq": 1,
        "attempt": 0,
        "counted_failures": 0,
        "create_time": now,
        "error_message": "",
        "progress_done": 0,
        "progress_total": 0,
        "paths": "[]",
        "worker": "",
    }


def insert_row(queue: JobQueue, row: dict[str, object]) -> None:
    with queue.db.engine.begin() as conn:
        conn.execute(insert(JobRow), [row])


def test_the_store_refuses_a_second_queued_job_of_a_kind(queue: JobQueue) -> None:
    make_realm(queue, "r")
    queue.enqueue("r", FS, USER)
    with pytest.raises(exc.IntegrityError):
        insert_row(queue, job_row("r", FS, "queued"))
    queue.enqueue("r", INC, USER, paths=[PathChange("a", False)])  # merged: still one row
    insert_row(queue, job_row("r", INC, "queued"))  # the other kind is allowed
    with pytest.raises(exc.IntegrityError):
        insert_row(queue, job_row("r", INC, "queued"))
    # Finished and other realms' jobs are not constrained.
    insert_row(queue, job_row("r", FS, "succeeded"))
    insert_row(queue, job_row("r", FS, "succeeded"))
    make_realm(queue, "other")
    insert_row(queue, job_row("other", FS, "queued"))
    states = sorted((j.realm_id, j.kind, j.state) for j in queue.list_jobs())
    assert states == [
        ("other", FS, JobState.QUEUED),
        ("r", FS, JobState.QUEUED),
        ("r", FS, JobState.SUCCEEDED),
        ("r", FS, JobState.SUCCEEDED),
        ("r", INC, JobState.QUEUED),
    ]


def test_the_store_refuses_a_second_running_job_of_a_realm(queue: JobQueue) -> None:
    make_realm(queue, "r")
    queue.enqueue("r", FS, USER)
    queue.claim(1)
    with pytest.raises(exc.IntegrityError):
        insert_row(queue, job_row("r", INC, "running"))
    insert_row(queue, job_row("r", INC, "queued"))


# -- CreateRealm losing its insert to another instance (PostgreSQL) ---------------


@pytest.mark.parametrize("request_id", ["req-1", ""])
def test_a_create_that_loses_its_insert_to_another_instance_retries(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, request_id: str
) -> None:
    """Another instance's create of the same realm commits after this one read
    the realm as absent and before it inserts: the insert fails, and the retry
    answers as if the other create had come first (the same request id gets
    that create's result; another gets ALREADY_EXISTS). One job either way."""
    here_db, there_db = open_database(pg_url), open_database(pg_url, migrate=False)
    here = Realms(here_db, JobQueue(here_db), max_file_size=1024)
    there = Realms(there_db, JobQueue(there_db), max_file_size=1024)
    first: list[CreateResult] = []
    raced = False

    def after_the_other(real_insert: Callable[..., Any]) -> Callable[..., Any]:
        def insert(tx: Tx, **kw: Any) -> Any:
            nonlocal raced
            if not raced:
                raced = True  # the other create's own insert runs plainly
                first.append(
                    there.create(
                        realm_id="r", priority=None, display_name="", request_id="req-1", files=[]
                    )
                )
            return real_insert(tx, **kw)

        return insert

    # With a request id the realm is read first and inserted by itself;
    # without, it is inserted with its files and job (create_realm).
    for name in ("insert_new_realm", "create_realm"):
        monkeypatch.setattr(realms_sql, name, after_the_other(getattr(realms_sql, name)))
    try:
        if request_id:
            again = here.create(
                realm_id="r", priority=50, display_name="", request_id=request_id, files=[]
            )
            assert again.replayed and again.job.job_id == first[0].job.job_id
        else:
            with pytest.raises(RealmAlreadyExists):
                here.create(realm_id="r", priority=50, display_name="", request_id="", files=[])
        assert raced
        [job] = here.queue.list_jobs(realm_id="r")
        assert (job.job_id, job.priority) == (first[0].job.job_id, USER)
        assert "r" in there.registry and "r" not in here.registry
    finally:
        here_db.close()
        there_db.close()
