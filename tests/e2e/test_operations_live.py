"""Operations as an operator sees them, with real processes: /metrics of the
server and of a worker read back after jobs finish, and the log lines of all
three programs parsed as logfmt and as JSON."""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb

from realm_common.logs import parse_logfmt
from tests.e2e.conftest import Proc, System, program
from tests.e2e.helpers import create_realm, poll, wait_job

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def worker_metrics_url(worker: Proc) -> str:
    return poll(
        lambda: (m := re.search(r"msg=metrics url=(\S+)", worker.stderr())) and m.group(1),
        what="the worker's metrics address",
    )


def test_metrics_return_to_zero_and_count_finished_jobs(system: System, sqlite_url: str) -> None:
    server = system.start_server(sqlite_url, "--metrics-listen", "127.0.0.1:0")
    url = server.proc.wait_for_stdout(r"metrics on (\S+)\n").group(1)
    stub = server.stub()
    # No worker yet: three USER jobs and one at priority 50 wait.
    jobs = [create_realm(stub, f"q{i}", {"a.txt": b"hello"}).job for i in range(3)]
    jobs.append(create_realm(stub, "urgent", {"a.txt": b"hi"}, priority=50).job)

    def depths(expect: tuple[float, float]) -> Samples | None:
        s = scrape(url)
        got = (
            value(s, "realm_queue_depth", priority="10"),
            value(s, "realm_queue_depth", priority="50"),
        )
        return s if got == expect else None

    waiting = poll(lambda: depths((3, 1)), what="the queue gauges to show the backlog")
    assert value(waiting, "realm_jobs", state="queued") == 4
    assert (value(waiting, "realm_queue_oldest_age_seconds", priority="10") or 0) > 0

    worker = system.start_worker(server, "mw", "--metrics-listen", "127.0.0.1:0")
    for job in jobs:
        assert wait_job(stub, job.job_id).state == pb.Job.STATE_SUCCEEDED
    done = poll(lambda: depths((0, 0)), what="the queue gauges to return to zero")
    for priority in ("0", "10", "50"):
        assert value(done, "realm_queue_oldest_age_seconds", priority=priority) == 0
    assert value(done, "realm_jobs", state="queued") == 0
    assert value(done, "realm_jobs", state="running") == 0
    scratch = {"kind": "from-scratch"}
    assert value(done, "realm_jobs_finished_total", outcome="succeeded", **scratch) == 4
    assert value(done, "realm_job_attempts_total", outcome="completed", **scratch) == 4
    assert value(done, "realm_job_run_seconds_count", priority_class="user", **scratch) == 4
    assert (
        value(done, "realm_dispatch_latency_seconds_count", priority_class="user", **scratch) == 4
    )
    assert value(done, "realm_workers_connected", lane="0") == 1
    create = "realm.v1.RealmService/CreateRealm"
    assert value(done, "realm_rpcs_total", method=create, code="OK") == 4
    assert value(done, "realm_rpc_duration_seconds_count", method=create, code="OK") == 4
    assert (value(done, "process_cpu_seconds_total") or 0) > 0
    assert any(name == "python_info" for name, _ in done)

    wurl = worker_metrics_url(worker)
    w = scrape(wurl)
    assert value(w, "index_worker_jobs_total", outcome="succeeded", **scratch) == 4
    # Each realm holds a.txt and the files every realm starts with.
    assert (value(w, "index_worker_files_indexed_total") or 0) >= 4
    assert (value(w, "index_worker_bytes_read_total") or 0) >= 4 * len(b"hi")
    assert value(w, "index_worker_stream_connected") == 1
    assert value(w, "index_worker_slots", state="total") == 2
    assert value(w, "index_worker_slots", state="busy") == 0
    assert (value(w, "process_resident_memory_bytes") or 0) > 0
    health = urllib.request.urlopen(wurl.replace("/metrics", "/healthz"), timeout=10)
    assert health.status == 200
    assert urllib.request.urlopen(url.replace("/metrics", "/healthz"), timeout=10).status == 200

    server.proc.stop(signal.SIGKILL)  # the worker loses its stream and says so
    poll(
        lambda: _status(wurl.replace("/metrics", "/healthz")) == 503,
        what="the worker's /healthz to fail without its server",
    )
    assert worker.stop() == 0


