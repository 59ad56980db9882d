"""CreateRealm against the echo, with more samples than `pair_bench.py --only
create`: one server of this tree on PostgreSQL, N creates each followed by a
Health.Check, then N creates back to back for the server's CPU a create.
For A/B runs of two trees (each on PYTHONPATH in turn), alternating.

    .venv/bin/python bench/create_loop.py --pg-url postgresql://... [-n 1500]
        [--py-spy FILE]   # raw stacks of the server over the timed part
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pair_bench as pb

WARM_UP = 50


async def main(args: argparse.Namespace) -> None:
    cfg = pb.Config(store="postgresql", quick=False, pg_url=args.pg_url, log_level="INFO")
    with tempfile.TemporaryDirectory() as d, pb.Pair(cfg, Path(d), "create-loop") as pair:
        pair.start_server()
        channel = grpc.aio.insecure_channel(pair.server.address)
        stub = sgrpc.RealmServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(
                [
                    *(str(pb.BIN / "py-spy"), "record", "--pid", str(pair.server.pid)),
                    *("--format", "raw", "--rate", "1000", "--output", args.py_spy),
                    *("--nonblocking", "--threads"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await asyncio.sleep(1.0)
        creates: list[float] = []
        echoes: list[float] = []
        for i in range(WARM_UP + args.n):
            t0 = time.perf_counter()
            await stub.CreateRealm(spb.CreateRealmRequest(realm_id=f"c-{i:06d}"), timeout=30)
            t1 = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            t2 = time.perf_counter()
            if i >= WARM_UP:
                creates.append(t1 - t0)
                echoes.append(t2 - t1)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        cpu0 = pb.cpu_seconds(pair.server.pid)
        for i in range(args.n):
            await stub.CreateRealm(spb.CreateRealmRequest(realm_id=f"d-{i:06d}"), timeout=30)
        cpu_us = (pb.cpu_seconds(pair.server.pid) - cpu0) / args.n * 1e6
        await channel.close()
    create_ms = statistics.median(creates) * 1000
    echo_ms = statistics.median(echoes) * 1000
    print(
        f"create p50 {create_ms:.3f} ms, echo p50 {echo_ms:.3f} ms, "
        f"ratio {create_ms / echo_ms:.2f}, server CPU a create {cpu_us:.0f} us"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", required=True, help="a PostgreSQL the bench may write to")
    parser.add_argument("-n", type=int, default=1500, help="creates timed (and for the CPU)")
    parser.add_argument("--py-spy", default="", help="record the server's stacks to this file")
    asyncio.run(main(parser.parse_args()))
