"""realm-service: serve the RealmService, or run a whole local system.

realm-service [serve] [flags]         the gRPC server
realm-service dev --workers N [flags] a server plus N index workers on SQLite
realm-service migrate [--store URL]   upgrade the store's schema and exit
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from realm_common import tracing
from realm_common.logs import configure_logging
from realm_common.settings import ConfigError, Option, Options, int_in
from realm_service.config import Settings, add_server_arguments, settings_from_args
from realm_service.errors import RealmError

# Exit statuses (docs/OPERATIONS.md, "Exit statuses").
EXIT_OK = 0
EXIT_FAILED = 1  # failed while running
EXIT_BAD_SETTING = 2  # a flag or variable has a bad value; nothing was started
EXIT_STORE = 3  # the store could not be opened or upgraded
EXIT_LISTEN = 4  # an address to listen on is taken or not ours

DEV_OPTIONS = Options(
    "REALM_",
    [
        Option("workers", int_in(0, 64), 2, "index worker processes"),
        Option("worker_concurrency", int_in(1, 1000), 2, "jobs per worker"),
    ],
)

DEV_WEB_PORT = 8080  # dev serves the web console unless --web-listen says where

log = logging.getLogger("realm_service")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realm-service", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gRPC server (the default)")
    add_server_arguments(serve)
    dev = sub.add_parser("dev", help="run a server plus index workers locally")
    add_server_arguments(dev)
    DEV_OPTIONS.add_arguments(dev)
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
        dev = DEV_OPTIONS.resolve(args) if args.command == "dev" else {}
    except ConfigError as e:
        print(f"realm-service: error: {e}", file=sys.stderr)
        return EXIT_BAD_SETTING
    configure_logging(settings.log_level, json_lines=settings.log_json)
    if args.command == "dev":
        return _dev(settings, dev["workers"], dev["worker_concurrency"], _server_flags(argv[1:]))
    tracing.configure("realm-service")
    try:
        if args.command == "migrate":
            from realm_service.store.db import open_database

            open_database(settings.store_url).close()
            print("schema is up to date", flush=True)
            return EXIT_OK
        from realm_service.server import serve

        asyncio.run(serve(settings))
    except (RealmError, ImportError) as e:
        if isinstance(e, ImportError) and not (e.name or "").startswith("psycopg"):
            raise  # not the store's driver: a bug, with its traceback
        _cannot_start(EXIT_STORE, "--store/REALM_STORE_URL", _store_problem(e, settings.store_url))
        return EXIT_STORE
    except OSError as e:
        _cannot_start(EXIT_LISTEN, "--listen/--metrics-listen/--web-listen", str(e))
        return EXIT_LISTEN
    except KeyboardInterrupt:
        # Ctrl-C while still starting, before the signal handlers are in
        # place: nothing is served yet, so there is nothing to drain.
        log.info("stopped while starting")
    finally:
        tracing.shutdown()
    return EXIT_OK


def _cannot_start(code: int, setting: str, problem: str) -> None:
    log.error("cannot start", extra={"setting": setting, "error": problem, "exit_code": code})


def _store_problem(error: BaseException, url: str) -> str:
    """The store's error with its first cause: the driver's own first line
    says what was wrong (refused, no such host, bad password)."""
    where = re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)  # no password in a log
    if isinstance(error, ImportError):
        return f"{where}: {error.name} is not installed; install realm-service[postgres]"
    deepest = error
    while deepest.__cause__ is not None:
        deepest = deepest.__cause__
    lines = str(getattr(deepest, "orig", None) or deepest).strip().splitlines()
    detail = lines[0] if lines else ""
    return f"{where}: {error}" + (f": {detail}" if detail and detail not in str(error) else "")


def _server_flags(dev_argv: list[str]) -> list[str]:
    """dev's arguments without its own: the server flags, as given, for its server."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--workers")
    own.add_argument("--worker-concurrency")
    return own.parse_known_args(dev_argv)[1]


def _dev_web_listen(listen: str) -> str:
    """dev's console: on --listen's host, port 8080, or any free port when
    --listen asks for one (so that several dev systems can run at once)."""
    host, _, port = listen.rpartition(":")
    return f"{host}:{'0' if port == '0' else DEV_WEB_PORT}"


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
    log_flags = ["--log-level", settings.log_level, *(["--log-json"] if settings.log_json else [])]
    if settings.log_json and "--log-json" not in server_cmd:
        server_cmd.append("--log-json")
    if settings.metrics_listen:
        server_cmd += ["--metrics-listen", settings.metrics_listen]
    server_cmd += ["--web-listen", settings.web_listen or _dev_web_listen(settings.listen)]
    server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    line = ""
    console = ""
    for _ in range(10):  # the address line follows at most a few others
        line = server.stdout.readline()
        if not line or "listening on" in line:
            break
        if "web console on" in line:
            console = line.rsplit(" ", 1)[-1].strip()
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
                    *log_flags,
                ],
                env=worker_env,
            )
        )
    print(
        f"realm-service dev: server on {address} (store {settings.store_url}), "
        f"{workers} index workers; Ctrl-C stops everything",
        flush=True,
    )
    if console:
        print(f"realm-service dev: web console on {console}", flush=True)
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
