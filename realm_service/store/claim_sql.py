"""The claim: the next jobs in priority order, leased in a fixed number of
statements whatever their count."""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Insert,
    Select,
    String,
    Table,
    Update,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)

from realm_service.domain import SYSTEM, AttemptOutcome, Job, JobKind, JobState, Lease
from realm_service.store import direct
from realm_service.store.db import Effects, LoopTx, Tx
from realm_service.store.rows import QUEUED, RUNNING, decode_paths, kind_of, make_job, to_job
from realm_service.store.sets import in_values, rows_params, rows_source
from realm_service.store.tables import JobAttemptRow, JobRow, RealmRow, UTCDateTime

_JOBS = cast(Table, JobRow.__table__)
_ATTEMPTS = cast(Table, JobAttemptRow.__table__)
_REALMS = cast(Table, RealmRow.__table__)


class _Candidate(NamedTuple):
    """What a claim reads of each candidate, as a tuple whose fields read at
    C speed (a Row's attribute access runs Python code for each column): the
    Job it hands out is built from these and the values the claim sets, with
    no second read of the rows."""

    id: int
    realm_id: str
    kind: str
    priority: int
    attempt: int
    create_time: datetime
    finish_time: datetime | None
    error_message: str
    paths: str
    trace_parent: str
    preemptions: int


_CLAIM_COLUMNS = tuple(_JOBS.c[name] for name in _Candidate._fields)
# The candidates are always bounded above, by `max_priority` or else by the
# largest value the column holds: with a lower bound alone PostgreSQL starts
# its walk of the claim index at the first leaf and steps over the entries
# that jobs claimed earlier left there until vacuum (a 20,000-job drain spent
# 10.1 s of the database's CPU against 7.0 s with the bound). Reading both
# lanes with one statement still costs PostgreSQL more than the two lanes'
# statements did (6.9-7.2 s against 6.1-6.5 s in that drain: the lane above
# SYSTEM stopped at once), for a round trip less per claim.
_ANY_PRIORITY = 2**31 - 1


def _line(kinds: bool, *columns: Any) -> Select[*tuple[Any, ...]]:
    """Queued jobs in claim order (priority, then enqueue order) within the
    bound priorities (and kinds), leaving out those of a realm that already
    has a running job (the partial unique index on running jobs serves that
    test)."""
    running = _JOBS.alias("running")
    q = (
        select(*columns)
        .where(
            _JOBS.c.state == QUEUED,
            _JOBS.c.priority >= bindparam("min_priority"),
            _JOBS.c.priority <= bindparam("max_priority"),
            ~exists().where(running.c.realm_id == _JOBS.c.realm_id, running.c.state == RUNNING),
        )
        .order_by(_JOBS.c.priority.desc(), _JOBS.c.seq, _JOBS.c.id)
    )
    if kinds:
        q = q.where(_JOBS.c.kind.in_(bindparam("kinds", expanding=True)))
    return q


@functools.cache
def _candidates(kinds: bool, pg: bool) -> Select[*tuple[Any, ...]]:
    """The claim's candidate query, built once per shape and reused, so that
    each claim costs its execution and not the building of the statement
    (the compiled form is cached by SQLAlchemy). On PostgreSQL it locks each
    candidate's realm with the job (SKIP LOCKED both): a job whose realm
    another claim (or a delete) holds is skipped, in the same round trip."""
    line = _line(kinds, *_CLAIM_COLUMNS).limit(bindparam("scan"))
    if not pg:
        return line.with_for_update(skip_locked=True, of=_JOBS)
    return line.join(_REALMS, _REALMS.c.realm_id == _JOBS.c.realm_id).with_for_update(
        skip_locked=True, of=(_JOBS, _REALMS)
    )


@functools.cache
def _first_in_line(kinds: bool) -> Select[*tuple[Any, ...]]:
    return _line(kinds, _JOBS).limit(1)