def _status(url: str) -> int:
    try:
        return int(urllib.request.urlopen(url, timeout=5).status)
    except urllib.error.HTTPError as e:
        return e.code


def _is_utc_rfc3339(text: str) -> bool:
    return text.endswith("Z") and datetime.fromisoformat(text).utcoffset() is not None


JOB_FIELDS = ("job", "realm", "lease", "attempt", "worker")


def test_dev_logs_json_for_all_three_programs(system: System, tmp_path: Path) -> None:
    """`realm-service dev --log-json`: the server and both workers write one
    JSON object per line, fields as keys; a job's line names the one worker
    that got it."""
    dev = system.start(
        "dev",
        [*program("realm-service", "realm_service"), "dev", "--workers", "2", "--log-json",
         "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path / 'dev.db'}"],
    )  # fmt: skip
    address = dev.wait_for_stdout(r"server on (127\.0\.0\.1:\d+)").group(1)
    with grpc.insecure_channel(address) as channel:
        stub = sgrpc.RealmServiceStub(channel)
        job = create_realm(stub, "logged", {"a.txt": b"x"}).job
        assert wait_job(stub, job.job_id).state == pb.Job.STATE_SUCCEEDED
    poll(lambda: '"job finished"' in dev.stderr(), what="the worker's job line")
    dev.send(signal.SIGINT)
    assert dev.wait(timeout=60) == 0
    records = [json.loads(line) for line in dev.stderr().splitlines() if line.strip()]
    assert all(_is_utc_rfc3339(r["time"]) for r in records)
    assert all({"time", "level", "logger", "msg"} <= r.keys() for r in records)
    loggers = {r["logger"].split(".")[0] for r in records}
    assert {"realm_service", "index_worker"} <= loggers
    running = [r for r in records if r["msg"] == "job running" and r["job"] == int(job.job_id)]
    assert len(running) == 1, running
    assert all(key in running[0] for key in (*JOB_FIELDS, "stream"))
    assert running[0]["worker"] in ("dev-worker-1", "dev-worker-2")
    finished = [r for r in records if r["msg"] == "job finished"]
    assert finished[0]["worker"] == running[0]["worker"]
    assert finished[0]["lease"] == running[0]["lease"]
    assert not any(r["logger"].startswith("alembic") for r in records)


def test_server_and_worker_log_logfmt_by_default(system: System, sqlite_url: str) -> None:
    server = system.start_server(sqlite_url)
    worker = system.start_worker(server, "lw")
    job = create_realm(server.stub(), "kv", {"a.txt": b"x"}).job
    assert wait_job(server.stub(), job.job_id).state == pb.Job.STATE_SUCCEEDED
    poll(lambda: '"job finished"' in worker.stderr(), what="the worker's job line")
    assert worker.stop() == 0
    assert server.proc.stop() == 0
    for proc in (server.proc, worker):
        lines = [parse_logfmt(line) for line in proc.stderr().splitlines() if line.strip()]
        assert lines and all(_is_utc_rfc3339(f["time"]) for f in lines), proc.stderr()
        assert all(f["level"] in ("debug", "info", "warning", "error") for f in lines)
    server_lines = [parse_logfmt(line) for line in server.proc.stderr().splitlines()]
    running = [f for f in server_lines if f.get("msg") == "job running"]
    assert len(running) == 1 and running[0]["worker"] == "lw"
    assert all(running[0][key] for key in (*JOB_FIELDS, "stream"))
    assert running[0]["job"] == job.job_id
    succeeded = [f for f in server_lines if f.get("msg") == "job succeeded"]
    assert succeeded[0]["lease"] == running[0]["lease"]
