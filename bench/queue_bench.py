"""Benchmarks of the job queue on its store, in one process (no gRPC).

    .venv/bin/python bench/queue_bench.py --store sqlite
    .venv/bin/python bench/queue_bench.py --store postgresql
    .venv/bin/python bench/queue_bench.py --store sqlite --quick     # smaller, faster
    .venv/bin/python bench/queue_bench.py --store postgresql --profile

Items (see bench/README.md, "Queue"):
  drain    claim-and-complete rate: JobQueue.claim(k) then complete each lease
           (and complete_many, when the queue has it), next to a bare SQL loop
           doing the same work on a plain table in the same database: claim k
           rows in one statement (FOR UPDATE SKIP LOCKED on PostgreSQL, one
           UPDATE ... RETURNING on SQLite), then mark them done.
  backlog  the queue's claim rate (and claim-and-complete rate) with 1,000
           queued jobs next to 1,000,000 (100,000 with --quick): one queued
           job per realm and kind, inserted in bulk (INSERT ... SELECT), each
           size in its own fresh schema (SQLite: file) of the same database,
           runs alternating between the two.
  reindex  ReindexAllRealms' work (JobQueue.enqueue_all): 20,000 realms (2,000
           with --quick) with no jobs each get a from-scratch job, then each
           merges into it on a second pass; realms per second.

Every result is one JSON line on stdout; a table follows. Progress goes to
stderr. PostgreSQL runs in fresh schemas of the `test` database (dropped at
the end; REALM_BENCH_PG_URL overrides the URL); SQLite in a temporary
directory. Every loop is bounded in count and in time; rates are the best of
a few runs (the median is shown too), the machine being shared.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy import bindparam, text

from realm_service.queue import JobQueue, QueueSettings
from realm_service.store.db import Database, open_database

PG_BASE = os.environ.get("REALM_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Result:
    store: str
    bench: str
    variant: str
    backlog: int
    jobs: int
    seconds: float  # wall time of the best run
    rate: float  # jobs per second of the best run
    claim_rate: float | None = None  # jobs per second of time spent in claim()
    runs: int = 1
    median_rate: float | None = None
    # This process's CPU time per job (least of the runs): little affected by
    # other load on the machine; on SQLite it includes the database's work.
    cpu_ms_per_job: float | None = None


@dataclass
class Run:
    jobs: int
    seconds: float
    claim_seconds: float
    cpu_seconds: float


# -- stores -------------------------------------------------------------------


@contextlib.contextmanager
def bench_database(kind: str) -> Iterator[Database]:
    if kind == "sqlite":
        workdir = tempfile.mkdtemp(prefix="queue-bench-")
        db = open_database(f"sqlite:///{workdir}/bench.db")
        try:
            yield db
        finally:
            db.close()
            shutil.rmtree(workdir, ignore_errors=True)
        return
    import psycopg

    conninfo = PG_BASE.replace("postgresql+psycopg://", "postgresql://")
    schema = f"queuebench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_BASE else "?"
    db = open_database(f"{PG_BASE}{sep}options={quote(f'-csearch_path={schema}', safe='')}")
    try:
        yield db
    finally:
        db.close()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def sequence_sql(db: Database, start: int, stop: int) -> tuple[str, str]:
    """(prefix, row source) yielding g = start..stop in an INSERT ... SELECT."""
    if db.backend == "postgresql":
        return "", f"FROM generate_series({start}, {stop}) AS s(g)"
    return (
        f"WITH RECURSIVE s(g) AS (SELECT {start} UNION ALL SELECT g + 1 FROM s WHERE g < {stop}) ",
        "FROM s",
    )


def add_realm_jobs(db: Database, prefix: str, start: int, count: int, kinds: int) -> None:
    """`count` realms named prefix+number, each with one queued job per kind
    (from-scratch, then incremental; none with kinds=0); one in ten at USER
    priority, the rest SYSTEM, in enqueue order. Two set-based statements."""
    if count <= 0:
        return
    stop = start + count - 1
    pg = db.backend == "postgresql"
    number = "lpad(g::text, 8, '0')" if pg else "printf('%08d', g)"
    realm_id = f"'{prefix}' || {number}"
    now = "now()" if pg else "'" + datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") + "'"
    seq0 = int(time.time() * 1_000_000)
    with_prefix, source = sequence_sql(db, start, stop)
    kind_rows = [("from-scratch", "[]"), ("incremental", '[["a.json", false]]')][:kinds]
    kinds_sql = " UNION ALL ".join(
        f"SELECT {n} AS o, '{k}' AS kind, '{p}' AS paths" for n, (k, p) in enumerate(kind_rows)
    )
    with db.session_for_tests() as s:
        s.execute(
            text(
                f"{with_prefix}INSERT INTO realms (realm_id, display_name, state, created_priority,"
                " create_time, files, cards, errors, entries)"
                f" SELECT {realm_id}, 'bench', 'ready', 0, {now}, 0, 0, 0, 0 {source}"
            )
        )
        if not kind_rows:
            return
        s.execute(
            text(
                f"{with_prefix}INSERT INTO jobs (realm_id, kind, priority, state, seq, attempt,"
                " counted_failures, create_time, error_message, progress_done, progress_total,"
                " paths, worker)"
                f" SELECT {realm_id}, k.kind, CASE WHEN g % 10 = 0 THEN 10 ELSE 0 END, 'queued',"
                f" {seq0} + g * 2 + k.o, 0, 0, {now}, '', 0, 0, k.paths, ''"
                f" {source} CROSS JOIN ({kinds_sql}) AS k"
            )
        )


def queued_count(db: Database) -> int:
    with db.session_for_tests() as s:
        return int(s.execute(text("SELECT count(*) FROM jobs WHERE state = 'queued'")).scalar_one())


def analyze(db: Database) -> None:
    with db.engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()


# -- the queue's loop -----------------------------------------------------------


def drain_queue(queue: JobQueue, k: int, max_jobs: int, max_seconds: float, batched: bool) -> Run:
    """Claim k, complete each (or all at once); returns (jobs, seconds, claim seconds)."""
    jobs = 0
    claiming = 0.0
    started = time.perf_counter()
    cpu = time.process_time()
    while jobs < max_jobs and time.perf_counter() - started < max_seconds:
        t0 = time.perf_counter()
        leases = queue.claim(min(k, max_jobs - jobs), worker="bench")
        claiming += time.perf_counter() - t0
        if not leases:
            break
        if batched:
            done = queue.complete_many([(lease.lease_id, 0) for lease in leases])
            assert all(not isinstance(v, Exception) for v in done.values())
        else:
            for lease in leases:
                queue.complete(lease.lease_id)
        jobs += len(leases)
    return Run(jobs, time.perf_counter() - started, claiming, time.process_time() - cpu)


# -- the bare loop --------------------------------------------------------------


def create_plain_table(db: Database, rows: int) -> None:
    pg = db.backend == "postgresql"
    with db.session_for_tests() as s:
        s.execute(text("DROP TABLE IF EXISTS bench_plain"))
        s.execute(
            text(
                "CREATE TABLE bench_plain (id "
                + ("BIGSERIAL" if pg else "INTEGER")
                + " PRIMARY KEY, priority INTEGER NOT NULL, state VARCHAR(20) NOT NULL,"
                " payload TEXT NOT NULL)"
            )
        )
        s.execute(
            text(
                "CREATE INDEX ix_bench_plain_claim ON bench_plain (priority DESC, id)"
                " WHERE state = 'queued'"
            )
        )
        with_prefix, source = sequence_sql(db, 1, rows)
        s.execute(
            text(
                f"{with_prefix}INSERT INTO bench_plain (priority, state, payload)"
                f" SELECT CASE WHEN g % 10 = 0 THEN 10 ELSE 0 END, 'queued', 'x' {source}"
            )
        )


def drain_bare(db: Database, k: int, max_jobs: int, max_seconds: float, batched: bool) -> Run:
    lock = " FOR UPDATE SKIP LOCKED" if db.backend == "postgresql" else ""
    claim = text(
        "UPDATE bench_plain SET state = 'running' WHERE id IN (SELECT id FROM bench_plain"
        f" WHERE state = 'queued' ORDER BY priority DESC, id LIMIT :k{lock}) RETURNING id"
    )
    done_one = text("UPDATE bench_plain SET state = 'done' WHERE id = :id")
    done_all = text("UPDATE bench_plain SET state = 'done' WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    jobs = 0
    claiming = 0.0
    started = time.perf_counter()
    cpu = time.process_time()
    while jobs < max_jobs and time.perf_counter() - started < max_seconds:
        t0 = time.perf_counter()
        with db.engine.begin() as conn:
            ids = list(conn.execute(claim, {"k": min(k, max_jobs - jobs)}).scalars())
        claiming += time.perf_counter() - t0
        if not ids:
            break
        if batched:
            with db.engine.begin() as conn:
                conn.execute(done_all, {"ids": ids})
        else:
            for job_id in ids:
                with db.engine.begin() as conn:
                    conn.execute(done_one, {"id": job_id})
        jobs += len(ids)
    return Run(jobs, time.perf_counter() - started, claiming, time.process_time() - cpu)


# -- items ----------------------------------------------------------------------


def best_of(
    runs: int,
    store: str,
    bench: str,
    variant: str,
    backlog: int,
    one: Callable[[], Run],
) -> Result:
    return summarize([one() for _ in range(runs)], store, bench, variant, backlog)


def summarize(measured: list[Run], store: str, bench: str, variant: str, backlog: int) -> Result:
    """The best run (highest rate) of several (jobs, seconds, claim seconds)."""
    best = max(measured, key=lambda m: m.jobs / m.seconds)
    jobs, seconds, claiming = best.jobs, best.seconds, best.claim_seconds
    rates = [m.jobs / m.seconds for m in measured]
    result = Result(
        store=store,
        bench=bench,
        variant=variant,
        backlog=backlog,
        jobs=jobs,
        seconds=round(seconds, 3),
        rate=round(jobs / seconds, 1),
        claim_rate=round(jobs / claiming, 1) if claiming else None,
        runs=len(measured),
        median_rate=round(statistics.median(rates), 1),
        cpu_ms_per_job=round(min(m.cpu_seconds / m.jobs for m in measured) * 1e3, 3),
    )
    print(json.dumps(asdict(result)), flush=True)
    return result


def bench_drain(db: Database, store: str, quick: bool) -> list[Result]:
    max_jobs, max_seconds, runs = (300, 3.0, 2) if quick else (1500, 10.0, 3)
    queue = JobQueue(db, settings=QueueSettings())
    results = []
    supplied = 0

    def supply() -> None:
        nonlocal supplied
        add_realm_jobs(db, "drain-", supplied, max_jobs, kinds=1)
        supplied += max_jobs

    variants: list[tuple[str, int, bool]] = [("claim(1) + complete", 1, False)]
    variants.append(("claim(16) + complete each", 16, False))
    if hasattr(queue, "complete_many"):
        variants.append(("claim(16) + complete_many", 16, True))
    for name, k, batched in variants:
        say(f"drain: queue {name}")

        def one(k: int = k, batched: bool = batched) -> Run:
            supply()
            return drain_queue(queue, k, max_jobs, max_seconds, batched)

        results.append(best_of(runs, store, "drain", f"queue {name}", max_jobs, one))
    for name, k, batched in [
        ("claim 1 + done", 1, False),
        ("claim 16 + done each", 16, False),
        ("claim 16 + done all", 16, True),
    ]:
        say(f"drain: bare {name}")

        def one_bare(k: int = k, batched: bool = batched) -> Run:
            create_plain_table(db, max_jobs)
            return drain_bare(db, k, max_jobs, max_seconds, batched)

        results.append(best_of(runs, store, "drain", f"bare {name}", max_jobs, one_bare))
    return results


class Backlog:
    """A store holding `size` queued jobs (one per realm and kind), topped up
    with new realms as claims consume it."""

    def __init__(self, db: Database, size: int) -> None:
        self.db = db
        self.size = size
        self.queue = JobQueue(db, settings=QueueSettings())
        self.next_realm = 0

    def top_up(self) -> None:
        missing = self.size - queued_count(self.db)
        while missing > 0:
            realms = min(100_000, (missing + 1) // 2)
            add_realm_jobs(self.db, "backlog-", self.next_realm, realms, kinds=2)
            self.next_realm += realms
            missing -= 2 * realms
            if self.size > 100_000:
                say(f"  backlog {self.size - max(missing, 0):,} / {self.size:,}")


def bench_backlog(store: str, quick: bool, profile: bool) -> list[Result]:
    """The same claims against a small and a large backlog, each in its own
    fresh schema (SQLite: file) of the same database, runs alternating between
    the two so that a change in the machine's load hits both alike."""
    large = 100_000 if quick else 1_000_000
    per_run, runs, max_seconds = (160, 3, 5.0) if quick else (480, 5, 15.0)
    variant = "queue claim(16) + complete each"
    with bench_database(store) as small_db, bench_database(store) as large_db:
        backlogs = [Backlog(small_db, 1_000), Backlog(large_db, large)]
        for backlog in backlogs:
            say(f"backlog: filling {backlog.size:,} queued jobs")
            started = time.perf_counter()
            backlog.top_up()
            analyze(backlog.db)
            say(f"  filled in {time.perf_counter() - started:.1f} s")
        measured: list[list[Run]] = [[], []]
        for n in range(runs):
            for side, backlog in enumerate(backlogs):
                say(f"backlog: run {n + 1}/{runs} at {backlog.size:,}")
                backlog.top_up()
                measured[side].append(drain_queue(backlog.queue, 16, per_run, max_seconds, False))
        results = [
            summarize(m, store, "backlog", variant, b.size)
            for m, b in zip(measured, backlogs, strict=True)
        ]
        if profile:
            for backlog in backlogs:
                profile_drain(backlog, per_run, max_seconds)
    return results


