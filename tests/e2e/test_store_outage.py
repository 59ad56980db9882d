"""PostgreSQL goes away under load and comes back: the workers stay up,
reconnect on their own, and every job completes, none failed by the outage.

Before, the server ended every ClaimJobs stream with INVALID_ARGUMENT when a
store call failed; workers take that as "this worker is wrong" and exited,
leaving the queue to wait for someone to restart them."""

from __future__ import annotations

import pytest
from realm.v1 import resources_pb2 as pb

from tests.e2e.conftest import System
from tests.e2e.helpers import (
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

REALMS = 40
FILES = 20
OUTAGE_SECONDS = 8.0


def test_workers_ride_out_a_store_outage(
    pg_behind_proxy: tuple[str, Proxy], system: System
) -> None:
    store_url, proxy = pg_behind_proxy
    server = system.start_server(store_url, "--lease-seconds", "6", "--heartbeat-seconds", "0.5")
    workers = [
        system.start_worker(server, f"w{i}", "--concurrency", "2", "--files-per-second", "300")
        for i in (1, 2)
    ]
    stub = server.stub()
    jobs = [create_realm(stub, f"r{i}", bulk_cards(FILES)).job.job_id for i in range(REALMS)]

    def some_done() -> bool:
        states = [get_job(stub, job_id).state for job_id in jobs]
        return pb.Job.STATE_SUCCEEDED in states and pb.Job.STATE_QUEUED in states

    poll(some_done, timeout=60, what="some jobs done while others wait")
    proxy.cut(down_seconds=OUTAGE_SECONDS)
    for job_id in jobs:
        done = wait_job(stub, job_id, timeout=120, tolerate_unavailable=True)
        assert done.state == pb.Job.STATE_SUCCEEDED, done
        # The outage interrupted attempts; it never counted one as failed.
        assert counted_failures(store_url, job_id) == 0, job_attempts(store_url, job_id)
        outcomes = [a.outcome for a in job_attempts(store_url, job_id)]
        assert set(outcomes[:-1]) <= {"interrupted"} and outcomes[-1] == "completed", outcomes
    for worker in workers:
        assert worker.alive(), f"{worker.name} exited:\n{worker.stderr()[-2000:]}"
        assert "not retrying" not in worker.stderr()
        assert worker.stop() == 0
    assert server.proc.alive()
    assert "Traceback" not in server.proc.stderr()
