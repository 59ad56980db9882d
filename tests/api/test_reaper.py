"""A lease that expires (the worker went silent on the job) is reaped: the job
is queued again with the attempt counted, the stream no longer counts it as
held, and a heartbeat for it is refused."""

from __future__ import annotations

import time
from dataclasses import replace

from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.config import Settings
from tests.api.conftest import start_live_server
from tests.api.worker_stream import StreamClient


def test_expired_lease_is_reaped_and_frees_the_stream_slot(server_settings: Settings) -> None:
    live, stop = start_live_server(replace(server_settings, lease_seconds=0.6))
    try:
        created = live.stub.CreateRealm(spb.CreateRealmRequest(realm_id="slow"))
        stream = StreamClient(live.stub)
        stream.settings()
        stream.credit(1)
        (a,) = stream.assignments(1)
        deadline = time.monotonic() + 15
        job = created.job
        while time.monotonic() < deadline:
            job = live.stub.GetJob(spb.GetJobRequest(job_id=created.job.job_id)).job
            held = [len(s.outstanding) for s in live.srv.dispatcher.streams.values()]
            if job.state == pb.Job.STATE_QUEUED and held == [0]:
                break
            time.sleep(0.05)
        assert job.state == pb.Job.STATE_QUEUED, job
        assert [len(s.outstanding) for s in live.srv.dispatcher.streams.values()] == [0]
        assert [o for _, o in live.srv.queue.attempts(int(job.job_id))] == ["expired"]
        stream.send(
            spb.ClaimJobsRequest(
                heartbeat=spb.Heartbeat(leases=[spb.LeaseProgress(lease_id=a.lease_id)])
            )
        )
        (ack,) = stream.acks()
        assert not ack.accepted
        stream.close()
        stream.wait_closed()
    finally:
        stop()
