"""Benchmarks of the service pair: a real `realm-service` process and real
`index-worker` processes (or a minimal ClaimJobs client in this process) on
loopback, over SQLite or PostgreSQL.

    .venv/bin/python bench/pair_bench.py --store sqlite
    .venv/bin/python bench/pair_bench.py --store postgresql
    .venv/bin/python bench/pair_bench.py --store sqlite --quick      # under a minute

Items (see bench/README.md, "Service pair"):
  throughput  drain queued no-op jobs with 1, 2, 4 worker processes, next to a
              bare SQL claim-and-complete loop on the same store
  wakeup      idle system, one ReindexRealm: time until a worker stream has the job
  streams     1,000 idle ClaimJobs streams: server RSS per stream, wake-up with them
  storm       a priority-10 realm's job start and CreateRealm(wait_for_index)
              return during a 100,000-job SYSTEM storm, next to an idle system
  preempt     the same storm with no reserved slot, every slot holding a
              2 s SYSTEM job: the user's job start with preemption, and with
              --max-preemptions 0 (it waits for a SYSTEM job to end)
  create      CreateRealm and ReindexRealm latency next to grpc.health.v1 Check
              and GetJob
  index       a realm of 5,000 small cards indexed by a real worker: enqueue to
              SUCCEEDED, CreateRealm(wait_for_index), next to the bulk stream
              alone, the per-file ReadRealmFile alone and the indexer alone;
              a bulk write of 5,000 files; one change in a 50,000-file realm
  index_rss   100,000 files of 1 KiB indexed: server and worker RSS growth
  push        `realmctl push` of a directory of 5,000 small cards, as a process
  stmt        what one SQL statement of the claim path costs through SQLAlchemy
              (built per call as the store does, prebuilt, raw DB-API), same store

Every result is one JSON line on stdout; a table follows at the end. Progress
goes to stderr. Every comparison is measured in the same run, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pair_client import BenchStream
from pair_proc import (
    BIN,
    BenchStore,
    Proc,
    Workdir,
    bench_store,
    card_file,
    env_pg_url,
    log,
    remaining_jobs,
    rss_kib,
    seed_jobs,
    seed_realms,
    start_server,
    start_worker,
    sync_ends,
)
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb

HERE = Path(__file__).resolve().parent
USER = 10
SYSTEM = 0
ITEMS = (
    "throughput",
    "wakeup",
    "storm",
    "preempt",
    "create",
    "index",
    "index_rss",
    "checkpoint",
    "push",
    "stmt",
)


@dataclass
class Config:
    store: str
    quick: bool
    pg_url: str
    log_level: str
    jobs: int = 50_000
    workers: tuple[int, ...] = (1, 2, 4)
    worker_concurrency: int = 64
    drain_limit_s: float = 240.0
    bare_batch: int = 64
    bare_single_s: float = 10.0
    wake_samples: int = 200
    idle_streams: int = 1000
    idle_channels: int = 10
    storm_jobs: int = 100_000
    storm_realms: int = 50
    storm_streams: int = 4
    storm_credits: int = 4
    preempt_job_s: float = 2.0
    create_samples: int = 300
    index_files: int = 5000
    index_realms: int = 3
    index_big_files: int = 50_000
    index_rss_files: int = 100_000
    checkpoint_files: int = 100_000
    checkpoint_rate: int = 5_000
    change_samples: int = 100
    push_files: int = 5000
    push_runs: int = 3
    only: tuple[str, ...] = ITEMS
    keep: bool = False
    py_spy: str = ""
    py_spy_gil: bool = False
    pg_statements: bool = False
    commit_stamps: bool = False

    @classmethod
    def quick_config(cls, **kw: Any) -> Config:
        return cls(
            quick=True,
            jobs=1_000,
            drain_limit_s=10.0,
            bare_single_s=1.0,
            wake_samples=30,
            idle_streams=100,
            idle_channels=2,
            storm_jobs=5_000,
            storm_realms=10,
            create_samples=40,
            index_files=500,
            index_realms=1,
            index_big_files=2_000,
            index_rss_files=5_000,
            checkpoint_files=5_000,
            checkpoint_rate=1_000,
            change_samples=5,
            push_files=500,
            push_runs=1,
            **kw,
        )


# -- figures ------------------------------------------------------------------------


RESULTS: list[dict[str, Any]] = []


def emit(record: dict[str, Any]) -> None:
    RESULTS.append(record)
    print(json.dumps(record, sort_keys=False), flush=True)


def pct(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, round(p / 100 * len(xs) + 0.5) - 1))
    return xs[k]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def ts_s(t: Any) -> float:
    """A protobuf Timestamp as seconds since the epoch."""
    return float(t.seconds + t.nanos / 1e9)


def summary(values_s: list[float]) -> dict[str, float]:
    return {
        "p50_ms": ms(pct(values_s, 50)),
        "p99_ms": ms(pct(values_s, 99)),
        "mean_ms": ms(statistics.fmean(values_s)) if values_s else float("nan"),
        "max_ms": ms(max(values_s)) if values_s else float("nan"),
        "n": len(values_s),
    }


def _user_system(stat: str) -> tuple[float, float]:
    """User and system CPU seconds from a /proc .../stat file (0 if gone)."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(_user_system(f"/proc/{pid}/stat"))


def cpu_split(pid: int) -> dict[str, float]:
    """A process's CPU seconds so far: user and system time, and the part of
    it its main thread (the server's event loop) used."""
    user, system = _user_system(f"/proc/{pid}/stat")
    return {
        "user": user,
        "system": system,
        "main_thread": sum(_user_system(f"/proc/{pid}/task/{pid}/stat")),
    }


def postgres_cpu_seconds() -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "postgres":
                total += cpu_seconds(int(entry.name))
        except OSError:
            continue
    return total


# -- shared pieces ----------------------------------------------------------------


class Pair:
    """A store plus a server process; workers are added by the scenario."""

    def __init__(self, cfg: Config, workdir: Path, label: str, extra: tuple[str, ...] = ()):
        self.cfg, self.workdir, self.label, self.extra = cfg, workdir, label, extra
        self.procs: list[Proc] = []

    def __enter__(self) -> Pair:
        self._store_cm = bench_store(self.cfg.store, self.workdir, self.label, self.cfg.pg_url)
        self.store: BenchStore = self._store_cm.__enter__()
        return self

    def start_server(self, trace: Path | None = None) -> None:
        self.server = start_server(
            self.store,
            self.workdir,
            self.label,
            log_level=self.cfg.log_level,
            extra=self.extra,
            trace=trace,
        )
        self.procs.append(self.server)

    def add_worker(
        self, label: str, *, concurrency: int, noop: bool, extra: tuple[str, ...] = ()
    ) -> Proc:
        proc = start_worker(
            self.server.address,
            self.workdir,
            f"{self.label}-{label}",
            concurrency=concurrency,
            noop=noop,
            log_level=self.cfg.log_level,
            extra=extra,
        )
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            code = proc.stop()
            if code not in (0, -15, None):
                log(f"{proc.log_path.name} exited {code}:\n{proc.tail()}")
        self._store_cm.__exit__(None, None, None)


async def wait_log(proc: Proc, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.log_path.read_text(errors="replace"):
            return
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.log_path.name} exited:\n{proc.tail()}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.log_path.name}: no {text!r} within {timeout}s:\n{proc.tail()}")


def profile(cfg: Config, pid: int, name: str) -> subprocess.Popen[bytes] | None:
    """With --py-spy DIR: sample `pid` until SIGINT into DIR/NAME.txt (collapsed stacks)."""
    if not cfg.py_spy:
        return None
    out = Path(cfg.py_spy) / f"{cfg.store}-{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            *(str(BIN / "py-spy"), "record", "--pid", str(pid), "--format", "raw"),
            *("--rate", "200", "--output", str(out), "--nonblocking", "--threads"),
            # --gil: only the thread holding the GIL, i.e. where a CPU-bound
            # Python process spends its one core (threads inside SQLite or
            # waiting on a lock are left out).
            *(["--gil"] if cfg.py_spy_gil else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profiles(*spies: subprocess.Popen[bytes] | None) -> None:
    """End the py-spy recordings `profile` started (None: none was)."""
    for spy in spies:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)


