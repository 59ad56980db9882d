"""The server restarts under connected workers: SIGTERM drains it while jobs
run and others wait; a new server on the same port and store takes over; the
workers reconnect on their own and every job completes, once. After a crash
(SIGKILL) the lease expires instead. A port in use is refused."""

from __future__ import annotations

import signal

import pytest
from realm.v1 import resources_pb2 as pb

from tests.e2e.conftest import System, program
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
    stored_job_states,
    wait_job,
)

pytestmark = pytest.mark.e2e

REALMS = 5
# The two oldest realms are big enough to be mid-way when the server stops
# (the workers read one file at a time); the others wait, and are small.
FILES_PER_REALM = 800
FILES_PER_WAITING_REALM = 20
# Read one at a time, enough to outlast a restart and the dead server's timeout.
CRASHED_FILES = 2000
SERVER_FLAGS = (
    "--lease-seconds", "300", "--heartbeat-seconds", "0.2",
    "--drain-grace-seconds", "1", "--reserved-slots", "0",
)  # fmt: skip


def test_server_restart_under_running_workers(store_url: str, system: System) -> None:
    first = system.start_server(store_url, *SERVER_FLAGS)
    workers = [
        system.start_worker(
            first, f"w{i}", "--concurrency", "1", "--files-per-second", "300", "--batch-size", "20"
        )
        for i in (1, 2)
    ]
    stub = first.stub()
    contents = {
        f"realm-{i}": bulk_cards(FILES_PER_REALM if i < 2 else FILES_PER_WAITING_REALM)
        for i in range(REALMS)
    }
    jobs = {
        realm_id: create_realm(stub, realm_id, files).job.job_id
        for realm_id, files in contents.items()
    }

    def busy() -> dict[str, pb.Job] | None:
        snapshot = {realm_id: get_job(stub, job_id) for realm_id, job_id in jobs.items()}
        states = [job.state for job in snapshot.values()]
        running = [j for j in snapshot.values() if j.state == pb.Job.STATE_RUNNING]
        ok = any(j.progress.done > 0 for j in running) and pb.Job.STATE_QUEUED in states
        return snapshot if ok else None

    before = poll(busy, what="a job running with progress while others wait")
    assert not any(j.state == pb.Job.STATE_FAILED for j in before.values())

    assert first.proc.stop() == 0
    for worker in workers:
        assert worker.alive(), f"{worker.name} exited with the server"
    # The drain requeued what did not finish in its grace: nothing is left running.
    at_stop = stored_job_states(store_url, list(jobs.values()))
    assert set(at_stop.values()) <= {"queued", "succeeded"}, at_stop
    unfinished = [job_id for job_id, state in at_stop.items() if state == "queued"]
    assert unfinished, at_stop

    second = system.start_server(store_url, *SERVER_FLAGS, port=first.port, name="server-2")
    assert second.address == first.address
    stub = second.stub()
    for realm_id, job_id in jobs.items():
        done = wait_job(stub, job_id, timeout=120)
        assert done.state == pb.Job.STATE_SUCCEEDED, done
        # Attempts cut short by the drain are interrupted, never counted as failures.
        attempts = job_attempts(store_url, job_id)
        assert [a.outcome for a in attempts][-1] == "completed", attempts
        assert {a.outcome for a in attempts[:-1]} <= {"interrupted"}, attempts
        # An attempt names the workers it was claimed for (both, when both had room).
        assert {w for a in attempts for w in a.worker.split(",")} <= {"w1", "w2"}
        assert done.attempt == len(attempts)
        assert counted_failures(store_url, job_id) == 0
        # Exactly one job for the realm: the restart's boot mount added none.
        assert [j.job_id for j in realm_jobs(stub, realm_id)] == [job_id]
        assert_index_whole(stub, realm_id, [*contents[realm_id], "realm.json", "index.json"])

    # The jobs left unfinished by the first server completed through the
    # second one, so the workers reconnected to it.
    for job_id in unfinished:
        assert "completed" in [a.outcome for a in job_attempts(store_url, job_id)]
    for worker in workers:
        assert worker.alive()
        assert worker.stop() == 0


def test_server_crashes_do_not_use_up_a_healthy_jobs_attempts(
    store_url: str, system: System
) -> None:
    """A SIGKILLed server releases nothing: its lease expires, and the next
    server requeues it once the dead server's instance row has gone stale,
    as an interruption. Crashing the server as often as the attempts cap
    used to fail the job and the realm; now the job completes, once, with
    no counted failure."""
    crashes = 2
    flags = ("--lease-seconds", "4", "--heartbeat-seconds", "0.3", "--max-attempts", str(crashes))
    server = system.start_server(store_url, *flags)
    files = bulk_cards(CRASHED_FILES)
    job_id = create_realm(server.stub(), "crashed", files).job.job_id
    worker = system.start_worker(server, "w1", "--concurrency", "1", "--files-per-second", "300")
    for crash in range(1, crashes + 1):
        stub = server.stub()
        poll(
            lambda stub=stub, crash=crash: (
                (job := get_job(stub, job_id)).state == pb.Job.STATE_RUNNING
                and job.attempt == crash
                and job.progress.done > 0
            ),
            timeout=90,
            what=f"the job running with progress before crash {crash}",
        )
        server.proc.send(signal.SIGKILL)
        assert server.proc.wait() == -signal.SIGKILL
        assert stored_job_states(store_url, [job_id]) == {job_id: "running"}
        server = system.start_server(store_url, *flags, port=server.port, name=f"server-{crash}")
    stub = server.stub()
    done = wait_job(stub, job_id, timeout=120)
    assert done.state == pb.Job.STATE_SUCCEEDED, done
    attempts = job_attempts(store_url, job_id)
    assert attempts == [*[Attempt("interrupted", "w1")] * crashes, Attempt("completed", "w1")]
    assert counted_failures(store_url, job_id) == 0
    assert [j.job_id for j in realm_jobs(stub, "crashed")] == [job_id]
    assert_index_whole(stub, "crashed", [*files, "realm.json", "index.json"])
    assert worker.stop() == 0


def test_second_server_on_a_port_in_use_refuses_to_start(sqlite_url: str, system: System) -> None:
    """Only the port matters here, so one store is enough. The restart above
    relies on it: a new server must never share a port with a live one."""
    first = system.start_server(sqlite_url)
    clash = system.start(
        "clash",
        [*program("realm-service", "realm_service"), "serve",
         "--listen", first.address, "--store", sqlite_url],
    )  # fmt: skip
    assert clash.wait(timeout=60) == 4  # EXIT_LISTEN
    assert "listening on" not in clash.stdout()
    assert "Traceback" not in clash.stderr()
    assert first.address in clash.stderr()
    # The first server still answers, alone.
    stub = first.stub()
    job = create_realm(stub, "still-here", {}).job
    assert get_job(stub, job.job_id).realm_id == "still-here"
    assert first.proc.alive()
