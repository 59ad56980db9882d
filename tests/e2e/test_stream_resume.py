"""A worker whose connection to the server is cut in the middle of a long
job carries on (DESIGN.md section 5, resumable sessions): it reconnects
through the same TCP proxy, re-attaches its lease with the stream's resume
token, resumes its file stream after the last whole file it had, and the job
finishes in one attempt with every file read once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from realm.v1 import resources_pb2 as pb

from tests.e2e.conftest import System
from tests.e2e.helpers import (
    Attempt,
    assert_index_whole,
    bulk_cards,
    counted_failures,
    create_realm,
    get_job,
    job_attempts,
    poll,
    wait_job,
)
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.e2e

BIG = 1000


@pytest.fixture
def proxy_for() -> Iterator[list[Proxy]]:
    proxies: list[Proxy] = []
    yield proxies
    for proxy in proxies:
        proxy.close()


def test_a_cut_connection_costs_no_attempt_and_no_file_twice(
    store_url: str, system: System, proxy_for: list[Proxy]
) -> None:
    server = system.start_server(
        store_url, "--lease-seconds", "300", "--resume-grace-seconds", "30"
    )
    host, port = server.address.rsplit(":", 1)
    proxy = Proxy(host, int(port)).start()
    proxy_for.append(proxy)
    stub = server.stub()
    files = bulk_cards(BIG)
    job_id = create_realm(stub, "big", files).job.job_id

    worker = system.start_worker(
        proxy.address, "w", "--concurrency", "1", "--files-per-second", "400", "--batch-size", "50"
    )

    def running_at(done: int) -> pb.Job | None:
        job = get_job(stub, job_id)
        return job if job.state == pb.Job.STATE_RUNNING and job.progress.done >= done else None

    mid = poll(lambda: running_at(200), what="the job a fifth done")
    assert mid.progress.done < mid.progress.total
    assert proxy.cut() >= 1  # the ClaimJobs stream and the file stream with it

    done = wait_job(stub, job_id)
    assert done.state == pb.Job.STATE_SUCCEEDED, done
    # One attempt, under the lease it started with; nothing counted.
    assert done.attempt == 1
    assert job_attempts(store_url, job_id) == [Attempt("completed", "w")]
    assert counted_failures(store_url, job_id) == 0
    # Every file read once: the worker's count of files visited is the
    # realm's file count (a restarted stream would have counted more).
    total = len(files) + 2  # realm.json and index.json
    assert (done.progress.done, done.progress.total) == (total, total), done.progress
    assert_index_whole(stub, "big", [*files, "realm.json", "index.json"])
    log = worker.stderr() + worker.stdout()
    assert "stream broken; jobs carried over" in log
    assert "session resumed" in log
    assert worker.stop() == 0
