"""Operating the server (DESIGN.md section 9): health, reflection, drain,
WatchJob, and CreateRealm waiting for its first index."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.config import Settings
from realm_service.store.db import open_database
from tests.api.conftest import BASE, LiveServer
from tests.api.helpers import (
    RPC_TIMEOUT,
    attempt_outcomes,
    counted_failures,
    create_realm,
    entry_for,
    get_job,
    open_stream,
    poll,
    realm_jobs,
    rpc_error,
    stored_jobs,
)
from tests.api.worker_stream import StreamClient

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RPCS = {
    "CreateRealm",
    "GetRealm",
    "ListRealms",
    "ReindexRealm",
    "ReindexAllRealms",
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
    "CancelJob",
    "RetryJob",
    "DeleteRealm",
    "ExplainJob",
    "ListWorkers",
    "GetQueueStats",
    "ClaimJobs",
}


@pytest.fixture
def server_settings(store_url: str) -> Settings:
    """`live` with leases no test here outlives: none expires unless a test makes it."""
    return replace(BASE, store_url=store_url, lease_seconds=60)


def health_of(live: LiveServer, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(live.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    return reply.status  # type: ignore[no-any-return]


def test_health_is_serving(live: LiveServer) -> None:
    assert health_of(live) == SERVING
    assert health_of(live, "realm.v1.RealmService") == SERVING
    error = rpc_error(lambda: health_of(live, "no.such.Service"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_service(live: LiveServer) -> None:
    database = ProtoReflectionDescriptorDatabase(live.channel)
    services = set(database.get_services())
    assert {"realm.v1.RealmService", "grpc.health.v1.Health"} <= services
    service = DescriptorPool(database).FindServiceByName("realm.v1.RealmService")
    assert {m.name for m in service.methods} == RPCS
    claim = service.methods_by_name["ClaimJobs"]
    assert claim.input_type.full_name == "realm.v1.ClaimJobsRequest"
    assert "hello" in claim.input_type.fields_by_name


def test_drain_tells_streams_waits_the_grace_then_requeues(
    live_with: Callable[..., LiveServer],
) -> None:
    live = live_with(drain_grace_seconds=3.0, lease_seconds=60)
    store_url = live.srv.settings.store_url
    done_job = create_realm(live.stub, "finished").job.job_id
    held_job = create_realm(live.stub, "held").job.job_id
    stream = open_stream(live.stub, "w", credits=2)
    leases = {a.job.job_id: a for a in stream.assignments(2)}
    assert health_of(live) == SERVING

    draining = asyncio.run_coroutine_threadsafe(live.srv.drain_and_stop(), live.loop)
    message = stream.next()
    assert message.HasField("drain"), message
    assert message.drain.grace.ToTimedelta().total_seconds() == 3.0
    poll(lambda: health_of(live) == NOT_SERVING, what="health NOT_SERVING")
    assert health_of(live, "realm.v1.RealmService") == NOT_SERVING
    # No new work is taken while draining.
    refused = rpc_error(lambda: create_realm(live.stub, "late"))
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    late = StreamClient(live.stub)
    error = late.wait_closed()
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    # A result sent within the grace is applied...
    ack = stream.complete(leases[done_job].lease_id)
    assert ack.accepted and ack.job_state == pb.Job.STATE_SUCCEEDED
    # ...and the lease still held when it runs out is given back.
    assert stream.wait_closed(timeout=RPC_TIMEOUT) is None
    draining.result(RPC_TIMEOUT)

    db = open_database(store_url, migrate=False)
    try:
        states = {str(j.job_id): j.state for j in stored_jobs(db)}
        assert states == {done_job: "succeeded", held_job: "queued"}
        assert attempt_outcomes(db, int(held_job)) == ["interrupted"]
        assert counted_failures(db, int(held_job)) == 0
    finally:
        db.close()


def test_watch_job_streams_snapshots_until_terminal(live: LiveServer) -> None:
    created = create_realm(live.stub, "watched")
    job_id = created.job.job_id
    snapshots: list[pb.Job] = []
    ended = threading.Event()

    def watch() -> None:
        for reply in live.stub.WatchJob(spb.WatchJobRequest(job_id=job_id), timeout=60):
            snapshots.append(reply.job)
        ended.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    poll(lambda: snapshots, what="the first snapshot")
    assert snapshots[0].state == pb.Job.STATE_QUEUED

    stream = open_stream(live.stub, "w", credits=1)
    (a,) = stream.assignments(1)
    poll(lambda: snapshots[-1].state == pb.Job.STATE_RUNNING, what="a RUNNING snapshot")
    stream.heartbeat({a.lease_id: (1, 2)})
    assert stream.acks()[0].accepted
    poll(
        lambda: (snapshots[-1].progress.done, snapshots[-1].progress.total) == (1, 2),
        what="the heartbeat's progress",
    )
    assert not ended.is_set()
    files = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="watched")).files
    assert stream.complete(a.lease_id, [entry_for(f) for f in files]).accepted
    assert ended.wait(RPC_TIMEOUT), "the watch ends once the job is terminal"
    watcher.join(RPC_TIMEOUT)

    states = [s.state for s in snapshots]
    assert states[-1] == pb.Job.STATE_SUCCEEDED
    assert states == sorted(states), "states only move forward"
    assert all(a != b for a, b in itertools.pairwise(snapshots)), "no repeats"
    assert {s.job_id for s in snapshots} == {job_id}
    # A terminal job: one snapshot, then the end.
    (only,) = list(live.stub.WatchJob(spb.WatchJobRequest(job_id=job_id), timeout=RPC_TIMEOUT))
    assert only.job.state == pb.Job.STATE_SUCCEEDED
    stream.close()


def test_create_with_wait_for_index_returns_when_the_job_is_done(live: LiveServer) -> None:
    stream = open_stream(live.stub, "w")
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(
            lambda: live.stub.CreateRealm(
                spb.CreateRealmRequest(realm_id="awaited", wait_for_index=True), timeout=60
            )
        )
        job_id = poll(lambda: realm_jobs(live.stub, "awaited"), what="the job").pop().job_id
        stream.credit(1)
        (a,) = stream.assignments(1)
        assert a.job.job_id == job_id
        # The job is running, not terminal: the call is still waiting.
        assert not waiting.done()
        files = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="awaited")).files
        assert stream.complete(a.lease_id, [entry_for(f) for f in files]).accepted
        reply = waiting.result(RPC_TIMEOUT)
    assert reply.job.job_id == job_id and reply.job.state == pb.Job.STATE_SUCCEEDED
    assert reply.realm.state == pb.Realm.STATE_READY and reply.realm.stats.entries == 2
    stream.close()


def test_create_with_wait_for_index_and_a_short_deadline_returns_the_queued_job(
    live: LiveServer,
) -> None:
    # No worker: the job cannot finish before the deadline.
    reply = live.stub.CreateRealm(
        spb.CreateRealmRequest(realm_id="impatient", wait_for_index=True), timeout=3.0
    )
    assert reply.realm.realm_id == "impatient"
    assert reply.realm.state == pb.Realm.STATE_INDEXING
    assert reply.job.state == pb.Job.STATE_QUEUED
    # The realm and its one job stay; the client can watch it.
    assert [j.job_id for j in realm_jobs(live.stub, "impatient")] == [reply.job.job_id]
    assert get_job(live.stub, reply.job.job_id).state == pb.Job.STATE_QUEUED