def bench_reindex(store: str, quick: bool) -> list[Result]:
    """ReindexAllRealms' work (`JobQueue.enqueue_all` at SYSTEM priority) over
    realms with no jobs (each gets one: inserts), then again (each merges into
    its queued job). Rates are realms per second."""
    realms = 2_000 if quick else 20_000
    results = []
    with bench_database(store) as db:
        add_realm_jobs(db, "rx", 1, realms, kinds=0)
        analyze(db)
        queue = JobQueue(db, settings=QueueSettings())
        for variant in ("enqueue_all: every realm inserts", "enqueue_all: every realm merges"):
            say(f"reindex: {variant}, {realms:,} realms")
            cpu, started = time.process_time(), time.perf_counter()
            _, seen = queue.enqueue_all(0)
            run = Run(seen, time.perf_counter() - started, 0.0, time.process_time() - cpu)
            results.append(summarize([run], store, "reindex", variant, realms))
    return results


def profile_drain(backlog: Backlog, per_run: int, max_seconds: float) -> None:
    """Where the time of a claim-and-complete loop goes: statements per job,
    the share of wall time spent waiting on the database (statement sent to
    result read), the costliest statements, then cProfile."""
    variants = [("complete each", False)]
    if hasattr(backlog.queue, "complete_many"):
        variants.append(("complete_many", True))
    for name, batched in variants:
        backlog.top_up()
        say(f"profile: queue claim(16) + {name} at backlog {backlog.size:,}")
        with sql_timer(backlog.db) as spent:
            run = drain_queue(backlog.queue, 16, per_run, max_seconds, batched)
            jobs, seconds = run.jobs, run.seconds
        say(
            f"  {jobs / seconds:.0f} jobs/s, {spent.statements / jobs:.2f} statements per job,"
            f" {spent.seconds / jobs * 1e3:.2f} ms per job in the driver"
            f" = {spent.seconds / seconds:.0%} of the wall time"
        )
        for sql, (count, total) in spent.top(12):
            say(f"  {count:6d} x {total / count * 1e6:7.0f} us  {sql}")
        backlog.top_up()
        profiler = cProfile.Profile()
        profiler.enable()
        drain_queue(backlog.queue, 16, per_run, max_seconds, batched)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        say(out.getvalue())


