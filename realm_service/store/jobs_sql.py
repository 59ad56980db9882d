"""Every SQL statement about jobs and their attempts (leases).

Functions take an open session (the caller owns the transaction) and return
frozen domain objects, never ORM rows.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Row,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    exc,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from realm_service.domain import AttemptOutcome, Job, JobKind, JobState, Lease, PathChange
from realm_service.errors import JobNotFound, StaleLease
from realm_service.store.tables import JobAttemptRow, JobRow, RealmRow

MERGED = "merged"  # internal state: folded into the job named by superseded_by
ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


def seq_of(now: datetime) -> int:
    return int(now.timestamp() * 1_000_000)


def encode_paths(changes: Iterable[PathChange]) -> str:
    return json.dumps(sorted([c.path, c.deleted] for c in changes))


def decode_paths(raw: str) -> tuple[PathChange, ...]:
    return tuple(PathChange(str(p), bool(d)) for p, d in json.loads(raw or "[]"))


def merge_paths(old: Iterable[PathChange], new: Iterable[PathChange]) -> tuple[PathChange, ...]:
    """Union by path; a delete wins over an update of the same path."""
    merged: dict[str, bool] = {}
    for change in [*old, *new]:
        merged[change.path] = merged.get(change.path, False) or change.deleted
    return tuple(PathChange(p, d) for p, d in sorted(merged.items()))


def to_job(row: JobRow, shown: JobRow | None = None) -> Job:
    """A job as clients see it; a merged job shows the state of its successor."""
    live = shown or row
    state = live.state if live.state != MERGED else JobState.QUEUED.value
    return Job(
        job_id=row.id,
        realm_id=row.realm_id,
        kind=JobKind(row.kind),
        priority=max(row.priority, live.priority),
        state=JobState(state),
        attempt=live.attempt,
        create_time=row.create_time,
        start_time=live.start_time,
        finish_time=live.finish_time,
        error_message=live.error_message,
        progress_done=live.progress_done,
        progress_total=live.progress_total,
        path_changes=decode_paths(live.paths),
    )


def _resolve(session: Session, row: JobRow) -> Job:
    live = row
    for _ in range(64):  # chains are short; the bound guards against cycles
        if live.state != MERGED or live.superseded_by is None:
            break
        nxt = session.get(JobRow, live.superseded_by)
        if nxt is None:
            break
        live = nxt
    return to_job(row, live if live is not row else None)


def get_job(session: Session, job_id: int) -> Job:
    row = session.get(JobRow, job_id)
    if row is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return _resolve(session, row)


def list_jobs(
    session: Session,
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
    return [_resolve(session, row) for row in session.scalars(q)]


def queued_job(session: Session, realm_id: str, kind: JobKind) -> JobRow | None:
    return session.scalars(
        select(JobRow)
        .where(JobRow.realm_id == realm_id, JobRow.kind == kind.value, JobRow.state == "queued")
        .with_for_update()
    ).first()


def queued_jobs(session: Session, realm_id: str, kinds: Sequence[JobKind]) -> dict[str, JobRow]:
    """The realm's queued jobs of these kinds (at most one each), locked as
    `queued_job` locks, in one read."""
    return {
        row.kind: row
        for row in session.scalars(
            select(JobRow)
            .where(
                JobRow.realm_id == realm_id,
                JobRow.state == "queued",
                JobRow.kind.in_([k.value for k in kinds]),
            )
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }


def running_job(session: Session, realm_id: str) -> JobRow | None:
    return session.scalars(
        select(JobRow).where(JobRow.realm_id == realm_id, JobRow.state == "running")
    ).first()


def lease_runs_realm(session: Session, lease_id: str, realm_id: str) -> bool:
    """Whether `lease_id` is the current lease of a running job of the realm."""
    return (
        session.scalar(
            select(JobRow.id).where(
                JobRow.lease_id == lease_id,
                JobRow.state == "running",
                JobRow.realm_id == realm_id,
            )
        )
        is not None
    )


def has_from_scratch(session: Session, realm_id: str, states: Sequence[str]) -> bool:
    return (
        session.scalar(
            select(func.count())
            .select_from(JobRow)
            .where(
                JobRow.realm_id == realm_id,
                JobRow.kind == JobKind.FROM_SCRATCH.value,
                JobRow.state.in_(states),
            )
        )
        or 0
    ) > 0


def insert_job(
    session: Session,
    *,
    realm_id: str,
    kind: JobKind,
    priority: int,
    now: datetime,
    paths: Sequence[PathChange] = (),
) -> JobRow:
    row = JobRow(
        realm_id=realm_id,
        kind=kind.value,
        priority=priority,
        state="queued",
        seq=seq_of(now),
        attempt=0,
        counted_failures=0,
        create_time=now,
        error_message="",
        progress_done=0,
        progress_total=0,
        paths=encode_paths(paths),
        worker="",
    )
    session.add(row)
    session.flush()
    return row


def try_insert_job(
    session: Session,
    *,
    realm_id: str,
    kind: JobKind,
    priority: int,
    now: datetime,
    paths: Sequence[PathChange] = (),
) -> JobRow | None:
    """Insert in a savepoint; None when the unique index refused it (a
    concurrent enqueuer's job exists now), leaving the outer transaction usable.
    On SQLite the transaction holds the only write lock: no concurrent
    enqueuer exists, and the savepoint's two statements are saved."""
    if session.get_bind().dialect.name != "postgresql":
        return insert_job(
            session, realm_id=realm_id, kind=kind, priority=priority, now=now, paths=paths
        )
    try:
        with session.begin_nested():
            return insert_job(
                session, realm_id=realm_id, kind=kind, priority=priority, now=now, paths=paths
            )
    except exc.IntegrityError:
        return None


def active_from_scratch(session: Session, realm_ids: Sequence[str]) -> dict[str, JobRow]:
    """Each of these realms' queued from-scratch job (locked, as
    `queued_job`), else its running one; realms with neither are left out.
    Queued first: on PostgreSQL a claim committing while this waits for the
    lock takes the job out of the queued read, and the running read, a later
    statement, sees it running. Rows already in the session are refreshed."""
    if not realm_ids:
        return {}
    scratch = (JobRow.realm_id.in_(realm_ids), JobRow.kind == JobKind.FROM_SCRATCH.value)
    fresh = {"populate_existing": True}
    queued = {
        row.realm_id: row
        for row in session.scalars(
            select(JobRow)
            .where(*scratch, JobRow.state == "queued")
            .with_for_update()
            .execution_options(**fresh)
        )
    }
    running = session.scalars(
        select(JobRow).where(*scratch, JobRow.state == "running").execution_options(**fresh)
    )
    return {**{row.realm_id: row for row in running}, **queued}


def try_insert_from_scratch_jobs(
    session: Session, realm_ids: Sequence[str], *, priority: int, now: datetime
) -> list[JobRow] | None:
    """One queued from-scratch job per realm, in one statement inside a
    savepoint; None when the unique index refused one (a concurrent enqueuer's
    job exists now), leaving the outer transaction usable."""
    if not realm_ids:
        return []
    seq = seq_of(now)
    rows = [
        {
            "realm_id": realm_id,
            "kind": JobKind.FROM_SCRATCH.value,
            "priority": priority,
            "state": "queued",
            "seq": seq,
            "attempt": 0,
            "counted_failures": 0,
            "create_time": now,
            "error_message": "",
            "progress_done": 0,
            "progress_total": 0,
            "paths": "[]",
            "worker": "",
        }
        for realm_id in realm_ids
    ]
    try:
        with session.begin_nested():
            return list(
                session.scalars(
                    insert(JobRow).returning(JobRow, sort_by_parameter_order=True), rows
                )
            )
    except exc.IntegrityError:
        return None


def merge_into(row: JobRow, priority: int, paths: Sequence[PathChange] = ()) -> None:
    row.priority = max(row.priority, priority)
    if paths:
        row.paths = encode_paths(merge_paths(decode_paths(row.paths), paths))


def raise_priority(session: Session, job_id: int, priority: int) -> None:
    session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.priority < priority)
        .values(priority=priority)
    )


