"""push, cat, rm and files against the fake server."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realmctl_fakes import (
    T0_ISO,
    FakeRealmService,
    Run,
    Server,
    assert_table_aligned,
    make_file,
    make_job,
)

from realmctl.__main__ import main

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


def test_push_writes_every_file_with_relative_posix_paths(
    run: Run, fake: FakeRealmService, tree: Path
) -> None:
    fake.reply(
        "WriteRealmFile",
        written(".gitignore", 6, "30", res.DISPOSITION_INSERTED),
        written("cards/a.json", 8, "30", res.DISPOSITION_MERGED),
        written("cards/deep/b.json", 8, "30", res.DISPOSITION_MERGED),
        written("empty.txt", 0, "31", res.DISPOSITION_INSERTED),
    )

    result = run("push", "demo", str(tree))

    assert result.code == 0, result.err
    requests = fake.requests("WriteRealmFile")
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


def test_push_priority_and_json(run: Run, fake: FakeRealmService, tree: Path) -> None:
    fake.reply("WriteRealmFile", written("x", 1, "30", res.DISPOSITION_MERGED))

    result = run("--json", "push", "demo", str(tree), "--priority", "0")

    requests = fake.requests("WriteRealmFile")
    assert all(r.HasField("priority") and r.priority == 0 for r in requests)
    data = json.loads(result.out)
    assert data["realm_id"] == "demo"
    assert data["count"] == 4
    assert [r["disposition"] for r in data["results"]] == ["DISPOSITION_MERGED"] * 4
    assert [job["job_id"] for job in data["jobs"]] == ["30"]


def test_push_skips_the_server_owned_realm_json(
    run: Run, fake: FakeRealmService, tmp_path: Path
) -> None:
    """A directory pulled from a realm holds realm.json, which the server
    refuses to take from clients: pushing it back skips it and says so."""
    (tmp_path / "realm.json").write_text('{"name": "x"}')
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "realm.json").write_text("{}")  # only the root one is reserved
    fake.reply("WriteRealmFile", written("cards/realm.json", 2, "30", res.DISPOSITION_INSERTED))

    result = run("push", "demo", str(tmp_path))

    assert result.code == 0, result.err
    assert [r.path for r in fake.requests("WriteRealmFile")] == ["cards/realm.json"]
    assert "skipped realm.json" in result.err


def test_push_of_an_empty_directory(run: Run, fake: FakeRealmService, tmp_path: Path) -> None:
    result = run("push", "demo", str(tmp_path))

    assert result.code == 0
    assert result.out == "pushed 0 files to realm demo\n"
    assert fake.calls == []


def test_push_of_a_missing_directory_is_a_usage_error(
    run: Run, fake: FakeRealmService, tmp_path: Path
) -> None:
    result = run("push", "demo", str(tmp_path / "nope"))

    assert result.code == 2
    assert result.err == f"realmctl: error: not a directory: {tmp_path / 'nope'}\n"
    assert fake.calls == []


def test_push_failing_midway_says_how_far_it_got(
    run: Run, fake: FakeRealmService, tree: Path
) -> None:
    fake.fail("WriteRealmFile", grpc.StatusCode.INVALID_ARGUMENT, "path: too long", after=2)

    result = run("push", "demo", str(tree))

    assert result.code == 1
    assert result.err == (
        "realmctl: error: INVALID_ARGUMENT: path: too long (after pushing 2 of 4 files)\n"
    )
    assert len(fake.requests("WriteRealmFile")) == 3


def test_cat_writes_the_raw_bytes(
    server: Server, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    content = b"\x00\xff not utf-8 \r\n"
    server.fake.reply(
        "ReadRealmFile", rs.ReadRealmFileResponse(file=make_file("bin/x"), content=content)
    )

    code = main(["--server", server.address, "cat", "demo", "bin/x"])

    assert code == 0
    assert capsysbinary.readouterr().out == content
    (request,) = server.fake.requests("ReadRealmFile")
    assert (request.realm_id, request.path) == ("demo", "bin/x")


def test_cat_json_has_metadata_and_base64_content(run: Run, fake: FakeRealmService) -> None:
    fake.reply("ReadRealmFile", rs.ReadRealmFileResponse(file=make_file("a.txt"), content=b"hi"))

    data = json.loads(run("cat", "demo", "a.txt", "--json").out)

    assert base64.b64decode(data["content"]) == b"hi"
    assert data["file"]["path"] == "a.txt"
    assert data["file"]["mtime"] == T0_ISO


def test_rm_sends_path_and_priority(run: Run, fake: FakeRealmService) -> None:
    fake.reply(
        "DeleteRealmFile",
        rs.DeleteRealmFileResponse(
            job=make_job("40", kind=INCREMENTAL), disposition=res.DISPOSITION_MERGED
        ),
    )

    result = run("rm", "demo", "cards/a.json", "--priority", "70")

    assert result.code == 0
    (request,) = fake.requests("DeleteRealmFile")
    assert (request.realm_id, request.path, request.priority) == ("demo", "cards/a.json", 70)
    assert result.out.splitlines() == [
        "deleted cards/a.json from realm demo",
        "index job 40 (incremental, priority 10, queued): merged",
    ]


def test_rm_without_priority_and_json(run: Run, fake: FakeRealmService) -> None:
    fake.reply(
        "DeleteRealmFile",
        rs.DeleteRealmFileResponse(job=make_job("40"), disposition=res.DISPOSITION_INSERTED),
    )

    data = json.loads(run("--json", "rm", "demo", "a.json").out)

    assert not fake.requests("DeleteRealmFile")[0].HasField("priority")
    assert data["disposition"] == "DISPOSITION_INSERTED"
    assert data["job"]["job_id"] == "40"


def test_rm_of_a_missing_file(run: Run, fake: FakeRealmService) -> None:
    fake.fail("DeleteRealmFile", grpc.StatusCode.NOT_FOUND, "file a.json not found in realm demo")

    result = run("rm", "demo", "a.json")

    assert result.code == 1
    assert result.err == "realmctl: error: NOT_FOUND: file a.json not found in realm demo\n"


def test_files_table_and_json(run: Run, fake: FakeRealmService) -> None:
    files = [make_file("index.json", 120), make_file("cards/a.json", 7)]
    fake.reply("ListRealmFiles", rs.ListRealmFilesResponse(files=files))

    table = run("files", "demo")
    data = json.loads(run("files", "demo", "--json").out)

    assert [r.realm_id for r in fake.requests("ListRealmFiles")] == ["demo", "demo"]
    lines = table.out.splitlines()
    assert lines[0].split() == ["PATH", "SIZE", "MTIME", "SHA256"]
    assert lines[1].split() == ["index.json", "120", T0_ISO, "ab" * 6]
    assert_table_aligned(table.out)
    assert [f["path"] for f in data] == ["index.json", "cards/a.json"]
    assert data[0]["sha256"] == "ab" * 32
    assert data[0]["size"] == "120"