class SqlTime:
    def __init__(self) -> None:
        self.statements = 0
        self.seconds = 0.0
        self.by_sql: dict[str, tuple[int, float]] = {}

    def top(self, n: int) -> list[tuple[str, tuple[int, float]]]:
        return sorted(self.by_sql.items(), key=lambda kv: -kv[1][1])[:n]


@contextlib.contextmanager
def sql_timer(db: Database) -> Iterator[SqlTime]:
    """Time spent between sending each statement and having its result."""
    from sqlalchemy import event

    spent = SqlTime()

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        elapsed = time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())
        key = " ".join(statement.split())[:80]
        count, total = spent.by_sql.get(key, (0, 0.0))
        spent.by_sql[key] = (count + 1, total + elapsed)
        spent.statements += 1
        spent.seconds += elapsed

    event.listen(db.engine, "before_cursor_execute", before)
    event.listen(db.engine, "after_cursor_execute", after)
    try:
        yield spent
    finally:
        event.remove(db.engine, "before_cursor_execute", before)
        event.remove(db.engine, "after_cursor_execute", after)


def table(results: list[Result]) -> str:
    lines = [
        f"{'store':<11} {'bench':<8} {'variant':<34} {'backlog':>10} {'jobs':>6}"
        f" {'jobs/s':>9} {'median':>9} {'claim jobs/s':>13} {'cpu ms/job':>11}",
    ]
    for r in results:
        claim = f"{r.claim_rate:,.0f}" if r.claim_rate else "-"
        lines.append(
            f"{r.store:<11} {r.bench:<8} {r.variant:<34} {r.backlog:>10,} {r.jobs:>6}"
            f" {r.rate:>9,.0f} {r.median_rate or 0:>9,.0f} {claim:>13}"
            f" {r.cpu_ms_per_job or 0:>11.3f}"
        )
    return "\n".join(lines)


