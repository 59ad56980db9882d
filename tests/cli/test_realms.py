"""create, get and ls against the fake server."""

from __future__ import annotations

import json
from pathlib import Path

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
    make_realm,
)


def fields_of(text: str) -> dict[str, str]:
    """The `key: value` lines of a details block."""
    pairs = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key.strip():
            pairs[key.strip()] = value.strip()
    return pairs


def test_create_sends_name_priority_request_id_and_files(
    run: Run, fake: FakeRealmService, tmp_path: Path
) -> None:
    tree = tmp_path / "site"
    (tree / "cards").mkdir(parents=True)
    (tree / "cards" / "a.json").write_bytes(b'{"a": 1}')
    (tree / "readme.txt").write_text("from the dir")
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main")
    extra = tmp_path / "extra.bin"
    extra.write_bytes(b"\x00\x01")
    fake.reply("CreateRealm", rs.CreateRealmResponse(realm=make_realm(), job=make_job()))

    result = run(
        "create", "demo", "--name", "Demo", "--priority", "42", "--request-id", "r-1",
        "--from-dir", str(tree), "--file", f"bin/x.bin={extra}", "--file", f"readme.txt={extra}",
    )  # fmt: skip

    assert result.code == 0, result.err
    (request,) = fake.requests("CreateRealm")
    assert request.realm_id == "demo"
    assert request.display_name == "Demo"
    assert request.HasField("priority") and request.priority == 42
    assert request.request_id == "r-1"
    assert not request.wait_for_index
    assert {f.path: f.content for f in request.initial_files} == {
        "cards/a.json": b'{"a": 1}',
        "readme.txt": b"\x00\x01",  # --file wins over the same path in --from-dir
        "bin/x.bin": b"\x00\x01",
    }


def test_create_without_options_leaves_priority_unset(run: Run, fake: FakeRealmService) -> None:
    result = run("create", "demo")

    assert result.code == 0, result.err
    (request,) = fake.requests("CreateRealm")
    assert not request.HasField("priority")
    assert (request.display_name, request.request_id, len(request.initial_files)) == ("", "", 0)
    assert fake.methods() == ["CreateRealm"]


def test_create_priority_zero_is_sent(run: Run, fake: FakeRealmService) -> None:
    run("create", "demo", "--priority", "0")

    (request,) = fake.requests("CreateRealm")
    assert request.HasField("priority") and request.priority == 0


def test_create_shows_realm_and_job(run: Run, fake: FakeRealmService) -> None:
    fake.reply("CreateRealm", rs.CreateRealmResponse(realm=make_realm(), job=make_job()))

    result = run("create", "demo")

    shown = fields_of(result.out)
    assert shown["realm_id"] == "demo"
    assert shown["name"] == "Demo"
    assert shown["state"] == "indexing"
    assert shown["created"] == T0_ISO
    assert shown["last indexed"] == "-"
    assert shown["job"] == "17 (from-scratch, priority 10, queued)"
    assert_values_aligned(result.out)


def test_create_json(run: Run, fake: FakeRealmService) -> None:
    fake.reply("CreateRealm", rs.CreateRealmResponse(realm=make_realm(), job=make_job()))

    result = run("--json", "create", "demo")

    data = json.loads(result.out)
    assert data["realm"]["realm_id"] == "demo"
    assert data["realm"]["state"] == "STATE_INDEXING"
    assert data["realm"]["create_time"] == T0_ISO
    assert data["realm"]["stats"]["files"] == "2"
    assert data["job"]["job_id"] == "17"
    assert data["job"]["kind"] == "JOB_KIND_FROM_SCRATCH_INDEX"


def test_create_wait_shows_progress_until_success(run: Run, fake: FakeRealmService) -> None:
    fake.reply("CreateRealm", rs.CreateRealmResponse(realm=make_realm(), job=make_job()))
    fake.watch_snapshots = [
        make_job(),
        make_job(state=res.Job.STATE_RUNNING, total=3),
        make_job(state=res.Job.STATE_RUNNING, done=2, total=3),
        make_job(state=res.Job.STATE_RUNNING, done=2, total=3),
        make_job(state=res.Job.STATE_SUCCEEDED, done=3, total=3),
    ]
    fake.reply("GetRealm", rs.GetRealmResponse(realm=make_realm(state=res.Realm.STATE_READY)))

    result = run("create", "demo", "--wait")

    assert result.code == 0, result.err
    assert fake.methods() == ["CreateRealm", "WatchJob", "GetRealm"]
    assert not fake.requests("CreateRealm")[0].wait_for_index
    assert fake.requests("WatchJob")[0].job_id == "17"
    assert fake.requests("GetRealm")[0].realm_id == "demo"
    # stderr is not a terminal: one line per change, repeats left out.
    lines = result.err.splitlines()
    assert [line.split("] ")[1] for line in lines] == [
        "0/? files  queued",
        "0/3 files  running",
        "2/3 files  running",
        "3/3 files  succeeded",
    ]
    assert lines[-1] == "job 17 [" + "#" * 30 + "] 3/3 files  succeeded"
    shown = fields_of(result.out)
    assert shown["state"] == "ready"
    assert shown["job"] == "17 (from-scratch, priority 10, succeeded)"


