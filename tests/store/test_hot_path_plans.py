"""The statements of the job hot path on SQLite read `jobs` and
`job_attempts` through indexes: their cost must not grow with the queue or
with the jobs' history. Checked twice: with SQLite's heuristics (the server
gathers no statistics) and with the statistics of a large backlog and
history (an operator may run ANALYZE or PRAGMA optimize). A completion once
scanned every queued job per completed job (a correlated subquery in
RETURNING, which SQLite does not serve from an index), and with statistics
its read of the held jobs walked the whole table in id order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from store_helpers import entry, make_realm

from realm_service.domain import SYSTEM, USER, JobKind, PathChange
from realm_service.queue import JobQueue
from realm_service.store.db import open_database

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL
WATCHED = ("jobs", "queued", "running", "job_attempts")


_REALM_COLUMNS = "'bulk' || x, 'bulk', 'ready', 0, '2026-01-01 00:00:00.000000', 0, 0, 0, 0"


@pytest.fixture(params=["heuristics", "analyzed"])
def queue(tmp_path: Path, request: pytest.FixtureRequest) -> JobQueue:
    """A small store, whose plans come from SQLite's heuristics, or one with a
    backlog of 20,000 jobs and planner statistics (ANALYZE, as an operator's
    `PRAGMA optimize` would gather)."""
    queue = JobQueue(open_database(f"sqlite:///{tmp_path / 'plans.db'}"))
    # A backlog and a history beside the jobs the steps touch.
    for n in range(6):
        make_realm(queue, f"old{n}", {"a.json": b"{}"})
        queue.enqueue(f"old{n}", FS, SYSTEM)
    for lease in queue.claim(3):
        queue.complete(lease.lease_id)
    if request.param == "analyzed":
        with queue.db.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO realms (realm_id, display_name, state, created_priority,"
                " create_time, files, cards, errors, entries)"
                f" SELECT * FROM (WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1"
                f" FROM n WHERE x < 20000) SELECT {_REALM_COLUMNS} FROM n)"
            )
            conn.exec_driver_sql(
                "INSERT INTO jobs (realm_id, kind, priority, state, seq, attempt,"
                " counted_failures, create_time, error_message, paths, trace_parent,"
                " progress_done, progress_total, preemptions, worker)"
                " SELECT realm_id, 'from-scratch', 0, 'queued', 1000000 + rowid, 0, 0,"
                " create_time, '', '[]', '', 0, 0, 0, '' FROM realms WHERE realm_id LIKE 'bulk%'"
            )
            # Their history: an ended attempt each.
            conn.exec_driver_sql(
                "INSERT INTO job_attempts (job_id, lease_id, worker, instance_id, start_time,"
                " end_time, outcome, error_message)"
                " SELECT id, 'ended-' || id, 'w', '', create_time, create_time, 'interrupted', ''"
                " FROM jobs WHERE realm_id LIKE 'bulk%'"
            )
            conn.exec_driver_sql("ANALYZE")
        queue.db.engine.dispose()  # connections read the statistics when they open
    return queue


def scans(queue: JobQueue, step: Callable[[], object]) -> list[tuple[str, str]]:
    """The full scans of the watched tables in the statements `step` runs."""
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT", "DELETE", "WITH")):
            statements.append((statement, params))

    event.listen(queue.db.engine, "before_cursor_execute", record)
    try:
        step()
    finally:
        event.remove(queue.db.engine, "before_cursor_execute", record)
    assert statements, "the step ran no statement"
    found: list[tuple[str, str]] = []
    raw = queue.db.engine.raw_connection()
    try:
        for statement, params in statements:
            for row in raw.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall():
                detail = str(row[-1])
                words = detail.split()
                if words[:1] == ["SCAN"] and len(words) > 1 and words[1] in WATCHED:
                    found.append((statement.splitlines()[0][:120], detail))
    finally:
        raw.close()
    return found


def test_enqueue_claim_heartbeat_upload_and_complete_scan_no_job_table(queue: JobQueue) -> None:
    make_realm(queue, "r", {"a.json": b"{}", "b.json": b"{}"})
    make_realm(queue, "s", {"a.json": b"{}"})
    assert scans(queue, lambda: queue.enqueue("r", FS, USER)) == []
    assert scans(queue, lambda: queue.enqueue("r", FS, USER + 1)) == []  # merges
    assert (
        scans(queue, lambda: queue.enqueue("s", INC, USER, paths=[PathChange("a.json", False)]))
        == []
    )
    taken: list[Any] = []
    assert scans(queue, lambda: taken.extend(queue.claim(8, min_priority=USER))) == []
    leases = {lease.job.realm_id: lease for lease in taken}
    assert set(leases) == {"r", "s"}
    assert scans(queue, lambda: queue.heartbeat({leases["r"].lease_id: (1, 2)})) == []
    assert scans(queue, lambda: queue.add_entries(leases["r"].lease_id, [entry("a.json")])) == []
    assert scans(queue, lambda: queue.release([leases["s"].lease_id], "stream closed")) == []
    assert scans(queue, lambda: queue.complete_many([(leases["r"].lease_id, 1)])) == []
