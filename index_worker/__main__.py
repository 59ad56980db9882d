"""Entry point: `index-worker --server HOST:PORT` or `python -m index_worker`.

Exit status: 0 after a stop on SIGTERM/SIGINT, 1 when the server refuses the
worker (bad token, wrong role, protocol error) or the worker itself fails,
2 for bad settings, 4 when `--metrics-listen` cannot be bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from index_worker.config import ConfigError, load_config
from realm_common import tracing
from realm_common.logs import configure_logging

logger = logging.getLogger("index_worker")

EXIT_BAD_CONFIG = 2
EXIT_FAILED = 1
EXIT_LISTEN = 4


class _CannotListen(Exception):
    """The metrics address is taken or not this host's."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while still starting, before the signal handlers are in
        # place (a terminal sends it to every process of `realm-service dev`):
        # a stop like any other, not a failure.
        return 0


def _main(argv: Sequence[str] | None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"index-worker: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    configure_logging(config.log_level, json_lines=config.log_json)
    # grpc's C core logs reconnects on its own; our log lines already say it.
    # Read when grpc is first imported, hence the late import below.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from index_worker.runner import Worker, run_until_signalled

    if config.noop_for_benchmarks:
        logger.warning("noop mode: jobs succeed without indexing; for benchmarks only")

    async def run() -> int:
        worker = Worker(config)
        web = None
        if config.metrics_listen:
            from index_worker.metrics import REGISTRY
            from realm_common.metrics_http import MetricsServer

            try:
                web = MetricsServer(config.metrics_listen, REGISTRY, worker.healthy)
            except OSError as exc:
                raise _CannotListen(f"--metrics-listen {config.metrics_listen}: {exc}") from exc
            logger.info("metrics", extra={"url": web.url, "worker": config.worker_id})
        try:
            return await run_until_signalled(worker)
        finally:
            if web is not None:
                web.close()

    tracing.configure("index-worker")
    try:
        return asyncio.run(run())
    except _CannotListen as exc:  # the metrics address is taken or not ours
        logger.error("cannot start", extra={"error": str(exc), "exit_code": EXIT_LISTEN})
        return EXIT_LISTEN
    except Exception:
        logger.exception("worker failed")
        return EXIT_FAILED
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    sys.exit(main())
