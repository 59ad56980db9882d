"""Median time between the stages `sitecustomize.py` stamped, per enqueue.

    python bench/stages/report.py DIR [--first N]

Each ReindexRealm call is one sequence from its handler's start; only
sequences with every stage count (an enqueue that handed off no job has no
`settle`). `--first N` keeps the first N (the one-stream wake-ups of
`pair_bench.py --only wakeup` come first: 10 to warm up and its samples).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

# In the order one enqueue passes them; `statement` is the first statement's
# (the insert's), `statement_end` its return.
STAGES = (
    "handler",
    "thread",
    "statement",
    "statement_end",
    "inserted",
    "claimed",
    "thread_end",
    "settle",
    "delivered",
    "reply",
)


def sequences(folder: Path) -> list[dict[str, float]]:
    records = []
    for path in folder.glob("stages-*.jsonl"):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    records.sort(key=lambda r: r[1])
    out: list[dict[str, float]] = []
    for stage, at in records:
        if stage == "handler":
            out.append({})
        if out and stage not in out[-1]:
            out[-1][stage] = at
    return [s for s in out if all(stage in s for stage in STAGES)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--first", type=int, default=0, help="keep the first N sequences (all)")
    args = p.parse_args()
    seqs = sequences(args.folder)
    if args.first:
        seqs = seqs[: args.first]
    print(f"{len(seqs)} enqueues with a hand-off")
    for a, b in itertools.pairwise(STAGES):
        gaps = [(s[b] - s[a]) * 1e3 for s in seqs]
        print(f"{a:>14} -> {b:<14} p50 {statistics.median(gaps):.3f} ms")
    whole = [(s["delivered"] - s["handler"]) * 1e3 for s in seqs]
    print(f"{'handler':>14} -> {'delivered':<14} p50 {statistics.median(whole):.3f} ms")


if __name__ == "__main__":
    main()
