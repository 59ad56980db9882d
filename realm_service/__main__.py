"""realm-service: serve the RealmService, or run a whole local system.

realm-service [serve] [flags]         the gRPC server
realm-service dev --workers N [flags] a server plus N index workers on SQLite
realm-service migrate [--store URL]   upgrade the store's schema and exit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from realm_service.config import ConfigError, Settings, add_server_arguments, settings_from_args


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"ts={self.formatTime(record)} level={record.levelname} logger={record.name}"
        text = f"{base} msg={record.getMessage()!r}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if settings.log_json else _KeyValueFormatter())
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realm-service", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gRPC server (the default)")
    add_server_arguments(serve)
    dev = sub.add_parser("dev", help="run a server plus index workers locally")
    add_server_arguments(dev)
    dev.add_argument("--workers", type=int, default=2, help="index worker processes (default 2)")
    dev.add_argument(
        "--worker-concurrency", type=int, default=2, help="jobs per worker (default 2)"
    )
    migrate = sub.add_parser("migrate", help="upgrade the store schema and exit")
    add_server_arguments(migrate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as e:
        print(f"realm-service: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if args.command == "migrate":
        from realm_service.store.db import open_database

        open_database(settings.store_url).close()
        print("schema is up to date", flush=True)
        return 0
    if args.command == "dev":
        return _dev(settings, args.workers, args.worker_concurrency, _server_flags(argv[1:]))
    try:
        from realm_service.server import serve

        asyncio.run(serve(settings))
    except OSError as e:
        logging.getLogger(__name__).error("cannot serve: %s", e)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C while still starting, before the signal handlers are in
        # place: nothing is served yet, so there is nothing to drain.
        logging.getLogger(__name__).info("stopped while starting")
    return 0


def _server_flags(dev_argv: list[str]) -> list[str]:
    """dev's arguments without its own: the server flags, as given, for its server."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--workers")
    own.add_argument("--worker-concurrency")
    return own.parse_known_args(dev_argv)[1]


def _dev(settings: Settings, workers: int, concurrency: int, server_flags: list[str]) -> int:
    """A server and N workers as child processes; Ctrl-C stops them all."""
    server_cmd = [
        sys.executable,
        "-m",
        "realm_service",
        "serve",
        *server_flags,
        "--listen",
        settings.listen,
        "--store",
        settings.store_url,
        "--log-level",
        settings.log_level,
    ]
    if settings.metrics_listen:
        server_cmd += ["--metrics-listen", settings.metrics_listen]
    server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    line = ""
    for _ in range(10):  # the address line follows at most a few others
        line = server.stdout.readline()
        if not line or "listening on" in line:
            break
        print(line, end="", flush=True)
    if "listening on" not in line:
        server.wait()
        print("realm-service: the server did not start", file=sys.stderr)
        return 1
    address = line.rsplit(" ", 1)[-1].strip()
    # The workers need what the server asks of them: a token, the certificate to trust.
    worker_env = dict(os.environ)
    tokens = {role: token for token, role in settings.tokens.items()}
    token = tokens.get("worker") or tokens.get("admin")
    if token:
        worker_env["INDEX_WORKER_TOKEN"] = token
    worker_tls = ["--ca-cert", settings.tls_cert] if settings.tls_cert else []
    procs: list[subprocess.Popen[Any]] = [server]
    for i in range(workers):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "index_worker",
                    "--server",
                    address,
                    "--concurrency",
                    str(concurrency),
                    "--worker-id",
                    f"dev-worker-{i + 1}",
                    *worker_tls,
                ],
                env=worker_env,
            )
        )
    print(
        f"realm-service dev: server on {address} (store {settings.store_url}), "
        f"{workers} index workers; Ctrl-C stops everything",
        flush=True,
    )
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p in reversed(procs):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    return 0 if stopping else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
