"""The store's row-to-value mappers (store/rows.py), on both stores: the
positional readers of the claim and completion paths make the same values as
the attribute mapping of ORM rows, for every column they read."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, select, update
from store_helpers import make_realm

from realm_service.domain import HeldJob, JobKind, JobState, PathChange
from realm_service.queue import JobQueue
from realm_service.store import claim_sql, leases_sql
from realm_service.store.rows import (
    HELD_FIELDS,
    JOB_FIELDS,
    held_reader,
    job_reader,
    make_held,
    make_job,
    to_held,
    to_job,
)
from realm_service.store.tables import JobRow

JOBS = cast(Table, JobRow.__table__)


def test_every_field_is_a_column_and_the_claims_tuple_matches_its_columns() -> None:
    assert set(HELD_FIELDS) <= set(JOBS.c.keys())
    assert HELD_FIELDS[: len(JOB_FIELDS)] == JOB_FIELDS
    assert claim_sql._Candidate._fields == tuple(c.name for c in claim_sql._CLAIM_COLUMNS)


def test_fast_held_construction_equals_the_dataclass() -> None:
    now = datetime.now(UTC)
    job = make_job(
        job_id=3, realm_id="r", kind=JobKind.FROM_SCRATCH, priority=0, state=JobState.RUNNING,
        attempt=1, create_time=now, start_time=now, finish_time=None, error_message="",
        progress_done=0, progress_total=0, path_changes=(), trace_parent="", worker="w",
    )  # fmt: skip
    fields = {"job": job, "lease_id": "l", "attempt_id": 9, "counted_failures": 1,
              "preemptions": 2, "checkpoint": 5, "kept": 4}  # fmt: skip
    assert {f.name for f in dataclasses.fields(HeldJob)} == set(fields)
    real = HeldJob(**fields)
    fast = make_held(**fields)
    assert fast == real and hash(fast) == hash(real) and repr(fast) == repr(real)
    assert fast.generation == 5 and fast.job_id == 3
    assert make_held(**{**fields, "checkpoint": None}).generation == 9


def test_readers_make_what_the_attribute_mapping_makes(queue: JobQueue) -> None:
    for realm_id in ("a", "b", "c"):
        make_realm(queue, realm_id)
    queue.enqueue("a", JobKind.FROM_SCRATCH, 10)
    queue.enqueue("b", JobKind.INCREMENTAL, 0, paths=[PathChange("x.json", True)])
    queue.enqueue("c", JobKind.FROM_SCRATCH, 5)
    leases = queue.claim(2, worker="w-1")
    assert {lease.job.realm_id for lease in leases} == {"a", "c"}
    with queue.db.transaction() as tx:  # a checkpoint on one held job: every column read
        tx.conn.execute(
            update(JOBS)
            .where(JOBS.c.realm_id == "a")
            .values(checkpoint=77, checkpoint_kept=3, counted_failures=1, preemptions=2)
        )
    with queue.db.session_for_tests() as s:
        rows = s.execute(select(JOBS).order_by(JOBS.c.id)).all()
        orm = s.scalars(select(JobRow).order_by(JobRow.id)).all()
        keys = tuple(s.execute(select(JOBS)).keys())
        read_job, read_held = job_reader(keys), held_reader(keys)
        for row, obj in zip(rows, orm, strict=True):
            assert to_job(row) == to_job(obj) == read_job(row)
            if row.state == "running":
                assert to_held(row) == to_held(obj) == read_held(row)
    jobs = {j.realm_id: j for j in map(to_job, rows)}
    assert jobs["b"].state is JobState.QUEUED and jobs["b"].kind is JobKind.INCREMENTAL
    assert jobs["b"].path_changes == (PathChange("x.json", True),)
    assert jobs["a"].state is JobState.RUNNING and jobs["a"].worker == "w-1"
    with queue.db.transaction() as tx:
        held = leases_sql.held_many(tx, [lease.lease_id for lease in leases] + ["no-such-lease"])
    assert set(held) == {lease.lease_id for lease in leases}
    a = next(h for h in held.values() if h.realm_id == "a")
    assert (a.checkpoint, a.kept, a.counted_failures, a.preemptions) == (77, 3, 1, 2)
    assert a.job == next(lease.job for lease in leases if lease.job.realm_id == "a")
    assert a.attempt_id is not None and a.lease_id
