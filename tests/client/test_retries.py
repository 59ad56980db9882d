"""The channel's retry policy, on a real gRPC server on loopback: grpc_testing's
channel runs no service config, so the retries are watched from the server's
side, attempt by attempt."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import realm_client
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import realm_service_pb2_grpc
from realm.v1 import resources_pb2 as res
from realm_client import RealmClient, RetryPolicy

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)


@dataclass
class Attempt:
    request: object
    metadata: dict[str, str]


@dataclass
class FlakyService(realm_service_pb2_grpc.RealmServiceServicer):
    """Fails the first `failures` attempts of every call with `code`, then answers."""

    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    failures: int = 0
    attempts: list[Attempt] = field(default_factory=list)

    def _attempt(self, request: object, context: grpc.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.attempts.append(Attempt(request, metadata))
        if len(self.attempts) <= self.failures:
            context.abort(self.code, f"attempt {len(self.attempts)} refused")

    def CreateRealm(
        self, request: rs.CreateRealmRequest, context: grpc.ServicerContext
    ) -> rs.CreateRealmResponse:
        self._attempt(request, context)
        return rs.CreateRealmResponse(realm=res.Realm(realm_id=request.realm_id))

    def GetRealm(
        self, request: rs.GetRealmRequest, context: grpc.ServicerContext
    ) -> rs.GetRealmResponse:
        self._attempt(request, context)
        return rs.GetRealmResponse(realm=res.Realm(realm_id=request.realm_id))

    def DeleteRealm(
        self, request: rs.DeleteRealmRequest, context: grpc.ServicerContext
    ) -> rs.DeleteRealmResponse:
        self._attempt(request, context)
        return rs.DeleteRealmResponse(replayed=len(self.attempts) > 1)

    def CancelJob(
        self, request: rs.CancelJobRequest, context: grpc.ServicerContext
    ) -> rs.CancelJobResponse:
        self._attempt(request, context)
        return rs.CancelJobResponse(job=res.Job(job_id=request.job_id))

    def RetryJob(
        self, request: rs.RetryJobRequest, context: grpc.ServicerContext
    ) -> rs.RetryJobResponse:
        self._attempt(request, context)
        return rs.RetryJobResponse(job=res.Job(job_id="2"))

    def WriteRealmFiles(
        self, request: rs.WriteRealmFilesRequest, context: grpc.ServicerContext
    ) -> rs.WriteRealmFilesResponse:
        self._attempt(request, context)
        return rs.WriteRealmFilesResponse(job=res.Job(job_id="3"))

    def DeleteRealmFile(
        self, request: rs.DeleteRealmFileRequest, context: grpc.ServicerContext
    ) -> rs.DeleteRealmFileResponse:
        self._attempt(request, context)
        return rs.DeleteRealmFileResponse()


@pytest.fixture
def service() -> Iterator[tuple[FlakyService, str]]:
    fake = FlakyService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    realm_service_pb2_grpc.add_RealmServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_a_retried_create_keeps_its_request_id(service: tuple[FlakyService, str]) -> None:
    fake, address = service
    fake.failures = 2
    files = {"big.bin": b"x" * 300_000}  # beyond gRPC's default retry buffer of 256 KiB

    with RealmClient(address, token="t", retry=FAST) as client:
        created = client.create_realm("demo", initial_files=files)

    assert created.realm.realm_id == "demo"
    assert len(fake.attempts) == 3
    ids = {a.request.request_id for a in fake.attempts}  # type: ignore[attr-defined]
    assert len(ids) == 1 and "" not in ids
    assert {a.metadata[realm_client.REQUEST_ID_KEY] for a in fake.attempts} == ids
    assert [a.metadata.get("grpc-previous-rpc-attempts") for a in fake.attempts] == [
        None,
        "1",
        "2",
    ]


def test_aborted_is_retried_where_a_repeat_is_safe(service: tuple[FlakyService, str]) -> None:
    fake, address = service
    fake.code, fake.failures = grpc.StatusCode.ABORTED, 1

    with RealmClient(address, retry=FAST) as client:
        assert client.get_realm("demo").realm_id == "demo"

    assert len(fake.attempts) == 2


def test_a_delete_is_not_repeated(service: tuple[FlakyService, str]) -> None:
    fake, address = service
    fake.failures = 1

    with RealmClient(address, retry=FAST) as client, pytest.raises(realm_client.Unavailable) as e:
        client.delete_realm_file("demo", "a.txt")

    assert e.value.message == "attempt 1 refused"
    assert len(fake.attempts) == 1


def test_attempts_are_bounded_and_the_last_message_is_kept(
    service: tuple[FlakyService, str],
) -> None:
    fake, address = service
    fake.failures = 10

    with RealmClient(address, retry=FAST) as client, pytest.raises(realm_client.Unavailable) as e:
        client.get_realm("demo")

    assert len(fake.attempts) == FAST.max_attempts
    assert e.value.message == f"attempt {FAST.max_attempts} refused"


def test_retry_none_turns_retries_off(service: tuple[FlakyService, str]) -> None:
    fake, address = service
    fake.failures = 1

    with RealmClient(address, retry=None) as client, pytest.raises(realm_client.Unavailable):
        client.create_realm("demo")

    assert len(fake.attempts) == 1


def test_a_retried_delete_realm_keeps_its_request_id(service: tuple[FlakyService, str]) -> None:
    fake, address = service
    fake.failures = 2

    with RealmClient(address, retry=FAST) as client:
        deleted = client.delete_realm("demo")

    assert deleted.replayed  # the fake says so of any answer after a refused attempt
    assert len(fake.attempts) == 3
    ids = {a.request.request_id for a in fake.attempts}  # type: ignore[attr-defined]
    assert len(ids) == 1 and "" not in ids
    assert {a.metadata[realm_client.REQUEST_ID_KEY] for a in fake.attempts} == ids


@pytest.mark.parametrize(
    ("call", "retried"),
    [
        (lambda c: c.cancel_job("1", reason="r"), True),
        (lambda c: c.write_realm_files("demo", files={"a": b"x" * 300_000}), True),
        (lambda c: c.retry_job("1"), False),
    ],
    ids=["CancelJob", "WriteRealmFiles", "RetryJob"],
)
def test_job_control_and_bulk_writes_are_retried_only_where_a_repeat_is_safe(
    service: tuple[FlakyService, str], call: Any, retried: bool
) -> None:
    fake, address = service
    fake.failures = 1

    with RealmClient(address, retry=FAST) as client:
        if retried:
            call(client)
        else:
            with pytest.raises(realm_client.Unavailable, match="attempt 1 refused"):
                call(client)

    assert len(fake.attempts) == (2 if retried else 1)
