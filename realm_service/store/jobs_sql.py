"""Reads of jobs for clients and operators: one job (following merges), a
page of jobs, a job's attempts, the queue's depth."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, or_, select, text

from realm_service.domain import (
    Attempt,
    Job,
    JobKind,
    JobState,
    QueuePosition,
    QueueStats,
    RunningInfo,
)
from realm_service.errors import JobNotFound
from realm_service.store import direct
from realm_service.store.db import Tx
from realm_service.store.rows import MERGED, QUEUED, RUNNING, to_job
from realm_service.store.tables import JobAttemptRow, JobRow

_JOBS = cast(Table, JobRow.__table__)
_ONE_JOB = select(_JOBS).where(_JOBS.c.id == bindparam("job_id"))


def _resolve(tx: Tx, row: Any) -> Job:
    """The job of `row` as clients see it: a merged job shows the job it was
    folded into (rows as Core rows or ORM objects alike)."""
    live = row
    for _ in range(64):  # chains are short; the bound guards against cycles
        if live.state != MERGED or live.superseded_by is None:
            break
        nxt = tx.conn.execute(_ONE_JOB, {"job_id": live.superseded_by}).first()
        if nxt is None:
            break
        live = nxt
    return to_job(row, live if live is not row else None)


def get_job(tx: Tx, job_id: int) -> Job:
    """One job, read with a prebuilt Core statement (WatchJob reads a job on
    every change of it)."""
    row = direct.first(tx.conn, _ONE_JOB, {"job_id": job_id})
    if row is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return _resolve(tx, row)


def list_jobs(
    tx: Tx,
    *,
    realm_id: str | None,
    kind: JobKind | None,
    state: JobState | None,
    before_id: int | None,
    limit: int,
) -> list[Job]:
    q = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
    if realm_id:
        q = q.where(JobRow.realm_id == realm_id)
    if kind is not None:
        q = q.where(JobRow.kind == kind.value)
    if state is not None:
        q = q.where(JobRow.state == state.value)
    if before_id is not None:
        q = q.where(JobRow.id < before_id)
    return [_resolve(tx, row) for row in tx.conn.execute(q)]


def attempts_of(tx: Tx, job_id: int) -> list[tuple[str, str]]:
    """(lease_id, outcome) of every attempt of a job, oldest first."""
    return [
        (r.lease_id, r.outcome)
        for r in tx.conn.execute(
            select(JobAttemptRow).where(JobAttemptRow.job_id == job_id).order_by(JobAttemptRow.id)
        )
    ]


def queue_depth(tx: Tx) -> list[tuple[int, int, datetime | None]]:
    """(priority, queued count, oldest create_time) per priority."""
    rows = tx.conn.execute(
        select(JobRow.priority, func.count(), func.min(JobRow.create_time))
        .where(JobRow.state == QUEUED)
        .group_by(JobRow.priority)
    ).all()
    return [(int(p), int(c), t) for p, c, t in rows]


def planned_rows(tx: Tx) -> float | None:
    """The row count of `jobs` PostgreSQL's planner last recorded (ANALYZE,
    VACUUM), or None: never recorded, or not PostgreSQL."""
    if tx.backend != "postgresql":
        return None
    rows = tx.conn.execute(_PLANNED_ROWS).scalar()
    return None if rows is None or rows < 0 else float(rows)


_PLANNED_ROWS = text("SELECT reltuples FROM pg_class WHERE oid = to_regclass('jobs')")


def running_count(tx: Tx) -> int:
    """Jobs running now, over every instance (served by the lease-expiry index)."""
    return int(
        tx.conn.execute(
            select(func.count()).select_from(JobRow).where(JobRow.state == RUNNING)
        ).scalar_one()
    )


def attempts_detail(tx: Tx, job_id: int) -> list[Attempt]:
    """Every attempt of a job, oldest first, without its lease id."""
    rows = tx.conn.execute(
        select(JobAttemptRow).where(JobAttemptRow.job_id == job_id).order_by(JobAttemptRow.id)
    )
    return [
        Attempt(
            number=i,
            worker=r.worker,
            instance_id=r.instance_id,
            start_time=r.start_time,
            end_time=r.end_time,
            outcome=r.outcome,
            error_message=r.error_message,
        )
        for i, r in enumerate(rows, start=1)
    ]


def running_info(tx: Tx, job_id: int) -> RunningInfo | None:
    """Where a running job's current lease stands."""
    row = tx.conn.execute(
        select(JobRow.lease_id, JobRow.lease_expire_time, JobRow.worker).where(
            JobRow.id == job_id, JobRow.state == RUNNING
        )
    ).first()
    if row is None or row.lease_id is None:
        return None
    attempt = tx.conn.execute(
        select(JobAttemptRow.instance_id, JobAttemptRow.resume_token).where(
            JobAttemptRow.lease_id == row.lease_id
        )
    ).first()
    return RunningInfo(
        worker=row.worker,
        instance_id=attempt.instance_id if attempt is not None else "",
        lease_expire_time=row.lease_expire_time,
        detached=attempt is not None and attempt.resume_token is not None,
    )


