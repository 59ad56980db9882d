"""Job control: CancelJob, RetryJob, DeleteRealm, ExplainJob, ListWorkers,
GetQueueStats, on a real server with ClaimJobs streams played by the test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb
from sqlalchemy import func, select

from realm_service.store.tables import IndexEntryRow
from tests.api.conftest import LiveServer
from tests.api.helpers import (
    RPC_TIMEOUT,
    entry_for,
    get_job,
    hello,
    poll,
    realm_jobs,
    rpc_error,
)
from tests.api.worker_stream import StreamClient

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
W = spb.WaitReason


def _create(live: LiveServer, realm_id: str, *, priority: int = 10) -> pb.Job:
    reply = live.stub.CreateRealm(
        spb.CreateRealmRequest(
            realm_id=realm_id,
            priority=priority,
            initial_files=[pb.FileContent(path="a.txt", content=b"a")],
        ),
        timeout=RPC_TIMEOUT,
    )
    return reply.job


def _cancel(live: LiveServer, job_id: str, reason: str = "") -> pb.Job:
    reply = live.stub.CancelJob(
        spb.CancelJobRequest(job_id=job_id, reason=reason), timeout=RPC_TIMEOUT
    )
    return reply.job


def _explain(live: LiveServer, job_id: str) -> spb.ExplainJobResponse:
    return live.stub.ExplainJob(spb.ExplainJobRequest(job_id=job_id), timeout=RPC_TIMEOUT)


def _staged_rows(live: LiveServer, realm_id: str) -> int:
    with live.srv.db.session_for_tests() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(IndexEntryRow)
                .where(IndexEntryRow.realm_id == realm_id)
            )
            or 0
        )


def _revocation(stream: StreamClient) -> spb.LeaseAck:
    (ack,) = stream.acks()
    return ack


def test_cancel_a_queued_first_job_marks_the_realm_and_reindex_recovers(
    live: LiveServer,
) -> None:
    job = _create(live, "c1")
    cancelled = _cancel(live, job.job_id, "wrong files")
    assert cancelled.state == pb.Job.STATE_CANCELLED
    assert cancelled.error_message == "cancelled: wrong files"
    assert cancelled.finish_time.seconds > 0
    # Idempotent.
    assert _cancel(live, job.job_id).state == pb.Job.STATE_CANCELLED
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="c1")).realm
    assert realm.state == pb.Realm.STATE_INDEX_CANCELLED
    # A worker gets nothing: the queue is empty.
    stream = StreamClient(live.stub)
    stream.settings()
    stream.credit(1)
    assert stream.poll(0.5) is None
    # A later reindex works.
    again = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="c1"))
    assert again.disposition == pb.DISPOSITION_INSERTED
    (a,) = stream.assignments(1)
    assert a.job.job_id == again.job.job_id
    assert stream.complete(a.lease_id).accepted
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="c1")).realm
    assert realm.state == pb.Realm.STATE_READY
    stream.close()
    stream.wait_closed()


def test_cancel_a_running_job_revokes_its_lease_and_refuses_late_results(
    live: LiveServer,
) -> None:
    job = _create(live, "c2")
    stream = StreamClient(live.stub)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    files = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="c2")).files
    stream.send_entries(a.lease_id, [entry_for(f) for f in files])
    poll(lambda: _staged_rows(live, "c2") == len(files), what="entries staged")

    cancelled = _cancel(live, job.job_id, "operator")
    assert cancelled.state == pb.Job.STATE_CANCELLED
    # The worker is told on its stream, without asking.
    ack = _revocation(stream)
    assert (ack.lease_id, ack.accepted) == (a.lease_id, False)
    assert "revoked" in ack.reason and "operator" in ack.reason
    assert ack.job_state == pb.Job.STATE_CANCELLED
    # What it staged is gone; its late result is refused.
    assert _staged_rows(live, "c2") == 0
    stream.send_result(a.lease_id)
    (late,) = stream.acks()
    assert not late.accepted
    assert get_job(live.stub, job.job_id).state == pb.Job.STATE_CANCELLED
    explained = _explain(live, job.job_id)
    assert [x.outcome for x in explained.attempts] == ["cancelled"]
    # Its slot is free again: the next job of the realm runs.
    nxt = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="c2")).job
    stream.credit(1)
    (b,) = stream.assignments(1)
    assert b.job.job_id == nxt.job_id
    stream.close()
    stream.wait_closed()


def test_cancel_of_a_finished_job_is_a_failed_precondition(live: LiveServer) -> None:
    job = _create(live, "c3")
    stream = StreamClient(live.stub)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert stream.complete(a.lease_id).accepted
    error = rpc_error(lambda: _cancel(live, job.job_id))
    assert error.code() == FAILED_PRECONDITION
    assert "succeeded" in (error.details() or "")
    assert get_job(live.stub, job.job_id).state == pb.Job.STATE_SUCCEEDED
    stream.close()
    stream.wait_closed()


def test_cancel_racing_completion_has_exactly_one_winner(live: LiveServer) -> None:
    stream = StreamClient(live.stub)
    stream.settings()
    for i in range(8):
        job = _create(live, f"race{i}")
        stream.credit(1)
        (a,) = stream.assignments(1)
        outcome: dict[str, object] = {}
        go = threading.Barrier(2)

        def cancel(
            job_id: str = job.job_id,
            go: threading.Barrier = go,
            outcome: dict[str, object] = outcome,
        ) -> None:
            go.wait()
            try:
                outcome["cancel"] = _cancel(live, job_id).state
            except grpc.RpcError as e:
                outcome["cancel"] = e.code()

        t = threading.Thread(target=cancel)
        t.start()
        go.wait()
        stream.send_result(a.lease_id)
        t.join(10)
        acks = [stream.acks()[0]]
        if not acks[0].accepted and "revoked" in acks[0].reason:
            acks.append(stream.acks()[0])  # the revocation came first
        result = acks[-1]
        final = get_job(live.stub, job.job_id).state
        if final == pb.Job.STATE_SUCCEEDED:
            assert result.accepted
            assert outcome["cancel"] == FAILED_PRECONDITION
        else:
            assert final == pb.Job.STATE_CANCELLED
            assert outcome["cancel"] == pb.Job.STATE_CANCELLED
            assert not result.accepted
    stream.close()
    stream.wait_closed()


def test_retry_queues_a_failed_job_again_with_fresh_attempts(live: LiveServer) -> None:
    job = _create(live, "r1")
    stream = StreamClient(live.stub)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    stream.send_result(
        a.lease_id, spb.JobResult.OUTCOME_FAILED_PERMANENTLY, error_message="bad input"
    )
    stream.acks()
    assert get_job(live.stub, job.job_id).state == pb.Job.STATE_FAILED
    assert (
        live.stub.GetRealm(spb.GetRealmRequest(realm_id="r1")).realm.state
        == pb.Realm.STATE_INDEX_FAILED
    )

    retried = live.stub.RetryJob(spb.RetryJobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT)
    assert retried.disposition == pb.DISPOSITION_INSERTED
    assert retried.job.job_id != job.job_id
    assert (retried.job.state, retried.job.attempt) == (pb.Job.STATE_QUEUED, 0)
    assert retried.job.kind == pb.JOB_KIND_FROM_SCRATCH_INDEX
    assert retried.job.priority == job.priority
    assert (
        live.stub.GetRealm(spb.GetRealmRequest(realm_id="r1")).realm.state
        == pb.Realm.STATE_INDEXING
    )
    # Retrying again while that one is queued merges into it.
    again = live.stub.RetryJob(spb.RetryJobRequest(job_id=job.job_id))
    assert again.disposition == pb.DISPOSITION_MERGED
    assert again.job.job_id == retried.job.job_id
    # Only failed or cancelled jobs are retried.
    error = rpc_error(lambda: live.stub.RetryJob(spb.RetryJobRequest(job_id=retried.job.job_id)))
    assert error.code() == FAILED_PRECONDITION
    stream.close()
    stream.wait_closed()


def test_delete_realm_revokes_its_jobs_and_a_new_realm_starts_afresh(live: LiveServer) -> None:
    old = _create(live, "gone")
    stream = StreamClient(live.stub)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    files = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="gone")).files
    stream.send_entries(a.lease_id, [entry_for(f, search_text="old") for f in files])

    reply = live.stub.DeleteRealm(
        spb.DeleteRealmRequest(realm_id="gone", request_id="del-1"), timeout=RPC_TIMEOUT
    )
    assert (reply.jobs_cancelled, reply.files_deleted, reply.replayed) == (1, 3, False)
    ack = _revocation(stream)
    assert (ack.lease_id, ack.accepted) == (a.lease_id, False)
    assert "deleted" in ack.reason
    error = rpc_error(lambda: live.stub.GetRealm(spb.GetRealmRequest(realm_id="gone")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert _staged_rows(live, "gone") == 0
    # Idempotent by request id; without one, a second delete is NOT_FOUND.
    replay = live.stub.DeleteRealm(spb.DeleteRealmRequest(realm_id="gone", request_id="del-1"))
    assert replay.replayed
    missing = rpc_error(lambda: live.stub.DeleteRealm(spb.DeleteRealmRequest(realm_id="gone")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND

    # A realm created again with the id gets one from-scratch job of its own.
    new = _create(live, "gone")
    assert new.job_id != old.job_id
    assert [j.job_id for j in realm_jobs(live.stub, "gone")] == [new.job_id]
    # The old lease's late result is refused and touches nothing of it.
    stream.send_result(a.lease_id, entries_uploaded=len(files))
    (late,) = stream.acks()
    assert not late.accepted
    stream.credit(1)
    (b,) = stream.assignments(1)
    assert b.job.job_id == new.job_id
    assert stream.complete(b.lease_id, [entry_for(f) for f in files]).accepted
    found = live.stub.SearchRealm(spb.SearchRealmRequest(realm_id="gone", text="old"))
    assert list(found.entries) == []
    stream.close()
    stream.wait_closed()


def _reasons(live: LiveServer, job_id: str) -> dict[int, str]:
    return {r.code: r.message for r in _explain(live, job_id).reasons}


def test_explain_says_why_a_queued_job_waits(live_with: Callable[..., LiveServer]) -> None:
    live = live_with(reserved_slots=1)
    first = _create(live, "e1")
    explained = _explain(live, first.job_id)
    assert set(_reasons(live, first.job_id)) == {W.CODE_NO_WORKERS}
    assert explained.summary.startswith(f"Job {first.job_id} is queued: no worker")
    assert explained.jobs_ahead == 0

    # A user lane only: a priority-10 job finds no worker that takes it.
    lane = StreamClient(live.stub, hello=hello("lane", min_priority=50), answer_pings=True)
    lane.settings()
    reasons = _reasons(live, first.job_id)
    assert set(reasons) == {W.CODE_NO_MATCHING_WORKER}
    assert "priority >= 50" in reasons[W.CODE_NO_MATCHING_WORKER]

    # A shared worker without credits: every slot busy. Jobs ahead.
    shared = StreamClient(live.stub, hello=hello("shared"), answer_pings=True)
    shared.settings()
    second = _create(live, "e2")
    reasons = _reasons(live, second.job_id)
    assert set(reasons) == {W.CODE_JOBS_AHEAD, W.CODE_ALL_SLOTS_BUSY}
    assert f"job {first.job_id}" in reasons[W.CODE_JOBS_AHEAD]
    explained = _explain(live, second.job_id)
    assert explained.jobs_ahead == 1
    assert [j.job_id for j in explained.ahead] == [first.job_id]

    # The realm's running job holds a follow-up back.
    shared.credit(1)
    (a,) = shared.assignments(1)
    assert a.job.job_id == first.job_id
    follow = live.stub.ReindexRealm(
        spb.ReindexRealmRequest(realm_id="e1", content_changed=True)
    ).job
    assert W.CODE_REALM_BUSY in _reasons(live, follow.job_id)
    running = _explain(live, first.job_id)
    assert running.running.worker_id == "shared"
    assert running.running.stream_id
    assert running.running.lease_expire_time.seconds > 0
    assert running.summary.startswith(f"Job {first.job_id} is running on worker shared")
    assert shared.complete(a.lease_id).accepted
    for _ in range(2):  # e2's job and e1's follow-up
        shared.credit(1)
        (b,) = shared.assignments(1)
        assert shared.complete(b.lease_id).accepted

    # Two slots, one kept for user work: one SYSTEM job runs, the other waits.
    shared.credit(2)
    live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="e1", priority=0))
    (d,) = shared.assignments(1)
    assert d.job.priority == 0
    system = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="e2", priority=0)).job
    assert shared.poll(0.3) is None
    reasons = _reasons(live, system.job_id)
    assert set(reasons) == {W.CODE_RESERVED_SLOTS}
    assert "1 slot(s) are kept free for user work" in reasons[W.CODE_RESERVED_SLOTS]
    finished = _explain(live, first.job_id)
    assert [x.outcome for x in finished.attempts] == ["completed"]
    assert finished.attempts[0].worker_id == "shared"
    assert finished.summary == f"Job {first.job_id} succeeded after 1 attempt(s)."
    for s in (lane, shared):
        s.close()
        s.wait_closed()


def test_list_workers_and_queue_stats(live: LiveServer) -> None:
    stream = StreamClient(live.stub, hello=hello("pod-7", min_priority=5))
    stream.settings()
    _create(live, "s1")
    _create(live, "s2", priority=20)
    stream.credit(3)
    a, _ = stream.assignments(2)
    assert a.job.realm_id == "s2"  # the higher priority first
    workers = live.stub.ListWorkers(spb.ListWorkersRequest(), timeout=RPC_TIMEOUT).workers
    (w,) = workers
    assert (w.worker_id, w.min_priority, w.jobs_held, w.credits) == ("pod-7", 5, 2, 1)
    assert w.instance_id and w.stream_id and w.connect_time.seconds > 0
    assert stream.complete(a.lease_id).accepted
    third = _create(live, "s3")
    (c,) = stream.assignments(1)  # the third credit
    assert c.job.job_id == third.job_id
    waiting = _create(live, "s4", priority=30)

    stats = live.stub.GetQueueStats(spb.GetQueueStatsRequest(), timeout=RPC_TIMEOUT)
    counts = {(c.state, c.kind, c.priority): c.count for c in stats.counts}
    scratch = pb.JOB_KIND_FROM_SCRATCH_INDEX
    assert counts[(pb.Job.STATE_SUCCEEDED, scratch, 20)] == 1
    assert counts[(pb.Job.STATE_RUNNING, scratch, 10)] == 2
    assert counts[(pb.Job.STATE_QUEUED, scratch, 30)] == 1
    assert sum(counts.values()) == 4
    (oldest,) = stats.oldest
    assert oldest.priority == 30
    assert oldest.create_time == waiting.create_time
    assert stats.last_minute.succeeded == 1 and stats.last_hour.succeeded == 1
    assert stats.last_hour.failed == 0 and stats.last_hour.cancelled == 0
    stream.close()
    stream.wait_closed()


def test_explain_names_a_drain(live_with: Callable[..., LiveServer]) -> None:
    live = live_with(drain_grace_seconds=3.0)
    job = _create(live, "dr")
    # A stream keeps the drain waiting for its grace.
    stream = StreamClient(live.stub, hello=hello("held"), answer_pings=True)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    queued = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="dr", content_changed=True))
    draining = asyncio.run_coroutine_threadsafe(live.srv.drain_and_stop(), live.loop)
    poll(lambda: live.srv.servicer.draining, what="the drain to start")
    reasons = _reasons(live, queued.job.job_id)
    assert W.CODE_DRAINING in reasons
    assert "draining" in reasons[W.CODE_DRAINING]
    assert a.job.job_id == job.job_id
    stream.cancel()
    draining.result(15)


def test_each_attempt_names_the_worker_that_got_it(live: LiveServer) -> None:
    """Streams with the same filter are claimed for together; each attempt
    still records the one worker its job went to."""
    streams = {
        name: StreamClient(live.stub, hello=hello(name), answer_pings=True) for name in ("wa", "wb")
    }
    for s in streams.values():
        s.settings()
    streams["wa"].credit(3)
    streams["wb"].credit(1)
    poll(
        lambda: (
            len(live.stub.ListWorkers(spb.ListWorkersRequest()).workers) == 2
            and all(w.credits for w in live.stub.ListWorkers(spb.ListWorkersRequest()).workers)
        ),
        what="both streams with credits",
    )
    # Both streams ready when the jobs come: each claim is for the two.
    jobs = [_create(live, f"who{i}") for i in range(4)]
    got = {name: [a.job.job_id for a in s.assignments(3 if name == "wa" else 1)]
           for name, s in streams.items()}  # fmt: skip
    assert sorted(got["wa"] + got["wb"]) == sorted(j.job_id for j in jobs)
    for name, job_ids in got.items():
        for job_id in job_ids:
            explained = _explain(live, job_id)
            assert explained.running.worker_id == name
            assert [a.worker_id for a in explained.attempts] == [name]
            assert get_job(live.stub, job_id).worker_id == name
    for s in streams.values():
        s.close()
        s.wait_closed()
