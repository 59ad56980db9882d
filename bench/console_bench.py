"""What the web console costs the server: the throughput drain of
`pair_bench.py` (queued no-op SYSTEM jobs, real `index-worker` processes)
with the console on, once with no page open and once with ten open
overview pages, side by side in one run.

    .venv/bin/python bench/console_bench.py --store sqlite
    .venv/bin/python bench/console_bench.py --store sqlite --quick     # seconds

A page is what a browser keeps open after loading the overview: one GET of
the page, then its server-sent-events stream (`/live/`), read to the end.
The figures are the server process's CPU seconds over the drain, per second
of drain, and the drain's rate (see bench/README.md, "Web console").
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from pair_bench import (
    SYSTEM,
    Config,
    Pair,
    cpu_seconds,
    emit,
    log,
    postgres_cpu_seconds,
    steady_rate,
)
from pair_proc import Workdir, remaining_jobs, seed_jobs, seed_realms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Pages:
    """`count` open overview pages, in a thread of their own with its own loop."""

    def __init__(self, url: str, count: int) -> None:
        self.url, self.count = url, count
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Pages:
        if self.count:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.count:
            self._thread.join(30)

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(self._page(session)) for _ in range(self.count)]
            while not self._stop.is_set():
                await asyncio.sleep(0.1)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _page(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.url) as page:
            await page.read()
        async with session.get(self.url + "live/") as live:
            async for line in live.content:
                if line.startswith(b"data:"):
                    self.events += 1


def drain(cfg: Config, workdir: Path, pages: int) -> dict[str, Any]:
    label = f"console{pages}"
    port = free_port()
    web = ("--web-listen", f"127.0.0.1:{port}")
    with Pair(cfg, workdir, label, extra=web) as pair:
        ids = [f"{label}-{i:06d}" for i in range(cfg.jobs)]
        seed_realms(pair.store, ids)
        seed_jobs(pair.store, ids, priority=SYSTEM)
        pair.start_server()
        conn = pair.store.connect()
        with Pages(f"http://127.0.0.1:{port}/", pages) as open_pages:
            time.sleep(2.0)  # the pages are open before the drain starts
            cpu0 = cpu_seconds(pair.server.pid)
            pg0 = postgres_cpu_seconds()
            t_spawn = time.perf_counter()
            workers = [
                pair.add_worker(f"w{i}", concurrency=cfg.worker_concurrency, noop=True)
                for i in range(2)
            ]
            samples: list[tuple[float, int]] = []
            deadline = t_spawn + cfg.drain_limit_s
            while True:
                remaining = remaining_jobs(conn)
                now = time.perf_counter()
                samples.append((now, remaining))
                if remaining == 0 or now > deadline:
                    break
                time.sleep(0.1)
            server_cpu = cpu_seconds(pair.server.pid) - cpu0
            pg_cpu = postgres_cpu_seconds() - pg0 if cfg.store == "postgresql" else 0.0
            events = open_pages.events
        worker_cpu = sum(cpu_seconds(w.pid) for w in workers)
        conn.close()
    rate, _ = steady_rate(samples, cfg.jobs)
    span = samples[-1][0] - t_spawn
    return {
        "item": "console_drain",
        "store": cfg.store,
        "pages": pages,
        "jobs": cfg.jobs,
        "jobs_per_s": round(rate, 1),
        "drain_s": round(span, 2),
        "drained": samples[-1][1] == 0,
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_per_drain_s": round(server_cpu / span, 3) if span else 0.0,
        "workers_cpu_s": round(worker_cpu, 2),
        "postgres_cpu_s": round(pg_cpu, 2),
        "page_events": events,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--quick", action="store_true", help="1,000 jobs instead of 50,000")
    p.add_argument("--jobs", type=int, help="jobs to drain (50,000)")
    p.add_argument("--pages", type=int, default=10, help="open overview pages (10)")
    p.add_argument("--log-level", default="INFO", help="server and worker log level (INFO)")
    args = p.parse_args(argv)
    from pair_proc import env_pg_url

    common = {"store": args.store, "pg_url": env_pg_url(), "log_level": args.log_level}
    cfg = Config.quick_config(**common) if args.quick else Config(quick=False, **common)
    if args.jobs:
        cfg.jobs = args.jobs
    work = Workdir()
    try:
        results = [drain(cfg, work.path, 0), drain(cfg, work.path, args.pages)]
    finally:
        work.cleanup()
    for r in results:
        emit(r)
        log(
            f"{r['pages']} pages: {r['jobs_per_s']} jobs/s, server CPU {r['server_cpu_s']} s "
            f"over {r['drain_s']} s ({r['server_cpu_per_drain_s']} CPU s/s), "
            f"PostgreSQL CPU {r['postgres_cpu_s']} s, "
            f"{r['page_events']} page updates"
        )
    idle, watched = results
    extra = watched["server_cpu_s"] - idle["server_cpu_s"]
    print(
        f"\nten open pages: server CPU {watched['server_cpu_s']} s vs {idle['server_cpu_s']} s "
        f"with none ({extra:+.2f} s over the drain); "
        f"{watched['jobs_per_s']} vs {idle['jobs_per_s']} jobs/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
