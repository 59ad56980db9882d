"""PostgreSQL runs a statement that psycopg prepared with a generic plan from
its sixth execution on, once it judges that plan no worse than one made with
the values (the server keeps the default plan cache mode: no statement pays
for planning at every execution). The statements of the job hot path must
read `jobs` and `job_attempts` through indexes under such a plan too, with
a backlog queued and a history behind it: their states are written into
their text, so a partial index on a state still serves them, and the
claim's priority bounds too, so its plan knows which lane it reads."""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, text
from store_helpers import entry, make_realm

from realm_service.domain import SYSTEM, USER, JobKind, PathChange
from realm_service.queue import JobQueue
from realm_service.store import index_sql
from realm_service.store.db import open_database

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL
WATCHED = ("jobs", "job_attempts")
BACKLOG = 3_000
_NAMES = itertools.count()


def queue_backlog(conn: Any) -> None:
    """BACKLOG realms with a queued SYSTEM job each, written in bulk."""
    conn.execute(
        text(
            "INSERT INTO realms (realm_id, display_name, state, created_priority,"
            " create_time, files, cards, errors, entries)"
            " SELECT 'bulk' || x, 'bulk', 'ready', 0, now(), 0, 0, 0, 0"
            " FROM generate_series(1, :n) AS x"
        ),
        {"n": BACKLOG},
    )
    conn.execute(
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
    """A queue with 3,000 SYSTEM jobs waiting and as many ended attempts, and
    PostgreSQL's statistics of them."""
    db = open_database(pg_url)
    try:
        with db.engine.begin() as conn:
            queue_backlog(conn)
            conn.execute(
                text(
                    "INSERT INTO job_attempts (job_id, lease_id, worker, instance_id,"
                    " start_time, end_time, outcome, error_message)"
                    " SELECT id, 'ended-' || id, 'w', '', now(), now(), 'interrupted', ''"
                    " FROM jobs"
                )
            )
            conn.execute(text("ANALYZE"))
        yield JobQueue(db)
    finally:
        db.close()


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


def _number(names: list[str], match: re.Match[str]) -> str:
    return f"${names.index(match.group(1)) + 1}"


def generic_scans(queue: JobQueue, step: Callable[[], object]) -> list[tuple[str, str]]:
    """The sequential scans of the watched tables in the generic plans of the
    statements `step` runs."""
    statements: list[tuple[str, dict[str, Any]]] = []

    def record(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT", "DELETE", "WITH")):
            statements.append((statement, dict(params or {})))

    event.listen(queue.db.engine, "before_cursor_execute", record)
    try:
        step()
    finally:
        event.remove(queue.db.engine, "before_cursor_execute", record)
    assert statements, "the step ran no statement"
    found: list[tuple[str, str]] = []
    pooled = queue.db.engine.raw_connection()
    try:
        raw = pooled.driver_connection
        assert isinstance(raw, psycopg.Connection)
        for statement, params in statements:
            names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", statement)))
            numbered = re.sub(r"%\((\w+)\)s", functools.partial(_number, names), statement)
            raw.execute("SET plan_cache_mode = force_generic_plan")
            name = f"hot_{next(_NAMES)}"
            raw.execute(f"PREPARE {name} AS {numbered}")
            args = ", ".join(psycopg.sql.Literal(params[k]).as_string(raw) for k in names)
            call = f"EXECUTE {name}({args})" if names else f"EXECUTE {name}"
            [(explained,)] = raw.execute(f"EXPLAIN (FORMAT JSON) {call}").fetchall()
            raw.execute(f"DEALLOCATE {name}")
            raw.rollback()  # the SET goes with it
            doc = explained if isinstance(explained, list) else json.loads(explained)
            for node in plan_nodes(doc[0]["Plan"]):
                if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in WATCHED:
                    found.append((statement.split("\n")[0][:120], node["Relation Name"]))
    finally:
        pooled.close()
    return found


def test_the_server_keeps_the_default_plan_cache_mode(queue: JobQueue) -> None:
    with queue.db.read_transaction() as tx:
        assert tx.conn.scalar(text("SHOW plan_cache_mode")) == "auto"


def test_hot_path_statements_read_the_job_tables_by_index_with_generic_plans(
    queue: JobQueue,
) -> None:
    make_realm(queue, "r", {"a.json": b"{}", "b.json": b"{}"})
    make_realm(queue, "s", {"a.json": b"{}"})
    assert generic_scans(queue, lambda: queue.enqueue("r", FS, USER)) == []
    assert generic_scans(queue, lambda: queue.enqueue("r", FS, USER + 1)) == []  # merges
    assert (
        generic_scans(
            queue, lambda: queue.enqueue("s", INC, USER, paths=[PathChange("a.json", False)])
        )
        == []
    )
    taken: list[Any] = []
    # No SYSTEM budget: the lane above SYSTEM only, in front of the backlog.
    assert generic_scans(queue, lambda: taken.extend(queue.claim(8, system_limit=0))) == []
    leases = {lease.job.realm_id: lease for lease in taken}
    assert set(leases) == {"r", "s"}
    lease_r = leases["r"].lease_id
    assert generic_scans(queue, lambda: queue.heartbeat({lease_r: (1, 2)})) == []
    assert generic_scans(queue, lambda: queue.add_entries(lease_r, [entry("a.json")])) == []
    assert generic_scans(queue, lambda: queue.release([leases["s"].lease_id], "closed")) == []
    assert generic_scans(queue, lambda: queue.complete_many([(lease_r, 1)])) == []
    # Both lanes: the SYSTEM backlog's head.
    assert generic_scans(queue, lambda: taken.extend(queue.claim(4, min_priority=SYSTEM))) == []


def test_a_search_by_a_rare_card_type_reads_its_own_index_whatever_ran_before(
    queue: JobQueue,
) -> None:
    """A search by card type keeps a plan made with its values: under a plan
    made once for all (what PostgreSQL may switch a prepared statement to),
    a rare type was searched by walking the realm's whole index in path
    order. The connection is put on generic plans first, as if PostgreSQL
    had switched; the search's own setting wins."""
    make_realm(queue, "cards")
    queue.enqueue("cards", FS, USER)
    [lease] = queue.claim(1, min_priority=USER)
    entries = [entry(f"c{n:05d}.json", card_type="abc"[n % 3]) for n in range(6_000)]
    entries += [entry(f"r{n}.json", card_type="rare") for n in range(3)]
    for start in range(0, len(entries), 500):
        queue.add_entries(lease.lease_id, entries[start : start + 500])
    queue.complete(lease.lease_id, entries_uploaded=len(entries))
    with queue.db.engine.begin() as conn:
        conn.execute(text("ANALYZE index_entries"))
    # A block, as the server's search has: the settings and the counts of
    # reads below last to its end.
    with queue.db.read_transaction(block=True) as tx:
        generation = tx.conn.scalar(
            text("SELECT current_generation FROM realms WHERE realm_id = 'cards'")
        )
        tx.conn.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))

        def rows_read() -> int:
            return int(
                tx.conn.scalar(
                    text(
                        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
                        " FROM pg_stat_xact_user_tables"
                        " WHERE relname = 'index_entries' AND schemaname = current_schema()"
                    )
                )
                or 0
            )

        for _ in range(7):  # prepared from the sixth run on
            before = rows_read()
            found = index_sql.search(
                tx,
                realm_id="cards",
                generation=generation,
                card_type="rare",
                text="",
                after_path=None,
                limit=50,
            )
            read = rows_read() - before
        assert [e.path for e in found] == ["r0.json", "r1.json", "r2.json"]
        assert read < 100, read


