"""A worker grants the slots of finished jobs right after their results, and
the server takes those credits while it still records the results (their
leases are finishing): the credits count against the stream's bound as
free slots, and a malformed results message leaves no lease finishing."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.api import claim_stream
from realm_service.api.claim_stream import ClaimSession
from tests.api.conftest import LiveServer
from tests.api.helpers import create_realm, open_stream, store_held


def test_credits_for_finishing_leases_are_within_the_streams_bound(
    live_with: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a bound of 4 outstanding credits, a worker of 3 slots holding 3
    jobs sends their results and grants the 3 slots again while the results
    are still being recorded: 3 + 3 would pass the bound if finishing leases
    counted as held, and the stream would end INVALID_ARGUMENT."""
    monkeypatch.setattr(claim_stream, "MAX_CREDITS", 4)
    live = live_with(lease_seconds=60, ping_seconds=30)
    jobs = [create_realm(live.stub, f"r{i}").job.job_id for i in range(3)]
    stream = open_stream(live.stub, "w1", credits=3)
    leases = stream.assignments(3)
    assert sorted(a.job.job_id for a in leases) == sorted(jobs)
    with store_held(live.srv.db, int(leases[0].job.job_id)):
        stream.send(
            spb.ClaimJobsRequest(
                results=spb.JobResults(
                    results=[
                        spb.JobResult(lease_id=a.lease_id, outcome=spb.JobResult.OUTCOME_SUCCEEDED)
                        for a in leases
                    ]
                )
            )
        )
        stream.credit(3)
        time.sleep(0.3)  # the credit is taken while the results wait
    acks = stream.acks()
    assert [a.accepted for a in acks] == [True, True, True], acks
    assert all(a.job_state == pb.Job.STATE_SUCCEEDED for a in acks)
    created = create_realm(live.stub, "after")
    (a,) = stream.assignments(1)  # the credits work
    assert a.job.job_id == created.job.job_id
    stream.close()


def test_only_a_leases_first_result_in_a_message_decides_whether_it_ends() -> None:
    """`_results` answers a lease's first result in a message and refuses the
    rest as not held: a first result without an outcome leaves the lease
    held, so it must not be marked finishing either."""
    ok, unset = spb.JobResult.OUTCOME_SUCCEEDED, spb.JobResult.OUTCOME_UNSPECIFIED
    results = spb.JobResults(
        results=[
            spb.JobResult(lease_id="a", outcome=unset),
            spb.JobResult(lease_id="a", outcome=ok),
            spb.JobResult(lease_id="b", outcome=ok),
            spb.JobResult(lease_id="b", outcome=unset),
            spb.JobResult(lease_id="c", outcome=spb.JobResult.OUTCOME_FAILED),
        ]
    )
    assert ClaimSession._ending(results) == ["b", "c"]