_BUSY_REALMS = select(_JOBS.c.realm_id).where(
    in_values(_JOBS.c.realm_id, "realm_ids"), _JOBS.c.state == RUNNING
)
# The leased jobs, as rows bound in one parameter: (job, lease, worker), then
# with the attempt's id.
_NEW_ATTEMPT_COLUMNS = (("job_id", int), ("lease_id", str), ("worker", str))
_STARTED_COLUMNS = (("job_id", int), ("lease_id", str), ("attempt_id", int), ("worker", str))


@functools.cache
def _claim_writes(backend: str) -> tuple[Insert, Update]:
    """The claim's two writes, one SQL text each whatever the claim's size:
    the attempts inserted from the bound rows, the jobs started from them."""
    insert_attempts = _insert_attempts(backend)
    started = rows_source(backend, "s", _STARTED_COLUMNS)
    start_jobs = (
        update(_JOBS)
        .where(_JOBS.c.id == started.c.job_id)
        .values(_start_values(started.c.lease_id, started.c.attempt_id, started.c.worker))
    )
    return insert_attempts, start_jobs


@functools.cache
def _claim_write_pg() -> Update:
    """On PostgreSQL the two writes are one statement (a round trip less on
    every claim): the attempts inserted in a data-modifying CTE, the jobs
    started from what it returns."""
    attempts = _insert_attempts("postgresql").cte("new_attempts")
    return (
        update(_JOBS)
        .add_cte(attempts)
        .where(_JOBS.c.id == attempts.c.job_id)
        .values(_start_values(attempts.c.lease_id, attempts.c.id, attempts.c.worker))
    )


def _start_values(lease_id: Any, attempt_id: Any, worker: Any) -> dict[str, Any]:
    return {
        "state": RUNNING,
        "attempt": _JOBS.c.attempt + 1,
        "start_time": bindparam("now", type_=UTCDateTime()),
        "lease_id": lease_id,
        "lease_attempt_id": attempt_id,
        "lease_expire_time": bindparam("until", type_=UTCDateTime()),
        "worker": worker,
        "progress_done": 0,
        "progress_total": 0,
    }


def _insert_attempts(backend: str) -> Insert:
    new = rows_source(backend, "v", _NEW_ATTEMPT_COLUMNS)
    return _attempts_from(new.c.job_id, new.c.lease_id, new.c.worker)


def _attempts_from(job_id: Any, lease_id: Any, worker: Any) -> Insert:
    """The running attempts of the jobs a claim starts, inserted from rows
    of (job, lease, worker): the claim's bound rows, or its one candidate."""
    return (
        insert(_ATTEMPTS)
        .from_select(
            [
                "job_id",
                "lease_id",
                "worker",
                "instance_id",
                "start_time",
                "outcome",
                "error_message",
            ],
            select(
                job_id,
                lease_id,
                worker,
                bindparam("instance_id", type_=String()),
                bindparam("now", type_=UTCDateTime()),
                literal(AttemptOutcome.RUNNING.value),
                literal(""),
            ),
        )
        .returning(_ATTEMPTS.c.id, _ATTEMPTS.c.job_id, _ATTEMPTS.c.lease_id, _ATTEMPTS.c.worker)
    )


def _take(
    eligible: Sequence[_Candidate], limit: int, system_cap: int | None
) -> tuple[list[_Candidate], bool]:
    """The eligible rows (in priority order) a claim takes, and whether
    scanning further could add none: `limit` taken, or the SYSTEM lane's cap
    met by rows past which only SYSTEM rows follow."""
    if system_cap is None:
        return list(eligible[:limit]), len(eligible) >= limit
    chosen: list[_Candidate] = []
    system = 0
    for row in eligible:
        if len(chosen) >= limit:
            return chosen, True
        if row.priority <= SYSTEM:
            if system >= system_cap:
                return chosen, True
            system += 1
        chosen.append(row)
    return chosen, len(chosen) >= limit or (system_cap <= system and system > 0)


