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
from tests.e2e.helpers import PERSON, PET, bulk_cards, card, card_type, sha256

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
    assert sorted(f["path"] for f in pushed["files"]) == sorted(pushed_files)
    assert [b["files"] for b in pushed["batches"]] == [2]
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


def test_realmctl_push_wait_and_job_control(store_url: str, system: System, tmp_path: Path) -> None:
    """push --wait of 300 files; a queued job (no worker takes priority 0 here)
    explained, cancelled and retried; workers, stats, and rm-realm."""
    server = system.start_server(store_url)
    system.start_worker(server, "lane-worker", "--min-priority", "10")

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return system.realmctl(*args, server=server)

    ok(ctl("create", "bulk", "--wait"))
    cards = bulk_cards(300)
    tree = write_tree(tmp_path / "bulk", cards)
    (tree / "realm.json").write_text('{"name": "skipped"}')

    # push --wait: one batch, one incremental job, followed to its end.
    pushed = ctl("push", "bulk", str(tree), "--wait")
    out = ok(pushed)
    *table, summary = out.splitlines()
    assert table[0].split() == ["BATCH", "FILES", "BYTES", "JOB_ID", "DISPOSITION"]
    assert table[1].split()[:2] == ["1", "300"]
    assert table[1].split()[4] == "inserted"
    push_job = table[1].split()[3]
    assert summary == (
        f"pushed 300 files to realm bulk in 1 batch; "
        f"index job: {push_job} (incremental, priority 10, succeeded)"
    )
    assert "skipped realm.json" in pushed.stderr
    assert pushed.stderr.splitlines()[-1].endswith("300/300 files  succeeded")
    found = ok_json(ctl("--json", "search", "bulk", "--type", card_type(PERSON)))
    assert len(found) == 300
    realm = ok_json(ctl("--json", "get", "bulk"))
    assert realm["stats"]["files"] == "302"  # the cards, realm.json and index.json

    # explain a finished job: its attempt, on the worker that ran it.
    explained = ok_json(ctl("--json", "explain", push_job))
    assert explained["job"]["state"] == "STATE_SUCCEEDED"
    assert [a["worker_id"] for a in explained["attempts"]] == ["lane-worker"]
    text = ok(ctl("explain", push_job))
    assert text.splitlines()[0] == explained["summary"]
    assert any(line.split()[:2] == ["1", "lane-worker"] for line in text.splitlines())

    # workers, and stats.
    workers = ok_json(ctl("--json", "workers"))
    assert [(w["worker_id"], w["min_priority"]) for w in workers] == [("lane-worker", 10)]
    assert ok(ctl("workers")).splitlines()[1].split()[0] == "lane-worker"
    stats = ok_json(ctl("--json", "stats"))
    succeeded = [c for c in stats["counts"] if c["state"] == "STATE_SUCCEEDED"]
    assert sum(int(c["count"]) for c in succeeded) >= 2
    assert ok(ctl("stats")).splitlines()[0].split() == ["STATE", "KIND", "PRIORITY", "COUNT"]

    # A SYSTEM-priority job stays queued (the only worker takes 10 and up).
    queued = ok_json(ctl("--json", "reindex", "bulk", "--priority", "0"))["job"]
    queued_id = queued["job_id"]
    why = ok_json(ctl("--json", "explain", queued_id))
    assert why["job"]["state"] == "STATE_QUEUED"
    assert "CODE_NO_MATCHING_WORKER" in {r["code"] for r in why["reasons"]}
    assert ok(ctl("explain", queued_id)).splitlines()[0] == why["summary"]
    cancelled = ok(ctl("cancel", queued_id, "--reason", "not tonight"))
    assert cancelled == f"cancelled job {queued_id} (from-scratch, priority 0, cancelled)\n"
    shown = ok_json(ctl("--json", "job", queued_id))
    assert shown["state"] == "STATE_CANCELLED" and "not tonight" in shown["error_message"]
    jobs = ok(ctl("jobs", "--realm", "bulk", "--state", "cancelled")).splitlines()
    assert jobs[0].split()[-3:] == ["FINISHED", "DURATION", "ERROR"]
    assert [line.split()[0] for line in jobs[1:]] == [queued_id]
    retried = ok_json(ctl("--json", "retry", queued_id))
    assert retried["job"]["state"] == "STATE_QUEUED"
    assert retried["job"]["job_id"] != queued_id
    one_line_error(ctl("retry", retried["job"]["job_id"]), "FAILED_PRECONDITION")
    one_line_error(ctl("jobs", "--realm", "nowhere"), "NOT_FOUND")

    # rm-realm: refused without --yes off a terminal, then done with it.
    refused = ctl("rm-realm", "bulk")
    assert refused.returncode == 2
    assert "stdin is not a terminal" in refused.stderr
    assert ok_json(ctl("--json", "get", "bulk"))["realm_id"] == "bulk"
    deleted = ok(ctl("rm-realm", "bulk", "--yes"))
    assert deleted == "deleted realm bulk: 302 files, 1 queued or running jobs cancelled\n"
    one_line_error(ctl("get", "bulk"), "NOT_FOUND")
    one_line_error(ctl("rm-realm", "bulk", "--yes"), "NOT_FOUND")


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
