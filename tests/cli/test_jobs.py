"""reindex, jobs, job, watch and search against the fake server; the progress bar."""

from __future__ import annotations

import io
import json

import grpc
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realmctl_fakes import (
    T0_ISO,
    FakeRealmService,
    Run,
    assert_table_aligned,
    assert_values_aligned,
    make_job,
)

from realmctl.output import ProgressBar

RUNNING = res.Job.STATE_RUNNING
SUCCEEDED = res.Job.STATE_SUCCEEDED
FAILED = res.Job.STATE_FAILED


def test_reindex_sends_priority_and_content_changed(run: Run, fake: FakeRealmService) -> None:
    fake.reply(
        "ReindexRealm",
        rs.ReindexRealmResponse(
            job=make_job("50", priority=60), disposition=res.DISPOSITION_RERUN_SCHEDULED
        ),
    )

    result = run("reindex", "demo", "--priority", "60", "--content-changed")

    assert result.code == 0
    (request,) = fake.requests("ReindexRealm")
    assert (request.realm_id, request.priority, request.content_changed) == ("demo", 60, True)
    assert result.out.splitlines() == [
        "reindex of realm demo: rerun-scheduled",
        "job 50 (from-scratch, priority 60, queued)",
    ]


def test_reindex_defaults_and_json(run: Run, fake: FakeRealmService) -> None:
    fake.reply(
        "ReindexRealm",
        rs.ReindexRealmResponse(job=make_job("50"), disposition=res.DISPOSITION_ATTACHED),
    )

    data = json.loads(run("--json", "reindex", "demo").out)

    (request,) = fake.requests("ReindexRealm")
    assert not request.HasField("priority")
    assert not request.content_changed
    assert data["disposition"] == "DISPOSITION_ATTACHED"
    assert data["job"]["job_id"] == "50"


def test_reindex_all(run: Run, fake: FakeRealmService) -> None:
    fake.reply("ReindexAllRealms", rs.ReindexAllRealmsResponse(jobs_enqueued=2, realms=3))

    result = run("reindex", "--all", "--priority", "5")
    data = json.loads(run("reindex", "--all", "--json").out)

    first, second = fake.requests("ReindexAllRealms")
    assert first.HasField("priority") and first.priority == 5
    assert not second.HasField("priority")
    assert result.out.startswith("visited 3 realms; queued 2 new jobs")
    assert data == {"jobs_enqueued": "2", "realms": "3"}


def test_reindex_needs_exactly_one_target(run: Run, fake: FakeRealmService) -> None:
    neither = run("reindex")
    both = run("reindex", "demo", "--all")
    all_with_content_changed = run("reindex", "--all", "--content-changed")

    assert (neither.code, both.code, all_with_content_changed.code) == (2, 2, 2)
    assert neither.err == "realmctl: error: reindex: give REALM_ID or --all\n"
    assert "not both" in both.err
    assert "--content-changed" in all_with_content_changed.err
    assert fake.calls == []


def test_reindex_all_refused(run: Run, fake: FakeRealmService) -> None:
    fake.fail("ReindexAllRealms", grpc.StatusCode.PERMISSION_DENIED, "admin role required")

    result = run("reindex", "--all")

    assert result.code == 1
    assert result.err == "realmctl: error: PERMISSION_DENIED: admin role required\n"


def test_jobs_sends_filters_and_follows_pages_up_to_the_limit(
    run: Run, fake: FakeRealmService
) -> None:
    fake.reply(
        "ListJobs",
        rs.ListJobsResponse(jobs=[make_job("9"), make_job("8")], next_page_token="p2"),
        rs.ListJobsResponse(jobs=[make_job("7"), make_job("6")], next_page_token="p3"),
    )

    result = run(
        "jobs", "--realm", "demo", "--kind", "incremental", "--state", "running", "--limit", "3"
    )

    assert result.code == 0
    first, second = fake.requests("ListJobs")
    assert first.realm_id == "demo"
    assert first.kind == res.JOB_KIND_INCREMENTAL_INDEX
    assert first.state == RUNNING
    assert (first.page_size, first.page_token) == (3, "")
    assert (second.page_size, second.page_token, second.kind) == (1, "p2", first.kind)
    assert [line.split()[0] for line in result.out.splitlines()[1:]] == ["9", "8", "7"]


def test_jobs_defaults(run: Run, fake: FakeRealmService) -> None:
    run("jobs")
    run("jobs", "--kind", "from-scratch", "--state", "failed", "--limit", "0")

    default, everything = fake.requests("ListJobs")
    assert default.realm_id == ""
    assert default.kind == res.JOB_KIND_UNSPECIFIED
    assert default.state == res.Job.STATE_UNSPECIFIED
    assert default.page_size == 100
    assert everything.kind == res.JOB_KIND_FROM_SCRATCH_INDEX
    assert everything.state == FAILED
    assert everything.page_size == 0


