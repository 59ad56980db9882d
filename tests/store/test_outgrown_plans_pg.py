"""A `jobs` table that grew fast from small is analyzed: PostgreSQL keeps
the generic plans it cached for the hot path while the table was small
(which read all of it) until an ANALYZE, and autovacuum runs one only up to
a minute later. The metrics loop calls `analyze_if_outgrown` with the live
jobs it counts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from realm_service.queue import OUTGROWN_SLACK, JobQueue
from realm_service.store import jobs_sql
from realm_service.store.db import Database, open_database

BULK = 3_000


def _planned(db: Database) -> float | None:
    with db.read_transaction() as tx:
        return jobs_sql.planned_rows(tx)


def _bulk_queue(db: Database, n: int) -> None:
    """`n` realms with a queued SYSTEM job each, written around the server
    (as a restore or a bench's seeding would)."""
    with db.session_for_tests() as s:
        s.execute(
            text(
                "INSERT INTO realms (realm_id, display_name, state, created_priority,"
                " create_time, files, cards, errors, entries)"
                " SELECT 'bulk' || x, 'bulk', 'ready', 0, now(), 0, 0, 0, 0"
                " FROM generate_series(1, :n) AS x"
            ),
            {"n": n},
        )
        s.execute(
            text(
                "INSERT INTO jobs (realm_id, kind, priority, state, seq, attempt,"
                " counted_failures, create_time, error_message, paths, trace_parent,"
                " progress_done, progress_total, preemptions, worker)"
                " SELECT realm_id, 'from-scratch', 0, 'queued', 1000000 + x, 0, 0,"
                " now(), '', '[]', '', 0, 0, 0, ''"
                " FROM (SELECT realm_id, row_number() OVER () AS x FROM realms) AS r"
            )
        )


@pytest.fixture
def queue(pg_url: str) -> Iterator[JobQueue]:
    db = open_database(pg_url)
    yield JobQueue(db)
    db.close()


def test_jobs_that_outgrew_the_planners_count_are_analyzed_once(queue: JobQueue) -> None:
    assert _planned(queue.db) is None  # a new table: never analyzed
    assert not queue.analyze_if_outgrown(OUTGROWN_SLACK)  # small: left alone
    _bulk_queue(queue.db, BULK)
    assert queue.analyze_if_outgrown(BULK)
    planned = _planned(queue.db)
    assert planned is not None and planned >= BULK
    # The planner's count is current now: no second ANALYZE.
    assert not queue.analyze_if_outgrown(BULK)
    assert not queue.analyze_if_outgrown(2 * BULK)


def test_sqlite_is_never_analyzed_for_it(tmp_path: object) -> None:
    db = open_database(f"sqlite:///{tmp_path}/realm.db")
    try:
        assert not JobQueue(db).analyze_if_outgrown(10**6)
    finally:
        db.close()
