"""Reads of jobs for clients and operators: one job (following merges), a
page of jobs, a job's attempts, the queue's depth."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select

from realm_service.domain import Job, JobKind, JobState
from realm_service.errors import JobNotFound
from realm_service.store.db import Tx
from realm_service.store.rows import MERGED, QUEUED, to_job
from realm_service.store.tables import JobAttemptRow, JobRow


def _resolve(tx: Tx, row: JobRow) -> Job:
    live = row
    for _ in range(64):  # chains are short; the bound guards against cycles
        if live.state != MERGED or live.superseded_by is None:
            break
        nxt = tx.session.get(JobRow, live.superseded_by)
        if nxt is None:
            break
        live = nxt
    return to_job(row, live if live is not row else None)


def get_job(tx: Tx, job_id: int) -> Job:
    row = tx.session.get(JobRow, job_id)
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
    return [_resolve(tx, row) for row in tx.session.scalars(q)]


def attempts_of(tx: Tx, job_id: int) -> list[tuple[str, str]]:
    """(lease_id, outcome) of every attempt of a job, oldest first."""
    return [
        (r.lease_id, r.outcome)
        for r in tx.session.scalars(
            select(JobAttemptRow).where(JobAttemptRow.job_id == job_id).order_by(JobAttemptRow.id)
        )
    ]


def queue_depth(tx: Tx) -> list[tuple[int, int, datetime | None]]:
    """(priority, queued count, oldest create_time) per priority."""
    rows = tx.session.execute(
        select(JobRow.priority, func.count(), func.min(JobRow.create_time))
        .where(JobRow.state == QUEUED)
        .group_by(JobRow.priority)
    ).all()
    return [(int(p), int(c), t) for p, c, t in rows]