# -- claiming ---------------------------------------------------------------


_JOBS = cast(Table, JobRow.__table__)
_ATTEMPTS = cast(Table, JobAttemptRow.__table__)
_REALMS = cast(Table, RealmRow.__table__)
# What a claim reads of each candidate: the Job it hands out is built from
# these and the values the claim sets, with no second read of the rows.
_CLAIM_COLUMNS = (
    _JOBS.c.id,
    _JOBS.c.realm_id,
    _JOBS.c.kind,
    _JOBS.c.priority,
    _JOBS.c.attempt,
    _JOBS.c.create_time,
    _JOBS.c.finish_time,
    _JOBS.c.error_message,
    _JOBS.c.paths,
)
_claim_statements: dict[tuple[bool, bool], Select[*tuple[Any, ...]]] = {}


def _candidates(max_priority: bool, kinds: bool) -> Select[*tuple[Any, ...]]:
    """The claim's candidate query, built once per shape and reused, so that
    each claim costs its execution and not the building of the statement
    (the compiled form is cached by SQLAlchemy). Jobs of a realm that already
    has a running job are left out here; the partial unique index on running
    jobs serves that test."""
    key = (max_priority, kinds)
    q = _claim_statements.get(key)
    if q is None:
        running = _JOBS.alias("running")
        q = (
            select(*_CLAIM_COLUMNS)
            .where(
                _JOBS.c.state == "queued",
                _JOBS.c.priority >= bindparam("min_priority"),
                ~exists().where(
                    running.c.realm_id == _JOBS.c.realm_id, running.c.state == "running"
                ),
            )
            .order_by(_JOBS.c.priority.desc(), _JOBS.c.seq, _JOBS.c.id)
            .limit(bindparam("scan"))
            .with_for_update(skip_locked=True, of=_JOBS)
        )
        if max_priority:
            q = q.where(_JOBS.c.priority <= bindparam("max_priority"))
        if kinds:
            q = q.where(_JOBS.c.kind.in_(bindparam("kinds", expanding=True)))
        _claim_statements[key] = q
    return q


