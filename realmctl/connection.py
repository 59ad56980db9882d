"""Where the server is, the realm_client that talks to it, and its errors in one line.

realmctl makes no call of its own: every RPC goes through `realm_client.RealmClient`
(deadline, bearer token, TLS, retries, request ids); this module builds it from
the command line's settings and words its errors for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from realm_client import DEFAULT_TARGET, RealmClient, RealmClientError

from realmctl.errors import UsageError

DEFAULT_SERVER = DEFAULT_TARGET
DEFAULT_TIMEOUT = 30.0
# A followed job's watch (watch, create --wait, push --wait) is reopened after
# UNAVAILABLE this many times in a row without news: with the client's backoff
# (0.1 s doubling to 2 s) about 15 s, time for a server to restart.
WATCH_BREAKS = 10

# How grpc-core words a failure to open a connection (as opposed to a server
# that answered UNAVAILABLE itself, e.g. while draining).
_CONNECT_FAILURES = (
    "failed to connect to all addresses",
    "errors resolving",
    "dns resolution failed",
    "empty address list",
)


@dataclass(frozen=True)
class ConnectionSettings:
    """Where the server is and how to talk to it."""

    target: str = DEFAULT_SERVER
    token: str | None = None
    timeout: float | None = DEFAULT_TIMEOUT
    tls: bool = False
    ca_cert: Path | None = None


def open_client(settings: ConnectionSettings, channel: grpc.Channel | None = None) -> RealmClient:
    """The client the settings describe (over `channel` when given, as tests do)."""
    root_certificates = None
    if settings.ca_cert is not None:
        try:
            root_certificates = settings.ca_cert.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read CA certificate {settings.ca_cert}: {exc}") from exc
    return RealmClient(
        settings.target,
        token=settings.token,
        tls=settings.tls,
        root_certificates=root_certificates,
        timeout=settings.timeout,
        watch_breaks=WATCH_BREAKS,
        channel=channel,
    )


def describe_error(error: RealmClientError, client: RealmClient) -> str:
    """`<STATUS_CODE>: <the server's message>`, saying more when nothing answered."""
    name, details = error.code.name, error.message
    if error.code is grpc.StatusCode.UNAVAILABLE and details.lower().startswith(_CONNECT_FAILURES):
        return f"{name}: cannot reach server at {client.target} ({details})"
    if (
        error.code is grpc.StatusCode.DEADLINE_EXCEEDED
        and error.method != "WatchJob"
        and client.timeout is not None
    ):
        return (
            f"{name}: no answer from server at {client.target} "
            f"within {client.timeout:g} s ({details})"
        )
    return f"{name}: {details}" if details else name
