"""One trace from CreateRealm to the worker: the server (in this process,
spans kept by an in-memory exporter) stores the call's trace context with the
job; a real `index-worker` process continues it (its spans written by the
console exporter, which the OTEL_* variables turn on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from realm.v1 import realm_service_pb2 as spb

from realm_common import tracing
from tests.api.conftest import LiveServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure("realm-service", environ={}, exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _console_spans(text: str) -> list[dict[str, Any]]:
    """The JSON objects the console exporter printed, one after the other."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        span, i = decoder.raw_decode(text, i)
        out.append(span)
    return out


def test_one_trace_from_create_realm_through_the_worker(
    live: LiveServer, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    created = live.stub.CreateRealm(
        spb.CreateRealmRequest(realm_id="traced", priority=10), timeout=10
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "INDEX_WORKER_"))}
    env.update(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="index-worker")
    out = tmp_path / "worker.out"
    with out.open("wb") as sink:
        worker = subprocess.Popen(
            [sys.executable, "-m", "index_worker", "--server", live.address, "--worker-id", "tw"],
            stdout=sink, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            job = live.stub.GetJob(spb.GetJobRequest(job_id=created.job.job_id), timeout=10).job
            if job.state == job.STATE_SUCCEEDED:
                break
            assert time.monotonic() < deadline, f"job still {job.state}"
            time.sleep(0.1)
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err.decode()

    server = {s.name: s for s in spans.get_finished_spans()}
    call = server["realm.v1.RealmService/CreateRealm"]
    trace_id = call.context.trace_id
    # The wait in the queue and the switch to the new generation: the same trace.
    assert server["job queued"].context.trace_id == trace_id
    assert server["job queued"].parent.span_id == call.context.span_id
    assert server["index generation switch"].context.trace_id == trace_id
    # The worker's run, in the other process: a child of the call that queued it.
    worker_spans = [s for s in _console_spans(out.read_text()) if s["name"] == "index job"]
    assert len(worker_spans) == 1, out.read_text()[-2000:]
    run = worker_spans[0]
    assert run["context"]["trace_id"] == f"0x{trace_id:032x}"
    assert run["parent_id"] == f"0x{call.context.span_id:016x}"
    assert run["resource"]["attributes"]["service.name"] == "index-worker"
    assert run["attributes"]["outcome"] == "succeeded"


def test_tracing_is_off_without_otel_variables() -> None:
    assert tracing.exporters_from({}) == []
    assert tracing.exporters_from({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert (
        tracing.exporters_from({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})
        == []
    )
    assert tracing.exporters_from({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) == [
        "otlp"
    ]
    assert not tracing.configure("realm-service", environ={})
    assert not tracing.enabled() and tracing.current_traceparent() == ""


def test_untraced_jobs_store_no_context(live: LiveServer) -> None:
    """Tracing off (no exporter): the job's assignment carries no trace."""
    created = live.stub.CreateRealm(spb.CreateRealmRequest(realm_id="plain"), timeout=10)
    job = live.call(lambda: live.srv.queue.get_job(int(created.job.job_id)))
    assert job.trace_parent == ""