_LOCK_REALMS = (
    select(_REALMS.c.realm_id)
    .where(_REALMS.c.realm_id.in_(bindparam("realm_ids", expanding=True)))
    .with_for_update(skip_locked=True)
)
_BUSY_REALMS = select(_JOBS.c.realm_id).where(
    _JOBS.c.realm_id.in_(bindparam("realm_ids", expanding=True)), _JOBS.c.state == "running"
)
_INSERT_ATTEMPTS = insert(_ATTEMPTS).returning(
    _ATTEMPTS.c.id, _ATTEMPTS.c.job_id, sort_by_parameter_order=True
)
_START_JOBS = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"))
    .values(
        state="running",
        attempt=_JOBS.c.attempt + 1,
        start_time=bindparam("b_now"),
        lease_id=bindparam("b_lease"),
        lease_attempt_id=bindparam("b_attempt"),
        lease_expire_time=bindparam("b_until"),
        worker=bindparam("b_worker"),
        progress_done=0,
        progress_total=0,
    )
)


def claim(
    session: Session,
    *,
    limit: int,
    min_priority: int,
    max_priority: int | None,
    kinds: Sequence[JobKind] | None,
    worker: str,
    now: datetime,
    lease_until: datetime,
    instance_id: str = "",
) -> tuple[list[Lease], bool]:
    """Lease up to `limit` queued jobs: highest priority, then oldest, at most
    one per realm and none of a realm that already has a running job. Also
    says whether claimable-looking jobs were left (locked but not taken).

    On SQLite the transaction holds the write lock (BEGIN IMMEDIATE), so the
    candidate query's own test for running jobs is final: a claim is three
    statements. On PostgreSQL candidate jobs and then their realms are locked
    with SKIP LOCKED, and the realms are checked again for running jobs once
    locked (a concurrent claim may have committed one meanwhile), so
    concurrent claimers never take the same job, nor two jobs of one realm.
    """
    if limit <= 0:
        return [], False
    pg = session.get_bind().dialect.name == "postgresql"
    query = _candidates(max_priority is not None, bool(kinds))
    params: dict[str, Any] = {"min_priority": min_priority}
    if max_priority is not None:
        params["max_priority"] = max_priority
    if kinds:
        params["kinds"] = [k.value for k in kinds]
    scan = limit * 2 + 16
    while True:
        candidates = session.execute(query, {**params, "scan": scan}).all()
        first_per_realm: dict[str, Row[*tuple[Any, ...]]] = {}
        for row in candidates:
            first_per_realm.setdefault(row.realm_id, row)
        if pg and first_per_realm:
            ids = {"realm_ids": list(first_per_realm)}
            locked = set(session.scalars(_LOCK_REALMS, ids))
            locked -= set(session.scalars(_BUSY_REALMS, {"realm_ids": list(locked)}))
        else:
            locked = set(first_per_realm)
        eligible = [row for realm_id, row in first_per_realm.items() if realm_id in locked]
        chosen = eligible[:limit]
        if len(chosen) >= limit or len(candidates) < scan or scan >= 100_000:
            break
        scan *= 4  # the head of the queue holds several jobs of a realm: look further
    # Claimable jobs locked here but not taken (this claim had no room left)
    # are skipped by concurrent claimers of other instances until this
    # transaction ends: they must look again. Rows left for any other reason
    # (their realm is busy or locked elsewhere) are not announced, or a claim
    # that takes nothing would wake its own dispatcher over and over.
    leftover = pg and len(eligible) > len(chosen)
    if not chosen:
        return [], leftover
    worker = worker[:200]
    leases = {row.id: secrets.token_hex(16) for row in chosen}
    # A fixed number of statements per claim, whatever its size: one
    # multi-row insert of the attempts, one executemany update of the jobs.
    attempt_ids = dict(
        (job_id, attempt_id)
        for attempt_id, job_id in session.execute(
            _INSERT_ATTEMPTS,
            [
                {
                    "job_id": job_id,
                    "lease_id": lease_id,
                    "worker": worker,
                    "instance_id": instance_id,
                    "start_time": now,
                    "outcome": AttemptOutcome.RUNNING.value,
                    "error_message": "",
                }
                for job_id, lease_id in leases.items()
            ],
        )
    )
    session.execute(
        _START_JOBS,
        [
            {
                "b_id": row.id,
                "b_lease": leases[row.id],
                "b_attempt": attempt_ids[row.id],
                "b_now": now,
                "b_until": lease_until,
                "b_worker": worker,
            }
            for row in chosen
        ],
    )
    return [
        Lease(
            lease_id=leases[row.id],
            expire_time=lease_until,
            job=Job(
                job_id=row.id,
                realm_id=row.realm_id,
                kind=JobKind(row.kind),
                priority=row.priority,
                state=JobState.RUNNING,
                attempt=row.attempt + 1,
                create_time=row.create_time,
                start_time=now,
                finish_time=row.finish_time,
                error_message=row.error_message,
                progress_done=0,
                progress_total=0,
                path_changes=decode_paths(row.paths),
            ),
        )
        for row in chosen
    ], leftover


