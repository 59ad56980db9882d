"""Python client of realm.v1.RealmService.

    from realm_client import RealmClient

    with RealmClient("127.0.0.1:50051", token="...") as client:
        created = client.create_realm("notes", wait=True)
        for realm in client.list_realms():
            print(realm.realm_id, realm.stats.entries)

`RealmClient` blocks; `AsyncRealmClient` (realm_client.aio) is its asyncio
twin. Answers are the realm.v1 messages; failures raise the exceptions of
`realm_client.errors`, all `RealmClientError`s.
"""

from __future__ import annotations

from realm.v1 import realm_service_pb2, resources_pb2

from realm_client._calls import TERMINAL_JOB_STATES, StreamedFile
from realm_client._channel import (
    DEFAULT,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    REPEATABLE_RPCS,
    REQUEST_ID_KEY,
    RetryPolicy,
)
from realm_client.aio import AsyncRealmClient
from realm_client.client import RealmClient
from realm_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RealmClientError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "DEFAULT",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "REPEATABLE_RPCS",
    "REQUEST_ID_KEY",
    "TERMINAL_JOB_STATES",
    "Aborted",
    "AlreadyExists",
    "AsyncRealmClient",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RealmClient",
    "RealmClientError",
    "ResourceExhausted",
    "RetryPolicy",
    "StreamedFile",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "realm_service_pb2",
    "resources_pb2",
]
