"""The statements of leases once handed out: fenced lookups, heartbeats,
attempts' ends, and the transitions of a held job (succeed, fail, requeue).
Each transition records its effects on the `Tx`: jobs changed, new work.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, Update, bindparam, case, exists, func, select, update

from realm_service.domain import (
    PREEMPTED_FOR,
    AttemptOutcome,
    HeldJob,
    Job,
    JobKind,
    JobState,
    Lease,
    merge_paths,
)
from realm_service.errors import FailedPrecondition, JobNotFound, StaleLease
from realm_service.store import direct, index_sql
from realm_service.store.db import Tx
from realm_service.store.rows import (
    CANCELLED,
    FAILED,
    HELD_FIELDS,
    MERGED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    decode_paths,
    encode_paths,
    held_reader,
    job_with,
    to_held,
    to_job,
)
from realm_service.store.sets import in_values, rows_params, rows_source
from realm_service.store.tables import JobAttemptRow, JobRow

_JOBS = cast(Table, JobRow.__table__)
_ATTEMPTS = cast(Table, JobAttemptRow.__table__)

# Locked in id order on PostgreSQL (concurrent batches lock alike). SQLite
# sorts them here instead: with planner statistics (an ANALYZE, a PRAGMA
# optimize) it walked the whole table in id order rather than sort the few
# rows the lease index finds.
_HELD_ROWS = select(*(_JOBS.c[name] for name in HELD_FIELDS)).where(
    in_values(_JOBS.c.lease_id, "leases"), _JOBS.c.state == RUNNING
)
_HELD = _HELD_ROWS.order_by(_JOBS.c.id).with_for_update()
# The job ids succeeding, each with its final progress (done = total).
_SUCCEED_COLUMNS = (("job_id", int), ("done", int))


@functools.cache
def _succeed(backend: str) -> Update:
    """Held jobs succeeded in one statement, with their final progress. On
    PostgreSQL each row returned says whether the job's realm has a queued
    job (held back while this one ran, it may run now), and the same
    statement ends their attempts as completed (a data-modifying CTE: one
    round trip less). On SQLite both are statements of their own: its
    RETURNING clause does not use an index for a correlated subquery (each
    row returned scanned every queued job: 57 ms for 16 jobs with 100,000
    queued), a SELECT does."""
    final = rows_source(backend, "f", _SUCCEED_COLUMNS)
    statement = (
        update(_JOBS)
        .where(_JOBS.c.id == final.c.job_id)
        .values(
            state=SUCCEEDED,
            finish_time=bindparam("now"),
            error_message="",
            progress_done=final.c.done,
            progress_total=final.c.done,
            lease_id=None,
            lease_expire_time=None,
            # Its generation is now the realm's: no longer a checkpoint.
            checkpoint=None,
        )
    )
    if backend != "postgresql":
        return statement
    # The jobs by their primary key whatever the statistics say (a backlog
    # just queued is not in them yet; the join alone was then planned as a
    # scan of every job), and per row a probe of the realm's queued job: a
    # scalar subquery with LIMIT, which PostgreSQL never turns into a hash of
    # the whole queue built for each batch (what it did for EXISTS when its
    # statistics counted few queued jobs).
    queued = _JOBS.alias("queued")
    return (
        statement.where(in_values(_JOBS.c.id, "f_job_id", int))
        .add_cte(_END_ATTEMPTS.cte("ended_attempts"))
        .returning(
            select(queued.c.id)
            .where(queued.c.realm_id == _JOBS.c.realm_id, queued.c.state == QUEUED)
            .limit(1)
            .scalar_subquery()
        )
    )


# Whether any of these realms has a queued job (SQLite; see `_succeed`).
_ANY_QUEUED = (
    select(_JOBS.c.id)
    .where(in_values(_JOBS.c.realm_id, "realm_ids"), _JOBS.c.state == QUEUED)
    .limit(1)
)


_END_ATTEMPTS = (
    update(_ATTEMPTS)
    .where(in_values(_ATTEMPTS.c.id, "ids", int))
    .values(outcome=bindparam("outcome"), end_time=bindparam("now"), error_message="")
)
# A detached lease is not extended: a heartbeat its broken stream had in
# flight must not undo the shortened expiry of its resume grace.
_ATTACHED = ~exists().where(
    _ATTEMPTS.c.id == _JOBS.c.lease_attempt_id, _ATTEMPTS.c.resume_token.is_not(None)
)
_EXTEND = (
    update(_JOBS)
    .where(_JOBS.c.lease_id == bindparam("b_lease"), _JOBS.c.state == RUNNING, _ATTACHED)
    .values(
        lease_expire_time=bindparam("b_until"),
        progress_done=bindparam("b_done"),
        progress_total=bindparam("b_total"),
    )
    .returning(_JOBS.c.id)
)
_EXTEND_ONLY = (
    update(_JOBS)
    .where(_JOBS.c.lease_id == bindparam("b_lease"), _JOBS.c.state == RUNNING, _ATTACHED)
    .values(lease_expire_time=bindparam("b_until"))
    .returning(_JOBS.c.id)
)


def current(tx: Tx, lease_id: str, *, lock: bool = True, share: bool = False) -> HeldJob:
    """The running job held under `lease_id`, or StaleLease (saying why).
    `share` takes a shared lock instead: enough to keep the lease current
    until commit (a cancel or completion waits for it), without serializing
    its readers."""
    q = _CURRENT_SHARED if share else _CURRENT_LOCKED if lock else _CURRENT
    row = tx.conn.execute(q, {"lease_id": lease_id}).first() if lease_id else None
    if row is None:
        raise StaleLease(stale_reasons(tx, [lease_id])[lease_id])
    return to_held(row)


_ENDED_ATTEMPTS = select(
    _ATTEMPTS.c.lease_id, _ATTEMPTS.c.outcome, _ATTEMPTS.c.error_message
).where(in_values(_ATTEMPTS.c.lease_id, "leases"))
_WHY_ENDED = {
    AttemptOutcome.COMPLETED.value: "its job completed",
    AttemptOutcome.FAILED.value: "its attempt failed",
    AttemptOutcome.INTERRUPTED.value: "its attempt was released as interrupted",
    AttemptOutcome.EXPIRED.value: "it expired",
    AttemptOutcome.CANCELLED.value: "its job was cancelled",
}


def stale_reasons(tx: Tx, lease_ids: Sequence[str]) -> dict[str, str]:
    """Why each of these leases is not current, read from its attempt (for a
    worker's log and an operator reading it): "lease '…' is not current:
    cancelled: <reason>", "…: it expired", "…: no such lease". The
    caller has found them not current; this only reads."""
    found = {
        row.lease_id: row
        for row in tx.conn.execute(_ENDED_ATTEMPTS, {"leases": [x for x in lease_ids if x]})
    }
    reasons: dict[str, str] = {}
    for lease_id in lease_ids:
        head = f"lease {lease_id[:40]!r} is not current"
        row = found.get(lease_id)
        if row is None:
            reasons[lease_id] = f"{head}: no such lease"
            continue
        why = _WHY_ENDED.get(row.outcome)
        if why is None:  # still running: the lease was named twice in one message
            reasons[lease_id] = head
            continue
        detail = (row.error_message or "")[:200]
        if row.outcome == AttemptOutcome.CANCELLED.value and detail:
            reasons[lease_id] = f"{head}: {detail}"  # the cancel's own words ("cancelled: …")
        elif row.outcome == AttemptOutcome.INTERRUPTED.value and detail.startswith(PREEMPTED_FOR):
            reasons[lease_id] = f"{head}: {detail}"  # "preempted for job …"
        elif row.outcome == AttemptOutcome.FAILED.value and detail:
            reasons[lease_id] = f"{head}: {why}: {detail}"
        else:
            reasons[lease_id] = f"{head}: {why}"
    return reasons


# Every result, upload and heartbeat of a lease reads it: prebuilt Core.
_CURRENT = select(_JOBS).where(_JOBS.c.lease_id == bindparam("lease_id"), _JOBS.c.state == RUNNING)
_CURRENT_LOCKED = _CURRENT.with_for_update()
_CURRENT_SHARED = _CURRENT.with_for_update(read=True)


def held_many(tx: Tx, lease_ids: Sequence[str]) -> dict[str, HeldJob]:
    """The running jobs held under any of `lease_ids`, locked, by lease."""
    wanted = [lease for lease in dict.fromkeys(lease_ids) if lease]
    if not wanted:
        return {}
    pg = tx.backend == "postgresql"
    read = held_reader(HELD_FIELDS)
    held = [
        read(row) for row in direct.rows(tx.conn, _HELD if pg else _HELD_ROWS, {"leases": wanted})
    ]
    if not pg:
        held.sort(key=lambda h: h.job.job_id)
    return {h.lease_id: h for h in held}


def running_lease(tx: Tx, lease_id: str, realm_id: str) -> HeldJob | None:
    """The running job of the realm whose current lease is `lease_id`, if any."""
    row = tx.conn.execute(
        select(_JOBS).where(
            _JOBS.c.lease_id == lease_id, _JOBS.c.state == RUNNING, _JOBS.c.realm_id == realm_id
        )
    ).first()
    return None if row is None else to_held(row)


def checkpoint_gitignore(tx: Tx, job_id: int) -> str | None:
    return cast(
        "str | None",
        tx.conn.scalar(select(_JOBS.c.checkpoint_gitignore).where(_JOBS.c.id == job_id)),
    )


def lease_runs_realm(tx: Tx, lease_id: str, realm_id: str) -> bool:
    """Whether `lease_id` is the current lease of a running job of the realm."""
    found = tx.conn.scalar(
        select(_JOBS.c.id).where(
            _JOBS.c.lease_id == lease_id, _JOBS.c.state == RUNNING, _JOBS.c.realm_id == realm_id
        )
    )
    return found is not None


def extend(
    tx: Tx, lease_ids: Sequence[str], until: datetime, progress: dict[str, tuple[int, int]]
) -> set[str]:
    """Extend current leases (recording progress where given); returns the
    ones that were current. Jobs whose progress changed are reported to
    watchers at commit."""
    extended: set[str] = set()
    moved: list[int] = []
    for lease in lease_ids:
        if lease in progress:
            done, total = progress[lease]
            params = {"b_lease": lease, "b_until": until, "b_done": max(0, done)}
            params["b_total"] = max(0, total)
            job_id = tx.conn.execute(_EXTEND, params).scalar()
            if job_id is not None:
                moved.append(job_id)
        else:
            job_id = tx.conn.execute(_EXTEND_ONLY, {"b_lease": lease, "b_until": until}).scalar()
        if job_id is not None:
            extended.add(lease)
    tx.job_changed(moved)
    return extended


def end_attempt(
    tx: Tx, attempt_id: int | None, outcome: AttemptOutcome, now: datetime, message: str
) -> None:
    if attempt_id is None:
        return
    tx.conn.execute(
        update(_ATTEMPTS)
        .where(_ATTEMPTS.c.id == attempt_id)
        .values(outcome=outcome.value, end_time=now, error_message=message[:2000])
    )


def succeed(
    tx: Tx, held: Sequence[HeldJob], now: datetime, *, files_done: Mapping[int, int] | None = None
) -> list[Job]:
    """Mark held jobs succeeded and their attempts completed; the jobs as they
    now are. A job that succeeded did all its work: its progress is done =
    total, the final count its worker reported (`files_done`, by job id) or
    else the total it had. Their realms' next jobs may run now: that is new
    work."""
    if not held:
        return []
    final = files_done or {}
    done = {h.job_id: final.get(h.job_id, h.job.progress_total) for h in held}
    attempts = {
        "ids": [h.attempt_id for h in held if h.attempt_id is not None],
        "outcome": AttemptOutcome.COMPLETED.value,
    }
    rows = rows_params(tx.backend, "f", _SUCCEED_COLUMNS, list(done.items()))
    if tx.backend == "postgresql":
        statement = _succeed(tx.backend)
        found = direct.rows(tx.conn, statement, {**rows, **attempts, "now": now})
        queued_after = any(row[0] is not None for row in found)
    else:
        direct.rows(tx.conn, _END_ATTEMPTS, {**attempts, "now": now})
        direct.rows(tx.conn, _succeed(tx.backend), {**rows, "now": now})
        realm_ids = list({h.realm_id for h in held})
        queued_after = direct.first(tx.conn, _ANY_QUEUED, {"realm_ids": realm_ids}) is not None
    # A realm's next job, held back while this one ran, may run now: new work,
    # if there is one (otherwise the wake-up would only cost a claim for nothing).
    if queued_after:
        tx.announce_new_work()
    jobs = [
        job_with(
            h.job,
            state=JobState.SUCCEEDED,
            finish_time=now,
            error_message="",
            progress_done=done[h.job_id],
            progress_total=done[h.job_id],
        )
        for h in held
    ]
    tx.job_finished(jobs)
    return jobs


def fail(tx: Tx, held: HeldJob, now: datetime, reason: str, *, counted: bool) -> Job:
    """End a held job as failed for good."""
    values: dict[str, Any] = {
        "state": FAILED,
        "finish_time": now,
        "error_message": reason[:2000],
        "lease_id": None,
        "lease_expire_time": None,
    }
    if counted:
        values["counted_failures"] = _JOBS.c.counted_failures + 1
    if held.checkpoint is not None:
        values["checkpoint"] = None
        index_sql.drop_generation(tx, held.realm_id, held.checkpoint)
    tx.conn.execute(update(_JOBS).where(_JOBS.c.id == held.job_id).values(**values))
    tx.announce_new_work()  # the realm's next job may run now
    job = dataclasses.replace(
        held.job, state=JobState.FAILED, finish_time=now, error_message=reason[:2000]
    )
    tx.job_finished([job])
    return job


def requeue(
    tx: Tx, held: HeldJob, *, counted: bool, message: str | None = None, preempted: bool = False
) -> Job:
    """Put a running job back in the queue, keeping its place in line. If a job
    of the same realm and kind was queued meanwhile, fold this one into it
    (the higher priority, the earlier place, the union of the paths). A
    `preempted` job is counted as such and goes to the head of its
    priority's line (aging: the next slot free for that work takes it).
    A from-scratch job keeps what its attempts staged as its checkpoint
    (DESIGN.md section 6): the next attempt stages into the same generation
    and reads only the files whose entries are not kept; folded into a job
    without one, the checkpoint goes with it."""
    job = held.job
    head: int | None = None
    if preempted:
        own, first = tx.conn.execute(
            select(
                select(_JOBS.c.seq).where(_JOBS.c.id == job.job_id).scalar_subquery(),
                select(func.min(_JOBS.c.seq))
                .where(_JOBS.c.state == QUEUED, _JOBS.c.priority == job.priority)
                .scalar_subquery(),
            )
        ).one()
        head = own if first is None else min(own, first - 1)
    other = tx.conn.execute(
        select(_JOBS)
        .where(
            _JOBS.c.realm_id == job.realm_id,
            _JOBS.c.kind == job.kind.value,
            _JOBS.c.state == QUEUED,
        )
        .with_for_update()
    ).first()
    values: dict[str, Any] = {"lease_id": None, "lease_expire_time": None, "lease_attempt_id": None}
    if counted:
        values["counted_failures"] = _JOBS.c.counted_failures + 1
    if message is not None:
        values["error_message"] = message[:2000]
    if preempted:
        values["preemptions"] = _JOBS.c.preemptions + 1
        values["seq"] = head
    checkpoint = held.generation if job.kind is JobKind.FROM_SCRATCH else None
    values["checkpoint_kept"] = None  # counted again when the next attempt opens it
    if other is None:
        values["state"] = QUEUED
        values["checkpoint"] = checkpoint
        if checkpoint is not None:
            values["checkpoint_gitignore"] = index_sql.gitignore_sha(job.realm_id)
    else:
        values["checkpoint"] = None
        moved: dict[str, Any] = {}
        if checkpoint is not None and other.checkpoint is None:
            moved = {
                "checkpoint": checkpoint,
                "checkpoint_kept": None,
                "checkpoint_gitignore": index_sql.gitignore_sha(job.realm_id),
            }
        elif checkpoint is not None and checkpoint != other.checkpoint:
            index_sql.drop_generation(tx, job.realm_id, checkpoint)
        values["state"] = MERGED
        values["superseded_by"] = other.id
        # Aging places a job in its own priority's line: folded into a job
        # of another priority, it keeps the place it had.
        seq = (
            head
            if head is not None and other.priority == job.priority
            else tx.conn.scalar(select(_JOBS.c.seq).where(_JOBS.c.id == job.job_id))
        )
        tx.conn.execute(
            update(_JOBS)
            .where(_JOBS.c.id == other.id)
            .values(
                priority=max(other.priority, job.priority),
                seq=min(other.seq, seq if seq is not None else other.seq),
                paths=encode_paths(merge_paths(decode_paths(other.paths), job.path_changes)),
                preemptions=max(other.preemptions, held.preemptions + preempted),
                **moved,
            )
        )
        tx.job_changed([other.id])
    tx.conn.execute(update(_JOBS).where(_JOBS.c.id == job.job_id).values(**values))
    tx.job_changed([job.job_id])
    tx.announce_new_work()
    return dataclasses.replace(
        job,
        state=JobState.QUEUED,
        error_message=job.error_message if message is None else message[:2000],
    )


def expired(tx: Tx, now: datetime, limit: int) -> list[HeldJob]:
    """Running jobs whose lease ran out, oldest expiry first, locked (rows
    another reaper holds are skipped)."""
    return [
        to_held(row)
        for row in tx.conn.execute(
            select(JobRow)
            .where(JobRow.state == RUNNING, JobRow.lease_expire_time < now)
            .order_by(JobRow.lease_expire_time)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ]


def cancel(tx: Tx, job_id: int, reason: str, now: datetime) -> tuple[Job, HeldJob | None]:
    """Cancel a job (a merged one: the job it was folded into): a queued one
    leaves the queue, a running one loses its lease and its attempt ends as
    cancelled. Returns the job as it now is, and what was held (to revoke
    its lease and drop what it staged); a cancelled job is returned as is.
    FailedPrecondition on a job that already succeeded or failed."""
    row = _live_row_for_update(tx, job_id)
    if row.state == CANCELLED:
        return to_job(row), None
    if row.state in (SUCCEEDED, FAILED):
        raise FailedPrecondition(
            f"job {row.id} already {row.state}; only queued or running jobs can be cancelled"
        )
    held = to_held(row) if row.state == RUNNING else None
    if held is None and row.checkpoint is not None:
        # A queued job's checkpoint goes with it (a running one's generation
        # is dropped by the caller with the attempt's).
        index_sql.drop_generation(tx, row.realm_id, row.checkpoint)
    tx.conn.execute(
        update(_JOBS)
        .where(_JOBS.c.id == row.id)
        .values(
            state=CANCELLED,
            finish_time=now,
            error_message=reason[:2000],
            lease_id=None,
            lease_expire_time=None,
            checkpoint=None,
        )
    )
    if held is not None and held.attempt_id is not None:
        end_attempt(tx, held.attempt_id, AttemptOutcome.CANCELLED, now, reason)
        tx.revoke([held.lease_id], reason)
        tx.announce_new_work()  # the realm's next job may run now
    tx.job_changed([row.id] if row.id == job_id else [job_id, row.id])
    return (
        dataclasses.replace(
            to_job(row),
            state=JobState.CANCELLED,
            finish_time=now,
            error_message=reason[:2000],
        ),
        held,
    )


def _live_row_for_update(tx: Tx, job_id: int) -> Any:
    """The job's row, or the row of the job it was merged into, locked."""
    for _ in range(64):  # merge chains are short; the bound guards against cycles
        row = tx.conn.execute(select(_JOBS).where(_JOBS.c.id == job_id).with_for_update()).first()
        if row is None:
            raise JobNotFound(f"job {job_id} does not exist")
        if row.state != MERGED or row.superseded_by is None:
            return row
        job_id = row.superseded_by
    raise JobNotFound(f"job {job_id} does not exist")


def still_queued(tx: Tx, job_id: int) -> bool:
    """Whether the job is queued, its row locked until commit (a claim that
    holds it is waited for, and then seen)."""
    state = tx.conn.scalar(select(_JOBS.c.state).where(_JOBS.c.id == job_id).with_for_update())
    return state == QUEUED


# Resumable sessions (DESIGN.md section 5): the leases of a stream that broke
# are kept for a grace, named by a secret its worker quotes to re-attach them.
_DETACH = (
    update(_JOBS)
    .where(_JOBS.c.lease_id == bindparam("b_lease"), _JOBS.c.state == RUNNING)
    .values(
        lease_expire_time=case(
            (_JOBS.c.lease_expire_time > bindparam("b_until"), bindparam("b_until")),
            else_=_JOBS.c.lease_expire_time,
        )
    )
    .returning(_JOBS.c.lease_attempt_id)
)
_MARK_DETACHED = (
    update(_ATTEMPTS)
    .where(_ATTEMPTS.c.id == bindparam("b_attempt"))
    .values(resume_token=bindparam("b_token"))
)


def detach(tx: Tx, lease_ids: Sequence[str], token: str, until: datetime) -> list[str]:
    """Keep the current ones of these leases until `until` at the latest
    (their expiry is shortened to it), re-attachable with `token`. Returns
    the leases kept."""
    kept: list[str] = []
    for lease_id in lease_ids:
        attempt = tx.conn.execute(_DETACH, {"b_lease": lease_id, "b_until": until}).scalar()
        if attempt is not None:
            tx.conn.execute(_MARK_DETACHED, {"b_attempt": attempt, "b_token": token})
            kept.append(lease_id)
    return kept


_DETACHED = (
    select(_JOBS, _ATTEMPTS.c.resume_token, _ATTEMPTS.c.worker.label("attempt_worker"))
    .join(_ATTEMPTS, _ATTEMPTS.c.id == _JOBS.c.lease_attempt_id)
    .where(_JOBS.c.lease_id == bindparam("lease_id"), _JOBS.c.state == RUNNING)
    .with_for_update(of=_JOBS)
)
# How a lease that could not be re-attached ended, as the job's state a
# worker is told (a result of it applied before the break: SUCCEEDED).
_STATE_AFTER = {
    AttemptOutcome.COMPLETED.value: JobState.SUCCEEDED,
    AttemptOutcome.INTERRUPTED.value: JobState.QUEUED,
    AttemptOutcome.CANCELLED.value: JobState.CANCELLED,
}


def reattach(
    tx: Tx,
    lease_ids: Sequence[str],
    *,
    worker: str,
    token: str,
    now: datetime,
    until: datetime,
    instance_id: str,
) -> dict[str, Lease | tuple[str, JobState | None]]:
    """Re-attach leases detached with `token` from a stream of `worker` whose
    grace has not run out: each gets `until` as its expiry and this instance
    as its holder. The others map to why not and their job's state, if it
    says something (SUCCEEDED: the attempt's result was applied)."""
    out: dict[str, Lease | tuple[str, JobState | None]] = {}
    stale: list[str] = []
    for lease_id in lease_ids:
        row = tx.conn.execute(_DETACHED, {"lease_id": lease_id}).first()
        if row is None:
            stale.append(lease_id)
            continue
        head = f"lease {lease_id[:40]!r} was not re-attached"
        if row.attempt_worker != worker or (
            row.resume_token is not None
            and not secrets.compare_digest(row.resume_token.encode(), token.encode())
        ):
            out[lease_id] = (f"{head}: it was not held by that stream", None)
            continue
        if row.resume_token is None:
            # Its stream has not been seen broken yet (RUNNING: worth asking
            # again in a moment).
            out[lease_id] = (f"{head}: it is still held by a stream", JobState.RUNNING)
            continue
        if row.lease_expire_time is None or row.lease_expire_time <= now:
            out[lease_id] = (f"{head}: its resume grace ran out", None)
            continue
        tx.conn.execute(update(_JOBS).where(_JOBS.c.id == row.id).values(lease_expire_time=until))
        tx.conn.execute(
            update(_ATTEMPTS)
            .where(_ATTEMPTS.c.id == row.lease_attempt_id)
            .values(resume_token=None, instance_id=instance_id)
        )
        out[lease_id] = Lease(
            lease_id=lease_id, job=to_job(row), expire_time=until, preemptions=row.preemptions
        )
    if stale:
        reasons = stale_reasons(tx, stale)
        outcomes = {
            r.lease_id: r.outcome
            for r in tx.conn.execute(_ENDED_ATTEMPTS, {"leases": [x for x in stale if x]})
        }
        for lease_id in stale:
            out[lease_id] = (reasons[lease_id], _STATE_AFTER.get(outcomes.get(lease_id, "")))
    return out
