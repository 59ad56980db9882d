"""push, cat, rm and files, with the test answering realmctl's calls over grpc_testing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realmctl_fakes import T0_ISO, Cli, assert_table_aligned, make_file, make_job

from realmctl import __main__ as realmctl_main
from realmctl import commands

INCREMENTAL = res.JOB_KIND_INCREMENTAL_INDEX
RUNNING = res.Job.STATE_RUNNING
SUCCEEDED = res.Job.STATE_SUCCEEDED
FAILED = res.Job.STATE_FAILED


def batch_written(
    paths: list[str], job_id: str, disposition: int, *, kind: int = INCREMENTAL
) -> rs.WriteRealmFilesResponse:
    return rs.WriteRealmFilesResponse(
        files=[make_file(path) for path in paths],
        job=make_job(job_id, kind=kind),  # type: ignore[arg-type]
        disposition=disposition,  # type: ignore[arg-type]
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "realm"
    (root / "cards" / "deep").mkdir(parents=True)
    (root / "cards" / "deep" / "b.json").write_bytes(b'{"b": 2}')
    (root / "cards" / "a.json").write_bytes(b'{"a": 1}')
    (root / "empty.txt").write_bytes(b"")
    (root / ".gitignore").write_text("*.tmp\n")  # only .git/ is skipped, not dotfiles
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (root / "vendor" / ".git").mkdir(parents=True)
    (root / "vendor" / ".git" / "config").write_text("[core]")
    return root


def test_push_writes_every_file_in_one_batch_with_relative_posix_paths(
    cli: Cli, tree: Path
) -> None:
    running = cli.start("push", "demo", str(tree))
    paths = [".gitignore", "cards/a.json", "cards/deep/b.json", "empty.txt"]
    request = cli.answer(
        "WriteRealmFiles", batch_written(paths, "30", res.DISPOSITION_INSERTED)
    ).request
    result = running.result()

    assert result.code == 0, result.err
    assert request.realm_id == "demo"
    assert [(f.path, f.content) for f in request.files] == [
        (".gitignore", b"*.tmp\n"),
        ("cards/a.json", b'{"a": 1}'),
        ("cards/deep/b.json", b'{"b": 2}'),
        ("empty.txt", b""),
    ]
    assert list(request.deleted_paths) == []
    assert not request.HasField("priority")
    assert cli.methods() == ["WriteRealmFiles"]
    *table, summary = result.out.splitlines()
    assert table[0].split() == ["BATCH", "FILES", "BYTES", "JOB_ID", "DISPOSITION"]
    assert table[1].split() == ["1", "4", "22", "30", "inserted"]
    assert_table_aligned("\n".join(table))
    assert summary == (
        "pushed 4 files to realm demo in 1 batch; index job: 30 (incremental, priority 10, queued)"
    )


def test_push_batches_by_count(cli: Cli, tmp_path: Path) -> None:
    """2,500 files make batches of 1,000, 1,000 and 500, in path order; the
    summary names each distinct job once, with its latest snapshot."""
    for i in range(2_500):
        (tmp_path / f"f{i:04d}.txt").write_bytes(b"x")

    running = cli.start("push", "demo", str(tmp_path))
    answers = [("30", res.DISPOSITION_INSERTED), ("30", res.DISPOSITION_MERGED),
               ("31", res.DISPOSITION_RERUN_SCHEDULED)]  # fmt: skip
    requests = []
    for job_id, disposition in answers:
        request = cli.taken_request("WriteRealmFiles")
        requests.append(request[0])
        paths = [f.path for f in request[0].files]
        request[1](batch_written(paths, job_id, disposition))
    result = running.result()

    assert result.code == 0, result.err
    assert [len(r.files) for r in requests] == [1_000, 1_000, 500]
    paths = [f.path for r in requests for f in r.files]
    assert paths == [f"f{i:04d}.txt" for i in range(2_500)]
    lines = result.out.splitlines()
    assert [line.split() for line in lines[1:4]] == [
        ["1", "1000", "1000", "30", "inserted"],
        ["2", "1000", "1000", "30", "merged"],
        ["3", "500", "500", "31", "rerun-scheduled"],
    ]
    assert lines[4] == (
        "pushed 2500 files to realm demo in 3 batches; index jobs: "
        "30 (incremental, priority 10, queued), 31 (incremental, priority 10, queued)"
    )


def test_push_batches_by_bytes_and_a_large_file_goes_alone(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "PUSH_BATCH_BYTES", 10)
    for name, size in (("a", 4), ("b", 4), ("c", 4), ("d", 25), ("e", 1)):
        (tmp_path / name).write_bytes(b"x" * size)

    running = cli.start("--json", "push", "demo", str(tmp_path))
    sizes = []
    for _ in range(4):
        request, reply = cli.taken_request("WriteRealmFiles")
        sizes.append([len(f.content) for f in request.files])
        reply(batch_written([f.path for f in request.files], "30", res.DISPOSITION_MERGED))
    result = running.result()

    assert result.code == 0, result.err
    assert sizes == [[4, 4], [4], [25], [1]]
    data = json.loads(result.out)
    assert data["count"] == 5
    assert [b["bytes"] for b in data["batches"]] == [8, 4, 25, 1]
    assert {b["disposition"] for b in data["batches"]} == {"DISPOSITION_MERGED"}
    assert [f["path"] for f in data["files"]] == ["a", "b", "c", "d", "e"]
    assert [job["job_id"] for job in data["jobs"]] == ["30"]


def test_push_priority_and_json(cli: Cli, tree: Path) -> None:
    running = cli.start("--json", "push", "demo", str(tree), "--priority", "0")
    answer = batch_written(["x"] * 4, "30", res.DISPOSITION_MERGED)
    request = cli.answer("WriteRealmFiles", answer).request
    result = running.result()

    assert request.HasField("priority") and request.priority == 0
    data = json.loads(result.out)
    assert data["realm_id"] == "demo"
    assert data["count"] == 4
    assert data["batches"] == [
        {"files": 4, "bytes": 22, "job_id": "30", "disposition": "DISPOSITION_MERGED"}
    ]
    assert [job["job_id"] for job in data["jobs"]] == ["30"]


def test_push_wait_follows_every_job_to_its_end(cli: Cli, tmp_path: Path) -> None:
    for i in range(1_001):
        (tmp_path / f"f{i:04d}").write_bytes(b"")

    running = cli.start("push", "demo", str(tmp_path), "--wait")
    for job_id in ("30", "31"):
        request, reply = cli.taken_request("WriteRealmFiles")
        reply(batch_written([f.path for f in request.files], job_id, res.DISPOSITION_INSERTED))
    first = cli.watch([make_job("30", kind=INCREMENTAL, state=SUCCEEDED, done=1000, total=1000)])
    second = cli.watch(
        [
            make_job("31", kind=INCREMENTAL, state=RUNNING, done=0, total=1),
            make_job("31", kind=INCREMENTAL, state=SUCCEEDED, done=1, total=1),
        ]
    )
    result = running.result()

    assert result.code == 0, result.err
    assert (first.request.job_id, second.request.job_id) == ("30", "31")
    assert result.err.splitlines() == [
        "job 30 [" + "#" * 30 + "] 1000/1000 files  succeeded",
        "job 31 [" + "." * 30 + "] 0/1 files  running",
        "job 31 [" + "#" * 30 + "] 1/1 files  succeeded",
    ]
    assert result.out.splitlines()[-1] == (
        "pushed 1001 files to realm demo in 2 batches; index jobs: "
        "30 (incremental, priority 10, succeeded), 31 (incremental, priority 10, succeeded)"
    )


def test_push_wait_exits_3_when_a_job_failed(cli: Cli, tree: Path) -> None:
    running = cli.start("push", "demo", str(tree), "--wait")
    cli.answer("WriteRealmFiles", batch_written(["a"] * 4, "30", res.DISPOSITION_INSERTED))
    cli.watch([make_job("30", kind=INCREMENTAL, state=FAILED, error="disk full")])
    result = running.result()

    assert result.code == 3
    assert "index job: 30 (incremental, priority 10, failed)" in result.out
    assert result.err.splitlines()[-1] == "realmctl: error: job 30 failed: disk full"


def test_push_skips_the_server_owned_realm_json(cli: Cli, tmp_path: Path) -> None:
    """A directory pulled from a realm holds realm.json, which the server
    refuses to take from clients: pushing it back skips it and says so."""
    (tmp_path / "realm.json").write_text('{"name": "x"}')
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "realm.json").write_text("{}")  # only the root one is reserved

    running = cli.start("push", "demo", str(tmp_path))
    answer = batch_written(["cards/realm.json"], "30", res.DISPOSITION_INSERTED)
    request = cli.answer("WriteRealmFiles", answer).request
    result = running.result()

    assert result.code == 0, result.err
    assert [f.path for f in request.files] == ["cards/realm.json"]
    assert cli.methods() == ["WriteRealmFiles"]
    assert "skipped realm.json" in result.err


def test_push_of_an_empty_directory(cli: Cli, tmp_path: Path) -> None:
    result = cli.run("push", "demo", str(tmp_path))

    assert result.code == 0
    assert result.out == "pushed 0 files to realm demo\n"
    assert cli.methods() == []


def test_push_of_a_missing_directory_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    result = cli.run("push", "demo", str(tmp_path / "nope"))

    assert result.code == 2
    assert result.err == f"realmctl: error: not a directory: {tmp_path / 'nope'}\n"
    assert cli.methods() == []


def test_push_failing_midway_says_how_far_it_got(
    cli: Cli, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "PUSH_BATCH_FILES", 2)
    running = cli.start("push", "demo", str(tree))
    cli.answer("WriteRealmFiles", batch_written(["a", "b"], "30", res.DISPOSITION_INSERTED))
    cli.fail("WriteRealmFiles", grpc.StatusCode.INVALID_ARGUMENT, "files[1].path: too long")
    result = running.result()

    assert result.code == 1
    assert result.err == (
        "realmctl: error: INVALID_ARGUMENT: files[1].path: too long "
        "(after pushing 2 of 4 files in 1 batch)\n"
    )
    assert result.out == ""
    assert cli.methods() == ["WriteRealmFiles"] * 2


def test_push_refused_at_once_is_the_servers_error(cli: Cli, tree: Path) -> None:
    running = cli.start("push", "nowhere", str(tree))
    cli.fail("WriteRealmFiles", grpc.StatusCode.NOT_FOUND, "realm nowhere not found")
    result = running.result()

    assert result.code == 1
    assert result.err == "realmctl: error: NOT_FOUND: realm nowhere not found\n"


def test_cat_writes_the_raw_bytes(
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    content = b"\x00\xff not utf-8 \r\n"
    cli = Cli(capsysbinary)
    monkeypatch.setattr(realmctl_main, "open_client", cli.open_client)

    running = cli.start("cat", "demo", "bin/x")
    answer = rs.ReadRealmFileResponse(file=make_file("bin/x"), content=content)
    request = cli.answer("ReadRealmFile", answer).request
    result = running.result()

    assert result.code == 0
    assert result.out == content
    assert (request.realm_id, request.path) == ("demo", "bin/x")


def test_cat_json_has_metadata_and_base64_content(cli: Cli) -> None:
    running = cli.start("cat", "demo", "a.txt", "--json")
    cli.answer("ReadRealmFile", rs.ReadRealmFileResponse(file=make_file("a.txt"), content=b"hi"))

    data = json.loads(running.result().out)
    assert base64.b64decode(data["content"]) == b"hi"
    assert data["file"]["path"] == "a.txt"
    assert data["file"]["mtime"] == T0_ISO


def test_rm_sends_path_and_priority(cli: Cli) -> None:
    running = cli.start("rm", "demo", "cards/a.json", "--priority", "70")
    answer = rs.DeleteRealmFileResponse(
        job=make_job("40", kind=INCREMENTAL), disposition=res.DISPOSITION_MERGED
    )
    request = cli.answer("DeleteRealmFile", answer).request
    result = running.result()

    assert result.code == 0
    assert (request.realm_id, request.path, request.priority) == ("demo", "cards/a.json", 70)
    assert result.out.splitlines() == [
        "deleted cards/a.json from realm demo",
        "index job 40 (incremental, priority 10, queued): merged",
    ]


def test_rm_without_priority_and_json(cli: Cli) -> None:
    running = cli.start("--json", "rm", "demo", "a.json")
    answer = rs.DeleteRealmFileResponse(job=make_job("40"), disposition=res.DISPOSITION_INSERTED)
    request = cli.answer("DeleteRealmFile", answer).request

    data = json.loads(running.result().out)
    assert not request.HasField("priority")
    assert data["disposition"] == "DISPOSITION_INSERTED"
    assert data["job"]["job_id"] == "40"


def test_rm_of_a_missing_file(cli: Cli) -> None:
    running = cli.start("rm", "demo", "a.json")
    cli.fail("DeleteRealmFile", grpc.StatusCode.NOT_FOUND, "file a.json not found in realm demo")
    result = running.result()

    assert result.code == 1
    assert result.err == "realmctl: error: NOT_FOUND: file a.json not found in realm demo\n"


def test_files_table_and_json(cli: Cli) -> None:
    files = rs.ListRealmFilesResponse(
        files=[make_file("index.json", 120), make_file("cards/a.json", 7)]
    )

    running = cli.start("files", "demo")
    first = cli.answer("ListRealmFiles", files).request
    table = running.result()
    running = cli.start("files", "demo", "--json")
    second = cli.answer("ListRealmFiles", files).request
    data = json.loads(running.result().out)

    assert [first.realm_id, second.realm_id] == ["demo", "demo"]
    lines = table.out.splitlines()
    assert lines[0].split() == ["PATH", "SIZE", "MTIME", "SHA256"]
    assert lines[1].split() == ["index.json", "120", T0_ISO, "ab" * 6]
    assert_table_aligned(table.out)
    assert [f["path"] for f in data] == ["index.json", "cards/a.json"]
    assert data[0]["sha256"] == "ab" * 32
    assert data[0]["size"] == "120"
