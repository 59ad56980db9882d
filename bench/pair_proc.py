"""Stores, seed data and processes for bench/pair_bench.py.

A `BenchStore` is a fresh SQLite file or a fresh PostgreSQL schema with the
service's schema migrated in; `seed_*` bulk-insert realms and jobs through the
service's own table definitions; `ServerProc` and `WorkerProc` run
`realm-service serve` and `index-worker` as real processes on loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import insert

from realm_service.domain import JobKind
from realm_service.store.db import open_database
from realm_service.store.rows import new_job_values
from realm_service.store.tables import JobRow, RealmRow

BIN = Path(sys.executable).parent
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
SEED_CHUNK = 5_000


def log(message: str) -> None:
    print(f"[pair-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- stores ---------------------------------------------------------------------


@dataclass
class BenchStore:
    kind: str  # "sqlite" | "postgresql"
    url: str  # what the server gets as --store
    workdir: Path
    pg_base: str = ""
    schema: str = ""
    path: Path | None = None

    @classmethod
    def create(cls, kind: str, workdir: Path, label: str, pg_base: str) -> BenchStore:
        if kind == "sqlite":
            path = workdir / f"{label}.db"
            store = cls(kind, f"sqlite:///{path}", workdir, path=path)
        else:
            import psycopg

            schema = f"pairbench_{label}_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(pg_base, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{schema}"')
            sep = "&" if "?" in pg_base else "?"
            url = f"{pg_base}{sep}options={quote(f'-csearch_path={schema}', safe='')}"
            store = cls(kind, url, workdir, pg_base=pg_base, schema=schema)
        db = open_database(store.url)  # runs the migrations
        db.close()
        return store

    def drop(self) -> None:
        if self.kind == "postgresql":
            import psycopg

            with psycopg.connect(self.pg_base, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        elif self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{self.path}{suffix}").unlink()

    def connect(self) -> Any:
        """A plain DB-API connection (autocommit) for polling and bare SQL loops."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        import psycopg

        conn = psycopg.connect(self.pg_base, autocommit=True)
        conn.execute(f'SET search_path TO "{self.schema}"')
        return conn

    def scalar(self, sql: str) -> Any:
        conn = self.connect()
        try:
            return conn.execute(sql).fetchone()[0]
        finally:
            conn.close()


@contextlib.contextmanager
def bench_store(kind: str, workdir: Path, label: str, pg_base: str) -> Iterator[BenchStore]:
    store = BenchStore.create(kind, workdir, label, pg_base)
    try:
        yield store
    finally:
        store.drop()


# -- seed data --------------------------------------------------------------------


def seed_realms(store: BenchStore, realm_ids: Sequence[str], *, indexed: bool = True) -> None:
    """Realm rows without files. `indexed` realms look like realms indexed
    earlier (ready, a current generation), so the server's boot mount leaves
    them alone, as it would after a deploy that triggers a reindex storm."""
    db = open_database(store.url, migrate=False)
    now = datetime.now(UTC)
    try:
        for start in range(0, len(realm_ids), SEED_CHUNK):
            rows = [
                {
                    "realm_id": realm_id,
                    "display_name": realm_id,
                    "state": "ready" if indexed else "indexing",
                    "created_priority": 0,
                    "create_time": now,
                    "current_generation": 0 if indexed else None,
                    "files": 0,
                    "cards": 0,
                    "errors": 0,
                    "entries": 0,
                    "last_index_time": now if indexed else None,
                }
                for realm_id in realm_ids[start : start + SEED_CHUNK]
            ]
            with db.session_for_tests() as s:
                s.execute(insert(RealmRow), rows)
    finally:
        db.close()


def seed_jobs(store: BenchStore, realm_ids: Sequence[str], *, priority: int = 0) -> None:
    """One queued from-scratch job per realm, in the given order."""
    db = open_database(store.url, migrate=False)
    now = datetime.now(UTC)
    try:
        for start in range(0, len(realm_ids), SEED_CHUNK):
            rows = [
                new_job_values(
                    realm_id=realm_id, kind=JobKind.FROM_SCRATCH, priority=priority, now=now
                )
                for realm_id in realm_ids[start : start + SEED_CHUNK]
            ]
            for i, row in enumerate(rows):
                row["seq"] += start + i
            with db.session_for_tests() as s:
                s.execute(insert(JobRow), rows)
    finally:
        db.close()