# -- fenced operations ------------------------------------------------------


def current(session: Session, lease_id: str, *, lock: bool = True) -> JobRow:
    """The running job held under `lease_id`, or StaleLease."""
    q = select(JobRow).where(JobRow.lease_id == lease_id, JobRow.state == "running")
    if lock:
        q = q.with_for_update()
    row = session.scalars(q).first() if lease_id else None
    if row is None:
        raise StaleLease(f"lease {lease_id[:40]!r} is not current")
    return row


def current_many(session: Session, lease_ids: Sequence[str]) -> dict[str, JobRow]:
    """The running jobs held under any of `lease_ids`, locked, by lease."""
    wanted = [lease for lease in dict.fromkeys(lease_ids) if lease]
    if not wanted:
        return {}
    rows = session.scalars(
        select(JobRow)
        .where(JobRow.lease_id.in_(wanted), JobRow.state == "running")
        .order_by(JobRow.id)
        .with_for_update()
    )
    return {row.lease_id: row for row in rows if row.lease_id}


_HELD_COLUMNS = (
    _JOBS.c.id,
    _JOBS.c.realm_id,
    _JOBS.c.kind,
    _JOBS.c.priority,
    _JOBS.c.attempt,
    _JOBS.c.create_time,
    _JOBS.c.start_time,
    _JOBS.c.progress_done,
    _JOBS.c.progress_total,
    _JOBS.c.paths,
    _JOBS.c.lease_id,
    _JOBS.c.lease_attempt_id,
)
_HELD = (
    select(*_HELD_COLUMNS)
    .where(_JOBS.c.lease_id.in_(bindparam("leases", expanding=True)), _JOBS.c.state == "running")
    .order_by(_JOBS.c.id)
    .with_for_update()
)
_SUCCEED = (
    update(_JOBS)
    .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))
    .values(
        state=JobState.SUCCEEDED.value,
        finish_time=bindparam("now"),
        error_message="",
        lease_id=None,
        lease_expire_time=None,
    )
)


HeldJob = Row[*tuple[Any, ...]]  # a running job's row, as `held_many` reads it


def held_many(session: Session, lease_ids: Sequence[str]) -> dict[str, Row[*tuple[Any, ...]]]:
    """`current_many` as plain rows (the columns a completion needs), locked."""
    wanted = [lease for lease in dict.fromkeys(lease_ids) if lease]
    if not wanted:
        return {}
    return {row.lease_id: row for row in session.execute(_HELD, {"leases": wanted})}


def succeed_many(session: Session, rows: Sequence[HeldJob], now: datetime) -> list[Job]:
    """Mark held jobs succeeded in one statement; the jobs as they now are."""
    if not rows:
        return []
    session.execute(_SUCCEED, {"ids": [row.id for row in rows], "now": now})
    return [
        Job(
            job_id=row.id,
            realm_id=row.realm_id,
            kind=JobKind(row.kind),
            priority=row.priority,
            state=JobState.SUCCEEDED,
            attempt=row.attempt,
            create_time=row.create_time,
            start_time=row.start_time,
            finish_time=now,
            error_message="",
            progress_done=row.progress_done,
            progress_total=row.progress_total,
            path_changes=decode_paths(row.paths),
        )
        for row in rows
    ]