def position(tx: Tx, job: Job, *, show: int = 5) -> QueuePosition:
    """A queued job's place in the claim order (priority, then age): the
    queued jobs before it, the first `show` of them, and its realm's
    running job."""
    row = tx.conn.execute(select(JobRow.seq).where(JobRow.id == job.job_id)).first()
    seq = row.seq if row is not None else 0
    ahead = and_(
        JobRow.state == QUEUED,
        JobRow.id != job.job_id,
        or_(
            JobRow.priority > job.priority,
            and_(
                JobRow.priority == job.priority,
                or_(JobRow.seq < seq, and_(JobRow.seq == seq, JobRow.id < job.job_id)),
            ),
        ),
    )
    count = int(tx.conn.scalar(select(func.count()).select_from(JobRow).where(ahead)) or 0)
    first = [
        to_job(r)
        for r in tx.conn.execute(
            select(JobRow)
            .where(ahead)
            .order_by(JobRow.priority.desc(), JobRow.seq, JobRow.id)
            .limit(show)
        )
    ]
    running = tx.conn.execute(
        select(JobRow).where(JobRow.realm_id == job.realm_id, JobRow.state == RUNNING)
    ).first()
    return QueuePosition(
        ahead=count,
        first_ahead=tuple(first),
        realm_running=None if running is None else to_job(running),
    )


def queue_stats(tx: Tx, now: datetime) -> QueueStats:
    """Jobs by state, kind and priority (a merged job counts with the job it
    was folded into, so it is left out), the oldest queued per priority, and
    jobs finished in the last minute and hour by outcome."""
    counts = tx.conn.execute(
        select(JobRow.state, JobRow.kind, JobRow.priority, func.count())
        .where(JobRow.state != MERGED)
        .group_by(JobRow.state, JobRow.kind, JobRow.priority)
        .order_by(JobRow.state, JobRow.kind, JobRow.priority)
    ).all()
    oldest = tx.conn.execute(
        select(JobRow.priority, func.min(JobRow.create_time))
        .where(JobRow.state == QUEUED)
        .group_by(JobRow.priority)
        .order_by(JobRow.priority.desc())
    ).all()
    finished = [JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value]

    def ended_since(since: datetime) -> dict[JobState, int]:
        rows = tx.conn.execute(
            select(JobRow.state, func.count())
            .where(JobRow.state.in_(finished), JobRow.finish_time >= since)
            .group_by(JobRow.state)
        ).all()
        return {JobState(state): int(n) for state, n in rows}

    return QueueStats(
        counts=tuple(
            (JobState(state), JobKind(kind), int(priority), int(n))
            for state, kind, priority, n in counts
        ),
        oldest=tuple((int(p), t) for p, t in oldest),
        last_minute=ended_since(now - timedelta(minutes=1)),
        last_hour=ended_since(now - timedelta(hours=1)),
    )
