"""ReindexRealm while a worker waits: the enqueue's own transaction starts the
job for that worker, so the reply already shows it running and the stream
gets it exactly once; without a free credit it is queued as before."""

from __future__ import annotations

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import LiveServer
from tests.api.helpers import (
    RPC_TIMEOUT,
    attempt_outcomes,
    create_realm,
    get_job,
    open_stream,
    poll,
    rpc_error,
)


def _reindex(live: LiveServer, realm_id: str, **kw: object) -> spb.ReindexRealmResponse:
    return live.stub.ReindexRealm(
        spb.ReindexRealmRequest(realm_id=realm_id, **kw),  # type: ignore[arg-type]
        timeout=RPC_TIMEOUT,
    )


def _wait_for_credits(live: LiveServer, credits: int) -> None:
    """The stream has `credits` free, and the claim round its grant started
    has ended (no hand-off is offered while one claims)."""
    dispatcher = live.srv.dispatcher
    poll(
        lambda: (
            [s.credits for s in dispatcher.streams.values()] == [credits]
            and not dispatcher._claims_in_flight
        ),
        what=f"the stream to have {credits} free credits",
    )


def test_a_reindex_starts_at_once_for_a_waiting_worker(live: LiveServer) -> None:
    first = create_realm(live.stub, "handed").job.job_id
    stream = open_stream(live.stub, "waiting", credits=1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == first and stream.complete(a.lease_id).accepted
    stream.credit(1)  # one free credit: the worker waits for work
    _wait_for_credits(live, 1)

    reply = _reindex(live, "handed", priority=40)
    assert reply.disposition == pb.DISPOSITION_INSERTED
    assert reply.job.state == pb.Job.STATE_RUNNING and reply.job.worker_id == "waiting"
    (b,) = stream.assignments(1)
    assert (b.job.job_id, b.job.priority) == (reply.job.job_id, 40)
    assert stream.poll(0.3) is None  # given once, not again by a round
    assert stream.complete(b.lease_id).accepted
    assert get_job(live.stub, reply.job.job_id).state == pb.Job.STATE_SUCCEEDED
    assert attempt_outcomes(live.srv.db, int(reply.job.job_id)) == ["completed"]

    # No free credit: the job is queued, and goes out once one comes.
    queued = _reindex(live, "handed")
    assert queued.job.state == pb.Job.STATE_QUEUED
    assert stream.poll(0.3) is None
    stream.credit(1)
    (c,) = stream.assignments(1)
    assert c.job.job_id == queued.job.job_id
    stream.close()


def test_a_reindex_for_an_unknown_realm_leaves_the_credit_free(live: LiveServer) -> None:
    stream = open_stream(live.stub, "waiting", credits=1)
    _wait_for_credits(live, 1)
    error = rpc_error(lambda: _reindex(live, "nowhere"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "nowhere" in (error.details() or "")
    created = create_realm(live.stub, "later").job.job_id
    (a,) = stream.assignments(1)
    assert a.job.job_id == created
    stream.close()
