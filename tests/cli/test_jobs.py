"""reindex, jobs, job, watch and search, with the test answering realmctl's calls over
grpc_testing; the progress bar."""

from __future__ import annotations

import io
import json

import grpc
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realmctl_fakes import T0, T0_ISO, Cli, assert_table_aligned, assert_values_aligned, make_job

from realmctl.output import ProgressBar

RUNNING = res.Job.STATE_RUNNING
SUCCEEDED = res.Job.STATE_SUCCEEDED
FAILED = res.Job.STATE_FAILED


def test_reindex_sends_priority_and_content_changed(cli: Cli) -> None:
    running = cli.start("reindex", "demo", "--priority", "60", "--content-changed")
    answer = rs.ReindexRealmResponse(
        job=make_job("50", priority=60), disposition=res.DISPOSITION_RERUN_SCHEDULED
    )
    request = cli.answer("ReindexRealm", answer).request
    result = running.result()

    assert result.code == 0
    assert (request.realm_id, request.priority, request.content_changed) == ("demo", 60, True)
    assert result.out.splitlines() == [
        "reindex of realm demo: rerun-scheduled",
        "job 50 (from-scratch, priority 60, queued)",
    ]


def test_reindex_defaults_and_json(cli: Cli) -> None:
    running = cli.start("--json", "reindex", "demo")
    answer = rs.ReindexRealmResponse(job=make_job("50"), disposition=res.DISPOSITION_ATTACHED)
    request = cli.answer("ReindexRealm", answer).request

    data = json.loads(running.result().out)
    assert not request.HasField("priority")
    assert not request.content_changed
    assert data["disposition"] == "DISPOSITION_ATTACHED"
    assert data["job"]["job_id"] == "50"


def test_reindex_all(cli: Cli) -> None:
    answer = rs.ReindexAllRealmsResponse(jobs_enqueued=2, realms=3)
    running = cli.start("reindex", "--all", "--priority", "5")
    first = cli.answer("ReindexAllRealms", answer).request
    result = running.result()
    running = cli.start("reindex", "--all", "--json")
    second = cli.answer("ReindexAllRealms", answer).request
    data = json.loads(running.result().out)

    assert first.HasField("priority") and first.priority == 5
    assert not second.HasField("priority")
    assert result.out.startswith("visited 3 realms; queued 2 new jobs")
    assert data == {"jobs_enqueued": "2", "realms": "3"}


def test_reindex_needs_exactly_one_target(cli: Cli) -> None:
    neither = cli.run("reindex")
    both = cli.run("reindex", "demo", "--all")
    all_with_content_changed = cli.run("reindex", "--all", "--content-changed")

    assert (neither.code, both.code, all_with_content_changed.code) == (2, 2, 2)
    assert neither.err == "realmctl: error: reindex: give REALM_ID or --all\n"
    assert "not both" in both.err
    assert "--content-changed" in all_with_content_changed.err
    assert cli.methods() == []


def test_reindex_all_refused(cli: Cli) -> None:
    running = cli.start("reindex", "--all")
    cli.fail("ReindexAllRealms", grpc.StatusCode.PERMISSION_DENIED, "admin role required")
    result = running.result()

    assert result.code == 1
    assert result.err == "realmctl: error: PERMISSION_DENIED: admin role required\n"


def test_jobs_sends_filters_and_follows_pages_up_to_the_limit(cli: Cli) -> None:
    running = cli.start(
        "jobs", "--realm", "demo", "--kind", "incremental", "--state", "running", "--limit", "3"
    )
    first = cli.answer(
        "ListJobs", rs.ListJobsResponse(jobs=[make_job("9"), make_job("8")], next_page_token="p2")
    ).request
    second = cli.answer(
        "ListJobs", rs.ListJobsResponse(jobs=[make_job("7"), make_job("6")], next_page_token="p3")
    ).request
    result = running.result()

    assert result.code == 0
    assert first.realm_id == "demo"
    assert first.kind == res.JOB_KIND_INCREMENTAL_INDEX
    assert first.state == RUNNING
    assert (first.page_size, first.page_token) == (3, "")
    assert (second.page_size, second.page_token, second.kind) == (1, "p2", first.kind)
    assert [line.split()[0] for line in result.out.splitlines()[1:]] == ["9", "8", "7"]
    assert cli.methods() == ["ListJobs", "ListJobs"]


def test_jobs_defaults(cli: Cli) -> None:
    running = cli.start("jobs")
    default = cli.answer("ListJobs", rs.ListJobsResponse()).request
    running.result()
    running = cli.start("jobs", "--kind", "from-scratch", "--state", "failed", "--limit", "0")
    everything = cli.answer("ListJobs", rs.ListJobsResponse()).request
    running.result()

    assert default.realm_id == ""
    assert default.kind == res.JOB_KIND_UNSPECIFIED
    assert default.state == res.Job.STATE_UNSPECIFIED
    assert default.page_size == 100
    assert everything.kind == res.JOB_KIND_FROM_SCRATCH_INDEX
    assert everything.state == FAILED
    assert everything.page_size == 0


