"""What the sync and asyncio clients share: channel options, the retry policy
as a gRPC service config, credentials and call metadata.

Retries are gRPC's own (the channel's service config, gRFC A6), not loops of
ours: gRPC repeats an attempt only while no answer has started, within the
call's deadline, with jittered exponential backoff, and re-sends the same
request bytes and metadata, so an attempt's request id is its first's.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

SERVICE = "realm.v1.RealmService"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
# Files travel whole in one message; the server bounds their size, not us.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
REQUEST_ID_KEY = "x-request-id"

# RPCs a repeat of which has the effect of one call, retried on UNAVAILABLE
# and on ABORTED (a concurrent writer won and nothing was stored): reads
# (StreamRealmFiles too: gRPC retries a stream only before its first answer);
# CreateRealm, whose request id makes a repeat answer the first result;
# ReindexRealm and ReindexAllRealms, which coalesce with the job they made;
# WriteRealmFile, which stores the same bytes again into the same job;
# WriteRealmFiles, for the same reason (all or nothing: ABORTED stored
# nothing). Its deletions are the exception: a repeat of a request whose
# deletions were applied before the connection broke answers NOT_FOUND for a
# deleted path. That answer is no less certain than the UNAVAILABLE it
# replaces (in both, the caller cannot tell whether the first attempt landed),
# while a request of writes only, the common one, succeeds: so it is retried.
# DeleteRealm, idempotent by the request id the client puts in the request
# and keeps across the retries (a repeat answers `replayed`); CancelJob,
# idempotent on a cancelled job. RetryJob is not retried: the retried job
# stays FAILED or CANCELLED, so a repeat after an applied first attempt whose
# new job has started since queues the work a second time; the caller, who
# can look at the realm's jobs, decides.
REPEATABLE_RPCS = (
    "CreateRealm",
    "GetRealm",
    "ListRealms",
    "ReindexRealm",
    "ReindexAllRealms",
    "WriteRealmFile",
    "WriteRealmFiles",
    "ListRealmFiles",
    "ReadRealmFile",
    "SearchRealm",
    "GetJob",
    "ListJobs",
    "WatchJob",
    "StreamRealmFiles",
    "CancelJob",
    "DeleteRealm",
    "ExplainJob",
    "ListWorkers",
    "GetQueueStats",
)
# DeleteRealmFile is not among them: a repeat of a delete that was applied
# before the connection broke answers NOT_FOUND. gRPC still repeats it
# transparently when the request never left the client.


class Default(enum.Enum):
    """Marks a keyword left to the client's setting."""

    DEFAULT = "default"


DEFAULT = Default.DEFAULT

Timeout = float | None | Default


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy for the repeatable RPCs (`REPEATABLE_RPCS`).

    `max_attempts` counts the first attempt; gRPC caps it at 5. Backoff before
    attempt n is random in [0, min(initial_backoff * multiplier**(n-1), max_backoff)].
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE", "ABORTED")


def service_config(retry: RetryPolicy | None) -> str:
    """The channel's service config (JSON) with the retry policy."""
    if retry is None:
        return json.dumps({"methodConfig": []})
    policy = {
        "maxAttempts": retry.max_attempts,
        "initialBackoff": f"{retry.initial_backoff:g}s",
        "maxBackoff": f"{retry.max_backoff:g}s",
        "backoffMultiplier": retry.backoff_multiplier,
        "retryableStatusCodes": list(retry.retryable_codes),
    }
    names = [{"service": SERVICE, "method": method} for method in REPEATABLE_RPCS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def channel_options(
    retry: RetryPolicy | None, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    # gRPC takes the first of two values of one option: the caller's win.
    return [
        *extra,
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.service_config", service_config(retry)),
        # gRPC keeps a request to retry it only up to this size (256 KiB by
        # default): a CreateRealm with its initial files may be larger.
        ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES),
    ]


def channel_credentials(
    tls: bool, root_certificates: bytes | None, credentials: grpc.ChannelCredentials | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel."""
    if credentials is not None:
        return credentials
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def new_request_id() -> str:
    return uuid.uuid4().hex


def call_metadata(token: str | None, request_id: str) -> tuple[tuple[str, str], ...]:
    """The bearer token (when there is one) and the logical call's request id."""
    if token:
        return (("authorization", f"Bearer {token}"), (REQUEST_ID_KEY, request_id))
    return ((REQUEST_ID_KEY, request_id),)