def test_jobs_table_and_json(run: Run, fake: FakeRealmService) -> None:
    jobs = [
        make_job("12", kind=res.JOB_KIND_INCREMENTAL_INDEX, state=RUNNING, done=2, total=5),
        make_job("11", priority=0, state=SUCCEEDED),
    ]
    fake.reply("ListJobs", rs.ListJobsResponse(jobs=jobs))

    table = run("jobs")
    data = json.loads(run("jobs", "--json").out)

    lines = table.out.splitlines()
    assert lines[0].split() == [
        "JOB_ID", "REALM", "KIND", "PRIORITY", "STATE", "ATTEMPT", "PROGRESS", "CREATED",
    ]  # fmt: skip
    assert lines[1].split() == ["12", "demo", "incremental", "10", "running", "0", "2/5", T0_ISO]
    assert lines[2].split() == ["11", "demo", "from-scratch", "0", "succeeded", "0", "-", T0_ISO]
    assert_table_aligned(table.out)
    assert [job["state"] for job in data] == ["STATE_RUNNING", "STATE_SUCCEEDED"]


def test_job_shows_every_field(run: Run, fake: FakeRealmService) -> None:
    job = make_job("12", kind=res.JOB_KIND_INCREMENTAL_INDEX, state=FAILED, error="realm gone")
    job.attempt = 3
    job.finish_time.seconds = 1_700_000_120
    job.path_changes.add(path="cards/a.json")
    job.path_changes.add(path="old.json", deleted=True)
    fake.reply("GetJob", rs.GetJobResponse(job=job))

    result = run("job", "12")

    assert fake.requests("GetJob")[0].job_id == "12"
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


def test_job_json(run: Run, fake: FakeRealmService) -> None:
    fake.reply("GetJob", rs.GetJobResponse(job=make_job("12", done=1, total=2)))

    data = json.loads(run("--json", "job", "12").out)

    assert data["job_id"] == "12"
    assert data["progress"] == {"done": "1", "total": "2"}
    assert data["path_changes"] == []


def test_watch_until_success(run: Run, fake: FakeRealmService) -> None:
    fake.watch_snapshots = [
        make_job("12", state=RUNNING, done=1, total=2),
        make_job("12", state=SUCCEEDED, done=2, total=2),
    ]

    result = run("watch", "12")

    assert result.code == 0
    assert fake.requests("WatchJob")[0].job_id == "12"
    assert result.err.splitlines() == [
        "job 12 [" + "#" * 15 + "." * 15 + "] 1/2 files  running",
        "job 12 [" + "#" * 30 + "] 2/2 files  succeeded",
    ]
    assert "state:    succeeded" in result.out.splitlines()


def test_watch_of_a_failed_job_exits_3(run: Run, fake: FakeRealmService) -> None:
    fake.watch_snapshots = [make_job("12", state=FAILED, error="attempts cap reached")]

    result = run("watch", "12", "--json")

    assert result.code == 3
    assert json.loads(result.out)["error_message"] == "attempts cap reached"
    assert result.err.splitlines()[-1] == "realmctl: error: job 12 failed: attempts cap reached"


def test_watch_of_an_unknown_job(run: Run, fake: FakeRealmService) -> None:
    fake.fail("WatchJob", grpc.StatusCode.NOT_FOUND, "job 99 not found")

    result = run("watch", "99")

    assert result.code == 1
    assert result.err == "realmctl: error: NOT_FOUND: job 99 not found\n"
    assert result.out == ""


def test_watch_broken_midway_is_one_error_line(run: Run, fake: FakeRealmService) -> None:
    fake.watch_snapshots = [make_job("12", state=RUNNING, done=1, total=3)]
    fake.watch_error = (grpc.StatusCode.UNAVAILABLE, "server draining")

    result = run("watch", "12")

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


def test_search_sends_filters_and_follows_pages(run: Run, fake: FakeRealmService) -> None:
    card = res.IndexEntry(path="cards/a.json", card_type="cards/person/Person", title="Ada")
    broken = res.IndexEntry(path="bad.json", error_message="invalid JSON\nat line 1")
    fake.reply(
        "SearchRealm",
        rs.SearchRealmResponse(entries=[card], next_page_token="n1"),
        rs.SearchRealmResponse(entries=[broken]),
    )

    result = run("search", "demo", "--type", "cards/person/Person", "--text", "ada")

    assert result.code == 0
    first, second = fake.requests("SearchRealm")
    assert (first.realm_id, first.card_type, first.text) == ("demo", "cards/person/Person", "ada")
    assert (first.page_token, second.page_token) == ("", "n1")
    assert (first.page_size, second.text) == (0, "ada")
    lines = result.out.splitlines()
    assert lines[0].split() == ["PATH", "CARD_TYPE", "TITLE", "ERROR"]
    assert lines[1].split() == ["cards/a.json", "cards/person/Person", "Ada", "-"]
    # A multi-line error stays on its row.
    assert lines[2].split() == ["bad.json", "-", "-", "invalid", "JSON", "at", "line", "1"]
    assert len(lines) == 3


def test_search_limit_and_json(run: Run, fake: FakeRealmService) -> None:
    entries = [res.IndexEntry(path=f"{i}.json") for i in range(3)]
    fake.reply("SearchRealm", rs.SearchRealmResponse(entries=entries, next_page_token="more"))

    data = json.loads(run("--json", "search", "demo", "--limit", "2").out)

    (request,) = fake.requests("SearchRealm")
    assert request.page_size == 2
    assert [entry["path"] for entry in data] == ["0.json", "1.json"]
