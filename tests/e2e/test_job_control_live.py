"""Job control with real processes: a real worker stops a cancelled job and a
job of a deleted realm, on both stores; on PostgreSQL, two server instances
share their workers' presence and a cancel reaches the worker through the
instance that holds its stream."""

from __future__ import annotations

import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.e2e.conftest import System
from tests.e2e.helpers import (
    bulk_cards,
    create_realm,
    get_job,
    job_attempts,
    poll,
    realm_jobs,
    stored_entry_rows,
)

pytestmark = pytest.mark.e2e

FILES = 600
# Slow enough to be caught mid-job: 600 files at 150 a second is 4 s.
PACE = ("--files-per-second", "150", "--batch-size", "20")


def _running_midway(stub: object, job_id: str) -> pb.Job:
    def midway() -> pb.Job | None:
        job = get_job(stub, job_id)  # type: ignore[arg-type]
        ok = job.state == pb.Job.STATE_RUNNING and 40 <= job.progress.done < job.progress.total
        return job if ok else None

    return poll(midway, what=f"job {job_id} running mid-way")


def _worker_stopped_job(worker_log: str) -> bool:
    """The worker stopped its job because the server ended the lease: told
    by the revocation, or by the refusal of a heartbeat or entry batch it
    sent right after the cancel committed (the two race; either stops it)."""
    return "job lease lost" in worker_log and (
        "lease revoked" in worker_log or "is not current" in worker_log
    )


def test_a_real_worker_stops_a_cancelled_job_and_takes_the_next(
    store_url: str, system: System
) -> None:
    server = system.start_server(store_url)
    stub = server.stub()
    job_id = create_realm(stub, "big", bulk_cards(FILES)).job.job_id
    worker = system.start_worker(server, "w1", "--concurrency", "1", *PACE)
    _running_midway(stub, job_id)

    reply = stub.CancelJob(spb.CancelJobRequest(job_id=job_id, reason="test"))
    assert reply.job.state == pb.Job.STATE_CANCELLED
    # The worker is told and stops within a second or so; what it staged goes.
    poll(lambda: _worker_stopped_job(worker.stderr()), timeout=5, what="the worker stopping")
    poll(lambda: stored_entry_rows(store_url, "big") == 0, timeout=5, what="staged entries gone")
    assert [a.outcome for a in job_attempts(store_url, job_id)] == ["cancelled"]
    realm = stub.GetRealm(spb.GetRealmRequest(realm_id="big")).realm
    assert realm.state == pb.Realm.STATE_INDEX_CANCELLED

    # Its slot is free: the next job runs on the same worker and succeeds.
    small = create_realm(stub, "small", bulk_cards(5, prefix="small")).job.job_id
    done = poll(
        lambda: (j := get_job(stub, small)).state == pb.Job.STATE_SUCCEEDED and j,
        what="the next job",
    )
    assert done.attempt == 1
    assert get_job(stub, job_id).state == pb.Job.STATE_CANCELLED
    assert worker.alive()


def test_deleting_a_realm_mid_job_stops_the_worker_and_a_new_realm_starts_clean(
    store_url: str, system: System
) -> None:
    server = system.start_server(store_url)
    stub = server.stub()
    old = create_realm(stub, "doomed", bulk_cards(FILES)).job.job_id
    worker = system.start_worker(server, "w1", "--concurrency", "1", *PACE)
    _running_midway(stub, old)

    reply = stub.DeleteRealm(spb.DeleteRealmRequest(realm_id="doomed", request_id="d1"))
    assert (reply.jobs_cancelled, reply.files_deleted) == (1, FILES + 2)
    poll(lambda: _worker_stopped_job(worker.stderr()), timeout=5, what="the worker told")

    new = create_realm(stub, "doomed", bulk_cards(3, prefix="fresh")).job.job_id
    assert new != old
    done = poll(
        lambda: (j := get_job(stub, new)).state == pb.Job.STATE_SUCCEEDED and j,
        what="the new realm's job",
    )
    assert [j.job_id for j in realm_jobs(stub, "doomed")] == [done.job_id]
    realm = stub.GetRealm(spb.GetRealmRequest(realm_id="doomed")).realm
    assert (realm.stats.files, realm.stats.entries) == (5, 5)
    assert stored_entry_rows(store_url, "doomed") == 5
    assert worker.alive()