def new_lease_id() -> str:
    """A lease's id, its fencing token: 32 hex digits, the first 10 the time
    of the claim in milliseconds (the low 40 bits), the other 22 random (88
    bits, which keep it unguessable). Ids made one after another sort one
    after another, so the unique indexes on them (`jobs.lease_id`,
    `job_attempts.lease_id`) take each new one at their right edge: with
    ids all random, each job of a claim changed a page of each index
    somewhere else, pages the commit then wrote (bench/README.md)."""
    return f"{time.time_ns() // 1_000_000 & 0xFF_FFFF_FFFF:010x}{secrets.token_hex(11)}"


def one_statement(backend: str, *, limit: int, concurrent: bool, system_cap: int | None) -> bool:
    """Whether `claim` with these arguments is one statement (and so may run
    in `Database.statements`): one job for one worker (a hand-off, a stream
    with one credit) on PostgreSQL, with no concurrent claim to check
    against. The first candidate is the one taken, whatever the lanes, so
    the read and the writes are one statement (unless the cap is 0)."""
    return backend == "postgresql" and limit == 1 and not concurrent and system_cap != 0


def claim(
    tx: Tx,
    *,
    limit: int,
    min_priority: int,
    max_priority: int | None,
    kinds: Sequence[JobKind] | None,
    worker: str | Sequence[str],
    now: datetime,
    lease_until: datetime,
    instance_id: str = "",
    system_cap: int | None = None,
    concurrent: bool = True,
) -> list[Lease]:
    """Lease up to `limit` queued jobs: highest priority, then oldest, at most
    one per realm and none of a realm that already has a running job. With
    `system_cap`, at most that many of them at SYSTEM priority or below (the
    reserved slots): the candidates come in priority order, so the jobs above
    SYSTEM come first and one statement serves both lanes.

    On SQLite the transaction holds the write lock (BEGIN IMMEDIATE), so the
    candidate query's own test for running jobs is final: a claim is three
    statements. On PostgreSQL candidate jobs are locked with their realms
    (SKIP LOCKED), and the realms are checked again for running jobs once
    locked (a concurrent claim may have committed one meanwhile), so
    concurrent claimers never take the same job, nor two jobs of one realm.
    With `concurrent` False the caller vouches that no other claim runs
    meanwhile (one instance, its claims one at a time): the check again is
    left out, a round trip less. Should another instance start unseen, the
    unique index on running jobs refuses a second job of a realm (a Conflict;
    the claim is run again).
    """
    if limit <= 0:
        return []
    pg = tx.backend == "postgresql"
    query = _candidates(bool(kinds), pg)
    params = _bounds(min_priority, max_priority, kinds)
    if one_statement(tx.backend, limit=limit, concurrent=concurrent, system_cap=system_cap):
        lease_id = new_lease_id()
        one = _one_values(params, lease_id, worker, instance_id, now, lease_until)
        statement = _claim_one_statement("kinds" in params, tx.each_statement_commits)
        row = direct.first(tx.conn, statement, one)
        return _started_one(tx, row, lease_id, one["worker"], now, lease_until)
    if tx.each_statement_commits:
        # Its statements are whole only together: the candidates are locked
        # by the first and taken by the later ones.
        raise RuntimeError("a claim of several statements needs a transaction")
    # Most realms have one queued job, so a scan of a few more rows than
    # wanted usually suffices; each row scanned is locked on PostgreSQL (a
    # write to its tuple), so scanning twice the rows doubled that cost.
    scan = limit + 8
    while True:
        candidates = list(
            map(_Candidate._make, direct.rows(tx.conn, query, {**params, "scan": scan}))
        )
        first_per_realm: dict[str, _Candidate] = {}
        for row in candidates:
            first_per_realm.setdefault(row.realm_id, row)
        locked = set(first_per_realm)
        if pg and concurrent and locked:
            locked -= set(tx.conn.scalars(_BUSY_REALMS, {"realm_ids": list(locked)}))
        eligible = [row for realm_id, row in first_per_realm.items() if realm_id in locked]
        chosen, lanes_full = _take(eligible, limit, system_cap)
        if lanes_full or len(candidates) < scan or scan >= 100_000:
            break
        scan *= 4  # the head of the queue holds several jobs of a realm: look further
    # Claimable jobs locked here but not taken (this claim had no room left)
    # are skipped by concurrent claimers of other instances until this
    # transaction ends: they must look again. Rows left for any other reason
    # (their realm is busy or locked elsewhere) are not announced, or a claim
    # that takes nothing would wake its own dispatcher over and over.
    if pg and len(eligible) > len(chosen):
        # Other instances skipped the rows this claim locked and left: wake
        # them to look again once it commits (this one has no room left).
        tx.announce_new_work(here=False)
    if not chosen:
        return []
    # One worker for all, or the worker each job in claim order will go to.
    names = [worker] * len(chosen) if isinstance(worker, str) else list(worker)
    holder = {row.id: (names[i] if i < len(names) else "")[:200] for i, row in enumerate(chosen)}
    leases = {row.id: new_lease_id() for row in chosen}
    # The writes of a claim, whatever its size, each with one SQL text: the
    # attempts inserted from the bound rows, the jobs started from them (one
    # statement on PostgreSQL, two on SQLite).
    new_rows = [(row.id, leases[row.id], holder[row.id]) for row in chosen]
    if pg:
        direct.rows(
            tx.conn,
            _claim_write_pg(),
            {
                **rows_params(tx.backend, "v", _NEW_ATTEMPT_COLUMNS, new_rows),
                "instance_id": instance_id,
                "now": now,
                "until": lease_until,
            },
        )
        return _started(tx, chosen, leases, holder, now, lease_until)
    insert_attempts, start_jobs = _claim_writes(tx.backend)
    attempt_ids = dict(
        (row.job_id, row.id)
        for row in direct.rows(
            tx.conn,
            insert_attempts,
            {
                **rows_params(tx.backend, "v", _NEW_ATTEMPT_COLUMNS, new_rows),
                "instance_id": instance_id,
                "now": now,
            },
        )
    )
    started_rows = [(j, lease, attempt_ids[j], w) for j, lease, w in new_rows]
    direct.rows(
        tx.conn,
        start_jobs,
        {
            **rows_params(tx.backend, "s", _STARTED_COLUMNS, started_rows),
            "now": now,
            "until": lease_until,
        },
    )
    return _started(tx, chosen, leases, holder, now, lease_until)


