"""Resumable ClaimJobs sessions (DESIGN.md section 5), seen from the wire: a
stream that breaks keeps its leases for the resume grace; the worker that
reconnects with the stream's resume token re-attaches them and carries on
under the same leases (one attempt); what it sends again is applied once; a
lease not re-attached in time is released as interrupted (uncounted); a
stream the worker closes releases at once."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service import metrics
from tests.api.conftest import BASE, LiveServer, start_live_server
from tests.api.helpers import (
    attempt_outcomes,
    counted_failures,
    create_realm,
    entry_for,
    get_job,
    hello,
    poll,
)
from tests.api.worker_stream import StreamClient

GRACE = 30.0  # far longer than the tests wait, unless they say otherwise


def connect(
    live: LiveServer, worker: str, *, token: str = "", leases: Sequence[str] = ()
) -> tuple[StreamClient, spb.StreamSettings]:
    h = hello(worker)
    h.resume_token = token
    h.resume_lease_ids.extend(leases)
    stream = StreamClient(live.stub, hello=h, answer_pings=True)
    return stream, stream.settings()


def entries_of(live: LiveServer, realm_id: str) -> list[pb.IndexEntry]:
    files = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id=realm_id)).files
    return [entry_for(f) for f in files]


def send_batch(
    stream: StreamClient, lease_id: str, entries: Sequence[pb.IndexEntry], number: int
) -> spb.LeaseAck:
    stream.send(
        spb.ClaimJobsRequest(
            entries=spb.IndexEntryBatch(lease_id=lease_id, entries=list(entries), sequence=number)
        )
    )
    (ack,) = stream.acks()
    return ack


def test_a_broken_stream_is_resumed_under_the_same_lease(
    live_with: Callable[..., LiveServer],
) -> None:
    live = live_with(resume_grace_seconds=GRACE)
    before = {how: resumed(how) for how in ("detached", "reattached")}
    job = create_realm(live.stub, "r").job
    first, settings = connect(live, "w")
    assert settings.resume_token and settings.resume_grace.seconds == int(GRACE)
    first.credit(1)
    (a,) = first.assignments(1)
    entries = entries_of(live, "r")
    ack = send_batch(first, a.lease_id, entries[:1], 1)
    assert (ack.accepted, ack.entries_sequence) == (True, 1)

    first.cancel()  # the connection breaks
    assert isinstance(first.wait_closed(), grpc.RpcError)
    time.sleep(0.3)
    still = get_job(live.stub, job.job_id)
    assert still.state == pb.Job.STATE_RUNNING and still.attempt == 1
    explained = live.stub.ExplainJob(spb.ExplainJobRequest(job_id=job.job_id))
    assert "its stream broke" in explained.summary, explained.summary

    second, again = connect(live, "w", token=settings.resume_token, leases=[a.lease_id])
    assert [(r.lease_id, r.accepted) for r in again.resumed] == [(a.lease_id, True)]
    assert again.resumed[0].job_state == pb.Job.STATE_RUNNING
    # The token is proven: the stream keeps it (a break at any point keeps
    # the leases under the token the worker holds).
    assert again.resume_token == settings.resume_token
    # A batch sent again (its acknowledgement was lost with the stream) is
    # stored once; the result lands on the new stream.
    assert send_batch(second, a.lease_id, entries[:1], 1).accepted
    assert send_batch(second, a.lease_id, entries[1:], 2).accepted
    second.send_result(a.lease_id, entries_uploaded=len(entries))
    (done,) = second.acks()
    assert done.accepted and done.job_state == pb.Job.STATE_SUCCEEDED, done
    assert attempt_outcomes(live.srv.db, int(job.job_id)) == ["completed"]
    assert counted_failures(live.srv.db, int(job.job_id)) == 0
    assert {how: resumed(how) - n for how, n in before.items()} == {
        "detached": 1,
        "reattached": 1,
    }


def resumed(how: str) -> float:
    value = metrics.REGISTRY.get_sample_value("realm_leases_resumed_total", {"how": how})
    assert value is not None
    return value


def test_a_lease_not_reattached_within_the_grace_is_released_uncounted(
    live_with: Callable[..., LiveServer],
) -> None:
    live = live_with(resume_grace_seconds=0.5)
    job = create_realm(live.stub, "r").job
    first, settings = connect(live, "w")
    first.credit(1)
    (a,) = first.assignments(1)
    first.cancel()
    queued = poll(
        lambda: (j := get_job(live.stub, job.job_id)).state == pb.Job.STATE_QUEUED and j,
        what="the job released after the grace",
    )
    assert queued.attempt == 1
    assert attempt_outcomes(live.srv.db, int(job.job_id)) == ["interrupted"]
    assert counted_failures(live.srv.db, int(job.job_id)) == 0
    late, answer = connect(live, "w", token=settings.resume_token, leases=[a.lease_id])
    (refused,) = answer.resumed
    assert not refused.accepted and refused.job_state == pb.Job.STATE_QUEUED
    assert "released as interrupted" in refused.reason, refused.reason
    late.close()


def test_a_result_applied_before_the_break_is_answered_succeeded(
    live_with: Callable[..., LiveServer],
) -> None:
    live = live_with(resume_grace_seconds=GRACE)
    create_realm(live.stub, "r")
    first, settings = connect(live, "w")
    first.credit(1)
    (a,) = first.assignments(1)
    assert first.complete(a.lease_id).accepted
    first.cancel()
    again, answer = connect(live, "w", token=settings.resume_token, leases=[a.lease_id])
    (settled,) = answer.resumed
    assert not settled.accepted and settled.job_state == pb.Job.STATE_SUCCEEDED
    assert "its job completed" in settled.reason
    again.close()


def test_a_wrong_token_or_another_worker_reattaches_nothing(
    live_with: Callable[..., LiveServer],
) -> None:
    live = live_with(resume_grace_seconds=GRACE)
    job = create_realm(live.stub, "r").job
    first, settings = connect(live, "w")
    first.credit(1)
    (a,) = first.assignments(1)
    first.cancel()
    assert isinstance(first.wait_closed(), grpc.RpcError)
    for worker, token in (("w", "not-the-token"), ("intruder", settings.resume_token)):
        other, answer = connect(live, worker, token=token, leases=[a.lease_id])
        (refused,) = answer.resumed
        assert not refused.accepted and "not re-attached" in refused.reason, refused.reason
        other.close()
    # The lease is still there for its own worker.
    mine, answer = connect(live, "w", token=settings.resume_token, leases=[a.lease_id])
    assert [r.accepted for r in answer.resumed] == [True]
    assert mine.complete(a.lease_id).job_state == pb.Job.STATE_SUCCEEDED
    assert get_job(live.stub, job.job_id).attempt == 1


def test_a_result_after_the_break_counts_the_batches_sent_before_it(
    live_with: Callable[..., LiveServer],
) -> None:
    """Every entry went up in batches on the stream that broke; the result,
    sent on the new stream alone, reports them all and is accepted."""
    live = live_with(resume_grace_seconds=GRACE)
    job = create_realm(live.stub, "r").job
    first, settings = connect(live, "w")
    first.credit(1)
    (a,) = first.assignments(1)
    entries = entries_of(live, "r")
    assert entries
    assert send_batch(first, a.lease_id, entries, 1).accepted
    first.cancel()
    first.wait_closed()
    time.sleep(0.3)
    second, again = connect(live, "w", token=settings.resume_token, leases=[a.lease_id])
    assert [r.accepted for r in again.resumed] == [True]
    second.send_result(a.lease_id, entries_uploaded=len(entries))
    (done,) = second.acks()
    assert done.accepted and done.job_state == pb.Job.STATE_SUCCEEDED, done
    assert attempt_outcomes(live.srv.db, int(job.job_id)) == ["completed"]
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="r")).realm
    assert realm.stats.entries == len(entries)


@pytest.mark.parametrize("how", ["cancel", "delete the realm"])
def test_a_lease_revoked_during_the_handshake_is_answered_not_resumed(
    live_with: Callable[..., LiveServer], how: str
) -> None:
    """The job is cancelled (or its realm deleted) right after the store
    re-attached its lease, while the new stream's handshake is still running:
    the settings answer the lease as not resumed, and the stream carries on."""
    live = live_with(resume_grace_seconds=GRACE)
    job = create_realm(live.stub, "r").job
    first, settings = connect(live, "w")
    first.credit(1)
    (a,) = first.assignments(1)
    first.cancel()
    first.wait_closed()
    time.sleep(0.3)
    queue = live.srv.queue
    reattach = queue.reattach

    def reattach_then_cancel(*args: Any, **kwargs: Any) -> Any:
        found = reattach(*args, **kwargs)
        if how == "cancel":
            queue.cancel(int(job.job_id), "cancelled by a test")
        else:
            live.srv.realms.delete("r", "a-test-request")
        return found

    queue.reattach = reattach_then_cancel  # type: ignore[method-assign]
    try:
        second, again = connect(live, "w", token=settings.resume_token, leases=[a.lease_id])
    finally:
        queue.reattach = reattach  # type: ignore[method-assign]
    (answer,) = again.resumed
    assert answer.lease_id == a.lease_id and not answer.accepted, answer
    if how == "cancel":
        assert answer.job_state == pb.Job.STATE_CANCELLED, answer
        assert "cancel" in answer.reason, answer.reason
        assert get_job(live.stub, job.job_id).state == pb.Job.STATE_CANCELLED
    else:
        assert answer.job_state == pb.Job.STATE_UNSPECIFIED, answer
    # The stream holds nothing: a result for the lease is refused.
    second.send_result(a.lease_id, entries_uploaded=0)
    (refused,) = second.acks()
    assert not refused.accepted


def test_a_worker_that_saw_the_break_first_takes_its_leases_over(
    live_with: Callable[..., LiveServer],
) -> None:
    """The worker reconnects while this server still holds the old stream
    (it has not noticed the break): that stream is ended, its leases move."""
    live = live_with(resume_grace_seconds=GRACE)
    create_realm(live.stub, "r")
    first, settings = connect(live, "w")
    first.credit(1)
    (a,) = first.assignments(1)
    second, answer = connect(live, "w", token=settings.resume_token, leases=[a.lease_id])
    assert [r.accepted for r in answer.resumed] == [True]
    first.wait_closed()  # ended by the server (raises if it is not)
    assert second.complete(a.lease_id).job_state == pb.Job.STATE_SUCCEEDED


def test_a_stream_the_worker_closes_releases_its_leases_at_once(
    live_with: Callable[..., LiveServer],
) -> None:
    live = live_with(resume_grace_seconds=GRACE)
    job = create_realm(live.stub, "r").job
    first, _ = connect(live, "w")
    first.credit(1)
    first.assignments(1)
    first.close()
    poll(
        lambda: get_job(live.stub, job.job_id).state == pb.Job.STATE_QUEUED,
        timeout=GRACE / 3,
        what="the job released at once",
    )


def test_leases_reattach_through_another_instance(pg_url: str) -> None:
    """On PostgreSQL a worker may come back through another instance."""
    settings = replace(BASE, store_url=pg_url, resume_grace_seconds=GRACE)
    a_server, stop_a = start_live_server(settings)
    b_server, stop_b = start_live_server(settings)
    try:
        _reattach_elsewhere(a_server, b_server)
    finally:
        stop_b()
        stop_a()


def _reattach_elsewhere(a_server: LiveServer, b_server: LiveServer) -> None:
    job = create_realm(a_server.stub, "r").job
    first, settings = connect(a_server, "w")
    first.credit(1)
    (a,) = first.assignments(1)
    first.cancel()
    assert isinstance(first.wait_closed(), grpc.RpcError)
    second, answer = connect(b_server, "w", token=settings.resume_token, leases=[a.lease_id])
    assert [r.accepted for r in answer.resumed] == [True], answer.resumed
    # Held by B now: A's reaper leaves it alone, B completes it.
    assert second.complete(a.lease_id).job_state == pb.Job.STATE_SUCCEEDED
    assert get_job(b_server.stub, job.job_id).attempt == 1