def verdicts(results: list[Result]) -> list[str]:
    by = {(r.bench, r.variant, r.backlog): r for r in results}
    out = []
    drain = [r for r in results if r.bench == "drain"]
    queue_best = max((r for r in drain if r.variant.startswith("queue")), key=lambda r: r.rate)
    bare_same = next(
        r
        for r in drain
        if r.variant
        == (
            "bare claim 16 + done all"
            if "complete_many" in queue_best.variant
            else "bare claim 16 + done each"
        )
    )
    ratio = queue_best.rate / bare_same.rate
    met = "met" if ratio >= 0.5 else "NOT met"
    out.append(
        f"queue/bare: {queue_best.variant} {queue_best.rate:,.0f} jobs/s vs {bare_same.variant}"
        f" {bare_same.rate:,.0f} jobs/s = {ratio:.2f} (aim >= 0.50: {met})"
    )
    backlogs = sorted({r.backlog for r in results if r.bench == "backlog"})
    if len(backlogs) == 2:
        small = by[("backlog", "queue claim(16) + complete each", backlogs[0])]
        big = by[("backlog", "queue claim(16) + complete each", backlogs[1])]
        for label, a, b in (
            ("claim-and-complete", small.rate, big.rate),
            ("claim only", small.claim_rate or 0, big.claim_rate or 0),
        ):
            cost = 1 - b / a if a else 0.0
            out.append(
                f"backlog {backlogs[1]:,} vs {backlogs[0]:,}, {label}: {b:,.0f} vs {a:,.0f} jobs/s,"
                f" cost {cost:.0%} (aim <= 20%: {'met' if cost <= 0.2 else 'NOT met'})"
            )
    return out


def source_state() -> dict[str, object]:
    """The commit measured, and whether the queue's code differs from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "realm_service")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "realm_service_modified": bool(changed),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], required=True)
    parser.add_argument("--quick", action="store_true", help="smaller backlog, fewer runs")
    parser.add_argument("--profile", action="store_true", help="cProfile the backlog runs")
    parser.add_argument("--only", choices=["drain", "backlog", "reindex"], help="run one item")
    args = parser.parse_args(argv)
    results: list[Result] = []
    print(json.dumps({"meta": source_state(), "store": args.store, "quick": args.quick}))
    if args.only in (None, "drain"):
        with bench_database(args.store) as db:
            results += bench_drain(db, args.store, args.quick)
    if args.only in (None, "backlog"):
        results += bench_backlog(args.store, args.quick, args.profile)
    if args.only in (None, "reindex"):
        results += bench_reindex(args.store, args.quick)
    print()
    print(table(results))
    if args.only is None:
        print()
        print("\n".join(verdicts(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