@functools.cache
def _claim_one_statement(kinds: bool, alone: bool) -> Select[*tuple[Any, ...]]:
    """The first candidate (locked with its realm, SKIP LOCKED both), its
    attempt inserted and the job started, in data-modifying CTEs over that
    one row; the statement returns the candidate as it was read.

    `alone`: the statement commits on its own (autocommit), and its commit
    does not wait for the WAL's flush (`synchronous_commit` off for its own
    transaction, `relaxed`): it is the last step before a waiting worker
    gets its job, and the wait was about a fifth of the wake-up from the
    claim on (bench/README.md). A claim lost with the last commits of a
    PostgreSQL crash only runs its job again: the job is queued again, and
    the worker's lease, unknown to the store, is refused at its next
    heartbeat or result. The next commit that waits for the flush (the
    job's result, any enqueue) makes it durable with everything before it.
    In a transaction of other writes (an enqueue's merge with its hand-off)
    the setting would hold for them too: there it is left as it is."""
    candidate = _candidates(kinds, True).cte("candidate")
    lease_id = bindparam("lease_id", type_=String())
    worker = bindparam("worker", type_=String())
    attempt = _attempts_from(candidate.c.id, lease_id, worker).cte("new_attempt")
    started = (
        update(_JOBS)
        .where(_JOBS.c.id == attempt.c.job_id)
        .values(_start_values(lease_id, attempt.c.id, worker))
        .returning(_JOBS.c.id)
        .cte("started")
    )
    claimed = select(*(candidate.c[name] for name in _Candidate._fields)).join_from(
        candidate, started, started.c.id == candidate.c.id
    )
    if not alone:
        return claimed
    relaxed = select(
        func.set_config("synchronous_commit", "off", literal(True)).label("value")
    ).cte("relaxed")
    # Joined, so that it is evaluated (when the claim takes a job).
    return claimed.join(relaxed, relaxed.c.value.is_not(None))


