"""Settings of a worker process, read once from flags and INDEX_WORKER_* variables.

A flag wins over its variable, which wins over the default. Every value is
checked here, so a typo stops the process at start with the name of the flag
or variable at fault instead of surfacing later as a confusing stream error.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from index_worker.model import JobKind

ENV_PREFIX = "INDEX_WORKER_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a bad value; the message starts with the flag or variable name."""


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
    read_concurrency: int = 8
    drain_timeout: float = 30.0
    rpc_timeout: float = 30.0
    # Probe the stream after this much silence; declare it dead when the probe
    # is not answered within ping_timeout.
    ping_interval: float = 15.0
    ping_timeout: float = 10.0
    noop_for_benchmarks: bool = False
    log_level: str = "INFO"
    # TLS to the server: on when tls is set or a CA file is given.
    tls: bool = False
    ca_cert: str | None = None

    def __post_init__(self) -> None:
        if not self.worker_id:
            object.__setattr__(self, "worker_id", default_worker_id())


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every default is None so that unset flags fall back to the environment."""
    p = argparse.ArgumentParser(
        prog="index-worker",
        description="Pull index jobs from a realm service over ClaimJobs and build realm indexes.",
        epilog=f"Every flag can also be set as an {ENV_PREFIX}<NAME> environment variable "
        f"(e.g. {ENV_PREFIX}SERVER, {ENV_PREFIX}TOKEN, {ENV_PREFIX}CONCURRENCY).",
    )
    p.add_argument("--server", help="address of the realm service, HOST:PORT (required)")
    p.add_argument("--token", help="bearer token sent on every call (prefer INDEX_WORKER_TOKEN)")
    p.add_argument("--concurrency", help="jobs run at once (default 2)")
    p.add_argument("--min-priority", help="only take jobs of at least this priority (0-100)")
    p.add_argument(
        "--kinds",
        nargs="+",
        help="job kinds to take: from-scratch, incremental (default: all)",
    )
    p.add_argument("--worker-id", help="stable name of this worker (default HOSTNAME-PID)")
    p.add_argument("--reconnect-backoff-base", help="first reconnect delay in seconds (0.1)")
    p.add_argument("--reconnect-backoff-max", help="longest reconnect delay in seconds (5)")
    p.add_argument("--batch-size", help="index entries per upload message, 1-1000 (500)")
    p.add_argument("--read-concurrency", help="file reads in flight per job (8)")
    p.add_argument("--drain-timeout", help="seconds to finish jobs on SIGTERM (30)")
    p.add_argument("--rpc-timeout", help="deadline of file RPCs in seconds (30)")
    p.add_argument("--ping-interval", help="seconds of stream silence before a probe (15)")
    p.add_argument("--ping-timeout", help="seconds to wait for a probe's answer (10)")
    p.add_argument(
        "--noop-for-benchmarks",
        action="store_const",
        const="true",
        help="report every job as succeeded without indexing (benchmarks only)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (INFO)")
    p.add_argument(
        "--tls", action="store_const", const="true", help="connect with TLS (system roots)"
    )
    p.add_argument("--ca-cert", help="PEM file of the CA that signed the server (implies --tls)")
    return p


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    """Parse flags and environment; raises ConfigError naming the bad setting.

    argparse itself exits with status 2 on unknown flags or --help.
    """
    args = vars(build_parser().parse_args(argv))
    env = os.environ if environ is None else environ

    def raw(name: str) -> tuple[str, str] | None:
        flag_value = args[name]
        if flag_value is not None:
            if isinstance(flag_value, list):
                flag_value = ",".join(flag_value)
            return "--" + name.replace("_", "-"), str(flag_value)
        env_name = ENV_PREFIX + name.upper()
        if env_name in env:
            return env_name, env[env_name]
        return None

    def get(name: str, parse: Callable[[str], T], default: T) -> T:
        found = raw(name)
        if found is None:
            return default
        source, text = found
        try:
            return parse(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc} (got {text!r})") from None

    server = get("server", _non_empty, "")
    if not server:
        raise ConfigError(f"--server or {ENV_PREFIX}SERVER: required (HOST:PORT)")
    base = get("reconnect_backoff_base", _positive_float, 0.1)
    maximum = get("reconnect_backoff_max", _positive_float, 5.0)
    if maximum < base:
        found = raw("reconnect_backoff_max") or raw("reconnect_backoff_base")
        source = found[0] if found else "--reconnect-backoff-max"
        raise ConfigError(f"{source}: backoff max {maximum} is below the backoff base {base}")
    ca_cert = get("ca_cert", _optional_str, None)
    if ca_cert is not None and not os.path.isfile(ca_cert):
        raise ConfigError(f"--ca-cert or {ENV_PREFIX}CA_CERT: no such file (got {ca_cert!r})")
    return WorkerConfig(
        server=server,
        token=get("token", _optional_str, None),
        concurrency=get("concurrency", _int_in(1, 1000), 2),
        min_priority=get("min_priority", _int_in(0, 100), None),
        kinds=get("kinds", _kinds, ()),
        worker_id=get("worker_id", _non_empty, ""),
        reconnect_backoff_base=base,
        reconnect_backoff_max=maximum,
        batch_size=get("batch_size", _int_in(1, 1000), 500),
        read_concurrency=get("read_concurrency", _int_in(1, 256), 8),
        drain_timeout=get("drain_timeout", _non_negative_float, 30.0),
        rpc_timeout=get("rpc_timeout", _positive_float, 30.0),
        ping_interval=get("ping_interval", _positive_float, 15.0),
        ping_timeout=get("ping_timeout", _positive_float, 10.0),
        noop_for_benchmarks=get("noop_for_benchmarks", _bool, False),
        log_level=get("log_level", _log_level, "INFO"),
        tls=get("tls", _bool, False) or raw("ca_cert") is not None,
        ca_cert=ca_cert,
    )


def _non_empty(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _optional_str(text: str) -> str | None:
    return text or None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number of seconds")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false")


def _kinds(text: str) -> tuple[JobKind, ...]:
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
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


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return level
