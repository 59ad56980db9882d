"""What realm_client adds to a call: GetJob through `RealmClient` next to the raw
generated stub, and `AsyncRealmClient` next to the raw grpc.aio stub, against
one real `realm-service` process on loopback, in the same run.

    .venv/bin/python bench/client_bench.py                  # ~1 min
    .venv/bin/python bench/client_bench.py --quick          # a few seconds

Each round calls every variant once, in a shuffled order, so drift of the
machine falls on all alike. The raw stubs run on a plain channel with the same
deadline; the clients on their own channel (retry policy, request id and
metadata, error translation). One JSON line per result on stdout, a table at
the end; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from pair_proc import Workdir, bench_store, env_pg_url, log, start_server
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm_client import AsyncRealmClient, RealmClient

TIMEOUT = 30.0
WARMUP = 50


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50_us": round(statistics.median(ordered) * 1e6, 1),
        "p90_us": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e6, 1),
        "mean_us": round(statistics.fmean(ordered) * 1e6, 1),
    }


def sync_rounds(address: str, job_id: str, samples: int) -> dict[str, list[float]]:
    channel = grpc.insecure_channel(address)
    stub = sgrpc.RealmServiceStub(channel)
    request = spb.GetJobRequest(job_id=job_id)
    with RealmClient(address, timeout=TIMEOUT) as client:
        calls: dict[str, Callable[[], object]] = {
            "stub": lambda: stub.GetJob(request, timeout=TIMEOUT),
            "RealmClient": lambda: client.get_job(job_id),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for i in range(WARMUP + samples):
            order = list(calls)
            random.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                calls[name]()
                if i >= WARMUP:
                    times[name].append(time.perf_counter() - t0)
    channel.close()
    return times


async def async_rounds(address: str, job_id: str, samples: int) -> dict[str, list[float]]:
    channel = grpc.aio.insecure_channel(address)
    stub = sgrpc.RealmServiceStub(channel)
    request = spb.GetJobRequest(job_id=job_id)
    async with AsyncRealmClient(address, timeout=TIMEOUT) as client:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "aio stub": lambda: stub.GetJob(request, timeout=TIMEOUT),
            "AsyncRealmClient": lambda: client.get_job(job_id),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for i in range(WARMUP + samples):
            order = list(calls)
            random.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                await calls[name]()
                if i >= WARMUP:
                    times[name].append(time.perf_counter() - t0)
    await channel.close()
    return times


def compare(item: str, raw: str, client: str, times: dict[str, list[float]]) -> dict[str, Any]:
    s = {name: summary(values) for name, values in times.items()}
    overhead = s[client]["p50_us"] / s[raw]["p50_us"] - 1
    return {
        "item": item,
        raw: s[raw],
        client: s[client],
        "overhead_p50_us": round(s[client]["p50_us"] - s[raw]["p50_us"], 1),
        "overhead_p50_pct": round(100 * overhead, 1),
        "target": "client p50 <= 1.10 x raw stub p50",
        "met": overhead <= 0.10,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="realm_client's per-call overhead on GetJob.")
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--pg-url", default=env_pg_url())
    p.add_argument("--samples", type=int, default=3000, help="calls per variant (3000)")
    p.add_argument("--quick", action="store_true", help="300 calls per variant")
    args = p.parse_args(argv)
    samples = 300 if args.quick else args.samples
    work = Workdir()
    results = []
    try:
        with bench_store(args.store, work.path, "client", args.pg_url) as store:
            server = start_server(store, work.path, "client", log_level="WARNING")
            try:
                with RealmClient(server.address) as client:
                    job_id = client.create_realm("bench").job.job_id
                log(f"client: {samples} GetJob calls per variant at {server.address}")
                sync = sync_rounds(server.address, job_id, samples)
                results.append(compare("client_overhead_sync", "stub", "RealmClient", sync))
                aio = asyncio.run(async_rounds(server.address, job_id, samples))
                results.append(
                    compare("client_overhead_async", "aio stub", "AsyncRealmClient", aio)
                )
            finally:
                server.stop()
    finally:
        work.cleanup()
    for record in results:
        print(json.dumps({"store": args.store, **record}), flush=True)
    print()
    print(f"{'GetJob':<22}{'p50 us':>10}{'p90 us':>10}{'mean us':>10}")
    for record in results:
        for name, value in record.items():
            if isinstance(value, dict):
                print(f"{name:<22}{value['p50_us']:>10}{value['p90_us']:>10}{value['mean_us']:>10}")
        print(
            f"{'  overhead p50':<22}{record['overhead_p50_us']:>10} ({record['overhead_p50_pct']}%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
