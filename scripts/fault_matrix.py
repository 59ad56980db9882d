"""The long fault matrix: N runs cycling through every (fault, store) pair,
each S seconds of workload with the fault striking about every 10 seconds,
each checked by the history checker (tests/faults/checker.py).

Usage:
    .venv/bin/python scripts/fault_matrix.py --runs 20 --seconds 40
    .venv/bin/python scripts/fault_matrix.py --runs 3 --faults server-kill --stores postgresql

Prints one line per run as it ends, then a table per (fault, store): runs,
fault injections, client operations and calls, ambiguous operations, jobs,
attempts, and violations by kind, and every violation with its details.
Exits 1 when a run found a violation or the harness failed. The directories
of failed runs (history.jsonl and the process logs) are kept and printed;
`--markdown` prints the table for docs/RELIABILITY.md.

Everything stays on loopback: the server, workers, the proxy and a private
PostgreSQL cluster (initdb in a temporary directory) that the script creates
and removes.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Put first only when PYTHONPATH does not name it already: with
# PYTHONPATH=OTHER_SOURCE:ROOT, the checker reads the tables of the code under
# test (see docs/RELIABILITY.md, "Checking the checker").
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.faults import disk  # noqa: E402
from tests.faults.driver import Fault, FaultRun, RunConfig, RunResult  # noqa: E402
from tests.faults.pgcluster import PgCluster, find_pg_bin  # noqa: E402

MATRIX: list[tuple[Fault, str]] = [
    (Fault.SERVER_KILL, "sqlite"),
    (Fault.SERVER_KILL, "postgresql"),
    (Fault.WORKER_KILL, "sqlite"),
    (Fault.WORKER_KILL, "postgresql"),
    (Fault.PG_STOP, "postgresql"),
    (Fault.PROXY_CUT, "sqlite"),
    (Fault.PROXY_STALL, "postgresql"),
    (Fault.DISK_FULL, "sqlite"),
    (Fault.POISON, "sqlite"),
    (Fault.POISON, "postgresql"),
    (Fault.NONE, "sqlite"),
]


@dataclass
class Row:
    runs: int = 0
    failed_runs: int = 0
    injections: int = 0
    ops: int = 0
    calls: int = 0
    ambiguous_calls: int = 0
    ambiguous: int = 0
    jobs: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=len(MATRIX), help="runs in all (default: one each)")
    p.add_argument("--seconds", type=float, default=30.0, help="workload seconds per run (30)")
    p.add_argument("--settle", type=float, default=60.0, help="seconds for jobs to end (60)")
    p.add_argument("--faults", help="comma-separated faults to run (default: all)")
    p.add_argument("--stores", help="comma-separated stores: sqlite,postgresql (default: both)")
    p.add_argument("--seed", type=int, default=1, help="seed of the first run (1)")
    p.add_argument("--keep", action="store_true", help="keep the directories of passing runs")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    if args.runs < 1 or args.seconds <= 0 or args.settle <= 0:
        p.error("--runs, --seconds and --settle must be positive")
    return args


def selected(args: argparse.Namespace) -> list[tuple[Fault, str]]:
    faults = {Fault(f.strip()) for f in args.faults.split(",")} if args.faults else set(Fault)
    stores = set(args.stores.split(",")) if args.stores else {"sqlite", "postgresql"}
    pairs = [(f, s) for f, s in MATRIX if f in faults and s in stores]
    if Fault.DISK_FULL in faults and (reason := disk.probe()) is not None:
        print(f"skipping disk-full: {reason}", file=sys.stderr)
        pairs = [(f, s) for f, s in pairs if f is not Fault.DISK_FULL]
    if not pairs:
        raise SystemExit("no (fault, store) pair selected")
    return pairs


@contextlib.contextmanager
def cluster_if_needed(pairs: list[tuple[Fault, str]]) -> Iterator[PgCluster | None]:
    if not any(store == "postgresql" for _, store in pairs):
        yield None
        return
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL runs need initdb and pg_ctl; use --stores sqlite without them")
    cluster = PgCluster(bin_dir)
    try:
        cluster.init().start()
        yield cluster
    finally:
        cluster.destroy()


def run_one(config: RunConfig, work_dir: Path, pg: PgCluster | None) -> RunResult:
    try:
        with FaultRun(config, work_dir, pg) as run:
            return run.execute()
    except Exception:
        return RunResult(
            config,
            [],
            {},
            work_dir / "history.jsonl",
            work_dir / "logs",
            [f"the run failed:\n{traceback.format_exc()}"],
        )


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so the runs' cleanup (processes, mounts,
    # the PostgreSQL cluster) still happens.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args(argv)
    pairs = selected(args)
    injections = max(1, round(args.seconds / 10))
    rows: dict[tuple[str, str], Row] = defaultdict(Row)
    failures: list[RunResult] = []
    root = Path(tempfile.mkdtemp(prefix="realm-fault-matrix-"))
    started = time.monotonic()
    with cluster_if_needed(pairs) as pg:
        for i in range(args.runs):
            fault, store = pairs[i % len(pairs)]
            config = RunConfig(
                fault,
                store,
                seconds=args.seconds,
                settle_seconds=args.settle,
                seed=args.seed + i,
                injections=injections,
            )
            work_dir = root / f"{i:03d}-{config.name}"
            result = run_one(config, work_dir, pg)
            row = rows[(fault.value, store)]
            row.runs += 1
            row.injections += int(str(result.figures.get("injections", 0)))
            row.ops += int(str(result.figures.get("ops", 0)))
            row.calls += int(str(result.figures.get("calls", 0)))
            row.ambiguous_calls += int(str(result.figures.get("ambiguous_calls", 0)))
            row.ambiguous += int(str(result.figures.get("ambiguous_ops", 0)))
            row.jobs += int(str(result.figures.get("jobs", 0)))
            attempts = result.figures.get("attempts", {})
            if isinstance(attempts, dict):
                row.attempts.update(attempts)
            row.violations.update(v.kind for v in result.violations)
            if result.harness_errors:
                row.violations["harness-error"] += len(result.harness_errors)
            row.seconds += float(str(result.figures.get("seconds", 0.0)))
            verdict = "ok" if result.ok else "VIOLATIONS"
            print(f"run {i + 1}/{args.runs} {verdict}: {result.report(limit=0)}", flush=True)
            if result.ok:
                if not args.keep:
                    shutil.rmtree(work_dir, ignore_errors=True)
            else:
                row.failed_runs += 1
                failures.append(result)
    elapsed = time.monotonic() - started
    print()
    print(table(rows, markdown=args.markdown))
    total_violations = sum(sum(r.violations.values()) for r in rows.values())
    print(
        f"\n{args.runs} runs, {sum(r.injections for r in rows.values())} faults injected, "
        f"{sum(r.ops for r in rows.values())} operations, {total_violations} violations, "
        f"{elapsed / 60:.1f} min"
    )
    for result in failures:
        print("\n" + result.report(limit=100))
    if not failures and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


def table(rows: dict[tuple[str, str], Row], *, markdown: bool) -> str:
    header = [
        "fault", "store", "runs", "faults", "ops", "calls", "ambiguous calls",
        "ambiguous ops", "jobs", "attempts", "violations",
    ]  # fmt: skip
    lines = []
    for (fault, store), r in rows.items():
        attempts = " ".join(f"{k}:{n}" for k, n in sorted(r.attempts.items()))
        violations = ", ".join(f"{k} x{n}" for k, n in r.violations.most_common()) or "none"
        lines.append(
            [
                fault, store, str(r.runs), str(r.injections), str(r.ops), str(r.calls),
                str(r.ambiguous_calls), str(r.ambiguous), str(r.jobs), attempts, violations,
            ]
        )  # fmt: skip
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
        for line in [header, *lines]
    )


if __name__ == "__main__":
    sys.exit(main())