def remaining_jobs(conn: Any) -> int:
    """Queued plus running jobs (both counts use the partial indexes)."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM jobs WHERE state = 'queued')"
        " + (SELECT count(*) FROM jobs WHERE state = 'running')"
    ).fetchone()
    return int(row[0])


def card_file(i: int) -> tuple[str, bytes]:
    """A small card (~400 bytes) like the ones realms hold."""
    import json

    card = {
        "data": {
            "type": "card",
            "attributes": {
                "title": f"Person {i}",
                "firstName": f"Ann{i}",
                "lastName": "Example",
                "bio": f"Card number {i} of the benchmark realm; it has a little text to index.",
            },
            "relationships": {
                "friend": {"links": {"self": f"../person/p{(i + 1) % 5000:05d}"}},
            },
            "meta": {"adoptsFrom": {"module": "https://example.com/person", "name": "Person"}},
        }
    }
    return f"person/p{i:05d}.json", json.dumps(card, indent=2).encode()


# -- processes ---------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class ServerProc(Proc):
    address: str = ""
    # With `start_server(..., trace=...)` the popen is strace; this is the
    # server under it (its pid for profiles and RSS, and the one stopped).
    traced_pid: int = 0

    @property
    def pid(self) -> int:
        return self.traced_pid or self.popen.pid

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.traced_pid and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.traced_pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)  # strace ends with the server
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.traced_pid, signal.SIGKILL)
        return super().stop(timeout)


def start_server(
    store: BenchStore,
    logdir: Path,
    label: str,
    *,
    log_level: str,
    extra: Sequence[str] = (),
    timeout: float = 60.0,
    trace: Path | None = None,
) -> ServerProc:
    """The server on a free loopback port. With `trace`, it runs under
    strace, which writes the end of each of its fsync and fdatasync calls
    (wall clock) to that file: a SQLite commit's sync (see `sync_ends`)."""
    log_path = logdir / f"server-{label}.log"
    cmd = [
        str(BIN / "realm-service"),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        store.url,
        "--log-level",
        log_level,
        "--drain-grace-seconds",
        "1",
        *extra,
    ]
    if trace is not None:
        if shutil.which("strace") is None:
            raise RuntimeError("commit stamps need strace on PATH")
        # seccomp-bpf: only the traced calls stop the server, not the others.
        syncs = ["-f", "--seccomp-bpf", "-qq", "-ttt", "-T", "-e", "trace=fsync,fdatasync"]
        cmd = ["strace", *syncs, "-o", str(trace), *cmd]
    with open(log_path, "w") as err:
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    proc = ServerProc(popen, log_path)
    line_box: list[str] = []

    def read_first() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            if "listening on" in line:
                line_box.append(line.strip())
                return

    reader = threading.Thread(target=read_first, daemon=True)
    reader.start()
    reader.join(timeout)
    if not line_box:
        proc.stop()
        raise RuntimeError(f"the server did not start:\n{proc.tail()}")
    proc.address = line_box[0].rsplit(" ", 1)[1]
    if trace is not None:
        children = Path(f"/proc/{popen.pid}/task/{popen.pid}/children").read_text().split()
        proc.traced_pid = int(children[0])
    return proc


_SYNC_LINE = re.compile(r"^\d+\s+(?P<t>\d+\.\d+)\s+(?P<rest>.*?)(?:<(?P<dur>\d+\.\d+)>)?$")


def sync_ends(trace: Path) -> list[float]:
    """The wall-clock ends of the fsync/fdatasync calls in a trace of
    `start_server(..., trace=...)`, sorted. strace stamps a call's start;
    with -T it adds the duration (a call split by another thread's is
    stamped again when it resumes, at its end)."""
    ends: list[float] = []
    for line in trace.read_text(errors="replace").splitlines():
        m = _SYNC_LINE.match(line.strip())
        if m is None or "unfinished" in m["rest"] or m["dur"] is None:
            continue
        t = float(m["t"])
        ends.append(t if "resumed>" in m["rest"] else t + float(m["dur"]))
    return sorted(ends)


def start_worker(
    address: str,
    logdir: Path,
    label: str,
    *,
    concurrency: int,
    noop: bool,
    log_level: str,
    extra: tuple[str, ...] = (),
) -> Proc:
    log_path = logdir / f"worker-{label}.log"
    cmd = [
        str(BIN / "index-worker"),
        "--server",
        address,
        "--concurrency",
        str(concurrency),
        "--worker-id",
        f"bench-{label}",
        "--log-level",
        log_level,
    ]
    if noop:
        cmd.append("--noop-for-benchmarks")
    cmd += extra
    with open(log_path, "w") as err:
        popen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
    return Proc(popen, log_path)


@dataclass
class Workdir:
    path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pair-bench-")))
    keep: bool = False

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def env_pg_url() -> str:
    return os.environ.get("PAIR_BENCH_PG_URL", DEFAULT_PG_URL)