def test_create_wait_on_failed_job_exits_3_with_the_job_error(
    run: Run, fake: FakeRealmService
) -> None:
    fake.reply("CreateRealm", rs.CreateRealmResponse(realm=make_realm(), job=make_job()))
    fake.watch_snapshots = [
        make_job(state=res.Job.STATE_RUNNING, done=1, total=2),
        make_job(state=res.Job.STATE_FAILED, done=1, total=2, error="worker crashed 3 times"),
    ]
    fake.reply(
        "GetRealm", rs.GetRealmResponse(realm=make_realm(state=res.Realm.STATE_INDEX_FAILED))
    )

    result = run("create", "demo", "--wait")

    assert result.code == 3
    assert result.err.splitlines()[-1] == "realmctl: error: job 17 failed: worker crashed 3 times"
    assert "1/2 files  failed" in result.err
    assert fields_of(result.out)["state"] == "index-failed"


def test_create_wait_json_reports_the_final_job(run: Run, fake: FakeRealmService) -> None:
    fake.reply("CreateRealm", rs.CreateRealmResponse(realm=make_realm(), job=make_job()))
    fake.watch_snapshots = [make_job(state=res.Job.STATE_SUCCEEDED, done=4, total=4)]
    fake.reply("GetRealm", rs.GetRealmResponse(realm=make_realm(state=res.Realm.STATE_READY)))

    result = run("--json", "create", "demo", "--wait")

    data = json.loads(result.out)
    assert data["job"]["state"] == "STATE_SUCCEEDED"
    assert data["job"]["progress"] == {"done": "4", "total": "4"}
    assert data["realm"]["state"] == "STATE_READY"


def test_create_wait_when_the_stream_ends_before_the_job(run: Run, fake: FakeRealmService) -> None:
    fake.reply("CreateRealm", rs.CreateRealmResponse(realm=make_realm(), job=make_job()))
    fake.watch_snapshots = [make_job(state=res.Job.STATE_RUNNING, done=1, total=5)]

    result = run("create", "demo", "--wait")

    assert result.code == 1
    last = result.err.splitlines()[-1]
    assert last.startswith("realmctl: error: UNAVAILABLE: the server ended the watch of job 17")
    assert "last state: running" in last


def test_create_already_exists(run: Run, fake: FakeRealmService) -> None:
    fake.fail("CreateRealm", grpc.StatusCode.ALREADY_EXISTS, "realm demo already exists")

    result = run("create", "demo", "--wait")

    assert result.code == 1
    assert result.err == "realmctl: error: ALREADY_EXISTS: realm demo already exists\n"
    assert fake.methods() == ["CreateRealm"]


def test_get_shows_state_and_stats(run: Run, fake: FakeRealmService) -> None:
    realm = make_realm(state=res.Realm.STATE_READY, files=7, cards=5, errors=1)
    realm.stats.last_index_time.seconds = 1_700_000_060
    fake.reply("GetRealm", rs.GetRealmResponse(realm=realm))

    result = run("get", "demo")

    assert result.code == 0
    assert fake.requests("GetRealm")[0].realm_id == "demo"
    shown = fields_of(result.out)
    assert (shown["state"], shown["files"], shown["cards"], shown["errors"]) == (
        "ready",
        "7",
        "5",
        "1",
    )
    assert shown["last indexed"] == "2023-11-14T22:14:20Z"


def test_get_json(run: Run, fake: FakeRealmService) -> None:
    fake.reply("GetRealm", rs.GetRealmResponse(realm=make_realm(errors=0)))

    data = json.loads(run("get", "demo", "--json").out)

    assert data["realm_id"] == "demo"
    # Defaults are printed too, so scripts can rely on every field being there.
    assert data["stats"]["errors"] == "0"


def page_of_realms(*ids: str, token: str = "") -> rs.ListRealmsResponse:
    return rs.ListRealmsResponse(
        realms=[make_realm(i, name=i.upper()) for i in ids], next_page_token=token
    )


def test_ls_follows_every_page(run: Run, fake: FakeRealmService) -> None:
    fake.reply(
        "ListRealms",
        page_of_realms("alpha", "beta", token="t1"),
        page_of_realms("gamma", token="t2"),
        page_of_realms("delta-long-name"),
    )

    result = run("ls")

    assert result.code == 0
    requests = fake.requests("ListRealms")
    assert [r.page_token for r in requests] == ["", "t1", "t2"]
    assert [r.page_size for r in requests] == [0, 0, 0]
    lines = result.out.splitlines()
    assert lines[0].split() == [
        "REALM_ID", "NAME", "STATE", "FILES", "CARDS", "ERRORS", "CREATED", "LAST_INDEXED",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["alpha", "beta", "gamma", "delta-long-name"]
    assert lines[1].split()[2:] == ["indexing", "2", "1", "0", T0_ISO, "-"]
    assert_table_aligned(result.out)


def test_ls_limit_asks_only_for_what_is_missing(run: Run, fake: FakeRealmService) -> None:
    fake.reply(
        "ListRealms", page_of_realms("a", "b", token="t1"), page_of_realms("c", "d", token="t2")
    )

    result = run("--json", "ls", "--limit", "3")

    assert [r.page_size for r in fake.requests("ListRealms")] == [3, 1]
    assert [realm["realm_id"] for realm in json.loads(result.out)] == ["a", "b", "c"]


def test_ls_json_is_an_array(run: Run, fake: FakeRealmService) -> None:
    fake.reply("ListRealms", page_of_realms())

    result = run("--json", "ls")

    assert json.loads(result.out) == []


def test_ls_stops_when_the_server_repeats_a_page_token(run: Run, fake: FakeRealmService) -> None:
    fake.reply("ListRealms", page_of_realms("a", token="same"))

    result = run("ls")

    assert result.code == 1
    assert len(fake.requests("ListRealms")) == 2
    assert "page token 'same' twice" in result.err