_END_ATTEMPTS = (
    update(_ATTEMPTS)
    .where(_ATTEMPTS.c.id.in_(bindparam("ids", expanding=True)))
    .values(outcome=bindparam("outcome"), end_time=bindparam("now"), error_message="")
)


def extend(
    session: Session,
    lease_ids: Sequence[str],
    until: datetime,
    progress: dict[str, tuple[int, int]],
) -> set[str]:
    """Extend current leases; returns the ones that were current."""
    extended: set[str] = set()
    for lease_id in lease_ids:
        values: dict[str, object] = {"lease_expire_time": until}
        if lease_id in progress:
            done, total = progress[lease_id]
            values["progress_done"] = max(0, done)
            values["progress_total"] = max(0, total)
        result = session.execute(
            update(JobRow)
            .where(JobRow.lease_id == lease_id, JobRow.state == "running")
            .values(**values)
            .returning(JobRow.id)
        ).first()
        if result is not None:
            extended.add(lease_id)
    return extended


def end_attempt(
    session: Session, attempt_id: int | None, outcome: AttemptOutcome, now: datetime, message: str
) -> None:
    if attempt_id is None:
        return
    session.execute(
        update(JobAttemptRow)
        .where(JobAttemptRow.id == attempt_id)
        .values(outcome=outcome.value, end_time=now, error_message=message[:2000])
    )


def end_attempts(
    session: Session, attempt_ids: Sequence[int], outcome: AttemptOutcome, now: datetime
) -> None:
    """end_attempt for several attempts with one outcome and no message."""
    if attempt_ids:
        session.execute(
            _END_ATTEMPTS, {"ids": list(attempt_ids), "outcome": outcome.value, "now": now}
        )


def finish(row: JobRow, state: JobState, now: datetime, message: str = "") -> None:
    row.state = state.value
    row.finish_time = now
    row.error_message = message[:2000]
    row.lease_id = None
    row.lease_expire_time = None


def requeue(session: Session, row: JobRow) -> None:
    """Put a running job back in the queue, keeping its place in line. If a job
    of the same realm and kind was queued meanwhile, fold this one into it."""
    row.lease_id = None
    row.lease_expire_time = None
    row.lease_attempt_id = None
    other = queued_job(session, row.realm_id, JobKind(row.kind))
    if other is None:
        row.state = "queued"
        session.flush()
        return
    other.priority = max(other.priority, row.priority)
    other.seq = min(other.seq, row.seq)
    other.paths = encode_paths(merge_paths(decode_paths(other.paths), decode_paths(row.paths)))
    row.state = MERGED
    row.superseded_by = other.id
    session.flush()


def expired(session: Session, now: datetime, limit: int) -> list[JobRow]:
    return list(
        session.scalars(
            select(JobRow)
            .where(JobRow.state == "running", JobRow.lease_expire_time < now)
            .order_by(JobRow.lease_expire_time)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def attempts_of(session: Session, job_id: int) -> list[tuple[str, str]]:
    """(lease_id, outcome) of every attempt of a job, oldest first."""
    return [
        (r.lease_id, r.outcome)
        for r in session.scalars(
            select(JobAttemptRow).where(JobAttemptRow.job_id == job_id).order_by(JobAttemptRow.id)
        )
    ]


def active_leases(session: Session) -> list[str]:
    return [
        lease
        for lease in session.scalars(select(JobRow.lease_id).where(JobRow.state == "running"))
        if lease
    ]


def queue_depth(session: Session) -> list[tuple[int, int, datetime | None]]:
    """(priority, queued count, oldest create_time) per priority."""
    rows = session.execute(
        select(JobRow.priority, func.count(), func.min(JobRow.create_time))
        .where(JobRow.state == "queued")
        .group_by(JobRow.priority)
    ).all()
    return [(int(p), int(c), t) for p, c, t in rows]


def realm_ids_with_jobs(session: Session, realm_ids: Sequence[str]) -> set[str]:
    return set(
        session.scalars(
            select(JobRow.realm_id).where(
                JobRow.realm_id.in_(list(realm_ids)),
                or_(JobRow.state.in_(ACTIVE), and_(JobRow.state == "succeeded")),
            )
        )
    )


def delete_jobs_of(session: Session, realm_id: str) -> None:
    session.execute(delete(JobRow).where(JobRow.realm_id == realm_id))
