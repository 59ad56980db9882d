"""Bearer tokens and roles (DESIGN.md section 8): no or bad token is
UNAUTHENTICATED, a call outside the role is PERMISSION_DENIED; health and
reflection stay open. And the server refuses to listen beyond loopback
without auth unless told it is insecure."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.config import ConfigError, add_server_arguments, settings_from_args
from tests.api.conftest import LiveServer
from tests.api.helpers import RPC_TIMEOUT, hello, store_snapshot
from tests.api.worker_stream import StreamClient

Metadata = tuple[tuple[str, str], ...]
TOKENS = {"tok-client": "client", "tok-worker": "worker", "tok-admin": "admin"}
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

CLIENT_RPCS = {
    "CreateRealm",
    "GetRealm",
    "ListRealms",
    "ReindexRealm",
    "WriteRealmFile",
    "DeleteRealmFile",
    "ListRealmFiles",
    "ReadRealmFile",
    "StreamRealmFiles",
    "WriteRealmFiles",
    "SearchRealm",
    "GetJob",
    "ListJobs",
    "WatchJob",
    "ExplainJob",
    "ListWorkers",
    "GetQueueStats",
}
WORKER_RPCS = {"ClaimJobs", "ListRealmFiles", "ReadRealmFile", "StreamRealmFiles", "GetJob"}
# Job control: admins only. Their requests name nothing that exists, so an
# allowed call ends in NOT_FOUND (past the role check) and changes nothing.
ADMIN_ACTIONS = {"CancelJob", "RetryJob", "DeleteRealm"}
ALL_RPCS = CLIENT_RPCS | ADMIN_ACTIONS | {"ReindexAllRealms", "ClaimJobs"}
ALLOWED = {"client": CLIENT_RPCS, "worker": WORKER_RPCS, "admin": ALL_RPCS}


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


ADMIN = bearer("tok-admin")


@pytest.fixture
def secured(live_with: Callable[..., LiveServer]) -> Iterator[tuple[LiveServer, str]]:
    """A server with tokens, holding realm "authz" whose first index is done
    (so WatchJob on it ends), and files for each role to delete."""
    live = live_with(tokens=TOKENS)
    created = live.stub.CreateRealm(
        spb.CreateRealmRequest(
            realm_id="authz",
            initial_files=[pb.FileContent(path=f"del-{r}.txt") for r in ("client", "admin")],
        ),
        metadata=ADMIN,
        timeout=RPC_TIMEOUT,
    )
    stream = StreamClient(live.stub, hello=hello("seeder"), metadata=ADMIN)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert stream.complete(a.lease_id).accepted
    stream.close()
    assert stream.wait_closed() is None
    yield live, created.job.job_id


def attempt(
    live: LiveServer, rpc: str, metadata: Metadata, job_id: str, who: str
) -> grpc.StatusCode:
    """Call `rpc` with a request that succeeds when the role may call it."""
    requests: dict[str, Any] = {
        "CreateRealm": spb.CreateRealmRequest(realm_id=f"made-by-{who}"),
        "GetRealm": spb.GetRealmRequest(realm_id="authz"),
        "ListRealms": spb.ListRealmsRequest(),
        "ReindexRealm": spb.ReindexRealmRequest(realm_id="authz"),
        "ReindexAllRealms": spb.ReindexAllRealmsRequest(),
        "WriteRealmFile": spb.WriteRealmFileRequest(realm_id="authz", path=f"w-{who}.txt"),
        "DeleteRealmFile": spb.DeleteRealmFileRequest(realm_id="authz", path=f"del-{who}.txt"),
        "ListRealmFiles": spb.ListRealmFilesRequest(realm_id="authz"),
        "ReadRealmFile": spb.ReadRealmFileRequest(realm_id="authz", path="realm.json"),
        "StreamRealmFiles": spb.StreamRealmFilesRequest(realm_id="authz"),
        "WriteRealmFiles": spb.WriteRealmFilesRequest(
            realm_id="authz", files=[pb.FileContent(path=f"bulk-{who}.txt")]
        ),
        "SearchRealm": spb.SearchRealmRequest(realm_id="authz"),
        "GetJob": spb.GetJobRequest(job_id=job_id),
        "ListJobs": spb.ListJobsRequest(),
        "WatchJob": spb.WatchJobRequest(job_id=job_id),
        "ExplainJob": spb.ExplainJobRequest(job_id=job_id),
        "ListWorkers": spb.ListWorkersRequest(),
        "GetQueueStats": spb.GetQueueStatsRequest(),
        "CancelJob": spb.CancelJobRequest(job_id="987654321"),
        "RetryJob": spb.RetryJobRequest(job_id="987654321"),
        "DeleteRealm": spb.DeleteRealmRequest(realm_id="no-such-realm"),
    }
    try:
        if rpc == "ClaimJobs":
            stream = StreamClient(live.stub, hello=hello(f"w-{who}"), metadata=metadata)
            try:
                stream.settings()
            finally:
                stream.close()
            assert stream.wait_closed() is None
        elif rpc == "StreamRealmFiles":
            messages = list(
                live.stub.StreamRealmFiles(requests[rpc], metadata=metadata, timeout=RPC_TIMEOUT)
            )
            assert messages[0].total_files >= 2
        elif rpc == "WatchJob":
            (snapshot,) = list(
                live.stub.WatchJob(requests[rpc], metadata=metadata, timeout=RPC_TIMEOUT)
            )
            assert snapshot.job.state == pb.Job.STATE_SUCCEEDED
        else:
            getattr(live.stub, rpc)(requests[rpc], metadata=metadata, timeout=RPC_TIMEOUT)
    except grpc.RpcError as e:
        if e.code() in (DENIED, UNAUTHENTICATED):
            return e.code()
        if rpc in ADMIN_ACTIONS and e.code() == grpc.StatusCode.NOT_FOUND:
            return OK
        raise AssertionError(f"{rpc} as {who}: {e.code()} {e.details()}") from e
    return OK


@pytest.mark.parametrize("role", ["client", "worker", "admin"])
def test_each_role_calls_exactly_its_rpcs(secured: tuple[LiveServer, str], role: str) -> None:
    live, job_id = secured
    got = {rpc: attempt(live, rpc, bearer(f"tok-{role}"), job_id, role) for rpc in sorted(ALL_RPCS)}
    expected = {rpc: OK if rpc in ALLOWED[role] else DENIED for rpc in sorted(ALL_RPCS)}
    if role == "worker":
        # Workers read only realms of running jobs; "authz" has none now
        # (test_worker_runs_a_job_with_its_token reads one that has).
        expected.update(ListRealmFiles=DENIED, ReadRealmFile=DENIED, StreamRealmFiles=DENIED)
    assert got == expected


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        bearer("tok-nope"),
        bearer(""),
        (("authorization", "tok-admin"),),
        (("authorization", "Basic tok-admin"),),
        (("x-token", "tok-admin"),),
    ],
    ids=["none", "unknown", "empty", "no-scheme", "basic", "other-header"],
)
def test_missing_or_bad_token_is_unauthenticated(
    secured: tuple[LiveServer, str], metadata: Metadata
) -> None:
    live, job_id = secured
    before = store_snapshot(live.srv.db)
    got = {rpc: attempt(live, rpc, metadata, job_id, "nobody") for rpc in sorted(ALL_RPCS)}
    assert got == dict.fromkeys(sorted(ALL_RPCS), UNAUTHENTICATED)
    assert store_snapshot(live.srv.db) == before


def test_permission_denied_names_the_role_and_method(secured: tuple[LiveServer, str]) -> None:
    live, _ = secured
    with pytest.raises(grpc.RpcError) as denied:
        live.stub.ReindexAllRealms(spb.ReindexAllRealmsRequest(), metadata=bearer("tok-client"))
    assert denied.value.code() == DENIED
    details = denied.value.details() or ""
    assert "client" in details and "ReindexAllRealms" in details
    stream = StreamClient(live.stub, hello=hello("intruder"), metadata=bearer("tok-client"))
    error = stream.wait_closed()
    assert error is not None and error.code() == DENIED
    assert "ClaimJobs" in (error.details() or "")


def test_worker_runs_a_job_with_its_token(secured: tuple[LiveServer, str]) -> None:
    live, _ = secured
    created = live.stub.CreateRealm(
        spb.CreateRealmRequest(realm_id="for-worker"), metadata=bearer("tok-client")
    )
    worker = bearer("tok-worker")
    stream = StreamClient(live.stub, hello=hello("w"), metadata=worker)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == created.job.job_id
    files = live.stub.ListRealmFiles(
        spb.ListRealmFilesRequest(realm_id="for-worker", lease_id=a.lease_id), metadata=worker
    ).files
    assert {f.path for f in files} == {"realm.json", "index.json"}
    read = live.stub.ReadRealmFile(
        spb.ReadRealmFileRequest(realm_id="for-worker", path="realm.json", lease_id=a.lease_id),
        metadata=worker,
    )
    assert b"for-worker" in read.content
    assert stream.complete(a.lease_id).accepted
    job = live.stub.GetJob(spb.GetJobRequest(job_id=a.job.job_id), metadata=worker).job
    assert job.state == pb.Job.STATE_SUCCEEDED
    # The job is done: its lease no longer opens the realm.
    with pytest.raises(grpc.RpcError) as denied:
        live.stub.ListRealmFiles(
            spb.ListRealmFilesRequest(realm_id="for-worker", lease_id=a.lease_id),
            metadata=worker,
        )
    assert denied.value.code() == DENIED
    stream.close()


def test_worker_reads_are_bound_to_its_lease(secured: tuple[LiveServer, str]) -> None:
    """Any worker token used to read any realm that had a running job; now a
    worker reads a realm only by quoting the lease of its running job there."""
    live, _ = secured
    client = bearer("tok-client")
    for realm_id in ("held-one", "held-two"):
        live.stub.CreateRealm(spb.CreateRealmRequest(realm_id=realm_id), metadata=client)
    worker = bearer("tok-worker")
    stream = StreamClient(live.stub, hello=hello("w"), metadata=worker)
    stream.settings()
    stream.credit(2)
    leases = {a.job.realm_id: a.lease_id for a in stream.assignments(2)}
    assert set(leases) == {"held-one", "held-two"}
    attempts = {
        "no lease": "",
        "another realm's lease": leases["held-two"],
        "a made-up lease": "0" * 32,
    }
    for what, lease_id in attempts.items():
        for call in (
            lambda lease=lease_id: live.stub.ListRealmFiles(
                spb.ListRealmFilesRequest(realm_id="held-one", lease_id=lease), metadata=worker
            ),
            lambda lease=lease_id: live.stub.ReadRealmFile(
                spb.ReadRealmFileRequest(realm_id="held-one", path="realm.json", lease_id=lease),
                metadata=worker,
            ),
        ):
            with pytest.raises(grpc.RpcError) as denied:
                call()
            assert denied.value.code() == DENIED, what
            assert "lease" in (denied.value.details() or ""), what
    # The right lease opens it; a client needs none.
    read = live.stub.ReadRealmFile(
        spb.ReadRealmFileRequest(
            realm_id="held-one", path="realm.json", lease_id=leases["held-one"]
        ),
        metadata=worker,
    )
    assert b"held-one" in read.content
    read = live.stub.ReadRealmFile(
        spb.ReadRealmFileRequest(realm_id="held-one", path="realm.json"), metadata=client
    )
    assert b"held-one" in read.content
    stream.close()


def test_health_and_reflection_need_no_token(secured: tuple[LiveServer, str]) -> None:
    live, _ = secured
    health = health_pb2_grpc.HealthStub(live.channel)
    for service in ("", "realm.v1.RealmService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(live.channel).get_services()
    assert "realm.v1.RealmService" in services


# -- configuration ----------------------------------------------------------------------


def parse(*argv: str, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    for name in ("LISTEN", "TOKENS", "TOKENS_FILE", "INSECURE", "TLS_CERT", "TLS_KEY"):
        monkeypatch.delenv(f"REALM_{name}", raising=False)
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "example.com:1"]
)
def test_listening_beyond_loopback_without_tokens_is_refused(
    listen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as refused:
        settings_from_args(parse("--listen", listen, monkeypatch=monkeypatch))
    assert "--tokens" in str(refused.value) and "--insecure" in str(refused.value)


@pytest.mark.parametrize(
    "extra",
    [["--insecure"], ["--tokens", "client:abc,admin:xyz"]],
    ids=["insecure", "tokens"],
)
def test_listening_beyond_loopback_with_tokens_or_insecure(
    extra: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from_args(
        parse("--listen", "0.0.0.0:50051", *extra, monkeypatch=monkeypatch)
    )
    assert settings.listen == "0.0.0.0:50051"
    if "--tokens" in extra:
        assert settings.tokens == {"abc": "client", "xyz": "admin"} and settings.auth_enabled


@pytest.mark.parametrize("listen", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051"])
def test_loopback_needs_no_tokens(listen: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_args(parse("--listen", listen, monkeypatch=monkeypatch))
    assert not settings.auth_enabled


def test_insecure_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN", "TOKENS", "TOKENS_FILE", "TLS_CERT", "TLS_KEY"):
        monkeypatch.delenv(f"REALM_{name}", raising=False)
    monkeypatch.setenv("REALM_INSECURE", "1")
    monkeypatch.setenv("REALM_LISTEN", "0.0.0.0:7000")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    settings = settings_from_args(parser.parse_args([]))
    assert settings.insecure and settings.listen == "0.0.0.0:7000"
