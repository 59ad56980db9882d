"""Workers that die or are stopped in the middle of a from-scratch job.

A SIGKILLed worker's connection closes, so the server releases its lease
as interrupted once the resume grace has passed (the lease is far longer
than the test waits); another worker then runs the job to completion, once,
going on from the checkpoint the killed one left. A SIGTERMed worker drains:
it finishes its job or releases it, takes nothing new, and exits 0.
"""

from __future__ import annotations

import signal

import pytest
from realm.v1 import resources_pb2 as pb

from tests.e2e.conftest import Server, System
from tests.e2e.helpers import (
    Attempt,
    assert_index_whole,
    bulk_cards,
    counted_failures,
    create_realm,
    get_job,
    job_attempts,
    poll,
    realm_jobs,
    stored_entry_rows,
    wait_job,
)

pytestmark = pytest.mark.e2e

# Enough files that one worker reading them one at a time takes seconds.
BIG = 1000
# Far longer than any wait below: a job that comes back did not come back by expiring.
SERVER_FLAGS = ("--lease-seconds", "300", "--heartbeat-seconds", "0.2")
# A job must come back within this, much sooner than its lease would expire.
RELEASE_WAIT = 30.0


def wait_running_with_progress(server: Server, job_id: str, min_done: int = 1) -> pb.Job:
    stub = server.stub()

    def running() -> pb.Job | None:
        job = get_job(stub, job_id)
        assert job.state in (pb.Job.STATE_QUEUED, pb.Job.STATE_RUNNING), job
        ok = job.state == pb.Job.STATE_RUNNING and job.progress.done >= min_done
        return job if ok else None

    job = poll(running, what=f"job {job_id} running with progress")
    assert job.progress.done < job.progress.total, f"the job is not mid-way: {job.progress}"
    return job


def wait_requeued(server: Server, job_id: str) -> pb.Job:
    stub = server.stub()
    return poll(
        lambda: (job := get_job(stub, job_id)).state == pb.Job.STATE_QUEUED and job,
        timeout=RELEASE_WAIT,
        what=f"job {job_id} back in the queue",
    )


def test_sigkilled_worker_job_completes_once_on_another(store_url: str, system: System) -> None:
    server = system.start_server(store_url, *SERVER_FLAGS)
    stub = server.stub()
    files = bulk_cards(BIG)
    job_id = create_realm(stub, "big", files).job.job_id

    doomed = system.start_worker(
        server, "doomed", "--concurrency", "1", "--files-per-second", "300", "--batch-size", "50"
    )
    # Past a few upload batches, so the attempt leaves staged entries behind.
    mid = wait_running_with_progress(server, job_id, min_done=120)
    assert mid.attempt == 1
    doomed.send(signal.SIGKILL)
    assert doomed.wait() == -signal.SIGKILL

    requeued = wait_requeued(server, job_id)
    assert requeued.attempt == 1
    assert job_attempts(store_url, job_id) == [Attempt("interrupted", "doomed")]
    assert counted_failures(store_url, job_id) == 0

    rescuer = system.start_worker(server, "rescuer", "--concurrency", "2")
    done = wait_job(stub, job_id)
    assert done.state == pb.Job.STATE_SUCCEEDED, done
    assert done.attempt == 2
    assert job_attempts(store_url, job_id) == [
        Attempt("interrupted", "doomed"),
        Attempt("completed", "rescuer"),
    ]
    assert counted_failures(store_url, job_id) == 0

    # The second attempt went on from the killed one's checkpoint: the files
    # whose entries the server had kept (uploaded in batches of 50) were not
    # read again; the rest were.
    assert 0 < done.progress.total <= len(files) + 2 - (mid.progress.done - 50), done.progress
    assert done.progress.done == done.progress.total
    # One job for the realm, succeeded once; the index is whole, and holds
    # each file once.
    jobs = realm_jobs(stub, "big")
    assert [(j.job_id, j.state) for j in jobs] == [(job_id, pb.Job.STATE_SUCCEEDED)]
    assert_index_whole(stub, "big", [*files, "realm.json", "index.json"])
    assert stored_entry_rows(store_url, "big") == len(files) + 2

    assert server.proc.alive()
    assert rescuer.stop() == 0


@pytest.mark.parametrize("drain", ["finishes", "releases"])
def test_sigtermed_worker_finishes_or_releases_and_exits_0(
    store_url: str, system: System, drain: str
) -> None:
    server = system.start_server(store_url, *SERVER_FLAGS)
    stub = server.stub()
    big_files = bulk_cards(BIG)
    small_files = bulk_cards(5, prefix="small")
    big_job = create_realm(stub, "big", big_files).job.job_id
    # Queued behind the big one: the single-slot worker must not take it while draining.
    small_job = create_realm(stub, "small", small_files).job.job_id

    drain_timeout = "120" if drain == "finishes" else "0"
    first = system.start_worker(
        server,
        "first",
        "--concurrency",
        "1",
        "--files-per-second",
        "300",
        "--drain-timeout",
        drain_timeout,
    )
    wait_running_with_progress(server, big_job)
    assert get_job(stub, small_job).state == pb.Job.STATE_QUEUED
    first.send(signal.SIGTERM)
    assert first.wait() == 0

    if drain == "finishes":
        # It completed the job it held before exiting.
        job = poll(
            lambda: (j := get_job(stub, big_job)).state != pb.Job.STATE_RUNNING and j,
            what="the drained job's result",
        )
        assert job.state == pb.Job.STATE_SUCCEEDED, job
        assert job.attempt == 1
        assert job_attempts(store_url, big_job) == [Attempt("completed", "first")]
    else:
        # It gave the job back at once; the server requeued it as interrupted.
        job = wait_requeued(server, big_job)
        assert job.attempt == 1
        assert job_attempts(store_url, big_job) == [Attempt("interrupted", "first")]
    assert counted_failures(store_url, big_job) == 0
    # The draining worker took nothing new.
    small = get_job(stub, small_job)
    assert (small.state, small.attempt) == (pb.Job.STATE_QUEUED, 0)
    assert job_attempts(store_url, small_job) == []

    second = system.start_worker(server, "second", "--concurrency", "2")
    for job_id in (big_job, small_job):
        done = wait_job(stub, job_id)
        assert done.state == pb.Job.STATE_SUCCEEDED, done
        assert counted_failures(store_url, job_id) == 0
    assert job_attempts(store_url, small_job) == [Attempt("completed", "second")]
    if drain == "releases":
        assert job_attempts(store_url, big_job) == [
            Attempt("interrupted", "first"),
            Attempt("completed", "second"),
        ]
        assert get_job(stub, big_job).attempt == 2

    for realm_id, files in (("big", big_files), ("small", small_files)):
        assert len(realm_jobs(stub, realm_id)) == 1
        assert_index_whole(stub, realm_id, [*files, "realm.json", "index.json"])
    assert second.stop() == 0