def test_two_instances_share_presence_and_a_cancel_reaches_the_other_ones_worker(
    pg_url: str, system: System
) -> None:
    a = system.start_server(pg_url, name="server-a")
    b = system.start_server(pg_url, name="server-b")
    stub_b = b.stub()
    worker = system.start_worker(a, "on-a", "--concurrency", "1", "--min-priority", "5", *PACE)

    # B lists A's worker once A has published its streams.
    def seen_from_b() -> list[spb.Worker]:
        return [w for w in stub_b.ListWorkers(spb.ListWorkersRequest()).workers]

    (w,) = poll(seen_from_b, what="the worker listed by the other instance")
    assert (w.worker_id, w.min_priority) == ("on-a", 5)
    instance_a = w.instance_id
    assert instance_a

    # A SYSTEM job: explained from B, the lane of A's worker is named.
    job_id = create_realm(stub_b, "lane", bulk_cards(3), priority=0).job.job_id
    explained = stub_b.ExplainJob(spb.ExplainJobRequest(job_id=job_id))
    codes = [r.code for r in explained.reasons]
    assert codes == [spb.WaitReason.CODE_NO_MATCHING_WORKER], explained
    assert "priority >= 5" in explained.reasons[0].message

    # A job running on A's worker, cancelled through B: A tells its worker.
    big = create_realm(stub_b, "big", bulk_cards(FILES)).job.job_id
    running = _running_midway(stub_b, big)
    assert running.state == pb.Job.STATE_RUNNING
    where = stub_b.ExplainJob(spb.ExplainJobRequest(job_id=big)).running
    assert (where.worker_id, where.instance_id) == ("on-a", instance_a)
    stub_b.CancelJob(spb.CancelJobRequest(job_id=big, reason="from b"))
    # A tells its worker when B's word (NOTIFY) arrives; a heartbeat or entry
    # batch the worker sends right after B's commit may be refused first as
    # no longer current. Either way the worker stops the job.
    poll(lambda: _worker_stopped_job(worker.stderr()), timeout=5, what="A's worker stopping")
    assert worker.alive()


def test_a_users_job_preempts_a_real_workers_system_job_which_then_finishes(
    store_url: str, system: System
) -> None:
    """No reserved slot, one worker slot busy with a long SYSTEM job: a
    user's new realm does not wait for it. The worker is told to hand the
    job back (logged as such, not as a lost lease), runs the user's job,
    then the SYSTEM job again, which completes; the interruption is not
    counted."""
    server = system.start_server(store_url, "--reserved-slots", "0")
    stub = server.stub()
    big = create_realm(stub, "big", bulk_cards(FILES), priority=0).job.job_id
    worker = system.start_worker(server, "w1", "--concurrency", "1", *PACE)
    _running_midway(stub, big)

    small = create_realm(stub, "small", bulk_cards(5, prefix="small"), priority=10).job.job_id
    done = poll(
        lambda: (j := get_job(stub, small)).state == pb.Job.STATE_SUCCEEDED and j,
        what="the user's job",
    )
    assert done.attempt == 1
    log = worker.stderr()
    assert "job handed back" in log and f"preempted for job {small}" in log
    assert "job lease lost" not in log
    finished = poll(
        lambda: (j := get_job(stub, big)).state == pb.Job.STATE_SUCCEEDED and j,
        timeout=30,
        what="the preempted job, run again",
    )
    assert finished.attempt == 2
    assert [a.outcome for a in job_attempts(store_url, big)] == ["interrupted", "completed"]
    realm = stub.GetRealm(spb.GetRealmRequest(realm_id="big")).realm
    assert realm.stats.entries == FILES + 2
    assert worker.alive()
