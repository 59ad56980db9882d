"""realmctl against a live server and worker: every command's happy path, and
the one-line errors (with exit 1) for bad input, unknown things and an
unreachable server."""

from __future__ import annotations

import json
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import System
from tests.e2e.helpers import PERSON, PET, card, card_type, sha256

pytestmark = pytest.mark.e2e


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}; stderr: {result.stderr}"
    return result.stdout


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def one_line_error(result: subprocess.CompletedProcess[str], code: str) -> str:
    """The single stderr line of a refused call, after checking exit 1 and no output."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"realmctl: error: {code}: "), lines[0]
    return lines[0]


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for path, content in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return root


def test_realmctl_commands_against_a_live_server(
    store_url: str, system: System, tmp_path: Path
) -> None:
    server = system.start_server(store_url)
    system.start_worker(server, "cli-worker")

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return system.realmctl(*args, server=server)

    def ctl_all(*calls: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(lambda args: ctl(*args), calls))

    initial = {
        "people/ada.json": card(PERSON, {"name": "Ada Lovelace", "city": "London"}),
        "people/alan.json": card(PERSON, {"name": "Alan Turing", "city": "Wilmslow"}),
        "pets/rex.json": card(PET, {"title": "Rex", "species": "dog"}),
        "notes/todo.txt": b"buy a telescope\n",
    }
    source = write_tree(tmp_path / "initial", initial)
    extra = tmp_path / "extra.md"
    extra.write_bytes(b"# Extra\nbrought in with --file\n")

    # create --wait: a progress bar on stderr, the realm once indexed on stdout.
    created = ctl(
        "create", "notes", "--name", "Team notes", "--from-dir", str(source),
        "--file", f"docs/extra.md={extra}", "--wait",
    )  # fmt: skip
    out = ok(created)
    assert "state:        ready" in out
    assert "name:         Team notes" in out
    assert "(from-scratch, priority 10, succeeded)" in out
    assert "succeeded" in created.stderr.splitlines()[-1]

    # Reads that do not depend on each other run at once: get, files, cat, search.
    realm_out, files_out, cat_out, people_out, found_out, second_out = ctl_all(
        ("--json", "get", "notes"),
        ("--json", "files", "notes"),
        ("cat", "notes", "people/ada.json"),
        ("--json", "search", "notes", "--type", card_type(PERSON)),
        ("search", "notes", "--text", "WILMSLOW"),
        ("--json", "create", "scratch", "--priority", "20"),
    )

    # get, as JSON: stats of the first index.
    realm = ok_json(realm_out)
    assert (realm["realm_id"], realm["state"]) == ("notes", "STATE_READY")
    stats = realm["stats"]
    stored_count = len(initial) + 3  # docs/extra.md, realm.json, index.json
    assert (stats["files"], stats["entries"]) == (str(stored_count), str(stored_count))
    assert stats["cards"] == "4"  # three cards and index.json
    assert stats.get("errors", "0") == "0"

    # files and cat: what was stored, byte for byte.
    files = {f["path"]: f for f in ok_json(files_out)}
    assert set(files) == {*initial, "docs/extra.md", "realm.json", "index.json"}
    assert files["docs/extra.md"]["sha256"] == sha256(extra.read_bytes())
    assert files["notes/todo.txt"]["size"] == str(len(initial["notes/todo.txt"]))
    assert ok(cat_out).encode() == initial["people/ada.json"]

    # search by type and by text.
    people = ok_json(people_out)
    assert [e["path"] for e in people] == ["people/ada.json", "people/alan.json"]
    assert people[0]["title"] == "Ada Lovelace"
    found = ok(found_out)
    assert [line.split()[0] for line in found.splitlines()[1:]] == ["people/alan.json"]

    # A second realm, without waiting; ls shows both.
    second = ok_json(second_out)
    assert (second["realm"]["realm_id"], second["job"]["priority"]) == ("scratch", 20)
    table = ok(ctl("ls")).splitlines()
    assert table[0].split()[:3] == ["REALM_ID", "NAME", "STATE"]
    assert [line.split()[0] for line in table[1:]] == ["notes", "scratch"]

    # push a directory: incremental jobs for its paths; watch them to the end.
    pushed_files = {
        "pets/tom.json": card(PET, {"title": "Tom", "species": "cat"}),
        "people/ada.json": card(PERSON, {"name": "Ada King", "city": "London"}),
    }
    push_dir = write_tree(tmp_path / "push", pushed_files)
    pushed = ok_json(ctl("--json", "push", "notes", str(push_dir)))
    assert pushed["count"] == 2
    assert sorted(r["file"]["path"] for r in pushed["results"]) == sorted(pushed_files)
    assert {job["kind"] for job in pushed["jobs"]} == {"JOB_KIND_INCREMENTAL_INDEX"}
    push_jobs = [job["job_id"] for job in pushed["jobs"]]
    for job_id in push_jobs:
        assert "succeeded" in ok(ctl("watch", job_id))
    by_text = ok_json(ctl("--json", "search", "notes", "--text", "ada king"))
    assert [e["path"] for e in by_text] == ["people/ada.json"]

    # rm: the file goes, and so does its entry once its job ran.
    removed = ok(ctl("rm", "notes", "notes/todo.txt"))
    assert "deleted notes/todo.txt from realm notes" in removed
    rm_job = ok_json(ctl("--json", "jobs", "--realm", "notes", "--limit", "1"))[0]
    assert rm_job["kind"] == "JOB_KIND_INCREMENTAL_INDEX"
    assert rm_job["path_changes"] == [{"path": "notes/todo.txt", "deleted": True}]
    assert rm_job["job_id"] not in push_jobs
    ok(ctl("watch", rm_job["job_id"]))
    assert ok_json(ctl("--json", "search", "notes", "--text", "telescope")) == []
    one_line_error(ctl("cat", "notes", "notes/todo.txt"), "NOT_FOUND")

    # reindex, then watch and job on its id.
    reindexed = ok_json(ctl("--json", "reindex", "notes"))
    assert reindexed["job"]["kind"] == "JOB_KIND_FROM_SCRATCH_INDEX"
    assert reindexed["disposition"] == "DISPOSITION_INSERTED"
    job_id = reindexed["job"]["job_id"]
    final = ok_json(ctl("--json", "watch", job_id))
    assert (final["job_id"], final["state"]) == (job_id, "STATE_SUCCEEDED")
    shown = ok(ctl("job", job_id))
    assert f"{job_id}" in shown and "succeeded" in shown and "from-scratch" in shown

    # jobs, filtered: the realm's two from-scratch jobs, newest first.
    scratch = ok_json(ctl("--json", "jobs", "--realm", "notes", "--kind", "from-scratch"))
    assert [j["job_id"] for j in scratch] == [job_id, created_job_id(out)]
    assert {j["state"] for j in scratch} == {"STATE_SUCCEEDED"}

    final_realm = ok_json(ctl("--json", "get", "notes"))
    assert final_realm["stats"]["cards"] == "5"  # ada, alan, rex, tom and index.json
    assert final_realm["stats"]["files"] == final_realm["stats"]["entries"] == str(stored_count)

    # Refusals: one line on stderr, exit 1, nothing on stdout (independent, so run together).
    refusals = [
        (("get", "Bad_Id"), "INVALID_ARGUMENT"),
        (("job", "not-a-number"), "INVALID_ARGUMENT"),
        (("cat", "notes", "../escape.txt"), "INVALID_ARGUMENT"),
        (("get", "nowhere"), "NOT_FOUND"),
        (("push", "nowhere", str(push_dir)), "NOT_FOUND"),
        (("watch", "987654321"), "NOT_FOUND"),
        (("create", "notes"), "ALREADY_EXISTS"),
    ]
    results = ctl_all(*(args for args, _ in refusals))
    for (args, code), result in zip(refusals, results, strict=True):
        line = one_line_error(result, code)
        assert line != f"realmctl: error: {code}: ", args
    assert server.proc.alive()
    # The refused calls changed nothing.
    assert [r["realm_id"] for r in ok_json(ctl("--json", "ls"))] == ["notes", "scratch"]


def created_job_id(create_output: str) -> str:
    """The job id in `realmctl create`'s "job: ID (...)" line."""
    for line in create_output.splitlines():
        if line.startswith("job:"):
            return line.split()[1]
    raise AssertionError(f"no job line in {create_output!r}")


def test_realmctl_unreachable_server(system: System) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens there any more.
    for args in (("get", "notes"), ("ls",), ("watch", "1"), ("create", "notes", "--wait")):
        result = system.realmctl("--timeout", "5", *args, server=f"127.0.0.1:{port}")
        assert result.returncode == 1, (args, result)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("realmctl: error: UNAVAILABLE: "), lines[0]
        assert result.stdout == ""
