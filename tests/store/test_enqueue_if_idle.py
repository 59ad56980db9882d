"""The enqueue of an idle realm (no running job, no queued job to coalesce
with) is one insert statement that inserts only while the realm is idle; on
PostgreSQL it commits alone (`Database.statements`), and a hand-off's claim
of one job does too. A realm that is not idle goes the full way, and the
outcome is the same either way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from store_helpers import (
    LEASE,
    FakeClock,
    Statements,
    make_realm,
    terminate_backend,
    woken_calls,
)

from realm_service.domain import (
    SYSTEM,
    USER,
    Disposition,
    HandOff,
    JobKind,
    JobState,
    PathChange,
)
from realm_service.errors import Conflict, RealmNotFound, StoreUnavailable
from realm_service.queue import JobQueue, QueueSettings
from realm_service.store import claim_sql, enqueue_sql
from realm_service.store.db import Database, open_database

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


def test_an_idle_realm_and_its_hand_off_are_two_statements_alone_on_postgresql(
    alone: JobQueue,
) -> None:
    make_realm(alone, "r")
    with Statements(alone.db) as statements:
        result = alone.enqueue("r", FS, USER, hand_off=_offer())
    assert result.lease is not None and result.lease.job.job_id == result.job.job_id
    stored = alone.get_job(result.job.job_id)
    assert (stored.state, stored.worker, stored.attempt) == (JobState.RUNNING, "w", 1)
    assert [outcome for _, outcome in alone.attempts(result.job.job_id)] == ["running"]
    if alone.db.backend == "postgresql":
        assert statements.sql == ["INSERT", "WITH"]
        assert statements.in_block == [False, False]  # each commits alone
    else:
        # One transaction on SQLite: two commits would be two syncs.
        assert statements.sql[:2] == ["BEGIN", "INSERT"]
        assert statements.sql.count("BEGIN") == 1


def test_shared_store_hand_off_claims_once_the_insert_committed(queue: JobQueue) -> None:
    """With other instances about, a claim is several statements, whole only
    in a transaction, and the insert must commit before its job is claimed
    (see `test_enqueues_racing_a_held_realm_coalesce`): on PostgreSQL the
    insert commits alone, with its word to the others, and the claim follows
    in a transaction of its own. On SQLite, where writers take turns, the
    insert and the claim share one transaction."""
    queue.db.others_alive = True
    make_realm(queue, "r")
    with Statements(queue.db) as statements:
        result = queue.enqueue("r", FS, USER, hand_off=_offer())
    assert result.lease is not None and result.lease.job.job_id == result.job.job_id
    stored = queue.get_job(result.job.job_id)
    assert (stored.state, stored.worker, stored.attempt) == (JobState.RUNNING, "w", 1)
    if queue.db.backend == "postgresql":
        assert statements.sql[:2] == ["INSERT", "SELECT"]
        assert "pg_notify" in statements.text[1]
        claim = len(statements.sql) - 2
        assert claim > 1
        assert statements.in_block == [False, False, False] + [True] * (claim - 1)
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


@pytest.mark.parametrize("on_loop", [False, True], ids=["thread", "loop"])
@pytest.mark.parametrize("others_alive", [False, True], ids=["alone", "shared"])
@pytest.mark.parametrize("errcode", ["unique_violation", "disk_full", "undefined_table"])
def test_a_hand_off_claim_that_fails_after_the_insert_keeps_the_job_queued(
    pg_alone: JobQueue,
    caplog: pytest.LogCaptureFixture,
    errcode: str,
    others_alive: bool,
    on_loop: bool,
) -> None:
    """The insert committed on its own; the claim (its one statement, or its
    own transaction with other instances about) is refused: as the unique
    index on running jobs refuses one that raced another claim, as a store
    that fails does, or with an error nobody expected. The job stays
    queued, the dispatcher is woken for it, and the enqueue is reported as
    it committed; a failure other than the race is logged. Whether the
    enqueue ran in a store thread or on the event loop
    (`JobQueue.enqueue_on_loop`)."""
    db = pg_alone.db
    db.others_alive = others_alive
    make_realm(pg_alone, "r")
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
        if on_loop:
            result = asyncio.run(pg_alone.enqueue_on_loop("r", FS, USER, hand_off=_offer()))
        else:
            result = pg_alone.enqueue("r", FS, USER, hand_off=_offer())
    assert result.disposition is Disposition.INSERTED and result.lease is None
    stored = pg_alone.get_job(result.job.job_id)
    assert (stored.state, stored.attempt) == (JobState.QUEUED, 0)
    assert woken
    assert [r.__dict__["job"] for r in caplog.records if r.getMessage() == "job enqueued"] == [
        result.job.job_id
    ]
    failed = [r for r in caplog.records if r.getMessage().startswith("hand-off claim failed")]
    assert len(failed) == (errcode != "unique_violation")
    if errcode == "undefined_table":  # not the store's known failures: a traceback
        assert failed[0].levelno == logging.ERROR and failed[0].exc_info
    assert pg_alone.list_jobs(realm_id="r") == [stored]


@contextlib.contextmanager
def backend_killed_before(db: Database, starts: str) -> Iterator[list[int]]:
    """While in it, the first statement that starts with `starts` meets a
    connection whose backend was just ended; yields the pids ended."""
    from sqlalchemy import event

    killed: list[int] = []

    def kill(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if not killed and statement.startswith(starts):
            pid = conn.connection.dbapi_connection.info.backend_pid
            terminate_backend(db, pid)
            killed.append(pid)

    event.listen(db.engine, "before_cursor_execute", kill)
    try:
        yield killed
    finally:
        event.remove(db.engine, "before_cursor_execute", kill)


def test_a_hand_off_claim_that_loses_its_connection_keeps_the_enqueue(
    pg_alone: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """The store goes away between the insert (committed on its own) and the
    hand-off's claim: the claim's statement meets a dead connection. The
    enqueue stands as it committed, reported so (not as an internal error of
    a unit of work left to commit on that connection), and the pool replaces
    the connection for the next call."""
    make_realm(pg_alone, "r")
    woken = woken_calls(pg_alone)
    with (
        backend_killed_before(pg_alone.db, "WITH") as killed,
        caplog.at_level(logging.INFO, logger="realm_service.queue"),
    ):
        result = pg_alone.enqueue("r", FS, USER, hand_off=_offer())
    assert killed
    assert result.disposition is Disposition.INSERTED and result.lease is None
    stored = pg_alone.get_job(result.job.job_id)
    assert (stored.state, stored.attempt) == (JobState.QUEUED, 0)
    assert woken
    failed = [r for r in caplog.records if r.getMessage().startswith("hand-off claim failed")]
    assert len(failed) == 1


def test_a_word_to_other_instances_lost_with_its_connection_keeps_the_enqueue(
    pg_alone: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """Another instance is alive: the insert (committed on its own) is
    followed by its NOTIFY, and the connection dies under that. The enqueue
    stands as it committed and is reported so; the lost word is logged (the
    other instances find the job at their next poll), and this process's
    dispatcher is still woken for it."""
    make_realm(pg_alone, "r")
    woken = woken_calls(pg_alone)
    pg_alone.db.others_alive = True
    with (
        backend_killed_before(pg_alone.db, "SELECT pg_notify") as killed,
        caplog.at_level(logging.INFO),
    ):
        result = pg_alone.enqueue("r", FS, USER)
    assert killed
    assert result.disposition is Disposition.INSERTED and result.lease is None
    stored = pg_alone.get_job(result.job.job_id)
    assert (stored.state, stored.attempt) == (JobState.QUEUED, 0)
    assert pg_alone.list_jobs() == [stored]
    assert woken
    lost = [r for r in caplog.records if r.getMessage().startswith("word to other instances")]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert lost[0].__dict__["word"] == "work"
    # The pool replaced the dead connection: the store serves the next call.
    again = pg_alone.enqueue("r", FS, USER)
    assert (again.disposition, again.job.job_id) == (Disposition.MERGED, stored.job_id)


def test_a_word_in_a_transaction_fails_with_it(pg_alone: JobQueue) -> None:
    """With another instance alive, an enqueue into a realm that is not idle
    (here it runs an incremental job) is one transaction, with its hand-off's
    claim (which checks for concurrent ones): the NOTIFY is part of it, so a
    word that cannot be sent fails it, and nothing is kept."""
    make_realm(pg_alone, "r")
    running = pg_alone.enqueue("r", INC, SYSTEM, paths=[PathChange("a", False)]).job
    [lease] = pg_alone.claim(1, worker="w")
    assert lease.job.job_id == running.job_id
    pg_alone.db.others_alive = True
    with (
        backend_killed_before(pg_alone.db, "SELECT pg_notify") as killed,
        pytest.raises(StoreUnavailable),
    ):
        pg_alone.enqueue("r", FS, USER, hand_off=_offer())
    assert killed
    assert [j.job_id for j in pg_alone.list_jobs()] == [running.job_id]
    assert pg_alone.get_job(running.job_id).state is JobState.RUNNING


def test_a_unit_of_work_whose_connection_was_lost_is_unavailable(pg_alone: JobQueue) -> None:
    """A transaction whose connection died under a statement whose error its
    caller went past cannot commit: that is the store being unavailable, not
    an internal error, and nothing of it is kept."""
    from sqlalchemy.exc import OperationalError

    db = pg_alone.db
    make_realm(pg_alone, "r")
    with pytest.raises(StoreUnavailable), db.transaction() as tx:
        enqueue_sql.insert_if_idle(
            tx, realm_id="r", kind=FS, coalesce_with=[FS], priority=USER, now=pg_alone.clock(),
            paths=(), trace_parent="",
        )  # fmt: skip
        pid = tx.conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        terminate_backend(db, pid)
        with pytest.raises(OperationalError):
            tx.conn.execute(text("SELECT 1"))
    assert pg_alone.list_jobs() == []


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


@pytest.mark.parametrize("others_alive", [False, True], ids=["alone", "shared"])
def test_enqueues_racing_a_held_realm_coalesce(
    pg_alone: JobQueue, others_alive: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another transaction holds the realm's row (a write to it), an
    enqueue offered a waiting worker and then one without race into the
    idle realm: both wait for it, and they coalesce as the rules say (one
    job). The queued insert of the first is what the second meets (the
    unique index of one queued job per realm and kind), so it must be
    committed queued: a job claimed in the inserting transaction, or
    inserted already running, would not be met, and both would stand. Alone
    or with other instances about. (The hand-off's claim waits until the
    plain enqueue is done: when it commits before the waiting insert looks
    again, that insert finds the row gone too; see `_hand_off_after`.)"""
    db = pg_alone.db
    db.others_alive = others_alive
    make_realm(pg_alone, "r")
    results: dict[str, object] = {}
    plain_done = _claim_waits_for(monkeypatch)

    def enqueue(name: str, offer: HandOff | None) -> None:
        try:
            results[name] = pg_alone.enqueue("r", FS, USER, hand_off=offer)
        except Exception as e:  # pragma: no cover - reported by the asserts
            results[name] = e
        finally:
            if name == "plain":
                plain_done.set()

    holder = db.engine.connect()
    try:
        holder.execute(text("SELECT realm_id FROM realms WHERE realm_id = 'r' FOR UPDATE"))
        threads = [
            threading.Thread(target=enqueue, args=("offered", _offer()), name="offered"),
            threading.Thread(target=enqueue, args=("plain", None), name="plain"),
        ]
        # The offered one first: its insert waits on the holder, the plain
        # one's on the offered one's queued row.
        blocker = holder.connection.dbapi_connection.info.backend_pid
        for thread in threads:
            thread.start()
            blocker = _insert_blocked_by(db, blocker)
        for thread in threads:
            thread.join(0.5)
        assert all(t.is_alive() for t in threads), "an enqueue went past the held realm"
        holder.rollback()
    finally:
        holder.close()
    for thread in threads:
        thread.join(30)
    outcomes = [results["offered"], results["plain"]]
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
    jobs = pg_alone.list_jobs(realm_id="r")
    assert len(jobs) == 1
    dispositions = sorted(str(o.disposition) for o in outcomes)  # type: ignore[attr-defined]
    assert dispositions.count(str(Disposition.INSERTED)) == 1
    assert {o.job.job_id for o in outcomes} == {jobs[0].job_id}  # type: ignore[attr-defined]


