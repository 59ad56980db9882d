"""Server settings, read once from flags and REALM_* environment variables."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from realm_common.settings import (
    ConfigError,
    Option,
    Options,
    boolean,
    choice,
    int_in,
    log_options,
    non_empty,
    non_negative_float,
    positive_float,
    text,
)
from realm_service.domain import DEFAULT_MAX_FILE_SIZE

ROLES = ("client", "worker", "admin")
SQLITE_SYNCHRONOUS = ("FULL", "NORMAL")
STORE_SCHEMES = ("sqlite", "postgresql", "postgres")

__all__ = ["ConfigError", "Settings", "add_server_arguments", "settings_from_args"]


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    store_url: str = "sqlite:///data/realm.db"
    metrics_listen: str = ""
    web_listen: str = ""  # the web console (realm_service/web); empty: off
    tokens: dict[str, str] = field(default_factory=dict)  # token -> role
    insecure: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    ping_seconds: float = 10.0
    max_attempts: int = 3
    reserved_slots: int = 1
    max_preemptions: int = 3
    resume_grace_seconds: float = 5.0
    drain_grace_seconds: float = 10.0
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    max_message_bytes: int = 64 * 1024 * 1024
    log_level: str = "INFO"
    log_json: bool = False
    sqlite_synchronous: str = "FULL"
    request_id_retention_hours: float = 24.0

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)


def parse_tokens(spec: str, source: str) -> dict[str, str]:
    """`role:token,role:token` -> {token: role}."""
    tokens: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        role, sep, token = item.partition(":")
        if not sep or role not in ROLES or not token:
            raise ConfigError(f"{source}: expected role:token with role in {ROLES}, got {item!r}")
        tokens[token] = role
    return tokens


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def store_url(value: str) -> str:
    """sqlite:///PATH or postgresql://...; anything else is refused here, not
    by a driver import deep in the start."""
    value = value.strip()
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme.split("+", 1)[0] not in STORE_SCHEMES:
        raise ValueError("expected sqlite:///PATH or postgresql://user@host/db")
    return value


OPTIONS = Options(
    "REALM_",
    [
        Option("listen", non_empty, Settings.listen, "host:port to serve gRPC on"),
        Option(
            "store",
            store_url,
            Settings.store_url,
            "SQLAlchemy URL: sqlite:///PATH or postgresql://user@host/db",
            metavar="URL",
        ),
        Option(
            "metrics_listen", text, "", "host:port for /metrics and /healthz; empty disables"
        ),
        Option(
            "web_listen", text, "", "host:port for the web console (http); empty disables"
        ),
        Option("tokens", text, "", "bearer tokens as role:token,... (roles client, worker, admin)"),
        Option("tokens_file", text, "", "file with one role:token per line"),
        Option("insecure", boolean, False, "allow listening beyond loopback without auth",
               switch=True),
        Option("tls_cert", text, "", "PEM certificate; with --tls-key enables TLS"),
        Option("tls_key", text, "", "PEM private key"),
        Option("lease_seconds", positive_float, Settings.lease_seconds,
               "lease duration without heartbeat"),
        Option("heartbeat_seconds", positive_float, Settings.heartbeat_seconds,
               "heartbeat interval asked of workers"),
        Option("max_attempts", int_in(1), Settings.max_attempts,
               "failed or expired attempts before a job fails"),
        Option("reserved_slots", int_in(0), Settings.reserved_slots,
               "worker slots kept free of SYSTEM-priority work"),
        Option("max_preemptions", int_in(0), Settings.max_preemptions,
               "times a SYSTEM job may be handed back for a waiting user job (0: never)"),
        Option("resume_grace_seconds", non_negative_float, Settings.resume_grace_seconds,
               "how long a broken ClaimJobs stream's leases wait for their worker to "
               "re-attach them (0: released at once)"),
        Option("drain_grace_seconds", non_negative_float, Settings.drain_grace_seconds,
               "on shutdown, time workers get to send results"),
        Option("max_file_size", int_in(1), Settings.max_file_size, "largest file accepted, bytes"),
        Option(
            "sqlite_synchronous",
            choice(*SQLITE_SYNCHRONOUS),
            Settings.sqlite_synchronous,
            "SQLite store only: FULL makes every acknowledged write survive a power loss; "
            "NORMAL is faster but may lose the last writes on power loss",
        ),
        Option("request_id_retention_hours", positive_float,
               Settings.request_id_retention_hours,
               "how long a request_id answers retries with its first result"),
        *log_options(),
    ],
)  # fmt: skip


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    OPTIONS.add_arguments(p)


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from parsed flags (None where not given) and REALM_* variables."""
    v = OPTIONS.resolve(args, environ)
    tokens = parse_tokens(v["tokens"], OPTIONS.describe("tokens"))
    if v["tokens_file"]:
        source = OPTIONS.describe("tokens_file")
        try:
            body = Path(v["tokens_file"]).read_text()
        except OSError as e:
            raise ConfigError(f"{source}: {e.strerror or e} ({v['tokens_file']})") from e
        tokens.update(parse_tokens(",".join(body.split()), source))
    if bool(v["tls_cert"]) != bool(v["tls_key"]):
        raise ConfigError(
            f"{OPTIONS.describe('tls_cert')} and {OPTIONS.describe('tls_key')} go together"
        )
    if ":" not in v["listen"]:
        raise ConfigError(f"{OPTIONS.describe('listen')}: must be host:port (got {v['listen']!r})")
    if not tokens and not v["insecure"] and not is_loopback(v["listen"]):
        raise ConfigError(
            f"refusing to listen on {v['listen']} without auth: set --tokens/REALM_TOKENS, "
            "or --insecure/REALM_INSECURE=1 to accept unauthenticated calls"
        )
    if v["web_listen"] and ":" not in v["web_listen"]:
        raise ConfigError(
            f"{OPTIONS.describe('web_listen')}: must be host:port (got {v['web_listen']!r})"
        )
    if v["web_listen"] and not tokens and not v["insecure"] and not is_loopback(v["web_listen"]):
        raise ConfigError(
            f"refusing to serve the web console on {v['web_listen']} without auth: set "
            "--tokens/REALM_TOKENS, or --insecure/REALM_INSECURE=1"
        )
    return Settings(
        listen=v["listen"],
        store_url=v["store"],
        metrics_listen=v["metrics_listen"],
        web_listen=v["web_listen"],
        tokens=tokens,
        insecure=v["insecure"],
        tls_cert=v["tls_cert"],
        tls_key=v["tls_key"],
        lease_seconds=v["lease_seconds"],
        heartbeat_seconds=v["heartbeat_seconds"],
        ping_seconds=max(1.0, v["heartbeat_seconds"] * 2),
        max_attempts=v["max_attempts"],
        reserved_slots=v["reserved_slots"],
        max_preemptions=v["max_preemptions"],
        resume_grace_seconds=v["resume_grace_seconds"],
        drain_grace_seconds=v["drain_grace_seconds"],
        max_file_size=v["max_file_size"],
        log_level=v["log_level"],
        log_json=v["log_json"],
        sqlite_synchronous=v["sqlite_synchronous"],
        request_id_retention_hours=v["request_id_retention_hours"],
    )
