"""The channel to the realm service, the call metadata, and a typed client.

Every RPC goes through `RealmClient`, which adds the bearer token and the
deadline and turns `grpc.RpcError` into a one-line `CliError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import realm_service_pb2_grpc, resources_pb2

from realmctl.errors import CliError, UsageError

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
# Files travel whole in one message; the server bounds their size, not us.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# How grpc-core words a failure to open a connection (as opposed to a server
# that answered UNAVAILABLE itself, e.g. while draining).
_CONNECT_FAILURES = (
    "failed to connect to all addresses",
    "errors resolving",
    "dns resolution failed",
    "empty address list",
)

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@dataclass(frozen=True)
class ConnectionSettings:
    """Where the server is and how to talk to it."""

    target: str = DEFAULT_SERVER
    token: str | None = None
    timeout: float | None = DEFAULT_TIMEOUT
    tls: bool = False
    ca_cert: Path | None = None


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata sent with every call: the bearer token, when there is one."""
    if not token:
        return ()
    return (("authorization", f"Bearer {token}"),)


def open_channel(settings: ConnectionSettings) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if not settings.tls and settings.ca_cert is None:
        return grpc.insecure_channel(settings.target, options=options)
    root_certificates = None
    if settings.ca_cert is not None:
        try:
            root_certificates = settings.ca_cert.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read CA certificate {settings.ca_cert}: {exc}") from exc
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(settings.target, credentials, options=options)


def describe_rpc_error(error: grpc.RpcError, settings: ConnectionSettings) -> str:
    """`<STATUS_CODE>: <details>` for an error raised by a call."""
    if not isinstance(error, grpc.Call):
        return f"UNKNOWN: {error}"
    code = error.code()
    details = error.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    if code is grpc.StatusCode.UNAVAILABLE and details.lower().startswith(_CONNECT_FAILURES):
        return f"{name}: cannot reach server at {settings.target} ({details})"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and settings.timeout is not None:
        return (
            f"{name}: no answer from server at {settings.target} "
            f"within {settings.timeout:g} s ({details})"
        )
    return f"{name}: {details}" if details else name


class RealmClient:
    """The realm service's RPCs, with metadata, deadline and error translation."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self._channel = open_channel(settings)
        self._stub = realm_service_pb2_grpc.RealmServiceStub(self._channel)
        self._metadata = call_metadata(settings.token)

    def __enter__(self) -> RealmClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as exc:
            raise CliError(describe_rpc_error(exc, self.settings)) from None

    def _unary(
        self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        with self._translated_errors():
            return method(request, timeout=self.settings.timeout, metadata=self._metadata)

    def create_realm(self, request: rs.CreateRealmRequest) -> rs.CreateRealmResponse:
        return self._unary(self._stub.CreateRealm, request)

    def get_realm(self, request: rs.GetRealmRequest) -> rs.GetRealmResponse:
        return self._unary(self._stub.GetRealm, request)

    def list_realms(self, request: rs.ListRealmsRequest) -> rs.ListRealmsResponse:
        return self._unary(self._stub.ListRealms, request)

    def reindex_realm(self, request: rs.ReindexRealmRequest) -> rs.ReindexRealmResponse:
        return self._unary(self._stub.ReindexRealm, request)

    def reindex_all_realms(
        self, request: rs.ReindexAllRealmsRequest
    ) -> rs.ReindexAllRealmsResponse:
        return self._unary(self._stub.ReindexAllRealms, request)

    def write_realm_file(self, request: rs.WriteRealmFileRequest) -> rs.WriteRealmFileResponse:
        return self._unary(self._stub.WriteRealmFile, request)

    def delete_realm_file(self, request: rs.DeleteRealmFileRequest) -> rs.DeleteRealmFileResponse:
        return self._unary(self._stub.DeleteRealmFile, request)

    def list_realm_files(self, request: rs.ListRealmFilesRequest) -> rs.ListRealmFilesResponse:
        return self._unary(self._stub.ListRealmFiles, request)

    def read_realm_file(self, request: rs.ReadRealmFileRequest) -> rs.ReadRealmFileResponse:
        return self._unary(self._stub.ReadRealmFile, request)

    def search_realm(self, request: rs.SearchRealmRequest) -> rs.SearchRealmResponse:
        return self._unary(self._stub.SearchRealm, request)

    def get_job(self, request: rs.GetJobRequest) -> rs.GetJobResponse:
        return self._unary(self._stub.GetJob, request)

    def list_jobs(self, request: rs.ListJobsRequest) -> rs.ListJobsResponse:
        return self._unary(self._stub.ListJobs, request)

    def watch_job(self, job_id: str) -> Iterator[resources_pb2.Job]:
        """Snapshots of the job until the server ends the stream.

        No deadline: the job may take as long as it takes; Ctrl-C cancels.
        """
        stream = self._stub.WatchJob(rs.WatchJobRequest(job_id=job_id), metadata=self._metadata)
        try:
            with self._translated_errors():
                for response in stream:
                    yield response.job
        finally:
            stream.cancel()