# -- 1. throughput ------------------------------------------------------------------


# How often a drain's progress is polled (a count of queued and running jobs).
POLL_S = 0.5


def finish_rate(conn: Any, store: str) -> float | None:
    """Jobs/s between the 10% and 90% points of the succeeded jobs' finish
    times (the store's own stamps), whatever the polling; None with too few."""
    epoch = (
        "extract(epoch from finish_time)"
        if store == "postgresql"
        else "(julianday(finish_time) - 2440587.5) * 86400.0"
    )
    times = sorted(
        float(row[0])
        for row in conn.execute(f"SELECT {epoch} FROM jobs WHERE state = 'succeeded'").fetchall()
    )
    if len(times) < 20:
        return None
    first, last = times[len(times) // 10], times[len(times) * 9 // 10]
    return (len(times) * 9 // 10 - len(times) // 10) / (last - first) if last > first else None


def steady_rate(samples: list[tuple[float, int]], total: int) -> tuple[float, float]:
    """Jobs/s between 10% and 90% drained (linear interpolation), and the
    time from the first sample to fully drained (or the last sample)."""

    def time_at(remaining: float) -> float | None:
        for (t0, r0), (t1, r1) in itertools.pairwise(samples):
            if r0 >= remaining >= r1 and r0 != r1:
                return t0 + (t1 - t0) * (r0 - remaining) / (r0 - r1)
        return None

    hi, lo = time_at(total * 0.9), time_at(total * 0.1)
    if hi is None or lo is None or lo <= hi:
        # Did not get to 10% left: rate over what was done.
        done = total - samples[-1][1]
        first = time_at(total - 1) or samples[0][0]
        span = samples[-1][0] - first
        return (done / span if span > 0 else 0.0), samples[-1][0] - samples[0][0]
    return total * 0.8 / (lo - hi), samples[-1][0] - samples[0][0]


def cpu_at_stream_open(workers: list[Proc], deadline: float) -> list[float]:
    """Each worker's CPU seconds when its log first says its stream is open
    (read every 5 ms, so a few milliseconds of its first jobs may count as
    start-up); all it had used if that line never came by `deadline`."""
    opened: dict[int, float] = {}
    while len(opened) < len(workers) and time.perf_counter() < deadline:
        for i, w in enumerate(workers):
            if i not in opened and "stream open" in w.log_path.read_text(errors="replace"):
                opened[i] = cpu_seconds(w.pid)
        time.sleep(0.005)
    return [opened.get(i, cpu_seconds(w.pid)) for i, w in enumerate(workers)]


def drain_with_workers(cfg: Config, workdir: Path, n_workers: int) -> dict[str, Any]:
    label = f"tp{n_workers}"
    with Pair(cfg, workdir, label) as pair:
        ids = [f"tp-{i:06d}" for i in range(cfg.jobs)]
        t = time.perf_counter()
        seed_realms(pair.store, ids)
        seed_jobs(pair.store, ids, priority=SYSTEM)
        log(f"throughput: seeded {cfg.jobs} jobs in {time.perf_counter() - t:.1f}s")
        pair.start_server()
        conn = pair.store.connect()
        statements = cfg.pg_statements and cfg.store == "postgresql" and pg_statements_reset(conn)
        cpu0 = {"server": cpu_seconds(pair.server.pid), "pg": postgres_cpu_seconds()}
        split0 = cpu_split(pair.server.pid)
        spy = profile(cfg, pair.server.pid, f"{label}-server")
        t_spawn = time.perf_counter()
        workers = [
            pair.add_worker(f"w{i}", concurrency=cfg.worker_concurrency, noop=True)
            for i in range(n_workers)
        ]
        # The first worker is profiled too (its start-up included).
        worker_spy = profile(cfg, workers[0].pid, f"{label}-worker") if workers else None
        # A worker's start-up (imports, the channel) is not its jobs' work:
        # its CPU is counted from the moment its stream is open.
        opened = cpu_at_stream_open(workers, t_spawn + 60)
        samples: list[tuple[float, int]] = []
        deadline = t_spawn + cfg.drain_limit_s
        while True:
            remaining = remaining_jobs(conn)
            now = time.perf_counter()
            samples.append((now, remaining))
            if remaining == 0 or now > deadline:
                break
            # A count of the queue costs PostgreSQL a few milliseconds; polled
            # every 0.1 s it took 7% of its CPU in the drain. The rate comes
            # from the jobs' own finish times; the polls only find the end.
            time.sleep(POLL_S)
        worker_total = sum(cpu_seconds(w.pid) for w in workers)
        worker_cpu = worker_total - sum(opened)
        stop_profiles(spy, worker_spy)
        server_cpu = cpu_seconds(pair.server.pid) - cpu0["server"]
        split = {k: round(v - split0[k], 2) for k, v in cpu_split(pair.server.pid).items()}
        pg_cpu = postgres_cpu_seconds() - cpu0["pg"] if cfg.store == "postgresql" else 0.0
        states = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        stamped = finish_rate(conn, cfg.store)
        profile_pg = pg_statements_summary(conn) if statements else None
        conn.close()
    # Start the clock at the first job done, so worker start-up is not counted.
    started = [s for s in samples if s[1] < cfg.jobs]
    polled, _ = steady_rate(samples, cfg.jobs)
    rate = stamped if stamped is not None else polled
    wall = samples[-1][0] - (started[0][0] if started else t_spawn)
    return {
        "jobs": cfg.jobs,
        "workers": n_workers,
        "worker_concurrency": cfg.worker_concurrency,
        "jobs_per_s": round(rate, 1),
        "jobs_per_s_polled": round(polled, 1),
        "drain_s": round(wall, 2),
        "spawn_to_drained_s": round(samples[-1][0] - t_spawn, 2),
        "drained": samples[-1][1] == 0,
        "states": states,
        "cpu_s": {
            "server": round(server_cpu, 2),
            "workers": round(worker_cpu, 2),
            "postgres": round(pg_cpu, 2),
        },
        "workers_start_cpu_s": round(sum(opened), 2),
        # The server's CPU as user and system time, and its event loop's part.
        "server_cpu_split_s": split,
        **({"pg_statements": profile_pg} if profile_pg is not None else {}),
    }


def pg_statements_reset(conn: Any) -> bool:
    """Empty pg_stat_statements before a drain; False (said once on stderr)
    when the cluster does not preload it."""
    preload = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()[0]
    if "pg_stat_statements" not in preload:
        log("--pg-statements: the cluster does not preload pg_stat_statements; no profile")
        return False
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public")
        conn.execute("SELECT public.pg_stat_statements_reset()")
    except Exception as e:  # not in shared_preload_libraries, or not installed
        log(f"--pg-statements: pg_stat_statements is not available ({str(e).strip()})")
        return False
    return True


def pg_statements_summary(conn: Any, top: int = 6) -> dict[str, Any]:
    """This database's statements since the reset: plans made, planning and
    execution time, and the statements that took most."""
    mine = (
        "FROM public.pg_stat_statements"
        " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    plans, plan_ms, exec_ms, calls = conn.execute(
        f"SELECT sum(plans), sum(total_plan_time), sum(total_exec_time), sum(calls) {mine}"
    ).fetchone()
    rows = conn.execute(
        "SELECT calls, plans, total_plan_time, total_exec_time,"
        f" left(regexp_replace(query, '\\s+', ' ', 'g'), 90) {mine}"
        f" ORDER BY total_plan_time + total_exec_time DESC LIMIT {top}"
    ).fetchall()
    summary = {
        "plans": int(plans or 0),
        "plan_ms": round(float(plan_ms or 0), 1),
        "exec_ms": round(float(exec_ms or 0), 1),
        "calls": int(calls or 0),
        "top": [
            {"calls": c, "plans": p, "plan_ms": round(pt, 1), "exec_ms": round(et, 1), "query": q}
            for c, p, pt, et, q in rows
        ],
    }
    log(
        f"pg_stat_statements: {summary['calls']} calls, {summary['plans']} plans,"
        f" planning {summary['plan_ms']} ms, execution {summary['exec_ms']} ms"
    )
    for row in summary["top"]:
        log(f"  {row['exec_ms']:9.1f} + {row['plan_ms']:7.1f} ms x{row['calls']}: {row['query']}")
    return summary


def bare_loop(store: BenchStore, batch: int, max_jobs: int, max_s: float) -> dict[str, Any]:
    """The store's own cost of moving jobs through the queue, without the
    service around it: one statement leases the next `batch` queued jobs in
    priority order (skipping locked rows on PostgreSQL) and commits; a second
    marks them succeeded and commits."""
    conn = store.connect()
    pg = store.kind == "postgresql"
    if pg:
        lease, now, until = "md5(random()::text || id::text)", "now()", "now() + interval '30s'"
        pick = "LIMIT %s FOR UPDATE SKIP LOCKED"
    else:
        lease = "lower(hex(randomblob(16)))"
        now, until = "strftime('%Y-%m-%d %H:%M:%f', 'now')", "datetime('now', '+30 seconds')"
        pick = "LIMIT ?"
    claim = (
        f"UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_id = {lease}, "
        f"start_time = {now}, lease_expire_time = {until} WHERE id IN (SELECT id FROM jobs "
        f"WHERE state = 'queued' ORDER BY priority DESC, seq, id {pick}) RETURNING id"
    )
    finish = (
        f"UPDATE jobs SET state = 'succeeded', finish_time = {now}, lease_id = NULL, "
        "lease_expire_time = NULL WHERE id IN ({})"
    )
    done = 0
    t0 = time.perf_counter()
    while done < max_jobs and time.perf_counter() - t0 < max_s:
        if pg:
            with conn.transaction():
                ids = [r[0] for r in conn.execute(claim, (batch,)).fetchall()]
            if ids:
                with conn.transaction():
                    conn.execute(finish.format("%s" + ", %s" * (len(ids) - 1)), ids)
        else:
            conn.execute("BEGIN IMMEDIATE")
            ids = [r[0] for r in conn.execute(claim, (batch,)).fetchall()]
            conn.execute("COMMIT")
            if ids:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(finish.format("?" + ", ?" * (len(ids) - 1)), ids)
                conn.execute("COMMIT")
        if not ids:
            break
        done += len(ids)
    elapsed = time.perf_counter() - t0
    conn.close()
    return {"batch": batch, "jobs": done, "s": round(elapsed, 2), "jobs_per_s": done / elapsed}


def run_throughput(cfg: Config, workdir: Path) -> None:
    with Pair(cfg, workdir, "bare") as pair:
        ids = [f"bare-{i:06d}" for i in range(cfg.jobs)]
        seed_realms(pair.store, ids)
        seed_jobs(pair.store, ids, priority=SYSTEM)
        single = bare_loop(pair.store, 1, cfg.jobs // 5, cfg.bare_single_s)
        batched = bare_loop(pair.store, cfg.bare_batch, cfg.jobs, cfg.drain_limit_s)
    for b in (single, batched):
        emit(
            {
                "item": "throughput_bare_sql",
                "store": cfg.store,
                "batch": b["batch"],
                "jobs": b["jobs"],
                "jobs_per_s": round(b["jobs_per_s"], 1),
            }
        )
        log(f"bare SQL batch={b['batch']}: {b['jobs_per_s']:.0f} jobs/s")
    target = 5000 if cfg.store == "postgresql" else 10_000
    for n in cfg.workers:
        r = drain_with_workers(cfg, workdir, n)
        r = {"item": "throughput", "store": cfg.store, **r}
        r["vs_bare_batched"] = round(r["jobs_per_s"] / batched["jobs_per_s"], 3)
        r["vs_bare_single"] = round(r["jobs_per_s"] / single["jobs_per_s"], 3)
        if n == 2:
            r["target"] = f">= {target} jobs/s with 2 workers"
            r["met"] = r["jobs_per_s"] >= target
        emit(r)
        log(f"throughput workers={n}: {r['jobs_per_s']} jobs/s ({r['drain_s']}s)")


# -- 2 + 6. wake-up, idle and with many idle streams ----------------------------------


async def wake_samples(
    stub: sgrpc.RealmServiceStub,
    stream: BenchStream,
    realms: list[str],
    n: int,
    windows: list[tuple[float, float]] | None = None,
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(send -> assignment read, send -> RPC reply, job create_time -> assignment
    read, job start_time -> assignment read): the last two are the server's
    part, on the shared wall clock, from the enqueue's start (inside its
    transaction) and from the claim's. A job handed off by its enqueue (a
    worker waited) is claimed inside the enqueue's transaction on SQLite,
    so its start_time precedes the commit and the last figure bounds the
    time from the enqueue's commit to the worker having the job from above.
    On PostgreSQL with one server instance, an idle realm's enqueue commits
    its insert alone and the claim follows as a statement of its own: there
    the last figure bounds that time from below, and the one before it from
    above. With
    `windows`, each sample's (claim start, arrival) on the wall clock is
    appended to it (see `commit_to_arrival`)."""
    wakes: list[float] = []
    rpcs: list[float] = []
    inner: list[float] = []
    claimed: list[float] = []
    for i in range(n):
        realm = realms[i % len(realms)]
        t0 = time.perf_counter()
        reply = await stub.ReindexRealm(
            spb.ReindexRealmRequest(realm_id=realm, priority=USER), timeout=30
        )
        t1 = time.perf_counter()
        arrived = await stream.arrival(reply.job.job_id, timeout=30)
        await stream.acked(reply.job.job_id, timeout=30)
        wakes.append(arrived - t0)
        rpcs.append(t1 - t0)
        inner.append(stream.arrivals_wall[reply.job.job_id] - ts_s(reply.job.create_time))
        claimed.append(
            stream.arrivals_wall[reply.job.job_id] - stream.start_times[reply.job.job_id]
        )
        if windows is not None:
            windows.append(
                (stream.start_times[reply.job.job_id], stream.arrivals_wall[reply.job.job_id])
            )
        await asyncio.sleep(0.01 + random.random() * 0.01)
    return wakes, rpcs, inner, claimed


def commit_to_arrival(windows: list[tuple[float, float]], syncs: list[float]) -> list[float]:
    """For each sample (claim start, arrival), the time from the end of the
    first sync after the claim's start, the enqueue's commit (the claim runs
    in the enqueue's transaction, and on an idle SQLite store nothing else
    commits meanwhile), to the arrival; samples with no sync in between are
    left out."""
    out = []
    for start, arrival in windows:
        i = bisect.bisect_right(syncs, start)
        if i < len(syncs) and syncs[i] < arrival:
            out.append(arrival - syncs[i])
    return out


async def run_wakeup(cfg: Config, workdir: Path) -> None:
    with Pair(cfg, workdir, "wake") as pair:
        realms = [f"wake-{i:02d}" for i in range(20)]
        seed_realms(pair.store, realms)
        trace = workdir / "wake-syncs.strace" if cfg.commit_stamps else None
        pair.start_server(trace)
        channel = grpc.aio.insecure_channel(pair.server.address)
        stub = sgrpc.RealmServiceStub(channel)
        # Two credits: the dispatcher hands a job to the stream with the most
        # credits, so this stream gets it even with idle streams holding one.
        timer = BenchStream(channel, "bench-timer", credits=2)
        await timer.open()
        await wake_samples(stub, timer, realms, 10)  # warm-up
        spy = profile(cfg, pair.server.pid, "wakeup-server")
        windows: list[tuple[float, float]] = []
        wakes, rpcs, inner, claimed = await wake_samples(
            stub, timer, realms, cfg.wake_samples, windows
        )
        stop_profiles(spy)
        idle = summary(wakes)
        commit_fields: dict[str, Any] = {}
        if trace is not None:
            committed = commit_to_arrival(windows, sync_ends(trace))
            commit_fields = {
                "commit_to_arrival_p50_ms": ms(pct(committed, 50)),
                "commit_to_arrival_p99_ms": ms(pct(committed, 99)),
                "commit_stamped": len(committed),
            }
        emit(
            {
                "item": "wakeup",
                "store": cfg.store,
                "streams": 1,
                "enqueue": "ReindexRealm",
                **idle,
                "rpc_p50_ms": ms(pct(rpcs, 50)),
                "enqueue_to_arrival_p50_ms": ms(pct(inner, 50)),
                "claim_to_arrival_p50_ms": ms(pct(claimed, 50)),
                **commit_fields,
                "target": "p50 < 3 ms",
                "met": idle["p50_ms"] < 3,
            }
        )
        log(f"wake-up idle: p50 {idle['p50_ms']} ms p99 {idle['p99_ms']} ms")

        await asyncio.sleep(1.0)
        rss_before = rss_kib(pair.server.pid)
        holder = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "pair_streams.py"),
                "--server",
                pair.server.address,
                "--streams",
                str(cfg.idle_streams),
                "--channels",
                str(cfg.idle_channels),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 180)
            if not line.startswith("ready"):
                raise RuntimeError(f"idle streams did not connect: {line!r}")
            await asyncio.sleep(3.0)
            rss_connected = rss_kib(pair.server.pid)
            await wake_samples(stub, timer, realms, 10)
            spy = profile(cfg, pair.server.pid, "wakeup-streams-server")
            wakes_n, rpcs_n, inner_n, claimed_n = await wake_samples(
                stub, timer, realms, cfg.wake_samples
            )
            stop_profiles(spy)
            rss_after = rss_kib(pair.server.pid)
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            try:
                holder.wait(30)
            except subprocess.TimeoutExpired:
                holder.kill()
        per_stream = (rss_connected - rss_before) / cfg.idle_streams
        many = summary(wakes_n)
        ratio = many["p50_ms"] / idle["p50_ms"]
        emit(
            {
                "item": "idle_streams",
                "store": cfg.store,
                "streams": cfg.idle_streams,
                "channels": cfg.idle_channels,
                "rss_before_kib": rss_before,
                "rss_connected_kib": rss_connected,
                "rss_after_wakeups_kib": rss_after,
                "rss_per_stream_kib": round(per_stream, 1),
                "target": "< 200 KiB per stream",
                "met": per_stream < 200,
            }
        )
        emit(
            {
                "item": "wakeup",
                "store": cfg.store,
                "streams": cfg.idle_streams + 1,
                "enqueue": "ReindexRealm",
                **many,
                "rpc_p50_ms": ms(pct(rpcs_n, 50)),
                "enqueue_to_arrival_p50_ms": ms(pct(inner_n, 50)),
                "claim_to_arrival_p50_ms": ms(pct(claimed_n, 50)),
                "vs_idle_p50": round(ratio, 2),
                "target": "p50 within 2x of one stream",
                "met": ratio <= 2,
            }
        )
        log(f"{cfg.idle_streams} streams: {per_stream:.1f} KiB/stream, wake p50 {many['p50_ms']}")
        await timer.close()
        await channel.close()


# -- 3. a user's job in a storm ------------------------------------------------------


async def storm_samples(
    stub: sgrpc.RealmServiceStub, streams: list[BenchStream], prefix: str, n: int
) -> tuple[list[float], list[float], int]:
    starts: list[float] = []
    returns: list[float] = []
    failed = 0
    for i in range(n):
        t0 = time.perf_counter()
        reply = await stub.CreateRealm(
            spb.CreateRealmRequest(
                realm_id=f"{prefix}-{i:03d}", priority=USER, wait_for_index=True
            ),
            timeout=60,
        )
        t1 = time.perf_counter()
        job_id = reply.job.job_id
        arrived = [s.arrivals[job_id] for s in streams if job_id in s.arrivals]
        if reply.job.state != pb.Job.STATE_SUCCEEDED or not arrived:
            failed += 1
            continue
        starts.append(min(arrived) - t0)
        returns.append(t1 - t0)
        await asyncio.sleep(0.01 + random.random() * 0.01)
    return starts, returns, failed


async def run_storm(cfg: Config, workdir: Path) -> None:
    with Pair(cfg, workdir, "storm") as pair:
        ids = [f"storm-{i:06d}" for i in range(cfg.storm_jobs)]
        seed_realms(pair.store, ids)
        pair.start_server()
        channel = grpc.aio.insecure_channel(pair.server.address)
        stub = sgrpc.RealmServiceStub(channel)
        holders = [
            BenchStream(
                channel,
                f"holder-{k}",
                credits=cfg.storm_credits,
                hold=lambda a: a.job.priority <= SYSTEM,
            )
            for k in range(cfg.storm_streams)
        ]
        for h in holders:
            await h.open()
        await storm_samples(stub, holders, "warm", 5)
        idle_start, idle_return, idle_failed = await storm_samples(
            stub, holders, "idle", cfg.storm_realms
        )

        t = time.perf_counter()
        await asyncio.to_thread(seed_jobs, pair.store, ids, priority=SYSTEM)
        log(f"storm: {cfg.storm_jobs} SYSTEM jobs queued in {time.perf_counter() - t:.1f}s")
        slots = cfg.storm_streams * cfg.storm_credits
        busy = slots - 1  # one reserved slot (the server's default)
        deadline = time.monotonic() + 60
        while sum(len(h.held) for h in holders) < busy:
            if time.monotonic() > deadline:
                raise RuntimeError("the storm did not fill the ordinary slots")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        held = sum(len(h.held) for h in holders)
        storm_start, storm_return, storm_failed = await storm_samples(
            stub, holders, "storm", cfg.storm_realms
        )
        queued = pair.store.scalar(
            f"SELECT count(*) FROM jobs WHERE state = 'queued' AND priority = {SYSTEM}"
        )
        for h in holders:
            await h.close()
        await channel.close()

    idle_s, storm_s = summary(idle_start), summary(storm_start)
    idle_r, storm_r = summary(idle_return), summary(storm_return)
    ratio = storm_s["p99_ms"] / idle_s["p99_ms"]
    for phase, s, r, failed in (
        ("idle", idle_s, idle_r, idle_failed),
        ("storm", storm_s, storm_r, storm_failed),
    ):
        record: dict[str, Any] = {
            "item": "storm",
            "store": cfg.store,
            "phase": phase,
            "system_jobs_queued": cfg.storm_jobs if phase == "storm" else 0,
            "slots": slots,
            "held_system_leases": held if phase == "storm" else 0,
            "job_start": s,
            "create_wait_return": r,
            "failed": failed,
        }
        if phase == "storm":
            record["system_jobs_still_queued"] = queued
            record["start_p99_vs_idle"] = round(ratio, 2)
            record["target"] = "start p99 <= 20 ms and <= 2x idle"
            record["met"] = s["p99_ms"] <= 20 and ratio <= 2
        emit(record)
        log(
            f"storm {phase}: start p50 {s['p50_ms']} p99 {s['p99_ms']} ms; return p50 {r['p50_ms']}"
        )


async def run_preempt(cfg: Config, workdir: Path) -> None:
    """The storm with `--reserved-slots 0`: all 16 slots hold SYSTEM jobs of
    `preempt_job_s` seconds each (a job handed back starts over when it runs
    again). With preemption (the default) a user's job starts by preempting
    one; with `--max-preemptions 0` it waits for a SYSTEM job to end."""
    for phase, extra in (
        ("preemption", ("--reserved-slots", "0")),
        ("no preemption", ("--reserved-slots", "0", "--max-preemptions", "0")),
    ):
        label = "preempt" if phase == "preemption" else "nopreempt"
        with Pair(cfg, workdir, label, extra=extra) as pair:
            ids = [f"storm-{i:06d}" for i in range(cfg.storm_jobs)]
            seed_realms(pair.store, ids)
            pair.start_server()
            channel = grpc.aio.insecure_channel(pair.server.address)
            stub = sgrpc.RealmServiceStub(channel)
            holders = [
                BenchStream(
                    channel,
                    f"holder-{k}",
                    credits=cfg.storm_credits,
                    hold=lambda a: a.job.priority <= SYSTEM,
                    hold_seconds=cfg.preempt_job_s,
                )
                for k in range(cfg.storm_streams)
            ]
            for h in holders:
                await h.open()
            await asyncio.to_thread(seed_jobs, pair.store, ids, priority=SYSTEM)
            slots = cfg.storm_streams * cfg.storm_credits
            deadline = time.monotonic() + 60
            while sum(len(h.held) for h in holders) < slots:
                if time.monotonic() > deadline:
                    raise RuntimeError("the storm did not fill the slots")
                await asyncio.sleep(0.05)
            start, ret, failed = await storm_samples(stub, holders, label, cfg.storm_realms)
            revoked = sum(h.revoked for h in holders)
            for h in holders:
                await h.close()
            await channel.close()
        s, r = summary(start), summary(ret)
        record: dict[str, Any] = {
            "item": "preempt",
            "store": cfg.store,
            "phase": phase,
            "system_jobs_queued": cfg.storm_jobs,
            "system_job_s": cfg.preempt_job_s,
            "slots": slots,
            "reserved_slots": 0,
            "preemptions": revoked,
            "job_start": s,
            "create_wait_return": r,
            "failed": failed,
        }
        if phase == "preemption":
            record["target"] = "start p99 <= 250 ms"
            record["met"] = s["p99_ms"] <= 250
        emit(record)
        log(f"{phase}: start p50 {s['p50_ms']} p99 {s['p99_ms']} ms; {revoked} preemptions")


# -- 5. CreateRealm latency next to a bare unary RPC ------------------------------------


async def run_create(cfg: Config, workdir: Path) -> None:
    """CreateRealm and ReindexRealm (no wait, no worker connected: each
    inserts a job) beside the echo and a read, interleaved."""
    with Pair(cfg, workdir, "create") as pair:
        # Each ReindexRealm takes a realm of its own (an idle one: the
        # call inserts a job), in the interleaved round and the CPU round.
        indexed = [f"r-{i:06d}" for i in range(20 + 2 * cfg.create_samples)]
        seed_realms(pair.store, indexed)
        pair.start_server()
        channel = grpc.aio.insecure_channel(pair.server.address)
        stub = sgrpc.RealmServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        first = await stub.CreateRealm(spb.CreateRealmRequest(realm_id="known"), timeout=30)
        known_job = first.job.job_id
        counter = iter(range(10**9))

        async def create() -> None:
            await stub.CreateRealm(
                spb.CreateRealmRequest(realm_id=f"c-{next(counter):06d}"), timeout=30
            )

        async def check() -> None:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)

        async def get_job() -> None:
            await stub.GetJob(spb.GetJobRequest(job_id=known_job), timeout=30)

        to_reindex = iter(indexed)

        async def reindex() -> None:
            await stub.ReindexRealm(
                spb.ReindexRealmRequest(realm_id=next(to_reindex), priority=USER), timeout=30
            )

        calls: dict[str, Callable[[], Any]] = {
            "CreateRealm": create,
            "ReindexRealm": reindex,
            "Health.Check": check,
            "GetJob": get_job,
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        spy = None
        for i in range(20 + cfg.create_samples):
            if i == 20:
                spy = profile(cfg, pair.server.pid, "create-server")
            order = list(calls)
            random.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                await calls[name]()
                if i >= 20:
                    times[name].append(time.perf_counter() - t0)
        stop_profiles(spy)
        # CPU per call of each kind, run back to back: the server process's
        # and PostgreSQL's (all its processes), in microseconds.
        cpu_us: dict[str, dict[str, float]] = {}
        for name, call in calls.items():
            server0, pg0 = cpu_seconds(pair.server.pid), postgres_cpu_seconds()
            for _ in range(cfg.create_samples):
                await call()
            server_s = cpu_seconds(pair.server.pid) - server0
            pg_s = postgres_cpu_seconds() - pg0 if cfg.store == "postgresql" else 0.0
            cpu_us[name] = {
                "server_cpu_us": round(server_s / cfg.create_samples * 1e6),
                "postgres_cpu_us": round(pg_s / cfg.create_samples * 1e6),
            }
        await channel.close()
    s = {name: {**summary(v), **cpu_us[name]} for name, v in times.items()}
    ratio = s["CreateRealm"]["p50_ms"] / s["Health.Check"]["p50_ms"]
    reindex_ratio = s["ReindexRealm"]["p50_ms"] / s["Health.Check"]["p50_ms"]
    emit(
        {
            "item": "create_latency",
            "store": cfg.store,
            "echo": "grpc.health.v1.Health/Check on the same server",
            **{name: v for name, v in s.items()},
            "create_p50_vs_echo": round(ratio, 2),
            "reindex_p50_vs_echo": round(reindex_ratio, 2),
            "create_p50_vs_getjob": round(s["CreateRealm"]["p50_ms"] / s["GetJob"]["p50_ms"], 2),
            "target": "CreateRealm and ReindexRealm p50 <= 3x echo p50",
            "met": ratio <= 3 and reindex_ratio <= 3,
        }
    )
    log(
        f"create: p50 {s['CreateRealm']['p50_ms']} ms; reindex: p50 "
        f"{s['ReindexRealm']['p50_ms']} ms; echo {s['Health.Check']['p50_ms']} ms; "
        "server CPU per call: "
        + ", ".join(f"{name} {v['server_cpu_us']} us" for name, v in s.items())
    )


# -- 7. indexing rate ----------------------------------------------------------------------


async def run_index(cfg: Config, workdir: Path) -> None:
    from index_worker.indexer import index_file

    files = [card_file(i) for i in range(cfg.index_files)]
    with Pair(cfg, workdir, "index") as pair:
        pair.start_server()
        worker = pair.add_worker("real", concurrency=2, noop=False)
        await wait_log(worker, "stream open")
        channel = grpc.aio.insecure_channel(
            pair.server.address,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        stub = sgrpc.RealmServiceStub(channel)

        # A from-scratch job of the realm, enqueued to SUCCEEDED (its run
        # time as the store recorded it), one worker.
        spies = [
            spy
            for spy in (
                profile(cfg, pair.server.pid, "index-server"),
                profile(cfg, worker.pid, "index-worker"),
            )
            if spy is not None
        ]
        if spies:
            await asyncio.sleep(1.0)  # py-spy attached
        runs = []
        for r in range(cfg.index_realms):
            realm_id = f"idx-{r}"
            t0 = time.perf_counter()
            reply = await stub.CreateRealm(
                spb.CreateRealmRequest(
                    realm_id=realm_id,
                    initial_files=[pb.FileContent(path=p, content=c) for p, c in files],
                ),
                timeout=120,
            )
            t_created = time.perf_counter()
            job = await wait_job(stub, reply.job.job_id)
            t_done = time.perf_counter()
            realm = (await stub.GetRealm(spb.GetRealmRequest(realm_id=realm_id))).realm
            run_s = ts_s(job.finish_time) - ts_s(job.start_time)
            queued_s = ts_s(job.finish_time) - ts_s(job.create_time)
            runs.append(
                {
                    "files": realm.stats.files,
                    "cards": realm.stats.cards,
                    "errors": realm.stats.errors,
                    "state": pb.Job.State.Name(job.state),
                    "progress": f"{job.progress.done}/{job.progress.total}",
                    "create_rpc_s": round(t_created - t0, 3),
                    "job_run_s": round(run_s, 3),
                    "enqueue_to_succeeded_s": round(queued_s, 3),
                    "create_to_indexed_s": round(t_done - t0, 3),
                    "files_per_s": round(realm.stats.files / queued_s, 1),
                }
            )
            log(f"index {realm_id}: {runs[-1]}")
        stop_profiles(*spies)

        # What a person waits for: CreateRealm with the cards and wait_for_index.
        waits = []
        for r in range(cfg.index_realms):
            t0 = time.perf_counter()
            reply = await stub.CreateRealm(
                spb.CreateRealmRequest(
                    realm_id=f"idw-{r}",
                    initial_files=[pb.FileContent(path=p, content=c) for p, c in files],
                    wait_for_index=True,
                ),
                timeout=120,
            )
            assert reply.job.state == pb.Job.STATE_SUCCEEDED, reply.job
            waits.append(time.perf_counter() - t0)
        log(f"index create+wait: {[round(w, 3) for w in waits]}")

        # Side by side: the bulk stream alone, the per-file RPC alone at the
        # old worker's read concurrency (8), the bulk write.
        t0 = time.perf_counter()
        streamed = 0
        async for message in stub.StreamRealmFiles(
            spb.StreamRealmFilesRequest(realm_id="idx-0"), timeout=120
        ):
            streamed += sum(1 for c in message.chunks if c.last)
        stream_per_s = streamed / (time.perf_counter() - t0)
        paths = [p for p, _ in files]
        sem = asyncio.Semaphore(8)

        async def read(path: str) -> None:
            async with sem:
                await stub.ReadRealmFile(
                    spb.ReadRealmFileRequest(realm_id="idx-0", path=path), timeout=30
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(read(p) for p in paths))
        reads_per_s = len(paths) / (time.perf_counter() - t0)

        await stub.CreateRealm(spb.CreateRealmRequest(realm_id="bulk-write"), timeout=30)
        t0 = time.perf_counter()
        await stub.WriteRealmFiles(
            spb.WriteRealmFilesRequest(
                realm_id="bulk-write",
                files=[pb.FileContent(path=p, content=c) for p, c in files],
            ),
            timeout=120,
        )
        bulk_write_per_s = len(files) / (time.perf_counter() - t0)

        # One file changed in a big indexed realm: write to SUCCEEDED.
        big = "idx-big"
        await load_realm(stub, big, cfg.index_big_files, size=400)
        await wait_realm_idle(stub, big)
        change_s: list[float] = []
        parts: dict[str, list[float]] = {"rpc": [], "queued": [], "run": [], "notified": []}
        for i in range(cfg.change_samples):
            t0 = time.perf_counter()
            wall0 = time.time()
            wrote = await stub.WriteRealmFile(
                spb.WriteRealmFileRequest(
                    realm_id=big, path=f"f{i:06d}.json", content=card_file(i + 7)[1]
                ),
                timeout=30,
            )
            t_rpc = time.perf_counter()
            done = await wait_job(stub, wrote.job.job_id, watch=True)
            change_s.append(time.perf_counter() - t0)
            # Where the time went, by the store's own times of the job.
            parts["rpc"].append(t_rpc - t0)
            parts["queued"].append(ts_s(done.start_time) - ts_s(done.create_time))
            parts["run"].append(ts_s(done.finish_time) - ts_s(done.start_time))
            parts["notified"].append(wall0 + change_s[-1] - ts_s(done.finish_time))
        await channel.close()
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    for path, content in files:
        index_file(path, content, now)
    indexer_per_s = len(files) / (time.perf_counter() - t0)
    rates = [r["files_per_s"] for r in runs]
    emit(
        {
            "item": "index",
            "store": cfg.store,
            "card_files": cfg.index_files,
            "worker_concurrency": 2,
            "files_per_s": round(statistics.median(rates), 1),
            "runs": runs,
            "create_wait_s": round(statistics.median(waits), 3),
            "bare_stream_per_s": round(stream_per_s, 1),
            "bare_read_rpc_per_s": round(reads_per_s, 1),
            "bulk_write_per_s": round(bulk_write_per_s, 1),
            "indexer_only_per_s": round(indexer_per_s, 1),
            "vs_indexer": round(statistics.median(rates) / indexer_per_s, 3),
            "vs_bare_reads": round(statistics.median(rates) / reads_per_s, 2),
            "big_realm_files": cfg.index_big_files,
            "one_change": summary(change_s),
            "one_change_parts_p50_ms": {k: round(ms(pct(v, 50)), 2) for k, v in parts.items()},
        }
    )


async def run_index_rss(cfg: Config, workdir: Path) -> None:
    """A realm of many 1 KiB files indexed from scratch: how much the server's
    and the worker's resident memory grows meanwhile (peak minus start)."""
    with Pair(cfg, workdir, "rss") as pair:
        pair.start_server()
        channel = grpc.aio.insecure_channel(
            pair.server.address, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        stub = sgrpc.RealmServiceStub(channel)
        await load_realm(stub, "rss", cfg.index_rss_files, size=1024)
        jobs = (
            await stub.ListJobs(spb.ListJobsRequest(realm_id="rss", state=pb.Job.STATE_QUEUED))
        ).jobs
        assert len(jobs) == 1, jobs
        server_start = reset_peak_rss(pair.server.pid)
        worker = pair.add_worker("real", concurrency=2, noop=False)
        await wait_log(worker, "stream open")
        worker_start = reset_peak_rss(worker.pid)
        t0 = time.perf_counter()
        job = await wait_job(stub, jobs[0].job_id, timeout=600)
        elapsed = time.perf_counter() - t0
        server_growth = peak_rss(pair.server.pid) - server_start
        worker_growth = peak_rss(worker.pid) - worker_start
        realm = (await stub.GetRealm(spb.GetRealmRequest(realm_id="rss"))).realm
        await channel.close()
    emit(
        {
            "item": "index_rss",
            "store": cfg.store,
            "files": realm.stats.files,
            "entries": realm.stats.entries,
            "state": pb.Job.State.Name(job.state),
            "seconds": round(elapsed, 2),
            "server_rss_growth_mib": round(server_growth / 2**20, 1),
            "worker_rss_growth_mib": round(worker_growth / 2**20, 1),
            "met": server_growth < 64 * 2**20 and worker_growth < 128 * 2**20,
        }
    )


# -- 8b. a from-scratch job killed at 90% ----------------------------------------------


async def run_checkpoint(cfg: Config, workdir: Path) -> None:
    """Two realms of `checkpoint_files` 1 KiB files indexed from scratch by a
    real worker: the first to its end (a full run), the second until 90% of
    its files are done, when the worker is SIGKILLed; a fresh worker then
    runs the second attempt, which goes on from the checkpoint (the entries
    the server had stored). The server releases the killed worker's lease at
    once (`--resume-grace-seconds 0`), so what is timed is the attempt. The
    workers index at most `checkpoint_rate` files a second (`--files-per-
    second`, both runs alike: an indexer with real work per file), so that
    the kill lands at 90% (progress reaches the server once a second); the
    store's own work (the listing, the checkpoint's opening) is not paced."""
    n = cfg.checkpoint_files
    extra = ("--resume-grace-seconds", "0")
    pace = ("--files-per-second", str(cfg.checkpoint_rate))
    with Pair(cfg, workdir, "checkpoint", extra=extra) as pair:
        pair.start_server()
        channel = grpc.aio.insecure_channel(
            pair.server.address, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        stub = sgrpc.RealmServiceStub(channel)
        # Both realms (one from-scratch job each) before any worker: the
        # worker takes the older first.
        await load_realm(stub, "full", n, size=1024)
        await load_realm(stub, "killed", n, size=1024)
        first = pair.add_worker("first", concurrency=1, noop=False, extra=pace)
        await wait_log(first, "stream open")
        [full_job] = (await stub.ListJobs(spb.ListJobsRequest(realm_id="full"))).jobs
        full = await wait_job(stub, full_job.job_id, timeout=900)
        assert full.state == pb.Job.STATE_SUCCEEDED, full
        full_s = ts_s(full.finish_time) - ts_s(full.start_time)
        log(f"checkpoint: full run of {n} files {full_s:.1f} s")

        [job] = (await stub.ListJobs(spb.ListJobsRequest(realm_id="killed"))).jobs
        deadline = time.monotonic() + 900
        while True:
            got = (await stub.GetJob(spb.GetJobRequest(job_id=job.job_id))).job
            if got.progress.total and got.progress.done >= 0.9 * got.progress.total:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job.job_id} never reached 90%: {got}")
            await asyncio.sleep(0.02)
        first.popen.send_signal(signal.SIGKILL)
        t_kill = time.perf_counter()
        at_kill = got.progress.done
        second = pair.add_worker("second", concurrency=1, noop=False, extra=pace)
        done = await wait_job(stub, job.job_id, timeout=900)
        kill_to_done = time.perf_counter() - t_kill
        assert done.state == pb.Job.STATE_SUCCEEDED and done.attempt == 2, done
        second_s = ts_s(done.finish_time) - ts_s(done.start_time)
        realm = (await stub.GetRealm(spb.GetRealmRequest(realm_id="killed"))).realm
        assert realm.stats.entries == realm.stats.files >= n, realm.stats
        await wait_log(second, "job finished")
        await channel.close()
    ratio = second_s / full_s
    emit(
        {
            "item": "checkpoint",
            "store": cfg.store,
            "files": n,
            "files_per_second_cap": cfg.checkpoint_rate,
            "full_run_s": round(full_s, 2),
            "done_at_kill": at_kill,
            "second_attempt_s": round(second_s, 2),
            "second_attempt_files_read": done.progress.total,
            "kill_to_succeeded_s": round(kill_to_done, 2),
            "ratio": round(ratio, 3),
            "met": ratio <= 0.20,
        }
    )


# -- 9. realmctl push -------------------------------------------------------------------


def run_push(cfg: Config, workdir: Path) -> None:
    """`realmctl push REALM DIR` of `push_files` small cards, timed as the process
    it is (interpreter start included), into a fresh realm each run; no worker,
    so the queue does nothing meanwhile. Next to it, `realmctl get` (the
    process's fixed cost) in the same run."""
    tree = workdir / "push-tree"
    for i in range(cfg.push_files):
        path, content = card_file(i)
        target = tree / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    realmctl = [str(BIN / "realmctl")]
    with Pair(cfg, workdir, "push") as pair:
        pair.start_server()
        address = pair.server.address

        def timed(*args: str) -> tuple[float, str]:
            t0 = time.perf_counter()
            done = subprocess.run(
                [*realmctl, "--server", address, *args],
                capture_output=True,
                text=True,
                check=False,
                timeout=600,
            )
            elapsed = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"realmctl {args[0]} exited {done.returncode}: {done.stderr}")
            return elapsed, done.stdout

        timed("create", "warm-up")
        seconds, fixed = [], []
        summary_line = ""
        for run in range(cfg.push_runs):
            realm_id = f"push-{run}"
            timed("create", realm_id)
            fixed.append(timed("get", realm_id)[0])
            elapsed, out = timed("push", realm_id, str(tree))
            seconds.append(elapsed)
            summary_line = out.splitlines()[-1]
            log(f"push run {run}: {cfg.push_files / elapsed:.0f} files/s ({elapsed:.2f} s)")
    rates = sorted(cfg.push_files / s for s in seconds)
    median = statistics.median(rates)
    emit(
        {
            "item": "push",
            "store": cfg.store,
            "files": cfg.push_files,
            "runs": cfg.push_runs,
            "files_per_s": round(median, 1),
            "files_per_s_runs": [round(r, 1) for r in rates],
            "seconds_runs": [round(s, 3) for s in sorted(seconds)],
            "realmctl_get_s_median": round(statistics.median(fixed), 3),
            "summary": summary_line,
            "target": "realmctl push of 5,000 files: at least 5,000 files/s",
            "met": median >= 5000,
        }
    )


async def wait_job(
    stub: sgrpc.RealmServiceStub, job_id: str, *, watch: bool = False, timeout: float = 300
) -> pb.Job:
    """The job once terminal: followed with WatchJob, or polled every 50 ms."""
    if watch:
        job = None
        async for message in stub.WatchJob(spb.WatchJobRequest(job_id=job_id), timeout=timeout):
            job = message.job
        assert job is not None
        return job
    deadline = time.monotonic() + timeout
    while True:
        job = (await stub.GetJob(spb.GetJobRequest(job_id=job_id))).job
        if job.state in (pb.Job.STATE_SUCCEEDED, pb.Job.STATE_FAILED):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished within {timeout}s")
        await asyncio.sleep(0.05)


async def load_realm(stub: sgrpc.RealmServiceStub, realm_id: str, count: int, *, size: int) -> None:
    """A realm of `count` files of `size` bytes, written in bulk requests."""
    await stub.CreateRealm(spb.CreateRealmRequest(realm_id=realm_id), timeout=30)
    body = (b"some text to index " * (size // 19 + 1))[:size]
    for start in range(0, count, 10_000):
        await stub.WriteRealmFiles(
            spb.WriteRealmFilesRequest(
                realm_id=realm_id,
                files=[
                    pb.FileContent(path=f"f{i:06d}.json", content=body)
                    for i in range(start, min(count, start + 10_000))
                ],
            ),
            timeout=300,
        )


async def wait_realm_idle(stub: sgrpc.RealmServiceStub, realm_id: str) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        jobs = (await stub.ListJobs(spb.ListJobsRequest(realm_id=realm_id))).jobs
        if all(j.state in (pb.Job.STATE_SUCCEEDED, pb.Job.STATE_FAILED) for j in jobs):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"realm {realm_id} still has jobs")


def reset_peak_rss(pid: int) -> int:
    """Reset the process's peak RSS (Linux clear_refs 5); returns its RSS now."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    return _status_kib(pid, "VmHWM") * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


# -- what one statement costs ------------------------------------------------------------


def run_stmt(cfg: Config, workdir: Path) -> None:
    """The claim's candidate query, executed in one open transaction: built per
    call through an ORM session (as the store once did), built once and executed
    through Core, and as plain SQL through the DB-API driver."""
    import timeit

    from sqlalchemy import select

    from realm_service.store.db import open_database
    from realm_service.store.tables import JobRow

    n = 300 if cfg.quick else 2000
    with Pair(cfg, workdir, "stmt") as pair:
        ids = [f"st-{i:04d}" for i in range(200)]
        seed_realms(pair.store, ids)
        seed_jobs(pair.store, ids, priority=SYSTEM)
        db = open_database(pair.store.url, migrate=False)
        jobs = JobRow.__table__
        prebuilt = (
            select(jobs.c.id, jobs.c.realm_id)
            .where(jobs.c.state == "queued", jobs.c.priority >= 0)
            .order_by(jobs.c.priority.desc(), jobs.c.seq, jobs.c.id)
            .limit(36)
        )
        sql = (
            "SELECT id, realm_id FROM jobs WHERE state = 'queued' AND priority >= 0 "
            "ORDER BY priority DESC, seq, id LIMIT 36"
        )
        try:
            with db.session_for_tests() as session:
                conn = session.connection()
                raw = conn.connection.driver_connection
                assert raw is not None

                def orm_built_per_call() -> None:
                    session.execute(
                        select(JobRow.id, JobRow.realm_id)
                        .where(JobRow.state == "queued", JobRow.priority >= 0)
                        .order_by(JobRow.priority.desc(), JobRow.seq, JobRow.id)
                        .limit(36)
                    ).all()

                def core_prebuilt() -> None:
                    conn.execute(prebuilt).all()

                def dbapi() -> None:
                    raw.execute(sql).fetchall()

                us = {}
                for fn in (orm_built_per_call, core_prebuilt, dbapi) * 2:  # second pass counts
                    us[fn.__name__] = timeit.timeit(fn, number=n) / n * 1e6
        finally:
            db.close()
    emit(
        {
            "item": "stmt",
            "store": cfg.store,
            "statement": "claim candidates (SELECT ... ORDER BY priority DESC, seq, id LIMIT 36)",
            **{f"{k}_us": round(v, 1) for k, v in us.items()},
            "orm_vs_dbapi": round(us["orm_built_per_call"] / us["dbapi"], 1),
        }
    )


# -- report ---------------------------------------------------------------------------


def table() -> str:
    lines = ["", "item                          figure", "-" * 78]

    def row(name: str, text: str) -> None:
        lines.append(f"{name:<30}{text}")

    for r in RESULTS:
        item = r["item"]
        met = "" if "met" not in r else ("  [met]" if r["met"] else "  [MISSED]")
        if item == "throughput_bare_sql":
            row(f"bare SQL loop batch={r['batch']}", f"{r['jobs_per_s']:>10.0f} jobs/s")
        elif item == "throughput":
            row(
                f"throughput workers={r['workers']}",
                f"{r['jobs_per_s']:>10.0f} jobs/s  ({r['vs_bare_batched']:.2f}x bare batched, "
                f"{r['vs_bare_single']:.2f}x bare single){met}",
            )
        elif item == "wakeup":
            row(
                f"wake-up, {r['streams']} stream(s)",
                f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  (RPC p50 "
                f"{r['rpc_p50_ms']:.2f} ms, enqueue->worker p50 "
                f"{r['enqueue_to_arrival_p50_ms']:.2f} ms, claim->worker p50 "
                f"{r['claim_to_arrival_p50_ms']:.2f} ms){met}",
            )
        elif item == "idle_streams":
            row(
                f"{r['streams']} idle streams",
                f"{r['rss_per_stream_kib']:.1f} KiB RSS per stream{met}",
            )
        elif item == "storm":
            s, c = r["job_start"], r["create_wait_return"]
            row(
                f"storm {r['phase']}: job start",
                f"p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms{met}",
            )
            row(
                f"storm {r['phase']}: create+wait",
                f"p50 {c['p50_ms']:.2f} ms  p99 {c['p99_ms']:.2f} ms",
            )
        elif item == "preempt":
            s, c = r["job_start"], r["create_wait_return"]
            row(
                f"{r['phase']}: job start",
                f"p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms"
                f" ({r['preemptions']} preemptions, {r['failed']} failed){met}",
            )
            row(
                f"{r['phase']}: create+wait",
                f"p50 {c['p50_ms']:.2f} ms  p99 {c['p99_ms']:.2f} ms",
            )
        elif item == "create_latency":
            for name in ("CreateRealm", "ReindexRealm", "Health.Check", "GetJob"):
                row(
                    name,
                    f"p50 {r[name]['p50_ms']:.2f} ms  p99 {r[name]['p99_ms']:.2f} ms  "
                    f"CPU/call server {r[name]['server_cpu_us']} us"
                    + (
                        f", postgres {r[name]['postgres_cpu_us']} us"
                        if r["store"] == "postgresql"
                        else ""
                    )
                    + (met if name == "CreateRealm" else ""),
                )
        elif item == "stmt":
            row(
                "one claim-path SELECT",
                f"ORM built per call {r['orm_built_per_call_us']:.0f} us, Core prebuilt "
                f"{r['core_prebuilt_us']:.0f} us, DB-API {r['dbapi_us']:.0f} us",
            )
        elif item == "index":
            row(
                "indexing (real worker)",
                f"{r['files_per_s']:>10.0f} files/s  (stream alone {r['bare_stream_per_s']:.0f}/s,"
                f" per-file reads {r['bare_read_rpc_per_s']:.0f}/s,"
                f" indexer alone {r['indexer_only_per_s']:.0f}/s)",
            )
            row("create + wait_for_index", f"{r['create_wait_s']:.3f} s median")
            row("bulk write", f"{r['bulk_write_per_s']:>10.0f} files/s")
            c = r["one_change"]
            row(
                f"one change, {r['big_realm_files']} files",
                f"p50 {c['p50_ms']:.2f} ms  p99 {c['p99_ms']:.2f} ms (write to SUCCEEDED; p50 "
                + ", ".join(f"{k} {v}" for k, v in r["one_change_parts_p50_ms"].items())
                + ")",
            )
        elif item == "push":
            row(
                f"realmctl push, {r['files']} files",
                f"{r['files_per_s']:>10.0f} files/s median of {r['runs']} (process with "
                f"start; `realmctl get` takes {r['realmctl_get_s_median']:.2f} s){met}",
            )
        elif item == "checkpoint":
            row(
                f"killed at 90%, {r['files']} files",
                f"second attempt {r['second_attempt_s']:.1f} s (read"
                f" {r['second_attempt_files_read']} files) vs full run {r['full_run_s']:.1f} s:"
                f" {r['ratio']:.0%} (target <= 20%){met}",
            )
        elif item == "index_rss":
            row(
                f"index {r['files']} files of 1 KiB",
                f"{r['seconds']:.1f} s; RSS growth server {r['server_rss_growth_mib']} MiB,"
                f" worker {r['worker_rss_growth_mib']} MiB{met}",
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(
        description="Service-pair benchmarks (realm-service + index-worker processes)."
    )
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--quick", action="store_true", help="small sizes; finishes in under a minute")
    p.add_argument("--only", default=",".join(ITEMS), help=f"comma list of {', '.join(ITEMS)}")
    p.add_argument("--pg-url", default=env_pg_url(), help="PostgreSQL database for schemas")
    p.add_argument("--log-level", default="INFO", help="server and worker log level (INFO)")
    p.add_argument("--jobs", type=int, help="throughput: jobs to drain (50,000)")
    p.add_argument("--workers", help="throughput: comma list of worker process counts (1,2,4)")
    p.add_argument("--worker-concurrency", type=int, help="throughput: jobs per worker (64)")
    p.add_argument("--drain-limit", type=float, help="throughput: seconds per drain at most (240)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument(
        "--py-spy-gil", action="store_true", help="with --py-spy: sample the GIL holder only"
    )
    p.add_argument(
        "--commit-stamps",
        action="store_true",
        help="wakeup, SQLite: run the server under strace, which stamps each commit's "
        "sync, and report the time from the enqueue's commit to the arrival",
    )
    p.add_argument(
        "--pg-statements",
        action="store_true",
        help="PostgreSQL's own profile of each drain (pg_stat_statements, which the "
        "cluster must preload): plans, planning and execution time, top statements",
    )
    p.add_argument(
        "--py-spy",
        default="",
        help="profile the server and the first worker of each drain into this dir",
    )
    args = p.parse_args(argv)
    common = {"store": args.store, "pg_url": args.pg_url, "log_level": args.log_level}
    cfg = Config.quick_config(**common) if args.quick else Config(quick=False, **common)
    if args.jobs:
        cfg.jobs = args.jobs
    if args.drain_limit:
        cfg.drain_limit_s = args.drain_limit
    if args.workers:
        cfg.workers = tuple(int(x) for x in args.workers.split(","))
    if args.worker_concurrency:
        cfg.worker_concurrency = args.worker_concurrency
    cfg.only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    cfg.keep = args.keep
    cfg.py_spy = args.py_spy
    cfg.py_spy_gil = args.py_spy_gil
    cfg.commit_stamps = args.commit_stamps
    if cfg.commit_stamps and cfg.store != "sqlite":
        p.error("--commit-stamps needs --store sqlite (PostgreSQL commits in its own process)")
    cfg.pg_statements = args.pg_statements
    unknown = set(cfg.only) - set(ITEMS)
    if unknown:
        p.error(f"unknown items {sorted(unknown)}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    work = Workdir(keep=cfg.keep)
    log(f"store={cfg.store} quick={cfg.quick} workdir={work.path}")
    t0 = time.perf_counter()
    only = cfg.only
    try:
        if "throughput" in only:
            run_throughput(cfg, work.path)
        if "wakeup" in only:
            asyncio.run(run_wakeup(cfg, work.path))
        if "storm" in only:
            asyncio.run(run_storm(cfg, work.path))
        if "preempt" in only:
            asyncio.run(run_preempt(cfg, work.path))
        if "create" in only:
            asyncio.run(run_create(cfg, work.path))
        if "index" in only:
            asyncio.run(run_index(cfg, work.path))
        if "index_rss" in only:
            asyncio.run(run_index_rss(cfg, work.path))
        if "checkpoint" in only:
            asyncio.run(run_checkpoint(cfg, work.path))
        if "push" in only:
            run_push(cfg, work.path)
        if "stmt" in only:
            run_stmt(cfg, work.path)
    finally:
        work.cleanup()
    print(table())
    print(f"\n{cfg.store}, {'quick' if cfg.quick else 'full'} run: {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
