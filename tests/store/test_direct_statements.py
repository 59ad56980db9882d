"""Statements run on the driver's cursor (`store/direct.py`) answer as
SQLAlchemy's execution does: the same values, the same errors (translated the
same way at the store's edge, a lost connection invalidated), the same
cursor events; a statement whose SQL depends on its values is left to
SQLAlchemy."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import bindparam, event, insert, select, text
from store_helpers import make_realm, terminate_backend

from realm_service.domain import USER, JobKind
from realm_service.errors import Conflict, InvalidArgument, StoreUnavailable
from realm_service.queue import JobQueue
from realm_service.store import direct, enqueue_sql, jobs_sql, realms_sql
from realm_service.store.rows import new_job_values
from realm_service.store.tables import JobRow, RealmRow

_JOBS: Any = JobRow.__table__
_REALMS: Any = RealmRow.__table__


def _both(queue: JobQueue, statement: Any, params: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    with queue.db.read_transaction() as tx:
        by_sqlalchemy = [tuple(r) for r in tx.conn.execute(statement, params)]
        by_cursor = [tuple(r) for r in direct.rows(tx.conn, statement, params)]
    return by_sqlalchemy, by_cursor


def test_rows_and_values_are_sqlalchemys(queue: JobQueue) -> None:
    make_realm(queue, "r")
    make_realm(queue, "s")
    first = queue.enqueue("r", JobKind.FROM_SCRATCH, USER).job
    queue.claim(1, worker="w")
    queue.enqueue("s", JobKind.INCREMENTAL, USER, paths=[])
    every_column = select(_JOBS).order_by(_JOBS.c.id)
    by_sqlalchemy, by_cursor = _both(queue, every_column, {})
    assert len(by_sqlalchemy) == 2
    assert by_cursor == by_sqlalchemy
    # Times come back aware, in UTC, as SQLAlchemy's types make them.
    start = by_cursor[0][list(_JOBS.c.keys()).index("start_time")]
    assert start is not None and start.utcoffset() is not None and not start.utcoffset()
    realms = select(_REALMS).where(_REALMS.c.realm_id == bindparam("r"))
    assert _both(queue, realms, {"r": "s"})[1] == _both(queue, realms, {"r": "s"})[0]
    with queue.db.read_transaction() as tx:
        row = direct.first(tx.conn, every_column, {})
        assert row is not None and (row.id, row.realm_id) == (first.job_id, "r")
        assert direct.first(tx.conn, realms, {"r": "nope"}) is None


def test_a_statement_whose_sql_depends_on_its_values_is_run_by_sqlalchemy(
    queue: JobQueue,
) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", JobKind.FROM_SCRATCH, USER).job
    expanding = select(_JOBS.c.id).where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))
    by_sqlalchemy, by_cursor = _both(queue, expanding, {"ids": [job.job_id, -1]})
    assert by_cursor == by_sqlalchemy == [(job.job_id,)]


def test_inserted_columns_get_their_scalar_defaults(queue: JobQueue) -> None:
    """`preemptions` has a Python-side default of 0, which SQLAlchemy adds to
    an INSERT ... SELECT; the cursor's run adds it too."""
    make_realm(queue, "r")
    with queue.db.transaction() as tx:
        job = enqueue_sql.insert_if_idle(
            tx,
            realm_id="r",
            kind=JobKind.FROM_SCRATCH,
            coalesce_with=[JobKind.FROM_SCRATCH],
            priority=USER,
            now=queue.clock(),
        )
    assert job is not None
    with queue.db.read_transaction() as tx:
        stored = tx.conn.execute(
            select(_JOBS.c.preemptions, _JOBS.c.trace_parent).where(_JOBS.c.id == job.job_id)
        ).one()
    assert tuple(stored) == (0, "")
    assert queue.get_job(job.job_id) == job


def test_errors_are_translated_as_sqlalchemys_are(queue: JobQueue) -> None:
    make_realm(queue, "r")
    values = new_job_values(
        realm_id="r", kind=JobKind.FROM_SCRATCH, priority=USER, now=queue.clock()
    )
    plain_insert = insert(_JOBS)
    with queue.db.transaction() as tx:
        direct.rows(tx.conn, plain_insert, values)
    # A second queued from-scratch job of the realm: the unique index refuses.
    with pytest.raises(Conflict), queue.db.transaction() as tx:
        direct.rows(tx.conn, plain_insert, values)
    # The refused transaction rolled back whole; one job stands.
    assert len(queue.list_jobs(realm_id="r")) == 1
    if queue.db.backend == "postgresql":
        # A value the store cannot hold: the request's fault.
        with pytest.raises(InvalidArgument), queue.db.transaction() as tx:
            direct.rows(tx.conn, plain_insert, {**values, "error_message": "a\x00b"})


def test_a_value_missing_or_refused_by_its_type_gets_sqlalchemys_error(
    queue: JobQueue,
) -> None:
    """What SQLAlchemy refuses before the driver sees it is refused the same
    way: a required value not given, a value its column type cannot bind
    (a naive time; the store's edge makes it INVALID_ARGUMENT)."""
    from sqlalchemy.exc import StatementError

    make_realm(queue, "r")
    by_id = select(_JOBS.c.id).where(_JOBS.c.realm_id == bindparam("r"))
    with (
        pytest.raises(StatementError, match="bind parameter 'r'"),
        queue.db.read_transaction() as tx,
    ):
        direct.rows(tx.conn, by_id, {})
    naive = select(_JOBS.c.id).where(
        _JOBS.c.create_time < bindparam("t", type_=_JOBS.c.create_time.type)
    )
    with pytest.raises(InvalidArgument), queue.db.read_transaction() as tx:
        direct.rows(tx.conn, naive, {"t": datetime(2026, 1, 1)})
    with queue.db.read_transaction() as tx:
        assert direct.rows(tx.conn, naive, {"t": datetime(2026, 1, 1, tzinfo=UTC)}) == []


