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

INCREMENTAL = res.JOB_KIND_INCREMENTAL_INDEX


def written(path: str, size: int, job_id: str, disposition: int) -> rs.WriteRealmFileResponse:
    return rs.WriteRealmFileResponse(
        file=make_file(path, size),
        job=make_job(job_id, kind=INCREMENTAL),
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


def test_push_writes_every_file_with_relative_posix_paths(cli: Cli, tree: Path) -> None:
    running = cli.start("push", "demo", str(tree))
    requests = [
        cli.answer("WriteRealmFile", written(*answer)).request
        for answer in [
            (".gitignore", 6, "30", res.DISPOSITION_INSERTED),
            ("cards/a.json", 8, "30", res.DISPOSITION_MERGED),
            ("cards/deep/b.json", 8, "30", res.DISPOSITION_MERGED),
            ("empty.txt", 0, "31", res.DISPOSITION_INSERTED),
        ]
    ]
    result = running.result()

    assert result.code == 0, result.err
    assert [(r.realm_id, r.path, r.content) for r in requests] == [
        ("demo", ".gitignore", b"*.tmp\n"),
        ("demo", "cards/a.json", b'{"a": 1}'),
        ("demo", "cards/deep/b.json", b'{"b": 2}'),
        ("demo", "empty.txt", b""),
    ]
    assert not any(r.HasField("priority") for r in requests)
    *table, summary = result.out.splitlines()
    assert table[0].split() == ["PATH", "SIZE", "JOB_ID", "DISPOSITION"]
    assert table[2].split() == ["cards/a.json", "8", "30", "merged"]
    assert_table_aligned("\n".join(table))
    assert summary == (
        "pushed 4 files to realm demo; index jobs: "
        "30 (incremental, priority 10, queued), 31 (incremental, priority 10, queued)"
    )


def test_push_priority_and_json(cli: Cli, tree: Path) -> None:
    running = cli.start("--json", "push", "demo", str(tree), "--priority", "0")
    requests = [
        cli.answer("WriteRealmFile", written("x", 1, "30", res.DISPOSITION_MERGED)).request
        for _ in range(4)
    ]
    result = running.result()

    assert all(r.HasField("priority") and r.priority == 0 for r in requests)
    data = json.loads(result.out)
    assert data["realm_id"] == "demo"
    assert data["count"] == 4
    assert [r["disposition"] for r in data["results"]] == ["DISPOSITION_MERGED"] * 4
    assert [job["job_id"] for job in data["jobs"]] == ["30"]


def test_push_skips_the_server_owned_realm_json(cli: Cli, tmp_path: Path) -> None:
    """A directory pulled from a realm holds realm.json, which the server
    refuses to take from clients: pushing it back skips it and says so."""
    (tmp_path / "realm.json").write_text('{"name": "x"}')
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "realm.json").write_text("{}")  # only the root one is reserved

    running = cli.start("push", "demo", str(tmp_path))
    answer = written("cards/realm.json", 2, "30", res.DISPOSITION_INSERTED)
    request = cli.answer("WriteRealmFile", answer).request
    result = running.result()

    assert result.code == 0, result.err
    assert request.path == "cards/realm.json"
    assert cli.methods() == ["WriteRealmFile"]
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


def test_push_failing_midway_says_how_far_it_got(cli: Cli, tree: Path) -> None:
    running = cli.start("push", "demo", str(tree))
    for path in (".gitignore", "cards/a.json"):
        cli.answer("WriteRealmFile", written(path, 1, "30", res.DISPOSITION_MERGED))
    cli.fail("WriteRealmFile", grpc.StatusCode.INVALID_ARGUMENT, "path: too long")
    result = running.result()

    assert result.code == 1
    assert result.err == (
        "realmctl: error: INVALID_ARGUMENT: path: too long (after pushing 2 of 4 files)\n"
    )
    assert cli.methods() == ["WriteRealmFile"] * 3


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
