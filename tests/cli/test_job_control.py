"""cancel, retry, rm-realm, explain, workers and stats; jobs of an unknown realm;
following a job across a server that went away. The test answers realmctl's
calls over grpc_testing."""

from __future__ import annotations

import io
import json
import sys

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realmctl_fakes import (
    T0,
    T0_ISO,
    Cli,
    assert_table_aligned,
    assert_values_aligned,
    make_job,
    make_realm,
)

QUEUED = res.Job.STATE_QUEUED
RUNNING = res.Job.STATE_RUNNING
SUCCEEDED = res.Job.STATE_SUCCEEDED
FAILED = res.Job.STATE_FAILED
CANCELLED = res.Job.STATE_CANCELLED
T1_ISO = "2023-11-14T22:14:20Z"  # T0 + 60 s


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# cancel and retry.


def test_cancel_sends_the_reason_and_shows_the_cancelled_job(cli: Cli) -> None:
    running = cli.start("cancel", "17", "--reason", "wrong realm")
    answer = rs.CancelJobResponse(job=make_job("17", state=CANCELLED, error="wrong realm"))
    request = cli.answer("CancelJob", answer).request
    result = running.result()

    assert result.code == 0, result.err
    assert request == rs.CancelJobRequest(job_id="17", reason="wrong realm")
    assert result.out == "cancelled job 17 (from-scratch, priority 10, cancelled)\n"


def test_cancel_json_and_refusal(cli: Cli) -> None:
    running = cli.start("--json", "cancel", "17")
    request = cli.answer("CancelJob", rs.CancelJobResponse(job=make_job(state=CANCELLED))).request
    data = json.loads(running.result().out)
    running = cli.start("cancel", "18")
    cli.fail("CancelJob", grpc.StatusCode.FAILED_PRECONDITION, "job 18 already succeeded")
    refused = running.result()

    assert request.reason == ""
    assert data["state"] == "STATE_CANCELLED"
    assert refused.code == 1
    assert refused.err == "realmctl: error: FAILED_PRECONDITION: job 18 already succeeded\n"


def test_retry_shows_the_job_that_will_run(cli: Cli) -> None:
    running = cli.start("retry", "17")
    answer = rs.RetryJobResponse(job=make_job("21"), disposition=res.DISPOSITION_INSERTED)
    request = cli.answer("RetryJob", answer).request
    result = running.result()
    running = cli.start("retry", "17", "--json")
    cli.answer(
        "RetryJob", rs.RetryJobResponse(job=make_job("21"), disposition=res.DISPOSITION_MERGED)
    )
    data = json.loads(running.result().out)

    assert request == rs.RetryJobRequest(job_id="17")
    assert result.out.splitlines() == [
        "retry of job 17: inserted",
        "job 21 (from-scratch, priority 10, queued)",
    ]
    assert (data["job"]["job_id"], data["disposition"]) == ("21", "DISPOSITION_MERGED")


# rm-realm.


def test_rm_realm_with_yes_sends_a_request_id_it_also_puts_in_the_metadata(cli: Cli) -> None:
    running = cli.start("rm-realm", "demo", "--yes")
    answer = rs.DeleteRealmResponse(jobs_cancelled=2, files_deleted=40)
    taken = cli.answer("DeleteRealm", answer)
    result = running.result()

    assert result.code == 0, result.err
    assert taken.request.realm_id == "demo"
    assert len(taken.request.request_id) == 32
    assert taken.metadata["x-request-id"] == taken.request.request_id
    assert result.out == "deleted realm demo: 40 files, 2 queued or running jobs cancelled\n"


def test_rm_realm_request_id_replayed_and_json(cli: Cli) -> None:
    running = cli.start("--json", "rm-realm", "demo", "--yes", "--request-id", "del-1")
    request = cli.answer("DeleteRealm", rs.DeleteRealmResponse(replayed=True)).request
    data = json.loads(running.result().out)
    running = cli.start("rm-realm", "demo", "--yes", "--request-id", "del-1")
    cli.answer("DeleteRealm", rs.DeleteRealmResponse(replayed=True))
    text = running.result().out

    assert request.request_id == "del-1"
    assert data["replayed"] is True
    assert text == "realm demo was deleted already (by this request id)\n"


