"""A file written or deleted while an incremental job covering its path runs
gets a follow-up job: the running one may have read the path already."""

from __future__ import annotations

from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import LiveServer
from tests.api.worker_stream import StreamClient


def test_write_or_delete_during_a_covering_run_queues_a_follow_up(live: LiveServer) -> None:
    stub = live.stub
    created = stub.CreateRealm(spb.CreateRealmRequest(realm_id="w"))
    stream = StreamClient(stub)
    stream.settings()
    stream.credit(1)
    (first,) = stream.assignments(1)
    assert first.job.job_id == created.job.job_id
    assert stream.complete(first.lease_id).accepted

    stub.WriteRealmFile(spb.WriteRealmFileRequest(realm_id="w", path="a.txt", content=b"1"))
    stub.DeleteRealmFile(spb.DeleteRealmFileRequest(realm_id="w", path="a.txt"))
    stub.WriteRealmFile(spb.WriteRealmFileRequest(realm_id="w", path="b.txt", content=b"1"))
    stream.credit(1)
    (inc,) = stream.assignments(1)
    changes = {(c.path, c.deleted) for c in inc.job.path_changes}
    assert changes == {("a.txt", True), ("b.txt", False)}

    again = stub.WriteRealmFile(spb.WriteRealmFileRequest(realm_id="w", path="b.txt", content=b"2"))
    assert again.disposition == pb.DISPOSITION_RERUN_SCHEDULED
    assert again.job.job_id != inc.job.job_id
    assert again.job.state == pb.Job.STATE_QUEUED

    gone = stub.DeleteRealmFile(spb.DeleteRealmFileRequest(realm_id="w", path="b.txt"))
    assert gone.disposition == pb.DISPOSITION_MERGED  # into the queued follow-up
    assert stream.complete(inc.lease_id).accepted
    stream.credit(1)
    (follow,) = stream.assignments(1)
    assert follow.job.job_id == again.job.job_id
    assert [(c.path, c.deleted) for c in follow.job.path_changes] == [("b.txt", True)]
    assert stream.complete(follow.lease_id).accepted
    stream.close()
    stream.wait_closed()
