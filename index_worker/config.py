"""Settings of a worker process, read once from flags and INDEX_WORKER_* variables.

A flag wins over its variable, which wins over the default. Every value is
checked here, so a typo stops the process at start with the name of the flag
or variable at fault instead of surfacing later as a confusing stream error.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from index_worker.model import JobKind
from realm_common.settings import (
    ConfigError,
    Option,
    Options,
    boolean,
    int_in,
    log_options,
    non_empty,
    non_negative_float,
    optional_text,
    positive_float,
    text,
)

ENV_PREFIX = "INDEX_WORKER_"

__all__ = ["ConfigError", "WorkerConfig", "build_parser", "load_config"]


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker needs to know; durations are in seconds."""

    server: str
    token: str | None = None
    concurrency: int = 2
    min_priority: int | None = None
    # Empty means every kind the server has.
    kinds: tuple[JobKind, ...] = ()
    worker_id: str = ""
    reconnect_backoff_base: float = 0.1
    reconnect_backoff_max: float = 5.0
    batch_size: int = 500
    files_per_second: float = 0.0
    drain_timeout: float = 30.0
    rpc_timeout: float = 30.0
    # Probe the stream after this much silence; declare it dead when the probe
    # is not answered within ping_timeout.
    ping_interval: float = 15.0
    ping_timeout: float = 10.0
    noop_for_benchmarks: bool = False
    metrics_listen: str = ""
    log_level: str = "INFO"
    log_json: bool = False
    # TLS to the server: on when tls is set or a CA file is given.
    tls: bool = False
    ca_cert: str | None = None

    def __post_init__(self) -> None:
        if not self.worker_id:
            object.__setattr__(self, "worker_id", default_worker_id())


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _kinds(value: str) -> tuple[JobKind, ...]:
    names = [part.strip().lower() for part in value.split(",") if part.strip()]
    kinds: list[JobKind] = []
    for name in names:
        try:
            kind = JobKind(name)
        except ValueError:
            allowed = ", ".join(k.value for k in JobKind)
            raise ValueError(f"unknown job kind {name!r}; expected {allowed}") from None
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


OPTIONS = Options(
    ENV_PREFIX,
    [
        Option("server", non_empty, "", "address of the realm service, HOST:PORT (required)"),
        Option("token", optional_text, None,
               "bearer token sent on every call (prefer the variable: ps shows flags)"),
        Option("concurrency", int_in(1, 1000), 2, "jobs run at once"),
        Option("min_priority", int_in(0, 100), None,
               "only take jobs of at least this priority (0-100)"),
        Option("kinds", _kinds, (), "job kinds to take: from-scratch, incremental (default all)",
               several=True),
        Option("worker_id", non_empty, "", "stable name of this worker (default HOSTNAME-PID)"),
        Option("reconnect_backoff_base", positive_float, 0.1,
               "first reconnect delay in seconds"),
        Option("reconnect_backoff_max", positive_float, 5.0, "longest reconnect delay in seconds"),
        Option("batch_size", int_in(1, 1000), 500, "index entries per upload message, 1-1000"),
        Option("files_per_second", non_negative_float, 0.0,
               "most files a job reads per second, to spare a busy server; 0 is no limit"),
        Option("drain_timeout", non_negative_float, 30.0, "seconds to finish jobs on SIGTERM"),
        Option("rpc_timeout", positive_float, 30.0, "deadline of file RPCs in seconds"),
        Option("ping_interval", positive_float, 15.0,
               "seconds of stream silence before a probe"),
        Option("ping_timeout", positive_float, 10.0, "seconds to wait for a probe's answer"),
        Option("noop_for_benchmarks", boolean, False,
               "report every job as succeeded without indexing (benchmarks only)", switch=True),
        Option("metrics_listen", text, "",
               "host:port for this worker's /metrics and /healthz; empty disables"),
        *log_options(),
        Option("tls", boolean, False, "connect with TLS (system roots)", switch=True),
        Option("ca_cert", optional_text, None,
               "PEM file of the CA that signed the server (implies --tls)"),
    ],
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The CLI; unset flags fall back to the environment, then the default."""
    p = argparse.ArgumentParser(
        prog="index-worker",
        description="Pull index jobs from a realm service over ClaimJobs and build realm indexes.",
        epilog=f"Every flag can also be set as an {ENV_PREFIX}<NAME> environment variable "
        f"(e.g. {ENV_PREFIX}SERVER, {ENV_PREFIX}TOKEN, {ENV_PREFIX}CONCURRENCY).",
    )
    OPTIONS.add_arguments(p)
    return p


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    """Parse flags and environment; raises ConfigError naming the bad setting.

    argparse itself exits with status 2 on unknown flags or --help.
    """
    args = build_parser().parse_args(argv)
    v = OPTIONS.resolve(args, environ)
    if not v["server"]:
        raise ConfigError(f"--server or {ENV_PREFIX}SERVER: required (HOST:PORT)")
    if v["reconnect_backoff_max"] < v["reconnect_backoff_base"]:
        raise ConfigError(
            f"{OPTIONS.describe('reconnect_backoff_max')}: backoff max "
            f"{v['reconnect_backoff_max']} is below the backoff base {v['reconnect_backoff_base']}"
        )
    ca_cert = v["ca_cert"]
    if ca_cert is not None and not os.path.isfile(ca_cert):
        raise ConfigError(f"--ca-cert or {ENV_PREFIX}CA_CERT: no such file (got {ca_cert!r})")
    v["tls"] = v["tls"] or ca_cert is not None
    return WorkerConfig(**v)
