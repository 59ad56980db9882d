"""The enqueue of an idle realm (no running job, no queued job to coalesce
with) is one insert statement that inserts only while the realm is idle; on
PostgreSQL it commits alone (`Database.statements`), and a hand-off's claim
of one job does too. A realm that is not idle goes the full way, and the
outcome is the same either way."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from store_helpers import LEASE, FakeClock, Statements, make_realm, woken_calls

from realm_service.domain import (
    SYSTEM,
    USER,
    Disposition,
    HandOff,
    JobKind,
    JobState,
    PathChange,
)
from realm_service.errors import Conflict, RealmNotFound
from realm_service.queue import JobQueue, QueueSettings
from realm_service.store import claim_sql, enqueue_sql
from realm_service.store.db import open_database

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL


def _offer() -> HandOff:
    return HandOff(stream_id="s", worker="w", min_priority=0, kinds=(), system_limit=None)


@pytest.fixture
def alone(queue: JobQueue) -> JobQueue:
    """One instance on the store: a hand-off's claim is one statement too
    (on PostgreSQL)."""
    queue.db.others_alive = False
    return queue


def test_an_idle_realm_is_enqueued_in_one_statement(alone: JobQueue) -> None:
    make_realm(alone, "r")
    with Statements(alone.db) as statements:
        result = alone.enqueue("r", FS, USER)
    assert result.disposition is Disposition.INSERTED
    assert alone.get_job(result.job.job_id) == result.job
    if alone.db.backend == "postgresql":
        assert statements.sql == ["INSERT"]  # no read
        assert statements.in_block == [False]
    else:
        assert statements.sql == ["BEGIN", "INSERT"]


def test_an_idle_realm_and_its_hand_off_are_one_statement_alone_on_postgresql(
    alone: JobQueue,
) -> None:
    """Nothing queued ranks ahead of the new job: it is inserted started,
    with its attempt, in the statement that checks the realm is idle."""
    make_realm(alone, "r")
    with Statements(alone.db) as statements:
        result = alone.enqueue("r", FS, USER, hand_off=_offer())
    assert result.disposition is Disposition.INSERTED
    assert result.lease is not None and result.lease.job == result.job
    assert result.lease.expire_time == alone.clock() + LEASE
    stored = alone.get_job(result.job.job_id)
    assert stored == result.job
    assert (stored.state, stored.worker, stored.attempt) == (JobState.RUNNING, "w", 1)
    assert stored.start_time == alone.clock()
    assert [outcome for _, outcome in alone.attempts(result.job.job_id)] == ["running"]
    if alone.db.backend == "postgresql":
        assert statements.sql == ["WITH"]
        assert statements.in_block == [False]  # it commits alone
    else:
        # One transaction on SQLite: two commits would be two syncs.
        assert statements.sql[:2] == ["BEGIN", "INSERT"]
        assert statements.sql.count("BEGIN") == 1


def test_shared_store_hand_off_is_one_transaction(queue: JobQueue) -> None:
    """With other instances about, the claim is several statements, whole
    only together: the insert and the claim share one transaction."""
    queue.db.others_alive = True
    make_realm(queue, "r")
    with Statements(queue.db) as statements:
        result = queue.enqueue("r", FS, USER, hand_off=_offer())
    assert result.lease is not None and result.lease.job.job_id == result.job.job_id
    assert queue.get_job(result.job.job_id).state is JobState.RUNNING
    if queue.db.backend == "postgresql":
        assert statements.sql[0] == "INSERT" and len(statements.sql) > 2
        assert statements.in_block == [False] + [True] * (len(statements.sql) - 1)
    else:
        assert statements.sql[:2] == ["BEGIN", "INSERT"]
        assert statements.sql.count("BEGIN") == 1


@pytest.mark.parametrize(
    ("arrange", "kind", "expected"),
    [
        # A queued job of the kind: merged into.
        ("queued FS", FS, Disposition.MERGED),
        ("queued INC", INC, Disposition.MERGED),
        # An incremental change onto a queued from-scratch job: folded into it.
        ("queued FS", INC, Disposition.MERGED),
        # A running from-scratch job: attached to it (nothing changed).
        ("running FS", FS, Disposition.ATTACHED),
        # A running job of the other kind: a new job, queued behind it.
        ("running FS", INC, Disposition.INSERTED),
        ("running INC", FS, Disposition.INSERTED),
    ],
)
def test_a_realm_that_is_not_idle_goes_the_full_way(
    alone: JobQueue, arrange: str, kind: JobKind, expected: Disposition
) -> None:
    make_realm(alone, "r")
    state, first_kind = arrange.split()
    first = alone.enqueue(
        "r",
        JobKind.FROM_SCRATCH if first_kind == "FS" else INC,
        SYSTEM,
        paths=[PathChange("a", False)],
    ).job
    if state == "running":
        [lease] = alone.claim(1, worker="w")
        assert lease.job.job_id == first.job_id
    now = alone.clock()
    coalesce_with = [kind, FS] if kind is INC else [kind]
    with alone.db.transaction() as tx:
        assert (
            enqueue_sql.insert_if_idle(
                tx, realm_id="r", kind=kind, coalesce_with=coalesce_with, priority=USER, now=now
            )
            is None
        )
    jobs_before = alone.list_jobs(realm_id="r")
    result = alone.enqueue("r", kind, USER, paths=[PathChange("b", False)])
    assert result.disposition is expected
    jobs_after = alone.list_jobs(realm_id="r")
    assert len(jobs_after) == len(jobs_before) + (expected is Disposition.INSERTED)


def test_an_unknown_realm_is_not_inserted_and_is_refused(alone: JobQueue) -> None:
    now = alone.clock()
    with alone.db.transaction() as tx:
        job = enqueue_sql.insert_if_idle(
            tx, realm_id="nope", kind=FS, coalesce_with=[FS], priority=USER, now=now
        )
        assert job is None
    with pytest.raises(RealmNotFound):
        alone.enqueue("nope", FS, USER, hand_off=_offer())
    assert alone.list_jobs() == []


def test_too_many_paths_escalate_as_before(alone: JobQueue) -> None:
    from realm_service.domain import MAX_JOB_PATHS

    make_realm(alone, "r")
    many = [PathChange(f"f{i}.json", False) for i in range(MAX_JOB_PATHS + 1)]
    result = alone.enqueue("r", INC, USER, paths=many)
    assert result.job.kind is FS and result.disposition is Disposition.INSERTED
    assert [j.kind for j in alone.list_jobs(realm_id="r")] == [FS]


def test_the_inserted_job_announces_new_work_and_logs_once(
    alone: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    make_realm(alone, "r")
    woken = woken_calls(alone)
    with caplog.at_level(logging.INFO, logger="realm_service.queue"):
        result = alone.enqueue("r", FS, USER)
    assert woken, "the dispatcher was not woken for the new job"
    lines = [r for r in caplog.records if r.getMessage() == "job enqueued"]
    assert len(lines) == 1 and lines[0].__dict__["job"] == result.job.job_id


# -- PostgreSQL: statements that commit alone ----------------------------------------


@pytest.fixture
def pg_alone(pg_url: str) -> Iterator[JobQueue]:
    """A queue on PostgreSQL (whatever the store parameter), alone."""
    db = open_database(pg_url)
    db.others_alive = False
    try:
        yield JobQueue(db, settings=QueueSettings(lease_duration=LEASE), clock=FakeClock())
    finally:
        db.close()


def test_each_statement_of_the_unit_commits_on_its_own(pg_alone: JobQueue) -> None:
    db = pg_alone.db
    make_realm(pg_alone, "r")
    with db.statements() as tx:
        job = enqueue_sql.insert_if_idle(
            tx, realm_id="r", kind=FS, coalesce_with=[FS], priority=USER, now=pg_alone.clock()
        )
        assert job is not None
        # Another connection sees it before the unit ends: it committed.
        with db.engine.connect() as other:
            seen = other.execute(text("SELECT count(*) FROM jobs WHERE id = :i"), {"i": job.job_id})
            assert seen.scalar_one() == 1


def test_a_claim_of_several_statements_refuses_to_run_alone(pg_alone: JobQueue) -> None:
    make_realm(pg_alone, "r")
    pg_alone.enqueue("r", FS, USER)
    assert not claim_sql.one_statement("postgresql", limit=2, concurrent=False, system_cap=None)
    assert not claim_sql.one_statement("postgresql", limit=1, concurrent=True, system_cap=None)
    assert not claim_sql.one_statement("sqlite", limit=1, concurrent=False, system_cap=None)
    assert not claim_sql.one_statement("postgresql", limit=1, concurrent=False, system_cap=0)
    now = pg_alone.clock()
    with pytest.raises(RuntimeError, match="needs a transaction"), pg_alone.db.statements() as tx:
        claim_sql.claim(
            tx,
            limit=2,
            min_priority=0,
            max_priority=None,
            kinds=None,
            worker="w",
            now=now,
            lease_until=now,
            concurrent=False,
        )
    assert pg_alone.get_job(pg_alone.list_jobs()[0].job_id).state is JobState.QUEUED


@pytest.mark.parametrize("errcode", ["unique_violation", "disk_full"])
def test_a_hand_off_claim_that_fails_after_the_insert_keeps_the_job_queued(
    pg_alone: JobQueue, caplog: pytest.LogCaptureFixture, errcode: str
) -> None:
    """The insert committed on its own (queued: a job ahead of it is the one
    the hand-off's claim takes); the claim's statement is refused (as the
    unique index on running jobs refuses one that raced another claim, or
    as a store that fails does): the job stays queued, the dispatcher is
    woken for it, and the enqueue is reported as it committed."""
    db = pg_alone.db
    make_realm(pg_alone, "first")
    make_realm(pg_alone, "r")
    ahead = pg_alone.enqueue("first", FS, USER + 1).job
    with db.transaction() as tx:
        tx.conn.execute(
            text(
                "CREATE FUNCTION refuse_attempt() RETURNS trigger LANGUAGE plpgsql AS $$"
                f" BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '{errcode}'; END $$"
            )
        )
        tx.conn.execute(
            text(
                "CREATE TRIGGER refuse_attempt BEFORE INSERT ON job_attempts"
                " FOR EACH ROW EXECUTE FUNCTION refuse_attempt()"
            )
        )
    woken = woken_calls(pg_alone)
    with caplog.at_level(logging.INFO, logger="realm_service.queue"):
        result = pg_alone.enqueue("r", FS, USER, hand_off=_offer())
    assert result.disposition is Disposition.INSERTED and result.lease is None
    stored = pg_alone.get_job(result.job.job_id)
    assert (stored.state, stored.attempt) == (JobState.QUEUED, 0)
    assert pg_alone.get_job(ahead.job_id).state is JobState.QUEUED
    assert woken
    assert [r.__dict__["job"] for r in caplog.records if r.getMessage() == "job enqueued"] == [
        result.job.job_id
    ]
    failed = [r for r in caplog.records if r.getMessage().startswith("hand-off claim failed")]
    assert len(failed) == (errcode != "unique_violation")


def test_a_claimed_job_whose_files_cannot_be_read_goes_out_without_them(
    pg_alone: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-off's claim committed on its own: a failure to read the
    job's files for the assignment must not lose the lease (the worker reads
    the files itself)."""
    from sqlalchemy.exc import OperationalError

    from realm_service import queue as queue_module

    make_realm(pg_alone, "r")

    def lost(*args: object, **kw: object) -> object:
        raise OperationalError("SELECT ...", {}, Exception("connection lost"))

    monkeypatch.setattr(queue_module.realms_sql, "files_with_content", lost)
    result = pg_alone.enqueue(
        "r", INC, USER, paths=[PathChange(path="a.txt", deleted=False)], hand_off=_offer()
    )
    assert result.lease is not None and result.lease.files is None
    stored = pg_alone.get_job(result.job.job_id)
    assert (stored.state, stored.attempt) == (JobState.RUNNING, 1)
    assert pg_alone.heartbeat([result.lease.lease_id])[result.lease.lease_id] is not None


def test_an_insert_refused_in_the_unit_falls_back_to_the_full_enqueue(
    pg_alone: JobQueue,
) -> None:
    """A Conflict from the insert itself (as when the realm is deleted
    between the check and the write; played by a trigger refusing the first
    two inserts, counted by a sequence, which no rollback undoes) leaves
    nothing written and wakes nobody; the full enqueue then inserts."""
    db = pg_alone.db
    make_realm(pg_alone, "r")
    with db.transaction() as tx:
        tx.conn.execute(text("CREATE SEQUENCE job_inserts"))
        tx.conn.execute(
            text(
                "CREATE FUNCTION refuse_job() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF nextval('job_inserts') <= 2 THEN"
                " RAISE EXCEPTION 'refused' USING ERRCODE = 'foreign_key_violation';"
                " END IF; RETURN NEW; END $$"
            )
        )
        tx.conn.execute(
            text(
                "CREATE TRIGGER refuse_job BEFORE INSERT ON jobs"
                " FOR EACH ROW EXECUTE FUNCTION refuse_job()"
            )
        )
    woken = woken_calls(pg_alone)
    with pytest.raises(Conflict), db.statements() as tx:
        enqueue_sql.insert_if_idle(
            tx, realm_id="r", kind=FS, coalesce_with=[FS], priority=USER, now=pg_alone.clock()
        )
    assert pg_alone.list_jobs(realm_id="r") == [] and woken == []
    result = pg_alone.enqueue("r", FS, USER)  # refused once more, then the full way
    assert result.disposition is Disposition.INSERTED
    assert [j.job_id for j in pg_alone.list_jobs(realm_id="r")] == [result.job.job_id]
    with db.read_transaction() as tx:
        assert tx.conn.execute(text("SELECT last_value FROM job_inserts")).scalar_one() == 3


# -- PostgreSQL: the hand-off's claim in the insert ---------------------------------


def test_a_job_started_by_its_insert_runs_its_course(pg_alone: JobQueue) -> None:
    """The lease works as a claim's does: its attempt is the one the job
    row names, a heartbeat extends it, its success ends both."""
    make_realm(pg_alone, "r")
    result = pg_alone.enqueue("r", FS, USER, hand_off=_offer())
    assert result.lease is not None
    lease = result.lease.lease_id
    with pg_alone.db.read_transaction() as tx:
        named = tx.conn.execute(
            text(
                "SELECT j.lease_id, a.lease_id, a.worker, a.instance_id FROM jobs j"
                " JOIN job_attempts a ON a.id = j.lease_attempt_id AND a.job_id = j.id"
                " WHERE j.id = :i"
            ),
            {"i": result.job.job_id},
        ).one()
    assert tuple(named) == (lease, lease, "w", pg_alone.instance_id)
    assert pg_alone.heartbeat([lease])[lease] is not None
    done = pg_alone.complete_many([(lease, 0)])[lease]
    assert not isinstance(done, Exception) and done.state is JobState.SUCCEEDED
    assert [outcome for _, outcome in pg_alone.attempts(result.job.job_id)] == ["completed"]


@pytest.mark.parametrize("ahead", [USER, USER + 5])
def test_a_queued_job_ahead_is_the_one_the_hand_off_takes(pg_alone: JobQueue, ahead: int) -> None:
    """A queued job of the new job's priority (older) or above ranks ahead:
    the new job is queued by the same statement, and the hand-off's claim
    takes the one ahead, as a claim would."""
    make_realm(pg_alone, "first")
    make_realm(pg_alone, "r")
    waiting = pg_alone.enqueue("first", FS, ahead).job
    woken = woken_calls(pg_alone)
    with Statements(pg_alone.db) as statements:
        result = pg_alone.enqueue("r", FS, USER, hand_off=_offer())
    assert statements.sql == ["WITH", "WITH"]  # the insert, the one-job claim
    assert result.lease is not None and result.lease.job.job_id == waiting.job_id
    assert result.job.state is JobState.QUEUED and result.disposition is Disposition.INSERTED
    assert pg_alone.get_job(result.job.job_id).state is JobState.QUEUED
    assert pg_alone.get_job(waiting.job_id).state is JobState.RUNNING
    assert woken, "the queued job was not announced"


def test_queued_jobs_below_its_priority_do_not_hold_the_start_back(pg_alone: JobQueue) -> None:
    make_realm(pg_alone, "backlog")
    make_realm(pg_alone, "r")
    below = pg_alone.enqueue("backlog", FS, SYSTEM).job
    with Statements(pg_alone.db) as statements:
        result = pg_alone.enqueue("r", FS, USER, hand_off=_offer())
    assert statements.sql == ["WITH"]
    assert result.lease is not None and result.lease.job.job_id == result.job.job_id
    assert pg_alone.get_job(below.job_id).state is JobState.QUEUED


@pytest.mark.parametrize(
    "offer",
    [
        HandOff(stream_id="s", worker="w", min_priority=USER + 1, kinds=(), system_limit=None),
        HandOff(stream_id="s", worker="w", min_priority=0, kinds=(INC,), system_limit=None),
        HandOff(stream_id="s", worker="w", min_priority=0, kinds=(), system_limit=None,
                max_priority=USER - 1),
    ],
    ids=["below the lane", "another kind", "above the ceiling"],
)  # fmt: skip
def test_a_job_the_stream_would_not_take_is_only_inserted(
    pg_alone: JobQueue, offer: HandOff
) -> None:
    make_realm(pg_alone, "r")
    with Statements(pg_alone.db) as statements:
        result = pg_alone.enqueue("r", FS, USER, hand_off=offer)
    assert statements.sql == ["INSERT", "WITH"]  # the claim looks and takes nothing
    assert result.lease is None
    assert pg_alone.get_job(result.job.job_id).state is JobState.QUEUED


def test_a_system_job_without_a_system_budget_is_only_inserted(pg_alone: JobQueue) -> None:
    make_realm(pg_alone, "r")
    offer = HandOff(stream_id="s", worker="w", min_priority=0, kinds=(), system_limit=0)
    result = pg_alone.enqueue("r", FS, SYSTEM, hand_off=offer)
    assert result.lease is None
    assert pg_alone.get_job(result.job.job_id).state is JobState.QUEUED


def test_a_busy_realm_starts_nothing_and_goes_the_full_way(pg_alone: JobQueue) -> None:
    make_realm(pg_alone, "r")
    first = pg_alone.enqueue("r", INC, USER, paths=[PathChange("a", False)]).job
    [running] = pg_alone.claim(1, worker="other")
    assert running.job.job_id == first.job_id
    result = pg_alone.enqueue("r", FS, USER, hand_off=_offer())
    assert result.disposition is Disposition.INSERTED and result.lease is None
    assert pg_alone.get_job(result.job.job_id).state is JobState.QUEUED
    assert [j.state for j in pg_alone.list_jobs(realm_id="r")].count(JobState.RUNNING) == 1


def test_a_small_incremental_job_started_by_its_insert_carries_its_files(
    pg_alone: JobQueue,
) -> None:
    make_realm(pg_alone, "r", {"a.txt": b"hello"})
    result = pg_alone.enqueue(
        "r", INC, USER, paths=[PathChange(path="a.txt", deleted=False)], hand_off=_offer()
    )
    assert result.lease is not None and result.lease.job.job_id == result.job.job_id
    assert result.lease.files is not None
    assert [(f.path, content) for f, content in result.lease.files] == [("a.txt", b"hello")]


def test_a_start_refused_by_the_store_writes_nothing(pg_alone: JobQueue) -> None:
    """The job and its attempt are one statement: when the store refuses the
    attempt (played by a trigger), the job is not written either, and the
    caller hears the store's error."""
    from realm_service.errors import StoreFull

    db = pg_alone.db
    make_realm(pg_alone, "r")
    with db.transaction() as tx:
        tx.conn.execute(
            text(
                "CREATE FUNCTION refuse_attempt() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = 'disk_full'; END $$"
            )
        )
        tx.conn.execute(
            text(
                "CREATE TRIGGER refuse_attempt BEFORE INSERT ON job_attempts"
                " FOR EACH ROW EXECUTE FUNCTION refuse_attempt()"
            )
        )
    with pytest.raises(StoreFull):
        pg_alone.enqueue("r", FS, USER, hand_off=_offer())
    assert pg_alone.list_jobs() == []
