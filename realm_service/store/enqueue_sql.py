"""The statements of enqueueing: a realm's queued and running jobs as
coalescing reads them, new jobs, merges. The coalescing rules themselves are
the queue's (`queue.py`); these functions only read and write what it
decides, and answer with `Job` values.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Insert,
    Table,
    and_,
    bindparam,
    exc,
    func,
    insert,
    null,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql

from realm_service.domain import Job, JobKind, JobState, PathChange, merge_paths
from realm_service.errors import Conflict, RealmNotFound
from realm_service.store import direct
from realm_service.store.db import Effects, LoopTx, Tx
from realm_service.store.rows import (
    JOB_FIELDS,
    MERGED,
    NEW_JOB_FIELDS,
    QUEUED,
    RUNNING,
    encode_paths,
    new_job_values,
    to_job,
)
from realm_service.store.sets import dialect_insert, in_values
from realm_service.store.tables import JobRow, RealmRow

_JOBS = cast(Table, JobRow.__table__)
_REALMS = cast(Table, RealmRow.__table__)
# What `to_job` reads, and no more: each column a read returns costs the
# driver and SQLAlchemy a little per execution.
_JOB_COLUMNS = tuple(_JOBS.c[name] for name in JOB_FIELDS)
_INSERT = insert(_JOBS).returning(*_JOB_COLUMNS, sort_by_parameter_order=True)
_MERGE = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"))
    .values(priority=bindparam("b_priority"), paths=bindparam("b_paths"))
)
_RAISE = (
    update(_JOBS)
    .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)), _JOBS.c.priority < bindparam("p"))
    .values(priority=bindparam("p"))
)


def realm_jobs(
    tx: Tx, realm_id: str, kinds: Sequence[JobKind], *, check_realm: bool = False
) -> tuple[dict[JobKind, Job], Job | None]:
    """What an enqueue coalesces with, in one read: the realm's queued jobs of
    these kinds (at most one each, locked until the transaction ends) and its
    running job, if any. With `check_realm`, the same read says whether the
    realm exists (RealmNotFound if not); a queued job of it proves it does."""
    params = {"realm_id": realm_id, "kinds": [k.value for k in kinds]}
    for _ in range(5):
        queued: dict[JobKind, Job] = {}
        running: Job | None = None
        seen: int | None = None  # None: no realm row
        for row in tx.conn.execute(_REALM_JOBS, params):
            if row.realm_row is None:
                queued[JobKind(row.kind)] = to_job(row)
                continue
            seen = row.queued_seen
            if row.id is not None:
                running = to_job(row)
        # On PostgreSQL the locked read waits for a claim (or merge) of its
        # rows to commit and then leaves out those no longer queued, but the
        # rest of the statement sees what was there before it: a job just
        # started would be found neither queued nor running. The count of
        # the statement's own view tells; read again.
        if seen is None or seen == len(queued):
            if check_realm and seen is None and not queued:
                raise RealmNotFound(f"realm {realm_id!r} does not exist")
            return queued, running
    raise Conflict("could not read the realm's jobs: they kept changing; retry")


# The statements every enqueue reads with: prebuilt, the kinds bound as one list.
_QUEUED_OF_KINDS = (
    select(*_JOB_COLUMNS)
    .where(
        _JOBS.c.realm_id == bindparam("realm_id"),
        _JOBS.c.state == QUEUED,
        in_values(_JOBS.c.kind, "kinds"),
    )
    .with_for_update()
)
# The realm's row joined with its running job, if any (one row if the realm
# exists; the job's columns are NULL when nothing runs), and how many queued
# jobs of the kinds the statement sees without waiting for locks.
_SEEN = _JOBS.alias("seen")
_QUEUED_SEEN = (
    select(func.count())
    .select_from(_SEEN)
    .where(
        _SEEN.c.realm_id == _REALMS.c.realm_id,
        _SEEN.c.state == QUEUED,
        in_values(_SEEN.c.kind, "kinds"),
    )
    .correlate(_REALMS)
    .scalar_subquery()
)
_REALM_AND_RUNNING = (
    select(_REALMS.c.realm_id.label("realm_row"), _QUEUED_SEEN.label("queued_seen"), *_JOB_COLUMNS)
    .select_from(
        _REALMS.outerjoin(
            _JOBS, and_(_JOBS.c.realm_id == _REALMS.c.realm_id, _JOBS.c.state == RUNNING)
        )
    )
    .where(_REALMS.c.realm_id == bindparam("realm_id"))
)
# Both in one statement: the queued jobs, locked (in a CTE: PostgreSQL locks
# no rows of a UNION's branches), with a NULL realm_row, then the row above.
_QUEUED_CTE = _QUEUED_OF_KINDS.cte("queued")
_REALM_JOBS = union_all(
    select(null().label("realm_row"), null().label("queued_seen"), *_QUEUED_CTE.c),
    _REALM_AND_RUNNING,
)


def has_from_scratch(tx: Tx, realm_id: str, states: Sequence[JobState]) -> bool:
    count = tx.conn.scalar(
        select(func.count())
        .select_from(_JOBS)
        .where(
            _JOBS.c.realm_id == realm_id,
            _JOBS.c.kind == JobKind.FROM_SCRATCH.value,
            _JOBS.c.state.in_([state.value for state in states]),
        )
    )
    return (count or 0) > 0


def merge(tx: Tx, job: Job, priority: int, paths: Sequence[PathChange] = ()) -> Job:
    """Fold a request into a queued job (locked by `realm_jobs`): the higher
    priority, the union of the paths (a delete wins)."""
    merged = merge_paths(job.path_changes, paths) if paths else job.path_changes
    top = max(job.priority, priority)
    if top == job.priority and merged == job.path_changes:
        return job
    tx.conn.execute(
        _MERGE, {"b_id": job.job_id, "b_priority": top, "b_paths": encode_paths(merged)}
    )
    tx.job_changed([job.job_id])
    return dataclasses.replace(job, priority=top, path_changes=merged)


def raise_priority(tx: Tx, job_ids: Sequence[int], priority: int) -> None:
    """Raise queued jobs to `priority`; never lower one."""
    if job_ids:
        tx.conn.execute(_RAISE, {"ids": list(job_ids), "p": priority})
        tx.job_changed(job_ids)


def insert_job(
    tx: Tx,
    *,
    realm_id: str,
    kind: JobKind,
    priority: int,
    now: datetime,
    paths: Sequence[PathChange] = (),
    trace_parent: str = "",
) -> Job:
    values = new_job_values(
        realm_id=realm_id,
        kind=kind,
        priority=priority,
        now=now,
        paths=paths,
        trace_parent=trace_parent,
    )
    row = tx.conn.execute(_INSERT, values).one()
    tx.announce_new_work()
    tx.job_changed([row.id])
    return to_job(row)


def insert_if_idle(
    tx: Tx,
    *,
    realm_id: str,
    kind: JobKind,
    coalesce_with: Sequence[JobKind],
    priority: int,
    now: datetime,
    paths: Sequence[PathChange] = (),
    trace_parent: str = "",
) -> Job | None:
    """Insert the job when the realm exists, runs no job and has no queued
    job of the kinds in `coalesce_with`: one statement, which a transaction
    of statements that each commit alone (`Database.statements`) may run.
    None, and nothing written, when any of that fails to hold (or a
    concurrent enqueuer's queued job of the kind wins the unique index): the
    caller's full enqueue reads the realm's jobs and decides."""
    values = _if_idle_values(realm_id, kind, coalesce_with, priority, now, paths, trace_parent)
    return _inserted(tx, direct.first(tx.conn, _insert_if_idle(tx.backend), values))


async def insert_if_idle_on_loop(
    tx: LoopTx,
    *,
    realm_id: str,
    kind: JobKind,
    coalesce_with: Sequence[JobKind],
    priority: int,
    now: datetime,
    paths: Sequence[PathChange] = (),
    trace_parent: str = "",
) -> Job | None:
    """`insert_if_idle` on the event loop (`Database.loop_statements`)."""
    values = _if_idle_values(realm_id, kind, coalesce_with, priority, now, paths, trace_parent)
    return _inserted(tx, await direct.first_on_loop(tx, _insert_if_idle("postgresql"), values))


def _if_idle_values(
    realm_id: str,
    kind: JobKind,
    coalesce_with: Sequence[JobKind],
    priority: int,
    now: datetime,
    paths: Sequence[PathChange],
    trace_parent: str,
) -> dict[str, Any]:
    values = new_job_values(
        realm_id=realm_id,
        kind=kind,
        priority=priority,
        now=now,
        paths=paths,
        trace_parent=trace_parent,
    )
    values["kinds"] = [k.value for k in coalesce_with]
    return values


def _inserted(tx: Effects, row: Any | None) -> Job | None:
    """The job an insert returned (None: it inserted nothing), new work at
    commit."""
    if row is None:
        return None
    tx.announce_new_work()
    tx.job_changed([row.id])
    return to_job(row)


@functools.cache
def _insert_if_idle(backend: str) -> Insert:
    names = list(NEW_JOB_FIELDS)
    realm_id = bindparam("realm_id", type_=_JOBS.c.realm_id.type)
    idle = _JOBS.alias("idle")
    row = select(*(bindparam(name, type_=_JOBS.c[name].type) for name in names)).where(
        select(_REALMS.c.realm_id).where(_REALMS.c.realm_id == realm_id).exists(),
        ~select(idle.c.id).where(idle.c.realm_id == realm_id, idle.c.state == RUNNING).exists(),
        ~select(idle.c.id)
        .where(idle.c.realm_id == realm_id, idle.c.state == QUEUED, in_values(idle.c.kind, "kinds"))
        .exists(),
    )
    # No arbiter: the only unique index a new queued row can meet is the one
    # of one queued job per realm and kind (the id is new, the lease NULL).
    return (
        dialect_insert(backend, _JOBS)
        .from_select(names, row)
        .on_conflict_do_nothing()
        .returning(*_JOB_COLUMNS)
    )


def try_insert_job(
    tx: Tx,
    *,
    realm_id: str,
    kind: JobKind,
    priority: int,
    now: datetime,
    paths: Sequence[PathChange] = (),
    trace_parent: str = "",
) -> Job | None:
    """Insert unless the realm has a queued job of this kind: None then (a
    concurrent enqueuer's job exists now), the transaction still usable.
    PostgreSQL skips the row on the unique index's conflict (`ON CONFLICT DO
    NOTHING`, one statement, no savepoint). On SQLite the transaction holds
    the only write lock: no concurrent enqueuer exists."""
    if tx.backend != "postgresql":
        return insert_job(
            tx,
            realm_id=realm_id,
            kind=kind,
            priority=priority,
            now=now,
            paths=paths,
            trace_parent=trace_parent,
        )
    values = new_job_values(
        realm_id=realm_id,
        kind=kind,
        priority=priority,
        now=now,
        paths=paths,
        trace_parent=trace_parent,
    )
    row = tx.conn.execute(_INSERT_UNLESS_QUEUED, values).first()
    if row is None:
        return None
    tx.announce_new_work()
    tx.job_changed([row.id])
    return to_job(row)


# The arbiter is the partial unique index of one queued job per realm and
# kind; its predicate is repeated literally so PostgreSQL can infer it.
_INSERT_UNLESS_QUEUED = (
    postgresql.insert(_JOBS)
    .on_conflict_do_nothing(
        index_elements=[_JOBS.c.realm_id, _JOBS.c.kind], index_where=text("state = 'queued'")
    )
    .returning(*_JOB_COLUMNS)
)


def active_from_scratch(tx: Tx, realm_ids: Sequence[str]) -> dict[str, Job]:
    """Each of these realms' queued from-scratch job (locked), else its
    running one; realms with neither are left out. Queued first: on
    PostgreSQL a claim committing while this waits for the lock takes the job
    out of the queued read, and the running read, a later statement, sees it
    running."""
    if not realm_ids:
        return {}
    scratch = (_JOBS.c.realm_id.in_(list(realm_ids)), _JOBS.c.kind == JobKind.FROM_SCRATCH.value)
    queued = {
        row.realm_id: to_job(row)
        for row in tx.conn.execute(
            select(_JOBS).where(*scratch, _JOBS.c.state == QUEUED).with_for_update()
        )
    }
    running = tx.conn.execute(select(_JOBS).where(*scratch, _JOBS.c.state == RUNNING))
    return {**{row.realm_id: to_job(row) for row in running}, **queued}


def try_insert_from_scratch_jobs(
    tx: Tx, realm_ids: Sequence[str], *, priority: int, now: datetime
) -> list[Job] | None:
    """One queued from-scratch job per realm, in one statement inside a
    savepoint; None when the unique index refused one (a concurrent enqueuer's
    job exists now), leaving the outer transaction usable."""
    if not realm_ids:
        return []
    rows = [
        new_job_values(realm_id=realm_id, kind=JobKind.FROM_SCRATCH, priority=priority, now=now)
        for realm_id in realm_ids
    ]
    try:
        with tx.conn.begin_nested():
            jobs = [to_job(row) for row in tx.conn.execute(_INSERT, rows)]
    except exc.IntegrityError:
        return None
    tx.announce_new_work()
    tx.job_changed([job.job_id for job in jobs])
    return jobs


def supersede(tx: Tx, job: Job, by: Job) -> None:
    """A queued job (locked by `realm_jobs`) folds into `by`, a queued or
    running job of the realm that does its work: it leaves the queue, reads
    of it follow `by`, and a queued `by` keeps the earlier place in line."""
    seq = tx.conn.scalar(
        update(_JOBS)
        .where(_JOBS.c.id == job.job_id, _JOBS.c.state == QUEUED)
        .values(state=MERGED, superseded_by=by.job_id)
        .returning(_JOBS.c.seq)
    )
    if seq is not None:
        tx.conn.execute(
            update(_JOBS)
            .where(_JOBS.c.id == by.job_id, _JOBS.c.state == QUEUED, _JOBS.c.seq > seq)
            .values(seq=seq)
        )
    tx.job_changed([job.job_id, by.job_id])
