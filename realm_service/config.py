"""Server settings, read once from flags and REALM_* environment variables."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from realm_service.domain import DEFAULT_MAX_FILE_SIZE

ROLES = ("client", "worker", "admin")
SQLITE_SYNCHRONOUS = ("FULL", "NORMAL")


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag and variable."""


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    store_url: str = "sqlite:///data/realm.db"
    metrics_listen: str = ""
    tokens: dict[str, str] = field(default_factory=dict)  # token -> role
    insecure: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    ping_seconds: float = 10.0
    max_attempts: int = 3
    reserved_slots: int = 1
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


def _env(name: str, default: str) -> str:
    return os.environ.get(f"REALM_{name}", default)


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


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen",
        default=_env("LISTEN", Settings.listen),
        help="host:port to serve gRPC on (REALM_LISTEN)",
    )
    p.add_argument(
        "--store",
        default=_env("STORE_URL", Settings.store_url),
        help="SQLAlchemy URL: sqlite:///PATH or postgresql://... (REALM_STORE_URL)",
    )
    p.add_argument(
        "--metrics-listen",
        default=_env("METRICS_LISTEN", ""),
        help="host:port for Prometheus /metrics; empty disables (REALM_METRICS_LISTEN)",
    )
    p.add_argument(
        "--tokens",
        default=_env("TOKENS", ""),
        help="bearer tokens as role:token,... with roles client, worker, admin (REALM_TOKENS)",
    )
    p.add_argument(
        "--tokens-file",
        default=_env("TOKENS_FILE", ""),
        help="file with one role:token per line (REALM_TOKENS_FILE)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=_env("INSECURE", "") in ("1", "true"),
        help="allow listening beyond loopback without auth (REALM_INSECURE)",
    )
    p.add_argument(
        "--tls-cert",
        default=_env("TLS_CERT", ""),
        help="PEM certificate; with --tls-key enables TLS (REALM_TLS_CERT)",
    )
    p.add_argument("--tls-key", default=_env("TLS_KEY", ""), help="PEM private key (REALM_TLS_KEY)")
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=float(_env("LEASE_SECONDS", "30")),
        help="lease duration without heartbeat (REALM_LEASE_SECONDS)",
    )
    p.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=float(_env("HEARTBEAT_SECONDS", "5")),
        help="heartbeat interval asked of workers (REALM_HEARTBEAT_SECONDS)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=int(_env("MAX_ATTEMPTS", "3")),
        help="failed or expired attempts before a job fails (REALM_MAX_ATTEMPTS)",
    )
    p.add_argument(
        "--reserved-slots",
        type=int,
        default=int(_env("RESERVED_SLOTS", "1")),
        help="worker slots kept free of SYSTEM-priority work (REALM_RESERVED_SLOTS)",
    )
    p.add_argument(
        "--drain-grace-seconds",
        type=float,
        default=float(_env("DRAIN_GRACE_SECONDS", "10")),
        help="on shutdown, time workers get to send results (REALM_DRAIN_GRACE_SECONDS)",
    )
    p.add_argument(
        "--max-file-size",
        type=int,
        default=int(_env("MAX_FILE_SIZE", str(DEFAULT_MAX_FILE_SIZE))),
        help="largest file accepted, bytes (REALM_MAX_FILE_SIZE)",
    )
    p.add_argument(
        "--sqlite-synchronous",
        default=_env("SQLITE_SYNCHRONOUS", Settings.sqlite_synchronous),
        help="SQLite store only: FULL (default) makes every acknowledged write survive "
        "a power loss; NORMAL is faster but may lose the last writes on power loss "
        "(REALM_SQLITE_SYNCHRONOUS)",
    )
    p.add_argument(
        "--request-id-retention-hours",
        type=float,
        default=float(_env("REQUEST_ID_RETENTION_HOURS", "24")),
        help="how long a request_id answers retries with its first result; older "
        "ones are swept (REALM_REQUEST_ID_RETENTION_HOURS)",
    )
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING (REALM_LOG_LEVEL)",
    )
    p.add_argument(
        "--log-json",
        action="store_true",
        default=_env("LOG_JSON", "") in ("1", "true"),
        help="JSON log lines (REALM_LOG_JSON)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    tokens = parse_tokens(args.tokens, "--tokens/REALM_TOKENS")
    if args.tokens_file:
        try:
            text = Path(args.tokens_file).read_text()
        except OSError as e:
            raise ConfigError(f"--tokens-file/REALM_TOKENS_FILE: {e}") from e
        tokens.update(parse_tokens(",".join(text.split()), "--tokens-file/REALM_TOKENS_FILE"))
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert/REALM_TLS_CERT and --tls-key/REALM_TLS_KEY go together")
    checks: Sequence[tuple[bool, str]] = (
        (args.lease_seconds > 0, "--lease-seconds/REALM_LEASE_SECONDS must be > 0"),
        (args.heartbeat_seconds > 0, "--heartbeat-seconds/REALM_HEARTBEAT_SECONDS must be > 0"),
        (args.max_attempts >= 1, "--max-attempts/REALM_MAX_ATTEMPTS must be >= 1"),
        (args.reserved_slots >= 0, "--reserved-slots/REALM_RESERVED_SLOTS must be >= 0"),
        (args.max_file_size > 0, "--max-file-size/REALM_MAX_FILE_SIZE must be > 0"),
        (":" in args.listen, "--listen/REALM_LISTEN must be host:port"),
        (
            args.sqlite_synchronous.upper() in SQLITE_SYNCHRONOUS,
            "--sqlite-synchronous/REALM_SQLITE_SYNCHRONOUS must be FULL or NORMAL",
        ),
        (
            args.request_id_retention_hours > 0,
            "--request-id-retention-hours/REALM_REQUEST_ID_RETENTION_HOURS must be > 0",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if not tokens and not args.insecure and not is_loopback(args.listen):
        raise ConfigError(
            f"refusing to listen on {args.listen} without auth: set --tokens/REALM_TOKENS, "
            "or --insecure/REALM_INSECURE=1 to accept unauthenticated calls"
        )
    return Settings(
        listen=args.listen,
        store_url=args.store,
        metrics_listen=args.metrics_listen,
        tokens=tokens,
        insecure=args.insecure,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        lease_seconds=args.lease_seconds,
        heartbeat_seconds=args.heartbeat_seconds,
        ping_seconds=max(1.0, args.heartbeat_seconds * 2),
        max_attempts=args.max_attempts,
        reserved_slots=args.reserved_slots,
        drain_grace_seconds=args.drain_grace_seconds,
        max_file_size=args.max_file_size,
        log_level=args.log_level.upper(),
        log_json=args.log_json,
        sqlite_synchronous=args.sqlite_synchronous.upper(),
        request_id_retention_hours=args.request_id_retention_hours,
    )
