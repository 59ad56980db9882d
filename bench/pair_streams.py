"""Hold many idle ClaimJobs streams open on one server, from their own process.

    python bench/pair_streams.py --server 127.0.0.1:PORT --streams 1000 --channels 10

Each stream says hello, grants `--credits` credits (an idle worker waiting for
work), answers pings and completes at once any job it is given. Prints
`ready N` on stdout once every stream has its settings, then holds them until
stdin closes or SIGTERM arrives, and exits after closing them.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
from pair_client import BenchStream


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--channels", type=int, default=10)
    p.add_argument("--credits", type=int, default=1)
    args = p.parse_args()

    channels = [
        grpc.aio.insecure_channel(
            args.server,
            # Distinct channels get distinct connections (no subchannel sharing).
            options=[("grpc.use_local_subchannel_pool", 1), ("bench.channel", i)],
        )
        for i in range(args.channels)
    ]
    streams = [
        BenchStream(channels[i % len(channels)], f"idle-{i:04d}", credits=args.credits)
        for i in range(args.streams)
    ]
    for start in range(0, len(streams), 100):
        await asyncio.gather(*(s.open() for s in streams[start : start + 100]))
    print(f"ready {len(streams)}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)
    await stop.wait()
    await asyncio.gather(*(s.close(timeout=2.0) for s in streams))
    for channel in channels:
        await channel.close()
    completed = sum(s.completed for s in streams)
    print(f"closed completed={completed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
