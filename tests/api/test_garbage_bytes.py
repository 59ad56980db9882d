"""Requests whose bytes do not parse as the method's request message
(DESIGN.md section 8): INVALID_ARGUMENT naming the method and the type, for
unary and streamed requests alike, UNAUTHENTICATED first when auth is on and
no valid token came, and at most a rate-limited WARNING in the log, never an
ERROR or a traceback per request (grpc.aio's own answer was UNKNOWN with one
of each, for anyone, token or not).

Raw bytes go through generic channel calls with no serializer."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb

from tests.api.conftest import LiveServer
from tests.api.helpers import RPC_TIMEOUT, create_realm, poll, rpc_error, store_snapshot

SERVICE = spb.DESCRIPTOR.services_by_name["RealmService"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
TOKENS = {"tok-client": "client", "tok-worker": "worker", "tok-admin": "admin"}
PARSING_LOGGER = "realm_service.api.parsing"
LOG_INTERVAL = 10.0  # parsing.LOG_INTERVAL_SECONDS

# Neither parses as any message: a tag whose varint never ends, and a field
# whose length runs past the end.
GARBAGE = {"unterminated-varint": b"\xff\xff\xff", "length-past-end": b"\x0a\x05ab"}
# GetRealmRequest's field 1 is a string: these bytes are not UTF-8.
NOT_UTF8 = b"\x0a\x02\xff\xfe"

Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def path_of(name: str) -> str:
    return f"/{SERVICE.full_name}/{name}"


def expected(name: str) -> str:
    method = SERVICE.methods_by_name[name]
    return f"the request to {path_of(name)} could not be parsed as {method.input_type.full_name}"


def send_raw(live: LiveServer, name: str, data: bytes, metadata: Metadata = ()) -> grpc.RpcError:
    """Send `data` as the (first) request of method `name`; its error."""
    method = SERVICE.methods_by_name[name]
    path = path_of(name)
    channel = live.channel

    def call() -> object:
        if method.client_streaming:
            streams: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
                path, request_serializer=None, response_deserializer=None
            )
            return list(streams(iter([data]), metadata=metadata, timeout=RPC_TIMEOUT))
        if method.server_streaming:
            stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
                path, request_serializer=None, response_deserializer=None
            )
            return list(stream(data, metadata=metadata, timeout=RPC_TIMEOUT))
        unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            path, request_serializer=None, response_deserializer=None
        )
        return unary(data, metadata=metadata, timeout=RPC_TIMEOUT)

    return rpc_error(call)


def claim_then_garbage(live: LiveServer, metadata: Metadata = ()) -> grpc.RpcError:
    """A ClaimJobs stream that says hello, gets its settings, then sends garbage."""
    outbox: queue.Queue[bytes | None] = queue.Queue()
    stub: grpc.StreamStreamMultiCallable[bytes, bytes] = live.channel.stream_stream(
        path_of("ClaimJobs"), request_serializer=None, response_deserializer=None
    )
    hello = spb.ClaimJobsRequest(hello=spb.WorkerHello(worker_id="w", incarnation_id="i"))
    outbox.put(hello.SerializeToString())
    responses: Iterator[bytes] = stub(
        iter(outbox.get, None), metadata=metadata, timeout=RPC_TIMEOUT
    )
    try:
        first = spb.ClaimJobsResponse.FromString(next(responses))
        assert first.HasField("settings"), first
        outbox.put(GARBAGE["unterminated-varint"])
        return rpc_error(lambda: list(responses))
    finally:
        outbox.put(None)


def assert_quiet(caplog: pytest.LogCaptureFixture, *, most_warnings: int) -> int:
    """No ERROR and no traceback anywhere; at most `most_warnings` lines from
    the parsing interceptor. Returns how many it wrote."""
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    warnings = [r for r in caplog.records if r.name == PARSING_LOGGER]
    assert len(warnings) <= most_warnings, [r.getMessage() for r in warnings]
    return len(warnings)


UNARY = [m.name for m in SERVICE.methods if not m.client_streaming and not m.server_streaming]


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_every_method_refuses_garbage_naming_itself_and_changes_nothing(
    live: LiveServer, data: bytes
) -> None:
    create_realm(live.stub, "kept")
    before = store_snapshot(live.srv.db)
    for method in SERVICE.methods:
        error = send_raw(live, method.name, data)
        assert (error.code(), error.details()) == (INVALID, expected(method.name))
    error = send_raw(live, "GetRealm", NOT_UTF8)
    assert (error.code(), error.details()) == (INVALID, expected("GetRealm"))
    assert store_snapshot(live.srv.db) == before
    got = live.stub.GetRealm(spb.GetRealmRequest(realm_id="kept"), timeout=RPC_TIMEOUT)
    assert got.realm.realm_id == "kept"


def test_garbage_mid_stream_ends_the_claim_stream(live: LiveServer) -> None:
    error = claim_then_garbage(live)
    assert (error.code(), error.details()) == (INVALID, expected("ClaimJobs"))
    # The stream is gone from the dispatcher, like any stream that ended.
    poll(lambda: not live.srv.dispatcher.streams, what="the stream to be removed")


def test_health_refuses_garbage_too(live: LiveServer) -> None:
    check: grpc.UnaryUnaryMultiCallable[bytes, bytes] = live.channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
    )
    error = rpc_error(lambda: check(GARBAGE["unterminated-varint"], timeout=RPC_TIMEOUT))
    assert error.code() == INVALID
    assert error.details() == (
        "the request to /grpc.health.v1.Health/Check could not be parsed as "
        "grpc.health.v1.HealthCheckRequest"
    )


def test_a_flood_of_garbage_logs_a_few_warnings_and_no_traceback(
    live: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    for _ in range(50):
        for name in ("GetRealm", "WatchJob", "ClaimJobs"):
            assert send_raw(live, name, GARBAGE["unterminated-varint"]).code() == INVALID
    assert claim_then_garbage(live).code() == INVALID
    # One line per method and started interval (the run takes a few seconds).
    per_method = 1 + int((time.monotonic() - start) // LOG_INTERVAL)
    written = assert_quiet(caplog, most_warnings=3 * per_method)
    assert written >= 3  # each method said it once
    first = next(r for r in caplog.records if r.name == PARSING_LOGGER)
    assert first.levelno == logging.WARNING
    assert first.method.startswith("/realm.v1.RealmService/")  # type: ignore[attr-defined]


# -- with auth ----------------------------------------------------------------------


@pytest.fixture
def secured(live_with: Callable[..., LiveServer]) -> LiveServer:
    return live_with(tokens=TOKENS)


@pytest.mark.parametrize(
    "metadata",
    [(), bearer("not-a-token"), (("authorization", "Basic dXNlcg=="),)],
    ids=["no-token", "unknown-token", "not-bearer"],
)
def test_without_a_valid_token_garbage_is_unauthenticated_and_not_logged(
    secured: LiveServer, caplog: pytest.LogCaptureFixture, metadata: Metadata
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(20):
        for method in SERVICE.methods:
            error = send_raw(secured, method.name, GARBAGE["unterminated-varint"], metadata)
            assert error.code() == UNAUTHENTICATED, (method.name, error.details())
    assert assert_quiet(caplog, most_warnings=0) == 0


def test_with_a_valid_token_garbage_is_invalid_argument(
    secured: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = bearer("tok-client")
    error = send_raw(secured, "GetRealm", GARBAGE["unterminated-varint"], client)
    assert (error.code(), error.details()) == (INVALID, expected("GetRealm"))
    error = send_raw(secured, "WatchJob", GARBAGE["unterminated-varint"], client)
    assert (error.code(), error.details()) == (INVALID, expected("WatchJob"))
    # Role checks also come before parsing: a worker may not call GetRealm.
    error = send_raw(secured, "GetRealm", GARBAGE["unterminated-varint"], bearer("tok-worker"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = claim_then_garbage(secured, bearer("tok-worker"))
    assert (error.code(), error.details()) == (INVALID, expected("ClaimJobs"))
    assert assert_quiet(caplog, most_warnings=3) >= 2
