"""graphile-worker's idle wake-up split at its enqueue's return, to set beside
pair_bench's wake-up from the enqueue's commit.

The peers' harness (`../shared/peers/`) times graphile-worker's wake-up from
before its `addJob` call to the task's start. The wake-up target of the job
hot path is counted from the enqueue's commit, so this script repeats that
part with the enqueue's two ends on record: it calls graphile-worker's own
`add_job` SQL function (what `addJob` runs) in autocommit from Python, stamps
the call's start and its return, and reads the task's start from the Node
worker's record, as the harness does (with its percentiles, `pctl`). The
commit lies between the two stamps,
so `return_to_start` bounds the time from the commit to the task's start from
below, and `call_to_start` from above.

The wall clocks of this process and the Node worker are compared first: a
Node process answers each line read with its clock, and the bracket of the
closest exchange bounds the offset.

Run it on a copy of the peers' folder after its `setup.sh`:

    /tmp/peers/.venv/bin/python bench/peer_wake.py --peers /tmp/peers --samples 50

(the peers' own interpreter, which has psycopg and their helpers)

Network traffic goes to the peers' cluster on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLOCK_JS = (
    "const rl=require('readline').createInterface({input:process.stdin});"
    "rl.on('line',()=>console.log(((performance.timeOrigin+performance.now())/1000).toFixed(6)));"
)


def clock_offset(node: str, rounds: int = 200) -> dict[str, float]:
    """Node's clock minus this process's, bounded by the narrowest exchange."""
    proc = subprocess.Popen(
        [node, "-e", CLOCK_JS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    best: tuple[float, float, float] | None = None
    try:
        for _ in range(rounds):
            sent = time.time()
            proc.stdin.write("x\n")
            proc.stdin.flush()
            theirs = float(proc.stdout.readline())
            back = time.time()
            if best is None or back - sent < best[1] - best[0]:
                best = (sent, back, theirs)
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert best is not None
    sent, back, theirs = best
    # theirs was read between sent and back: offset in [theirs - back, theirs - sent].
    return {"low_ms": (theirs - back) * 1e3, "high_ms": (theirs - sent) * 1e3}


def measure(peers: Path, samples: int) -> dict[str, Any]:
    sys.path.insert(0, str(peers))
    bg: Any = importlib.import_module("bench_graphile")
    psycopg: Any = importlib.import_module("psycopg")
    offset = clock_offset(bg.NODE)
    bg.reset_db()
    workers = bg.Workers(1, 10)
    stamps: dict[str, tuple[float, float]] = {}
    try:
        time.sleep(1.0)
        with psycopg.connect(bg.DSN, autocommit=True) as conn:
            for i in range(samples + 5):
                t0 = time.time()
                key = f"{t0:.6f}"
                row = conn.execute(
                    "SELECT id FROM graphile_worker.add_job("
                    "'noop', json_build_object('t', %s::float8), priority => -10)",
                    (float(key),),
                ).fetchone()
                t1 = time.time()
                if i >= 5:  # the first five warm the connection and the worker
                    stamps[key] = (t0, t1)
                deadline = time.monotonic() + 30
                while conn.execute(
                    "SELECT 1 FROM graphile_worker._private_jobs WHERE id = %s", (row[0],)
                ).fetchone():
                    if time.monotonic() > deadline:
                        raise RuntimeError("graphile-worker did not run the job in 30 s")
                    time.sleep(0.002)
                time.sleep(0.05 + random.random() * 0.1)
    finally:
        recs = workers.stop()
    call_to_start: list[float] = []
    return_to_start: list[float] = []
    round_trip: list[float] = []
    for start, t in recs:
        if t is None or f"{t:.6f}" not in stamps:
            continue
        t0, t1 = stamps[f"{t:.6f}"]
        call_to_start.append((start - t0) * 1e3)
        return_to_start.append((start - t1) * 1e3)
        round_trip.append((t1 - t0) * 1e3)
    if len(call_to_start) != samples:
        raise RuntimeError(f"matched {len(call_to_start)} of {samples} samples")
    return {
        "item": "graphile_wakeup_split",
        "samples": samples,
        "call_to_start_p50_ms": round(bg.pctl(call_to_start, 50), 3),
        "return_to_start_p50_ms": round(bg.pctl(return_to_start, 50), 3),
        "return_to_start_p99_ms": round(bg.pctl(return_to_start, 99), 3),
        "add_job_round_trip_p50_ms": round(bg.pctl(round_trip, 50), 3),
        "clock_offset_ms": {k: round(v, 3) for k, v in offset.items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=Path, required=True, help="a set-up copy of ../shared/peers")
    p.add_argument("--samples", type=int, default=50, help="measured wake-ups (50)")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.peers.resolve(), args.samples)), flush=True)


if __name__ == "__main__":
    main()