async def claim_one_on_loop(
    tx: LoopTx,
    *,
    min_priority: int,
    max_priority: int | None,
    kinds: Sequence[JobKind] | None,
    worker: str,
    now: datetime,
    lease_until: datetime,
    instance_id: str = "",
) -> list[Lease]:
    """`claim` of one job in its one PostgreSQL statement (`one_statement`:
    no SYSTEM cap, no concurrent claimer), on the event loop
    (`Database.loop_statements`)."""
    params = _bounds(min_priority, max_priority, kinds)
    lease_id = new_lease_id()
    one = _one_values(params, lease_id, worker, instance_id, now, lease_until)
    row = await direct.first_on_loop(tx, _claim_one_statement("kinds" in params, True), one)
    return _started_one(tx, row, lease_id, one["worker"], now, lease_until)


def _bounds(
    min_priority: int, max_priority: int | None, kinds: Sequence[JobKind] | None
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "min_priority": min_priority,
        "max_priority": _ANY_PRIORITY if max_priority is None else max_priority,
    }
    if kinds:
        params["kinds"] = [k.value for k in kinds]
    return params


def _one_values(
    params: dict[str, Any],
    lease_id: str,
    worker: str | Sequence[str],
    instance_id: str,
    now: datetime,
    lease_until: datetime,
) -> dict[str, Any]:
    """The values of the one-statement claim (`_claim_one_statement`)."""
    return {
        **params,
        "scan": 1,
        "lease_id": lease_id,
        "worker": (worker if isinstance(worker, str) else (list(worker) or [""])[0])[:200],
        "instance_id": instance_id,
        "now": now,
        "until": lease_until,
    }


def _started_one(
    tx: Effects,
    row: Any | None,
    lease_id: str,
    worker: str,
    now: datetime,
    lease_until: datetime,
) -> list[Lease]:
    if row is None:
        return []
    chosen = _Candidate._make(row)
    return _started(tx, [chosen], {chosen.id: lease_id}, {chosen.id: worker}, now, lease_until)


def _started(
    tx: Effects,
    chosen: Sequence[_Candidate],
    leases: dict[int, str],
    holder: dict[int, str],
    now: datetime,
    lease_until: datetime,
) -> list[Lease]:
    """The leases of a claim's started jobs; their values reach the job
    change listeners with the commit."""
    started = [
        Lease(
            lease_id=leases[row.id],
            expire_time=lease_until,
            job=make_job(
                job_id=row.id,
                realm_id=row.realm_id,
                kind=kind_of(row.kind),
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
                trace_parent=row.trace_parent,
                worker=holder[row.id],
            ),
            preemptions=row.preemptions,
        )
        for row in chosen
    ]
    tx.job_values_known(lease.job for lease in started)
    return started


def first_waiting(tx: Tx, *, min_priority: int, kinds: Sequence[JobKind] | None) -> Job | None:
    """The queued job a claim at `min_priority` and above would take first
    (its realm has no running job), read without locking: what waits for a
    slot. Reads the claim index from its head within the bounds."""
    params: dict[str, Any] = {"min_priority": min_priority, "max_priority": _ANY_PRIORITY}
    if kinds:
        params["kinds"] = [k.value for k in kinds]
    row = tx.conn.execute(_first_in_line(bool(kinds)), params).first()
    return None if row is None else to_job(row)