def rows_read_by(queue: JobQueue, step: Callable[[], object], alias: str) -> list[tuple[str, int]]:
    """Each statement `step` runs, with the rows its plan read through the
    table alias `alias` (EXPLAIN ANALYZE in a savepoint rolled back just
    before the statement itself runs, so it sees what the statement will
    see)."""
    found: list[tuple[str, int]] = []

    def explain(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if not statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "WITH")):
            return
        raw = conn.connection.driver_connection
        raw.execute("SAVEPOINT explained")
        [(doc,)] = raw.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", params).fetchall()
        raw.execute("ROLLBACK TO SAVEPOINT explained")
        plan = (doc if isinstance(doc, list) else json.loads(doc))[0]["Plan"]
        read = sum(
            int(node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0))
            * int(node.get("Actual Loops", 1))
            for node in plan_nodes(plan)
            if node.get("Alias") == alias and "Scan" in node["Node Type"]
        )
        found.append((statement.split("\n")[0][:80], read))

    event.listen(queue.db.engine, "before_cursor_execute", explain)
    try:
        step()
    finally:
        event.remove(queue.db.engine, "before_cursor_execute", explain)
    return found


def test_a_completion_probes_the_queue_per_job_with_stale_statistics(pg_url: str) -> None:
    """A backlog queued after PostgreSQL last gathered statistics (a reindex
    storm, minutes before autovacuum looks): the completion of a batch probes
    the queue once per job for its realm's next job. That test was planned as
    a hash of every queued job, built for each batch, when the statistics
    counted few of them (PostgreSQL's profile of a 20,000-job drain: 56% of
    its execution time)."""
    db = open_database(pg_url)
    try:
        queue = JobQueue(db)
        with db.engine.begin() as conn:
            conn.execute(text("ANALYZE"))  # statistics of an empty store
            queue_backlog(conn)
        taken = queue.claim(16, min_priority=SYSTEM)
        assert len(taken) == 16
        reads = rows_read_by(
            queue, lambda: queue.complete_many([(t.lease_id, 0) for t in taken]), "queued"
        )
        assert reads, "the completion ran no statement"
        # One probe of a realm's queued job per job completed, at most.
        assert sum(read for _, read in reads) <= len(taken), reads
    finally:
        db.close()