def test_jobs_table_and_json(cli: Cli) -> None:
    finished = make_job("11", priority=0, state=SUCCEEDED)
    finished.attempt = 2
    finished.start_time.seconds = T0 + 60
    finished.finish_time.seconds = T0 + 60 + 185
    failed = make_job("10", state=FAILED, error="attempts cap\nreached")
    failed.attempt = 5
    failed.start_time.seconds = T0
    failed.finish_time.seconds = T0 + 3
    held = make_job("12", kind=res.JOB_KIND_INCREMENTAL_INDEX, state=RUNNING, done=2, total=5)
    held.worker_id = "w-7"
    jobs = rs.ListJobsResponse(jobs=[held, finished, failed])

    running = cli.start("jobs")
    cli.answer("ListJobs", jobs)
    table = running.result()
    running = cli.start("jobs", "--json")
    cli.answer("ListJobs", jobs)
    data = json.loads(running.result().out)

    lines = table.out.splitlines()
    assert lines[0].split() == [
        "JOB_ID", "REALM", "KIND", "PRIORITY", "STATE", "ATTEMPT", "WORKER", "PROGRESS", "CREATED",
        "FINISHED", "DURATION", "ERROR",
    ]  # fmt: skip
    assert lines[1].split() == [
        "12", "demo", "incremental", "10", "running", "0", "w-7", "2/5", T0_ISO, "-", "-", "-",
    ]  # fmt: skip
    assert lines[2].split() == [
        "11", "demo", "from-scratch", "0", "succeeded", "2", "-", "-", T0_ISO,
        "2023-11-14T22:17:25Z", "3m05s", "-",
    ]  # fmt: skip
    assert lines[3].split() == [
        "10", "demo", "from-scratch", "10", "failed", "5", "-", "-", T0_ISO,
        "2023-11-14T22:13:23Z", "3.0s", "attempts", "cap", "reached",
    ]  # fmt: skip
    assert_table_aligned(table.out)
    assert [job["state"] for job in data] == ["STATE_RUNNING", "STATE_SUCCEEDED", "STATE_FAILED"]


def test_job_shows_every_field(cli: Cli) -> None:
    job = make_job("12", kind=res.JOB_KIND_INCREMENTAL_INDEX, state=FAILED, error="realm gone")
    job.attempt = 3
    job.finish_time.seconds = 1_700_000_120
    job.path_changes.add(path="cards/a.json")
    job.path_changes.add(path="old.json", deleted=True)

    running = cli.start("job", "12")
    request = cli.answer("GetJob", rs.GetJobResponse(job=job)).request
    result = running.result()

    assert request.job_id == "12"
    assert result.out.splitlines() == [
        "job_id:   12",
        "realm:    demo",
        "kind:     incremental",
        "priority: 10",
        "state:    failed",
        "attempt:  3",
        "progress: -",
        f"created:  {T0_ISO}",
        "started:  -",
        "finished: 2023-11-14T22:15:20Z",
        "error:    realm gone",
        "paths:    cards/a.json",
        "          old.json (deleted)",
    ]
    assert_values_aligned(result.out)


def test_job_json(cli: Cli) -> None:
    running = cli.start("--json", "job", "12")
    cli.answer("GetJob", rs.GetJobResponse(job=make_job("12", done=1, total=2)))

    data = json.loads(running.result().out)
    assert data["job_id"] == "12"
    assert data["progress"] == {"done": "1", "total": "2"}
    assert data["path_changes"] == []


def test_watch_until_success(cli: Cli) -> None:
    running = cli.start("watch", "12")
    looked_up = cli.answer("GetJob", rs.GetJobResponse(job=make_job("12"))).request
    taken = cli.watch(
        [
            make_job("12", state=RUNNING, done=1, total=2),
            make_job("12", state=SUCCEEDED, done=2, total=2),
        ]
    )
    result = running.result()

    assert result.code == 0
    assert looked_up.job_id == taken.request.job_id == "12"
    assert cli.methods() == ["GetJob", "WatchJob"]
    assert result.err.splitlines() == [
        "job 12 [" + "#" * 15 + "." * 15 + "] 1/2 files  running",
        "job 12 [" + "#" * 30 + "] 2/2 files  succeeded",
    ]
    assert "state:    succeeded" in result.out.splitlines()
    assert cli.channel.timeouts("WatchJob") == [None]  # watching has no deadline


def test_watch_of_a_failed_job_exits_3(cli: Cli) -> None:
    running = cli.start("watch", "12", "--json")
    cli.answer("GetJob", rs.GetJobResponse(job=make_job("12", state=RUNNING)))
    cli.watch([make_job("12", state=FAILED, error="attempts cap reached")])
    result = running.result()

    assert result.code == 3
    assert json.loads(result.out)["error_message"] == "attempts cap reached"
    assert result.err.splitlines()[-1] == "realmctl: error: job 12 failed: attempts cap reached"


