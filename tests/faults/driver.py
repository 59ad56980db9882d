"""One fault run: real server and worker processes on loopback, a workload
of clients, one kind of fault injected while they run, then a settle phase,
a look at the processes, the store and the logs, and the checker's verdict.

Everything is bounded: the workload by time and operation count, each fault
by its duration, the settle phase by a deadline, every process stop by a
timeout. Whatever happens, `FaultRun.__exit__` kills the processes it
started, closes the proxy, unmounts the tmpfs and drops the database.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from realm_common.logs import parse_logfmt
from realm_service.store.tables import JobRow
from tests.e2e.conftest import Proc, Server, System
from tests.faults.checker import Snapshot, Violation, check, load_snapshot
from tests.faults.disk import TmpfsDisk
from tests.faults.history import (
    Call,
    FaultEvent,
    History,
    LogTraceback,
    Outcome,
    ProcessEnd,
    ProcessStop,
    RunInfo,
    Settled,
)
from tests.faults.pgcluster import PgCluster
from tests.faults.proxy import Proxy
from tests.faults.workload import Workload, WorkloadConfig

STOP_TIMEOUT = 30.0
RPC_TIMEOUT = 10.0


class Fault(StrEnum):
    NONE = "none"
    SERVER_KILL = "server-kill"
    WORKER_KILL = "worker-kill"
    PG_STOP = "pg-stop"
    PROXY_CUT = "proxy-cut"
    PROXY_STALL = "proxy-stall"
    DISK_FULL = "disk-full"
    POISON = "poison"


# Faults whose traffic goes through the proxy.
PROXIED = frozenset({Fault.PROXY_CUT, Fault.PROXY_STALL})


@dataclass(frozen=True)
class RunConfig:
    fault: Fault
    store: str  # sqlite | postgresql
    seconds: float = 10.0
    settle_seconds: float = 45.0
    seed: int = 0
    clients: int = 3
    workers: int = 2
    # How often the fault strikes during the workload.
    injections: int = 1
    # How long an outage lasts (a stopped PostgreSQL, a full disk, a stall).
    outage_seconds: float = 3.0
    lease_seconds: float = 4.0

    @property
    def name(self) -> str:
        return f"{self.fault}-{self.store}"


@dataclass
class RunResult:
    config: RunConfig
    violations: list[Violation]
    figures: dict[str, object]
    history_path: Path
    log_dir: Path
    harness_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.harness_errors

    def report(self, limit: int = 40) -> str:
        lines = [
            f"fault run {self.config.name} (seed {self.config.seed}): "
            + ", ".join(f"{k}={v}" for k, v in self.figures.items()),
            f"history: {self.history_path}",
            f"logs: {self.log_dir}",
        ]
        for error in self.harness_errors:
            # A one-line report (limit 0) keeps only an error's last line.
            text = error if limit else error.strip().splitlines()[-1]
            lines.append(f"HARNESS ERROR: {text}")
        counts = Counter(v.kind for v in self.violations)
        if self.violations:
            lines.append(
                f"{len(self.violations)} violation(s): "
                + ", ".join(f"{k} x{n}" for k, n in counts.items())
            )
        lines += [str(v) for v in self.violations[:limit]]
        if len(self.violations) > limit > 0:
            lines.append(f"... and {len(self.violations) - limit} more")
        return "\n".join(lines)


class FaultRun:
    """Use as a context manager: `with FaultRun(...) as run: result = run.execute()`."""

    def __init__(self, config: RunConfig, work_dir: Path, pg: PgCluster | None = None) -> None:
        if config.store == "postgresql" and pg is None:
            raise ValueError("a PostgreSQL run needs a private cluster")
        if config.fault is Fault.PG_STOP and config.store != "postgresql":
            raise ValueError("pg-stop runs on PostgreSQL only")
        if config.fault is Fault.DISK_FULL and config.store != "sqlite":
            raise ValueError("disk-full runs on SQLite only")
        self.config = config
        self.work_dir = work_dir
        self.pg = pg
        self.log_dir = work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.system = System(self.log_dir)
        self.history = History(work_dir / "history.jsonl")
        self.proxy: Proxy | None = None
        self.disk: TmpfsDisk | None = None
        self.database = ""
        self.store_url = ""
        self.server: Server | None = None
        self.port = 0
        # Where clients and workers connect: the server, or the proxy before it.
        self.target = ""
        self.workers: dict[str, Proc] = {}
        self.killed: set[int] = set()
        self.injected = 0
        self.errors: list[str] = []
        self._t0 = time.monotonic()

    def clock(self) -> float:
        return time.monotonic() - self._t0

    def __enter__(self) -> FaultRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.history.close()
        self.system.cleanup(failed=False)
        if self.proxy is not None:
            self.proxy.close()
        if self.disk is not None:
            self.disk.unmount()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                if not self.pg.running():
                    self.pg.start()
            if self.database:
                with contextlib.suppress(Exception):
                    self.pg.drop_database(self.database)

    # -- the run -----------------------------------------------------------

    def execute(self) -> RunResult:
        config = self.config
        started = time.monotonic()
        self.history.add(RunInfo(config.fault, config.store, config.seconds, config.seed))
        self._open_store()
        self._start_server()
        target = self.server_address()
        if config.fault in PROXIED:
            host, port = target.rsplit(":", 1)
            self.proxy = Proxy(host, int(port)).start()
            target = self.proxy.address
        self.target = target
        for i in range(config.workers):
            self._start_worker(f"w{i}")
        workload = Workload(
            WorkloadConfig(
                target=target,
                seconds=config.seconds,
                clients=config.clients,
                seed=config.seed,
                realm_prefix=f"s{config.seed}",
                poison=config.fault is Fault.POISON,
                # Enough operations for the whole workload time, however long.
                max_ops=max(400, int(config.seconds * 60)),
                op_seconds=max(15.0, config.outage_seconds * 4),
            ),
            self.history,
            self.clock,
        )
        self._t0 = time.monotonic()
        workload.start()
        try:
            self._inject_faults()
        finally:
            workload.stop()
            if not workload.join(timeout=60.0):
                self.errors.append("a client thread did not end within 60 s")
        self.errors += [f"client thread failed: {e!r}" for e in workload.errors]
        settled = self._settle()
        self._record_processes()
        snapshot = self._snapshot()
        self._stop_processes()
        self._record_tracebacks()
        violations = check(self.history.entries, snapshot)
        figures = self._figures(workload, snapshot, settled, time.monotonic() - started)
        return RunResult(
            config, violations, figures, self.history.path, self.log_dir, list(self.errors)
        )

    def server_address(self) -> str:
        assert self.server is not None
        return self.server.address

    # -- processes -----------------------------------------------------------

    def _open_store(self) -> None:
        if self.config.store == "postgresql":
            assert self.pg is not None
            self.database = f"run_{uuid.uuid4().hex[:12]}"
            self.store_url = self.pg.create_database(self.database)
            return
        store_dir = self.work_dir / "store"
        if self.config.fault is Fault.DISK_FULL:
            # Room for the store, its WAL and their growth during the run; the
            # filler takes the rest when the fault strikes.
            self.disk = TmpfsDisk(store_dir, size_mb=64).mount()
        store_dir.mkdir(parents=True, exist_ok=True)
        self.store_url = f"sqlite:///{store_dir / 'realm.db'}"

    def _server_flags(self) -> list[str]:
        return [
            "--lease-seconds", str(self.config.lease_seconds),
            "--heartbeat-seconds", "0.5",
            "--drain-grace-seconds", "1",
            "--max-attempts", "3",
        ]  # fmt: skip

    def _start_server(self) -> None:
        n = sum(1 for p in self.system.procs if p.name.startswith("server"))
        name = "server" if n == 0 else f"server-{n + 1}"
        self.server = self.system.start_server(
            self.store_url, *self._server_flags(), port=self.port, name=name
        )
        self.port = self.server.port

    def _start_worker(self, worker_id: str) -> None:
        self.workers[worker_id] = self.system.start_worker(
            self.target,
            worker_id,
            "--concurrency", "2",
            "--ping-interval", "1",
            "--ping-timeout", "2",
            "--rpc-timeout", "5",
            "--drain-timeout", "5",
        )  # fmt: skip

    def _kill(self, proc: Proc) -> None:
        self.killed.add(proc.pid)
        proc.send(signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)

    # -- faults ------------------------------------------------------------------

    def _inject_faults(self) -> None:
        config = self.config
        if config.fault is Fault.POISON:
            self._event("inject", "client 0 writes poison/nul.json (a NUL in a card title)")
        times = [config.seconds * (i + 0.35) / config.injections for i in range(config.injections)]
        for at in times:
            self._sleep_until(at)
            self._inject_one()
        self._sleep_until(config.seconds)

    def _sleep_until(self, at: float) -> None:
        time.sleep(max(0.0, at - self.clock()))

    def _event(self, action: str, detail: str = "") -> None:
        self.history.add(FaultEvent(self.config.fault, action, round(self.clock(), 4), detail))

    def _inject_one(self) -> None:
        fault = self.config.fault
        outage = self.config.outage_seconds
        if fault in (Fault.NONE, Fault.POISON):
            return
        self.injected += 1
        if fault is Fault.SERVER_KILL:
            assert self.server is not None
            pid = self.server.proc.pid
            self._event("inject", f"SIGKILL server pid {pid}")
            self._kill(self.server.proc)
            time.sleep(0.5)
            self._start_server()
            self._event("heal", f"server restarted on port {self.port}, pid {self.server.proc.pid}")
        elif fault is Fault.WORKER_KILL:
            worker_id = f"w{(self.injected - 1) % self.config.workers}"
            proc = self.workers[worker_id]
            self._event("inject", f"SIGKILL worker {worker_id} pid {proc.pid}")
            self._kill(proc)
            time.sleep(0.5)
            self._start_worker(worker_id)
            self._event("heal", f"worker {worker_id} restarted")
        elif fault is Fault.PG_STOP:
            assert self.pg is not None
            self._event("inject", "pg_ctl stop -m immediate")
            self.pg.stop("immediate")
            time.sleep(outage)
            self.pg.start()
            self._event("heal", "pg_ctl start")
        elif fault is Fault.PROXY_CUT:
            assert self.proxy is not None
            links = self.proxy.cut(down_seconds=1.0)
            self._event("inject", f"cut {links} connections, refused new ones for 1 s")
        elif fault is Fault.PROXY_STALL:
            assert self.proxy is not None
            self._event("inject", f"stall every connection for {outage} s")
            self.proxy.stall(outage)
            self._event("heal", "traffic flows again")
        elif fault is Fault.DISK_FULL:
            assert self.disk is not None
            taken = self.disk.fill()
            self._event("inject", f"filled the store's tmpfs ({taken} bytes)")
            time.sleep(outage)
            self.disk.free()
            self._event("heal", "filler removed")

    # -- after the faults --------------------------------------------------------

    def _settle(self) -> Settled:
        """Wait until no job is queued or running, or the deadline passes."""
        started = time.monotonic()
        deadline = started + self.config.settle_seconds
        engine = create_engine(self.store_url, poolclass=NullPool)
        pending = -1
        try:
            while True:
                try:
                    with engine.connect() as conn:
                        pending = conn.execute(
                            select(func.count())
                            .select_from(JobRow)
                            .where(JobRow.state.in_(("queued", "running")))
                        ).scalar_one()
                        conn.rollback()
                except Exception as exc:  # the store may still be coming back
                    pending = -1
                    if time.monotonic() > deadline:
                        self.errors.append(f"cannot read the store after the run: {exc}")
                if pending == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
        finally:
            engine.dispose()
        settled = Settled(pending == 0, round(time.monotonic() - started, 2), pending)
        self.history.add(settled)
        return settled

    def _record_processes(self) -> None:
        for proc in self.system.procs:
            code = proc.popen.poll()
            self.history.add(
                ProcessEnd(
                    name=proc.name,
                    role=_role(proc),
                    pid=proc.pid,
                    killed=proc.pid in self.killed,
                    returncode=code,
                    stderr_tail="" if code is None else _tail(proc.stderr()),
                )
            )

    def _snapshot(self) -> Snapshot:
        snapshot = load_snapshot(self.store_url)
        server = self.server
        if server is None or not server.proc.alive():
            return snapshot
        channel = grpc.insecure_channel(server.address)
        try:
            stub = sgrpc.RealmServiceStub(channel)
            snapshot.index = {
                realm_id: _index_of(stub, realm_id) for realm_id in sorted(snapshot.realms)
            }
        except grpc.RpcError as exc:
            self.errors.append(f"SearchRealm after the run failed: {exc.code()} {exc.details()}")
            snapshot.index = None
        finally:
            channel.close()
        return snapshot

    def _stop_processes(self) -> None:
        """SIGTERM the workers, then the server; each must exit 0."""
        live = [p for p in self.system.procs if p.alive()]
        for proc in sorted(live, key=lambda p: _role(p) == "server"):
            proc.send(signal.SIGTERM)
            try:
                code: int | None = proc.popen.wait(timeout=STOP_TIMEOUT)
            except Exception:
                code = None
            self.history.add(
                ProcessStop(
                    proc.name,
                    _role(proc),
                    proc.pid,
                    code,
                    "" if code == 0 else _tail(proc.stderr()),
                )
            )

    def _record_tracebacks(self) -> None:
        for proc in self.system.procs:
            for text in _tracebacks(proc.stderr()):
                self.history.add(LogTraceback(proc.name, _role(proc), text))

    def _figures(
        self, workload: Workload, snapshot: Snapshot, settled: Settled, seconds: float
    ) -> dict[str, object]:
        w = workload.figures()
        outcomes = Counter(a.outcome for a in snapshot.attempts)
        calls = [e for e in self.history.entries if isinstance(e, Call)]
        return {
            "seconds": round(seconds, 1),
            "injections": self.injected,
            "ops": w.ops,
            "calls": w.calls,
            "acked_calls": w.acknowledged,
            # Attempts without a definite answer; their operations were retried.
            "ambiguous_calls": sum(1 for c in calls if c.outcome is Outcome.AMBIGUOUS),
            "ambiguous_ops": w.ambiguous_ops,
            "refused_ops": w.refused_ops,
            "realms": len(snapshot.realms),
            "jobs": len(snapshot.jobs),
            "attempts": dict(sorted(outcomes.items())),
            "settled": f"{settled.seconds}s" if settled.all_terminal else "NO",
        }


def _role(proc: Proc) -> str:
    return "server" if proc.name.startswith("server") else "worker"


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):$", re.MULTILINE)


def _unfold_exc(log: str) -> str:
    """The log with each record's `exc` field (a traceback, kept on the
    record's one line by the log format) written out below the record, as
    a traceback printed to stderr would be."""
    out = []
    for line in log.splitlines():
        exc = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                exc = json.loads(line).get("exc")
        elif " exc=" in line:
            exc = parse_logfmt(line).get("exc")
        out.append(line)
        if exc:
            out.append(exc)
    return "\n".join(out)


def _tracebacks(log: str, limit: int = 5) -> list[str]:
    """Each distinct traceback in a log (by its last line), with the log line
    before it and how often it came."""
    seen: Counter[str] = Counter()
    texts: dict[str, str] = {}
    log = _unfold_exc(log)
    lines = log.splitlines()
    for match in _TRACEBACK.finditer(log):
        start = log.count("\n", 0, match.start())
        end = start + 1
        while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end]):
            end += 1
        # Chained exceptions continue after a blank line and a sentence.
        last = lines[end] if end < len(lines) else ""
        seen[last] += 1
        if last not in texts:
            before = lines[start - 1] if start > 0 else ""
            frames = lines[start:end]
            if len(frames) > 9:
                frames = [frames[0], "  ...", *frames[-8:]]
            texts[last] = "\n".join([before, *frames, last])
    return [
        f"{texts[last]}\n(seen {n} time{'s' if n > 1 else ''})"
        for last, n in list(seen.items())[:limit]
    ]


def _index_of(stub: sgrpc.RealmServiceStub, realm_id: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    token = ""
    for _ in range(1000):
        page = stub.SearchRealm(
            spb.SearchRealmRequest(realm_id=realm_id, page_size=1000, page_token=token),
            timeout=RPC_TIMEOUT,
        )
        entries.update((e.path, e.sha256) for e in page.entries)
        token = page.next_page_token
        if not token:
            break
    return entries