def test_rows_of_a_text_statement_come_back(queue: JobQueue) -> None:
    with queue.db.read_transaction() as tx:
        assert direct.rows(tx.conn, text("SELECT 1, 'a'"), {}) == [(1, "a")]


def test_cursor_events_see_the_statements(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", JobKind.FROM_SCRATCH, USER).job
    seen: list[str] = []

    def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(queue.db.engine, "before_cursor_execute", spy)
    try:
        with queue.db.read_transaction() as tx:
            assert jobs_sql.get_job(tx, job.job_id) == job
    finally:
        event.remove(queue.db.engine, "before_cursor_execute", spy)
    selects = [sql for sql in seen if sql.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1 and "FROM jobs" in selects[0]


def test_a_lost_connection_is_unavailable_and_the_pool_recovers(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from realm_service.store import db as db_module
    from realm_service.store.db import open_database

    # No ping at checkout on a slow machine: the dead connection is met by
    # the statement, not replaced before it.
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 3600.0)
    db = open_database(pg_url, pool_size=1)  # used one call at a time: one connection
    try:
        queue = JobQueue(db)
        make_realm(queue, "r")
        job = queue.enqueue("r", JobKind.FROM_SCRATCH, USER).job
        with db.read_transaction() as tx:
            pid = tx.conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        terminate_backend(db, pid)
        seen: list[str] = []
        event.listen(db.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        with pytest.raises(StoreUnavailable), db.read_transaction() as tx:
            jobs_sql.get_job(tx, job.job_id)  # the first statement on the dead connection
        assert len(seen) == 1 and "FROM jobs" in seen[0]
        # The broken connection left the pool: the next read gets a good one.
        assert queue.get_job(job.job_id) == job
        with db.read_transaction() as tx:
            assert realms_sql.realm_exists(tx, "r")
    finally:
        db.close()


class _Interrupted(BaseException):
    """Like KeyboardInterrupt: not an Exception, so the connection is given up."""


def test_an_interrupt_mid_statement_surfaces_and_the_pool_recovers(queue: JobQueue) -> None:
    make_realm(queue, "r")
    job = queue.enqueue("r", JobKind.FROM_SCRATCH, USER).job

    def interrupt(*args: Any) -> None:
        raise _Interrupted

    event.listen(queue.db.engine, "before_cursor_execute", interrupt)
    try:
        with pytest.raises(_Interrupted), queue.db.read_transaction() as tx:
            jobs_sql.get_job(tx, job.job_id)
    finally:
        event.remove(queue.db.engine, "before_cursor_execute", interrupt)
    assert queue.get_job(job.job_id) == job


# -- many: one executemany for rows of the same values --------------------------------


def _files(realm_id: str, *names: str) -> list[dict[str, Any]]:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    return [
        {"realm_id": realm_id, "path": n, "content": n.encode(), "mtime": now,
         "size": len(n), "sha256": "0" * 64}
        for n in names
    ]  # fmt: skip


def _stored_files(queue: JobQueue, realm_id: str) -> list[tuple[Any, ...]]:
    files: Any = realms_sql._FILES_TABLE
    with queue.db.read_transaction() as tx:
        return [
            tuple(r)
            for r in tx.conn.execute(
                select(files.c.path, files.c.content, files.c.mtime, files.c.size)
                .where(files.c.realm_id == realm_id)
                .order_by(files.c.path)
            )
        ]


def test_many_writes_each_row_as_sqlalchemy_does(queue: JobQueue) -> None:
    make_realm(queue, "r")
    make_realm(queue, "s")
    statement = insert(realms_sql._FILES_TABLE)
    with queue.db.transaction() as tx:
        direct.many(tx.conn, statement, _files("r", "a.txt", "b.txt", "c.txt"))
        tx.conn.execute(statement, _files("s", "a.txt", "b.txt", "c.txt"))
        direct.many(tx.conn, statement, [])  # nothing to write: no statement
    by_cursor = _stored_files(queue, "r")
    assert [path for path, *_ in by_cursor] == ["a.txt", "b.txt", "c.txt"]
    assert by_cursor == _stored_files(queue, "s")
    assert by_cursor[0][2] == datetime(2026, 12, 1, tzinfo=UTC)  # aware, as bound


def test_many_refusals_and_errors_are_sqlalchemys(queue: JobQueue) -> None:
    """Rows naming different values, or a value its type refuses (a naive
    time), go to SQLAlchemy, which writes or refuses them its way; a row the
    store refuses (a second file of one path) rolls the whole call back."""
    make_realm(queue, "r")
    statement = insert(realms_sql._FILES_TABLE)
    ragged = _files("r", "a.txt", "b.txt")
    del ragged[1]["sha256"]
    from sqlalchemy.exc import StatementError

    with (
        pytest.raises(StatementError, match="sha256"),
        queue.db.transaction() as tx,
    ):
        direct.many(tx.conn, statement, ragged)
    naive = _files("r", "a.txt")
    naive[0]["mtime"] = datetime(2026, 12, 1)
    with pytest.raises(InvalidArgument), queue.db.transaction() as tx:
        direct.many(tx.conn, statement, naive)
    with pytest.raises(Conflict), queue.db.transaction() as tx:
        direct.many(tx.conn, statement, _files("r", "a.txt", "b.txt", "a.txt"))
    assert _stored_files(queue, "r") == []