def test_watch_of_an_unknown_job(cli: Cli) -> None:
    running = cli.start("watch", "99")
    cli.fail("GetJob", grpc.StatusCode.NOT_FOUND, "job 99 not found")
    result = running.result()

    assert result.code == 1
    assert result.err == "realmctl: error: NOT_FOUND: job 99 not found\n"
    assert result.out == ""
    assert cli.methods() == ["GetJob"]


def test_watch_of_a_finished_job_shows_it_without_watching(cli: Cli) -> None:
    running = cli.start("watch", "12")
    cli.answer("GetJob", rs.GetJobResponse(job=make_job("12", state=SUCCEEDED)))
    result = running.result()

    assert result.code == 0
    assert "state:    succeeded" in result.out.splitlines()
    assert result.err == ""
    assert cli.methods() == ["GetJob"]


def test_watch_broken_midway_is_resumed(cli: Cli) -> None:
    running = cli.start("watch", "12")
    cli.answer("GetJob", rs.GetJobResponse(job=make_job("12", state=RUNNING)))
    first = cli.watch(
        [make_job("12", state=RUNNING, done=1, total=3)],
        grpc.StatusCode.UNAVAILABLE,
        "server draining",
    )
    again = cli.watch([make_job("12", state=SUCCEEDED, done=3, total=3)])
    result = running.result()

    assert result.code == 0, result.err
    assert again.request == first.request
    assert again.metadata["x-request-id"] == first.metadata["x-request-id"]
    assert result.err.splitlines() == [
        "job 12 [" + "#" * 10 + "." * 20 + "] 1/3 files  running",
        "job 12 [" + "#" * 30 + "] 3/3 files  succeeded",
    ]


def test_watch_that_keeps_breaking_is_one_error_line(cli: Cli) -> None:
    running = cli.start("watch", "12")
    cli.answer("GetJob", rs.GetJobResponse(job=make_job("12", state=RUNNING)))
    for _ in range(3):  # the first stream and two reconnects (the tests' budget)
        cli.watch(
            [make_job("12", state=RUNNING, done=1, total=3)],
            grpc.StatusCode.UNAVAILABLE,
            "server draining",
        )
    result = running.result()

    assert result.code == 1
    assert result.err.splitlines() == [
        "job 12 [" + "#" * 10 + "." * 20 + "] 1/3 files  running",
        "realmctl: error: UNAVAILABLE: server draining",
    ]


def test_progress_bar_redraws_in_place_on_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, in_place=True, width=4)

    bar.update(make_job("1"))
    bar.update(make_job("1", state=RUNNING, done=1, total=4))
    bar.update(make_job("1", state=RUNNING, done=1, total=4))
    bar.update(make_job("1", state=FAILED, done=2, total=4))
    bar.close()

    assert stream.getvalue() == (
        "\rjob 1 [....] 0/? files  queued"
        "\rjob 1 [#...] 1/4 files  running"
        "\rjob 1 [##..] 2/4 files  failed "  # padded over the longer line before
        "\n"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_in_place_only_on_a_terminal() -> None:
    assert ProgressBar.for_stream(Terminal()).in_place
    assert not ProgressBar.for_stream(io.StringIO()).in_place


def test_progress_bar_draws_nothing_when_nothing_happened() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, in_place=True)

    bar.close()

    assert stream.getvalue() == ""


def test_search_sends_filters_and_follows_pages(cli: Cli) -> None:
    card = res.IndexEntry(path="cards/a.json", card_type="cards/person/Person", title="Ada")
    broken = res.IndexEntry(path="bad.json", error_message="invalid JSON\nat line 1")

    running = cli.start("search", "demo", "--type", "cards/person/Person", "--text", "ada")
    first = cli.answer(
        "SearchRealm", rs.SearchRealmResponse(entries=[card], next_page_token="n1")
    ).request
    second = cli.answer("SearchRealm", rs.SearchRealmResponse(entries=[broken])).request
    result = running.result()

    assert result.code == 0
    assert (first.realm_id, first.card_type, first.text) == ("demo", "cards/person/Person", "ada")
    assert (first.page_token, second.page_token) == ("", "n1")
    assert (first.page_size, second.text) == (0, "ada")
    lines = result.out.splitlines()
    assert lines[0].split() == ["PATH", "CARD_TYPE", "TITLE", "ERROR"]
    assert lines[1].split() == ["cards/a.json", "cards/person/Person", "Ada", "-"]
    # A multi-line error stays on its row.
    assert lines[2].split() == ["bad.json", "-", "-", "invalid", "JSON", "at", "line", "1"]
    assert len(lines) == 3


def test_search_limit_and_json(cli: Cli) -> None:
    entries = [res.IndexEntry(path=f"{i}.json") for i in range(3)]

    running = cli.start("--json", "search", "demo", "--limit", "2")
    answer = rs.SearchRealmResponse(entries=entries, next_page_token="more")
    request = cli.answer("SearchRealm", answer).request
    data = json.loads(running.result().out)

    assert request.page_size == 2
    assert [entry["path"] for entry in data] == ["0.json", "1.json"]
    assert cli.methods() == ["SearchRealm"]