def test_rm_realm_without_yes_and_without_a_terminal_refuses(cli: Cli) -> None:
    result = cli.run("rm-realm", "demo")  # pytest's stdin is not a terminal

    assert result.code == 2
    assert result.err == (
        "realmctl: error: rm-realm: stdin is not a terminal to confirm on; "
        "give --yes to delete realm demo\n"
    )
    assert cli.methods() == []


def test_rm_realm_asks_on_a_terminal(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", Terminal("yes\n"))
    running = cli.start("rm-realm", "demo")
    cli.answer("DeleteRealm", rs.DeleteRealmResponse(files_deleted=3))
    result = running.result()

    assert result.code == 0, result.err
    assert result.err == "delete realm demo with all its files, index and jobs? [y/N] "
    assert result.out.startswith("deleted realm demo: 3 files")


@pytest.mark.parametrize("reply", ["n\n", "\n", "nope\n", ""])
def test_rm_realm_declined_deletes_nothing(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, reply: str
) -> None:
    monkeypatch.setattr(sys, "stdin", Terminal(reply))
    result = cli.run("rm-realm", "demo")

    assert result.code == 1
    assert result.err.endswith("[y/N] realmctl: error: realm demo not deleted\n")
    assert cli.methods() == []


def test_rm_realm_of_an_unknown_realm(cli: Cli) -> None:
    running = cli.start("rm-realm", "nope", "--yes")
    cli.fail("DeleteRealm", grpc.StatusCode.NOT_FOUND, "realm nope not found")
    result = running.result()

    assert result.code == 1
    assert result.err == "realmctl: error: NOT_FOUND: realm nope not found\n"


# explain.


def test_explain_of_a_queued_job_gives_the_sentence_then_the_reasons(cli: Cli) -> None:
    answer = rs.ExplainJobResponse(
        job=make_job("17", priority=0),
        summary="Job 17 waits: 2 jobs come first, and the reserved slots hold SYSTEM work.",
        reasons=[
            rs.WaitReason(code=rs.WaitReason.CODE_JOBS_AHEAD, message="2 claimable jobs first"),
            rs.WaitReason(code=rs.WaitReason.CODE_RESERVED_SLOTS, message="1 slot kept free"),
        ],
        jobs_ahead=2,
        ahead=[make_job("15", priority=10), make_job("16", priority=10)],
    )
    running = cli.start("explain", "17")
    request = cli.answer("ExplainJob", answer).request
    result = running.result()

    assert request == rs.ExplainJobRequest(job_id="17")
    summary, blank, *rest = result.out.splitlines()
    assert summary == answer.summary
    assert blank == ""
    reasons = rest[: rest.index("")]
    assert reasons[0].split() == ["REASON", "DETAIL"]
    assert reasons[1].split() == ["jobs-ahead", "2", "claimable", "jobs", "first"]
    assert reasons[2].split() == ["reserved-slots", "1", "slot", "kept", "free"]
    assert_table_aligned("\n".join(reasons))
    assert "jobs ahead: 2" in rest
    ahead = rest[rest.index("jobs ahead: 2") + 1 :]
    assert [line.split()[0] for line in ahead] == ["JOB_ID", "15", "16"]


def test_explain_of_a_running_job_says_where_it_runs(cli: Cli) -> None:
    job = make_job("17", state=RUNNING, done=3, total=9)
    running_at = rs.RunningAttempt(worker_id="w1", stream_id="s-4", instance_id="i-1")
    running_at.lease_expire_time.seconds = T0 + 60
    running_at.last_heartbeat_time.seconds = T0
    answer = rs.ExplainJobResponse(job=job, summary="Job 17 runs on w1.", running=running_at)

    running = cli.start("explain", "17")
    cli.answer("ExplainJob", answer)
    result = running.result()

    summary, _, *block = result.out.splitlines()
    assert summary == "Job 17 runs on w1."
    assert block == [
        "worker:         w1",
        "instance:       i-1",
        "stream:         s-4",
        f"lease expires:  {T1_ISO}",
        f"last heartbeat: {T0_ISO}",
        "progress:       3/9",
    ]
    assert_values_aligned("\n".join(block))


def test_explain_of_a_finished_job_lists_its_attempts(cli: Cli) -> None:
    attempts = []
    for number, outcome, error in ((1, "expired", "lease expired"), (2, "failed", "bad\ncard")):
        attempt = rs.JobAttempt(
            number=number, worker_id=f"w{number}", instance_id="i-1", outcome=outcome,
            error_message=error,
        )  # fmt: skip
        attempt.start_time.seconds = T0
        attempt.end_time.seconds = T0 + 60
        attempts.append(attempt)
    answer = rs.ExplainJobResponse(
        job=make_job("17", state=FAILED), summary="Job 17 failed after 2 attempts.",
        attempts=attempts,
    )  # fmt: skip

    running = cli.start("explain", "17")
    cli.answer("ExplainJob", answer)
    result = running.result()
    running = cli.start("--json", "explain", "17")
    cli.answer("ExplainJob", answer)
    data = json.loads(running.result().out)

    summary, _, *table = result.out.splitlines()
    assert summary == "Job 17 failed after 2 attempts."
    assert table[0].split() == ["#", "WORKER", "INSTANCE", "STARTED", "ENDED", "OUTCOME", "ERROR"]
    assert table[1].split() == ["1", "w1", "i-1", T0_ISO, T1_ISO, "expired", "lease", "expired"]
    assert table[2].split() == ["2", "w2", "i-1", T0_ISO, T1_ISO, "failed", "bad", "card"]
    assert_table_aligned("\n".join(table))
    # --json: the whole answer.
    assert data["summary"] == "Job 17 failed after 2 attempts."
    assert [a["outcome"] for a in data["attempts"]] == ["expired", "failed"]
    assert data["job"]["state"] == "STATE_FAILED"
    assert data["reasons"] == [] and data["jobs_ahead"] == "0"


def test_explain_of_an_unknown_job(cli: Cli) -> None:
    running = cli.start("explain", "99")
    cli.fail("ExplainJob", grpc.StatusCode.NOT_FOUND, "job 99 not found")
    result = running.result()

    assert (result.code, result.err) == (1, "realmctl: error: NOT_FOUND: job 99 not found\n")


# workers and stats.


def test_workers_table_and_json(cli: Cli) -> None:
    lane = rs.Worker(
        worker_id="w1", incarnation_id="inc-1", instance_id="i-1", stream_id="s-1",
        kinds=[res.JOB_KIND_INCREMENTAL_INDEX], min_priority=10, credits=3, jobs_held=1,
    )  # fmt: skip
    lane.connect_time.seconds = T0
    lane.last_message_time.seconds = T0 + 60
    anything = rs.Worker(worker_id="w2", instance_id="i-1", stream_id="s-2", credits=4)
    answer = rs.ListWorkersResponse(workers=[lane, anything])

    running = cli.start("workers")
    request = cli.answer("ListWorkers", answer).request
    table = running.result().out
    running = cli.start("workers", "--json")
    cli.answer("ListWorkers", answer)
    data = json.loads(running.result().out)

    assert request == rs.ListWorkersRequest()
    lines = table.splitlines()
    assert lines[0].split() == [
        "WORKER", "INSTANCE", "KINDS", "MIN_PRIORITY", "CREDITS", "HELD", "CONNECTED",
        "LAST_MESSAGE", "STREAM",
    ]  # fmt: skip
    assert lines[1].split() == ["w1", "i-1", "incremental", "10", "3", "1", T0_ISO, T1_ISO, "s-1"]
    assert lines[2].split() == ["w2", "i-1", "all", "0", "4", "0", "-", "-", "s-2"]
    assert_table_aligned(table)
    assert [w["worker_id"] for w in data] == ["w1", "w2"]
    assert data[0]["incarnation_id"] == "inc-1"


def test_stats_tables_and_json(cli: Cli) -> None:
    oldest = rs.OldestQueued(priority=0, age=Duration(seconds=125))
    oldest.create_time.seconds = T0
    answer = rs.GetQueueStatsResponse(
        counts=[
            rs.JobCount(state=QUEUED, kind=res.JOB_KIND_FROM_SCRATCH_INDEX, priority=0, count=40),
            rs.JobCount(state=SUCCEEDED, kind=res.JOB_KIND_INCREMENTAL_INDEX, priority=10, count=7),
        ],
        oldest=[oldest],
        last_minute=rs.FinishedCounts(succeeded=3, failed=1),
        last_hour=rs.FinishedCounts(succeeded=7, failed=1, cancelled=2),
    )

    running = cli.start("stats")
    request = cli.answer("GetQueueStats", answer).request
    text = running.result().out
    running = cli.start("--json", "stats")
    cli.answer("GetQueueStats", answer)
    data = json.loads(running.result().out)

    assert request == rs.GetQueueStatsRequest()
    counts, oldest_table, finished = text.split("\n\n")
    assert [line.split() for line in counts.splitlines()] == [
        ["STATE", "KIND", "PRIORITY", "COUNT"],
        ["queued", "from-scratch", "0", "40"],
        ["succeeded", "incremental", "10", "7"],
    ]
    assert [line.split() for line in oldest_table.splitlines()] == [
        ["PRIORITY", "OLDEST_QUEUED", "AGE"],
        ["0", T0_ISO, "2m05s"],
    ]
    assert [line.split() for line in finished.strip().splitlines()] == [
        ["FINISHED", "SUCCEEDED", "FAILED", "CANCELLED"],
        ["last", "minute", "3", "1", "0"],
        ["last", "hour", "7", "1", "2"],
    ]
    for block in (counts, oldest_table, finished.strip()):
        assert_table_aligned(block)
    assert data["last_hour"]["cancelled"] == "2"
    assert data["oldest"][0]["age"] == "125s"


# jobs of an unknown realm; following across a server that went away.


def test_jobs_of_an_unknown_realm_is_not_found(cli: Cli) -> None:
    running = cli.start("jobs", "--realm", "nope")
    listed = cli.answer("ListJobs", rs.ListJobsResponse()).request
    looked_up = cli.fail("GetRealm", grpc.StatusCode.NOT_FOUND, "realm nope not found").request
    result = running.result()

    assert listed.realm_id == looked_up.realm_id == "nope"
    assert (result.code, result.out) == (1, "")
    assert result.err == "realmctl: error: NOT_FOUND: realm nope not found\n"


def test_jobs_of_a_realm_costs_no_lookup_unless_the_list_is_empty(cli: Cli) -> None:
    running = cli.start("jobs", "--realm", "demo", "--state", "running")
    cli.answer("ListJobs", rs.ListJobsResponse())
    cli.answer("GetRealm", rs.GetRealmResponse(realm=make_realm()))
    empty = running.result()
    running = cli.start("jobs", "--realm", "demo")
    cli.answer("ListJobs", rs.ListJobsResponse(jobs=[make_job()]))
    some = running.result()

    assert empty.code == 0 and empty.out.split() == [
        "JOB_ID", "REALM", "KIND", "PRIORITY", "STATE", "ATTEMPT", "WORKER", "PROGRESS", "CREATED",
        "FINISHED", "DURATION", "ERROR",
    ]  # fmt: skip
    assert some.code == 0
    assert cli.methods() == ["ListJobs", "GetRealm", "ListJobs"]


def test_create_wait_reconnects_after_unavailable(cli: Cli) -> None:
    running = cli.start("create", "demo", "--wait")
    cli.answer("CreateRealm", rs.CreateRealmResponse(realm=make_realm(), job=make_job()))
    first = cli.watch(
        [make_job(state=RUNNING, done=1, total=2)], grpc.StatusCode.UNAVAILABLE, "Socket closed"
    )
    again = cli.watch([], grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    last = cli.watch([make_job(state=SUCCEEDED, done=2, total=2)])
    ready = make_realm(state=res.Realm.STATE_READY)
    cli.answer("GetRealm", rs.GetRealmResponse(realm=ready))
    result = running.result()

    assert result.code == 0, result.err
    assert first.request == again.request == last.request == rs.WatchJobRequest(job_id="17")
    assert "state:        ready" in result.out
    assert result.err.splitlines()[-1].endswith("2/2 files  succeeded")


def test_watch_of_a_cancelled_job_ends_and_exits_3(cli: Cli) -> None:
    running = cli.start("watch", "17")
    cli.answer("GetJob", rs.GetJobResponse(job=make_job(state=QUEUED)))
    cli.watch([make_job(state=RUNNING), make_job(state=CANCELLED, error="operator: stop")])
    result = running.result()

    assert result.code == 3
    assert "state:    cancelled" in result.out
    assert result.err.splitlines()[-1] == ("realmctl: error: job 17 was cancelled: operator: stop")
    assert cli.methods() == ["GetJob", "WatchJob"]


def test_realmctl_follows_a_job_across_ten_breaks() -> None:
    """The budget realmctl gives a followed job's watch (the tests above run
    with 2): about 15 s of backoff, time for a server to restart."""
    from realmctl.connection import ConnectionSettings, open_client

    with open_client(ConnectionSettings()) as client:
        assert client.watch_breaks == 10
