"""create, get and ls, with the test answering realmctl's calls over grpc_testing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realmctl_fakes import (
    T0_ISO,
    Cli,
    assert_table_aligned,
    assert_values_aligned,
    make_job,
    make_realm,
)

RUNNING = res.Job.STATE_RUNNING


def fields_of(text: str) -> dict[str, str]:
    """The `key: value` lines of a details block."""
    pairs = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key.strip():
            pairs[key.strip()] = value.strip()
    return pairs


def created() -> rs.CreateRealmResponse:
    return rs.CreateRealmResponse(realm=make_realm(), job=make_job())


def test_create_sends_name_priority_request_id_and_files(cli: Cli, tmp_path: Path) -> None:
    tree = tmp_path / "site"
    (tree / "cards").mkdir(parents=True)
    (tree / "cards" / "a.json").write_bytes(b'{"a": 1}')
    (tree / "readme.txt").write_text("from the dir")
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main")
    extra = tmp_path / "extra.bin"
    extra.write_bytes(b"\x00\x01")

    running = cli.start(
        "create", "demo", "--name", "Demo", "--priority", "42", "--request-id", "r-1",
        "--from-dir", str(tree), "--file", f"bin/x.bin={extra}", "--file", f"readme.txt={extra}",
    )  # fmt: skip
    taken = cli.answer("CreateRealm", created())
    result = running.result()

    assert result.code == 0, result.err
    request = taken.request
    assert request.realm_id == "demo"
    assert request.display_name == "Demo"
    assert request.HasField("priority") and request.priority == 42
    assert request.request_id == "r-1"
    assert taken.metadata["x-request-id"] == "r-1"
    assert not request.wait_for_index
    assert {f.path: f.content for f in request.initial_files} == {
        "cards/a.json": b'{"a": 1}',
        "readme.txt": b"\x00\x01",  # --file wins over the same path in --from-dir
        "bin/x.bin": b"\x00\x01",
    }
    assert cli.channel.timeouts("CreateRealm") == [5.0]


def test_create_without_options_leaves_priority_unset(cli: Cli) -> None:
    running = cli.start("create", "demo")
    request = cli.answer("CreateRealm", rs.CreateRealmResponse()).request

    assert running.result().code == 0
    assert not request.HasField("priority")
    assert (request.display_name, len(request.initial_files)) == ("", 0)
    # A fresh request id all the same, so that the client's retries are exactly-once.
    assert re.fullmatch("[0-9a-f]{32}", request.request_id)
    assert cli.methods() == ["CreateRealm"]


def test_create_priority_zero_is_sent(cli: Cli) -> None:
    running = cli.start("create", "demo", "--priority", "0")
    request = cli.answer("CreateRealm", rs.CreateRealmResponse()).request
    running.result()

    assert request.HasField("priority") and request.priority == 0


def test_create_shows_realm_and_job(cli: Cli) -> None:
    running = cli.start("create", "demo")
    cli.answer("CreateRealm", created())
    result = running.result()

    shown = fields_of(result.out)
    assert shown["realm_id"] == "demo"
    assert shown["name"] == "Demo"
    assert shown["state"] == "indexing"
    assert shown["created"] == T0_ISO
    assert shown["last indexed"] == "-"
    assert shown["job"] == "17 (from-scratch, priority 10, queued)"
    assert_values_aligned(result.out)


def test_create_json(cli: Cli) -> None:
    running = cli.start("--json", "create", "demo")
    cli.answer("CreateRealm", created())

    data = json.loads(running.result().out)
    assert data["realm"]["realm_id"] == "demo"
    assert data["realm"]["state"] == "STATE_INDEXING"
    assert data["realm"]["create_time"] == T0_ISO
    assert data["realm"]["stats"]["files"] == "2"
    assert data["job"]["job_id"] == "17"
    assert data["job"]["kind"] == "JOB_KIND_FROM_SCRATCH_INDEX"


def test_create_wait_shows_progress_until_success(cli: Cli) -> None:
    running = cli.start("create", "demo", "--wait")
    create = cli.answer("CreateRealm", created())
    watch = cli.watch(
        [
            make_job(),
            make_job(state=RUNNING, total=3),
            make_job(state=RUNNING, done=2, total=3),
            make_job(state=RUNNING, done=2, total=3),
            make_job(state=res.Job.STATE_SUCCEEDED, done=3, total=3),
        ]
    )
    get = cli.answer("GetRealm", rs.GetRealmResponse(realm=make_realm(state=res.Realm.STATE_READY)))
    result = running.result()

    assert result.code == 0, result.err
    assert cli.methods() == ["CreateRealm", "WatchJob", "GetRealm"]
    assert not create.request.wait_for_index
    assert watch.request.job_id == "17"
    assert get.request.realm_id == "demo"
    # One logical call: the create's request id on each of its RPCs.
    request_id = create.request.request_id
    assert {t.metadata["x-request-id"] for t in (create, watch, get)} == {request_id}
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
    # Watching has no deadline; the unary calls have --timeout.
    assert cli.channel.timeouts("WatchJob") == [None]
    assert cli.channel.timeouts("GetRealm") == [5.0]


def test_create_wait_resumes_a_broken_watch(cli: Cli) -> None:
    running = cli.start("create", "demo", "--wait")
    cli.answer("CreateRealm", created())
    cli.watch([make_job(state=RUNNING, done=1, total=2)], grpc.StatusCode.UNAVAILABLE, "reset")
    cli.watch([make_job(state=RUNNING, done=1, total=2), make_job(state=res.Job.STATE_SUCCEEDED)])
    cli.answer("GetRealm", rs.GetRealmResponse(realm=make_realm(state=res.Realm.STATE_READY)))
    result = running.result()

    assert result.code == 0, result.err
    assert cli.methods() == ["CreateRealm", "WatchJob", "WatchJob", "GetRealm"]
    assert [line.split("] ")[1] for line in result.err.splitlines()] == [
        "0/? files  queued",
        "1/2 files  running",
        "0/? files  succeeded",
    ]


def test_create_wait_on_failed_job_exits_3_with_the_job_error(cli: Cli) -> None:
    running = cli.start("create", "demo", "--wait")
    cli.answer("CreateRealm", created())
    cli.watch(
        [
            make_job(state=RUNNING, done=1, total=2),
            make_job(state=res.Job.STATE_FAILED, done=1, total=2, error="worker crashed 3 times"),
        ]
    )
    cli.answer(
        "GetRealm", rs.GetRealmResponse(realm=make_realm(state=res.Realm.STATE_INDEX_FAILED))
    )
    result = running.result()

    assert result.code == 3
    assert result.err.splitlines()[-1] == "realmctl: error: job 17 failed: worker crashed 3 times"
    assert "1/2 files  failed" in result.err
    assert fields_of(result.out)["state"] == "index-failed"


def test_create_wait_json_reports_the_final_job(cli: Cli) -> None:
    running = cli.start("--json", "create", "demo", "--wait")
    cli.answer("CreateRealm", created())
    cli.watch([make_job(state=res.Job.STATE_SUCCEEDED, done=4, total=4)])
    cli.answer("GetRealm", rs.GetRealmResponse(realm=make_realm(state=res.Realm.STATE_READY)))

    data = json.loads(running.result().out)
    assert data["job"]["state"] == "STATE_SUCCEEDED"
    assert data["job"]["progress"] == {"done": "4", "total": "4"}
    assert data["realm"]["state"] == "STATE_READY"


def test_create_wait_when_the_stream_keeps_ending_before_the_job(cli: Cli) -> None:
    running = cli.start("create", "demo", "--wait")
    cli.answer("CreateRealm", created())
    for _ in range(3):  # the first stream and two reconnects (the tests' budget)
        cli.watch([make_job(state=RUNNING, done=1, total=5)])
    result = running.result()

    assert result.code == 1
    last = result.err.splitlines()[-1]
    assert last.startswith("realmctl: error: UNAVAILABLE: the server ended the watch of job 17")
    assert "last state: running" in last
    assert cli.methods() == ["CreateRealm", "WatchJob", "WatchJob", "WatchJob"]


def test_create_already_exists(cli: Cli) -> None:
    running = cli.start("create", "demo", "--wait")
    cli.fail("CreateRealm", grpc.StatusCode.ALREADY_EXISTS, "realm demo already exists")
    result = running.result()

    assert result.code == 1
    assert result.err == "realmctl: error: ALREADY_EXISTS: realm demo already exists\n"
    assert cli.methods() == ["CreateRealm"]


def test_get_shows_state_and_stats(cli: Cli) -> None:
    realm = make_realm(state=res.Realm.STATE_READY, files=7, cards=5, errors=1)
    realm.stats.last_index_time.seconds = 1_700_000_060

    running = cli.start("get", "demo")
    request = cli.answer("GetRealm", rs.GetRealmResponse(realm=realm)).request
    result = running.result()

    assert result.code == 0
    assert request.realm_id == "demo"
    shown = fields_of(result.out)
    assert (shown["state"], shown["files"], shown["cards"], shown["errors"]) == (
        "ready",
        "7",
        "5",
        "1",
    )
    assert shown["last indexed"] == "2023-11-14T22:14:20Z"


def test_get_json(cli: Cli) -> None:
    running = cli.start("get", "demo", "--json")
    cli.answer("GetRealm", rs.GetRealmResponse(realm=make_realm(errors=0)))

    data = json.loads(running.result().out)
    assert data["realm_id"] == "demo"
    # Defaults are printed too, so scripts can rely on every field being there.
    assert data["stats"]["errors"] == "0"


def page_of_realms(*ids: str, token: str = "") -> rs.ListRealmsResponse:
    return rs.ListRealmsResponse(
        realms=[make_realm(i, name=i.upper()) for i in ids], next_page_token=token
    )


def test_ls_follows_every_page(cli: Cli) -> None:
    running = cli.start("ls")
    requests = [
        cli.answer("ListRealms", page_of_realms("alpha", "beta", token="t1")).request,
        cli.answer("ListRealms", page_of_realms("gamma", token="t2")).request,
        cli.answer("ListRealms", page_of_realms("delta-long-name")).request,
    ]
    result = running.result()

    assert result.code == 0
    assert [r.page_token for r in requests] == ["", "t1", "t2"]
    assert [r.page_size for r in requests] == [0, 0, 0]
    lines = result.out.splitlines()
    assert lines[0].split() == [
        "REALM_ID", "NAME", "STATE", "FILES", "CARDS", "ERRORS", "CREATED", "LAST_INDEXED",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["alpha", "beta", "gamma", "delta-long-name"]
    assert lines[1].split()[2:] == ["indexing", "2", "1", "0", T0_ISO, "-"]
    assert_table_aligned(result.out)


def test_ls_limit_asks_only_for_what_is_missing(cli: Cli) -> None:
    running = cli.start("--json", "ls", "--limit", "3")
    first = cli.answer("ListRealms", page_of_realms("a", "b", token="t1")).request
    second = cli.answer("ListRealms", page_of_realms("c", "d", token="t2")).request
    result = running.result()

    assert [first.page_size, second.page_size] == [3, 1]
    assert [realm["realm_id"] for realm in json.loads(result.out)] == ["a", "b", "c"]
    assert cli.methods() == ["ListRealms", "ListRealms"]


def test_ls_json_is_an_array(cli: Cli) -> None:
    running = cli.start("--json", "ls")
    cli.answer("ListRealms", page_of_realms())

    assert json.loads(running.result().out) == []


def test_ls_stops_when_the_server_repeats_a_page_token(cli: Cli) -> None:
    running = cli.start("ls")
    cli.answer("ListRealms", page_of_realms("a", token="same"))
    cli.answer("ListRealms", page_of_realms("b", token="same"))
    result = running.result()

    assert result.code == 1
    assert cli.methods() == ["ListRealms", "ListRealms"]
    assert result.err == (
        "realmctl: error: INTERNAL: the server returned page token 'same' twice\n"
    )
