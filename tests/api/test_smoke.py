from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import LiveServer


def test_create_claim_complete(live: LiveServer) -> None:
    stub = live.stub
    created = stub.CreateRealm(spb.CreateRealmRequest(realm_id="r1"))
    assert created.job.priority == 10
    assert created.job.state == pb.Job.STATE_QUEUED

    outbox: queue.Queue[spb.ClaimJobsRequest | None] = queue.Queue()
    outbox.put(spb.ClaimJobsRequest(hello=spb.WorkerHello(worker_id="w1", incarnation_id="i1")))
    outbox.put(spb.ClaimJobsRequest(credit=spb.CreditGrant(credits=2)))

    def requests() -> Iterator[spb.ClaimJobsRequest]:
        while (m := outbox.get()) is not None:
            yield m

    responses = stub.ClaimJobs(requests())
    first = next(responses)
    assert first.HasField("settings")
    assign = next(responses)
    (a,) = assign.assignments.assignments
    assert a.job.job_id == created.job.job_id
    files = stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="r1")).files
    assert sorted(f.path for f in files) == ["index.json", "realm.json"]
    outbox.put(
        spb.ClaimJobsRequest(
            entries=spb.IndexEntryBatch(
                lease_id=a.lease_id,
                entries=[pb.IndexEntry(path="index.json", card_type="m/Grid", title="T", size=1)],
            )
        )
    )
    outbox.put(
        spb.ClaimJobsRequest(
            results=spb.JobResults(
                results=[
                    spb.JobResult(
                        lease_id=a.lease_id,
                        outcome=spb.JobResult.OUTCOME_SUCCEEDED,
                        entries_uploaded=1,
                    )
                ]
            )
        )
    )
    ack = next(responses)
    assert ack.acks.acks[0].accepted, ack
    assert ack.acks.acks[0].job_state == pb.Job.STATE_SUCCEEDED
    realm = stub.GetRealm(spb.GetRealmRequest(realm_id="r1")).realm
    assert realm.state == pb.Realm.STATE_READY and realm.stats.cards == 1
    found = stub.SearchRealm(spb.SearchRealmRequest(realm_id="r1", card_type="m/Grid"))
    assert [e.path for e in found.entries] == ["index.json"]
    outbox.put(None)
    threading.Thread(target=_drain, args=(responses,), daemon=True).start()


def _drain(responses: Iterator[spb.ClaimJobsResponse]) -> None:
    """Read the stream to its end; the fixture's channel close may cut it."""
    with contextlib.suppress(grpc.RpcError):
        for _ in responses:
            pass