def _claim_waits_for(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The hand-off claims of the thread named "offered" wait (5 s at most)
    until the event returned is set: a claim that would run in the
    enqueue's transaction then holds it open that long."""
    hand_off_in = JobQueue._hand_off_in
    done = threading.Event()

    def waiting(
        self: JobQueue, tx: Any, result: Any, hand_off: HandOff, *, concurrent: bool
    ) -> Any:
        if threading.current_thread().name == "offered":
            done.wait(5)
        return hand_off_in(self, tx, result, hand_off, concurrent=concurrent)

    monkeypatch.setattr(JobQueue, "_hand_off_in", waiting)
    return done


def _insert_blocked_by(db: Database, pid: int) -> int:
    """Waits until an insert into jobs waits on a lock that backend `pid`
    holds; that insert's backend."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with db.read_transaction() as tx:
            blocked = tx.conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE 'INSERT INTO jobs%'"
                    " AND :pid = ANY (pg_blocking_pids(pid))"
                ),
                {"pid": pid},
            ).scalar()
        if blocked is not None:
            return int(blocked)
        time.sleep(0.01)
    raise AssertionError(f"no insert came to wait on backend {pid}")


@pytest.mark.parametrize("others_alive", [False, True], ids=["alone", "shared"])
@pytest.mark.parametrize(
    ("running_kind", "expected"),
    [(INC, Disposition.INSERTED), (FS, Disposition.RERUN_SCHEDULED)],
    ids=["behind-another-kind", "rerun"],
)
def test_a_job_inserted_the_full_way_is_claimed_once_it_committed(
    pg_alone: JobQueue,
    others_alive: bool,
    running_kind: JobKind,
    expected: Disposition,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The full enqueue inserts a queued job behind the realm's running one
    (of another kind, or a rerun of a from-scratch job for changed content),
    offered a waiting worker. Before it commits, the running job ends and a
    plain enqueue of the realm, finding it idle, waits on the new queued
    row. The hand-off's claim may now take the new job, but only after its
    insert committed: the plain enqueue then meets the queued row and
    coalesces (one job of the kind), alone or with other instances about."""
    queue = pg_alone
    queue.db.others_alive = others_alive
    make_realm(queue, "r")
    running = queue.enqueue("r", running_kind, SYSTEM, paths=[PathChange("a", False)]).job
    [lease] = queue.claim(1, worker="x")
    assert lease.job.job_id == running.job_id

    inserted = threading.Event()
    go = threading.Event()
    offered_pid: list[int] = []
    enqueue_in = JobQueue.enqueue_in

    def paused(self: JobQueue, tx: Any, *args: Any, **kwargs: Any) -> Any:
        result = enqueue_in(self, tx, *args, **kwargs)
        if threading.current_thread().name == "offered":
            offered_pid.append(tx.conn.connection.dbapi_connection.info.backend_pid)
            inserted.set()
            assert go.wait(10)
        return result

    monkeypatch.setattr(JobQueue, "enqueue_in", paused)
    plain_done = _claim_waits_for(monkeypatch)
    results: dict[str, Any] = {}

    def enqueue(offer: HandOff | None) -> None:
        name = threading.current_thread().name
        try:
            results[name] = queue.enqueue(
                "r", FS, USER, content_changed=offer is not None, hand_off=offer
            )
        except Exception as e:  # pragma: no cover - reported by the asserts
            results[name] = e
        finally:
            if name == "plain":
                plain_done.set()

    offered = threading.Thread(target=enqueue, args=(_offer(),), name="offered")
    plain = threading.Thread(target=enqueue, args=(None,), name="plain")
    offered.start()
    try:
        assert inserted.wait(10)
        queue.fail(lease.lease_id, "done", permanent=True)  # the realm is idle now
        plain.start()
        _insert_blocked_by(queue.db, offered_pid[0])
    finally:
        go.set()
    offered.join(30)
    plain.join(30)
    assert not any(isinstance(r, Exception) for r in results.values()), results
    assert results["offered"].disposition is expected
    jobs = [j for j in queue.list_jobs(realm_id="r") if j.kind is FS and j.job_id != running.job_id]
    assert [j.job_id for j in jobs] == [results["offered"].job.job_id]
    assert results["plain"].job.job_id == jobs[0].job_id
    assert results["plain"].disposition in (Disposition.MERGED, Disposition.ATTACHED)


def test_an_enqueue_on_the_loop_decides_as_one_in_a_thread(queue: JobQueue) -> None:
    """`enqueue_on_loop`: on PostgreSQL the idle insert and a one-statement
    hand-off run on the event loop, anything else in a store thread, as on
    SQLite; the coalescing rules decide the same either way."""
    make_realm(queue, "r")
    pool = queue.db.loop_connections
    assert (pool is not None) == (queue.db.backend == "postgresql")

    async def run() -> list[Any]:
        first = await queue.enqueue_on_loop("r", FS, USER)  # idle: inserted
        merged = await queue.enqueue_on_loop("r", FS, USER + 5)  # queued: merged
        [lease] = queue.claim(1, worker="w")
        attached = await queue.enqueue_on_loop("r", FS, USER)  # running: attached
        rerun = await queue.enqueue_on_loop("r", FS, USER, content_changed=True)
        with pytest.raises(RealmNotFound):
            await queue.enqueue_on_loop("missing", FS, USER)
        queue.db.close_loop_connections()
        return [first, merged, lease, attached, rerun]

    first, merged, lease, attached, rerun = asyncio.run(run())
    assert first.disposition is Disposition.INSERTED
    assert merged.disposition is Disposition.MERGED
    assert merged.job.job_id == first.job.job_id and merged.job.priority == USER + 5
    assert lease.job.job_id == first.job.job_id
    assert attached.disposition is Disposition.ATTACHED
    assert attached.job.job_id == first.job.job_id
    assert rerun.disposition is Disposition.RERUN_SCHEDULED
    assert rerun.job.job_id != first.job.job_id
    if pool is not None:
        assert pool.opened == 1  # the idle insert, and the next one's try
