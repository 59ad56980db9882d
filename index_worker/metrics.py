"""Prometheus metrics of a worker process, served with `--metrics-listen`
beside `/healthz` (200 while its stream to the server is open)."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
)

from index_worker.model import JobKind, Outcome

REGISTRY = CollectorRegistry()
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

JOBS = Counter(
    "index_worker_jobs_total", "Jobs run, by kind and outcome", ["kind", "outcome"],
    registry=REGISTRY,
)  # fmt: skip
FILES_INDEXED = Counter(
    "index_worker_files_indexed_total", "Files read and indexed", registry=REGISTRY
)
BYTES_READ = Counter(
    "index_worker_bytes_read_total", "Bytes of file content read", registry=REGISTRY
)
RECONNECTS = Counter(
    "index_worker_reconnects_total", "Streams opened again after the first", registry=REGISTRY
)
CONNECTED = Gauge(
    "index_worker_stream_connected", "1 while the ClaimJobs stream is open", registry=REGISTRY
)
SLOTS = Gauge("index_worker_slots", "Job slots: total, and busy now", ["state"], registry=REGISTRY)
LEASES_TAKEN = Counter(
    "index_worker_leases_taken_total",
    "Jobs stopped because the server ended their lease: handed back (preempted, "
    "queued again) or lost (cancelled, expired, deleted)",
    ["how"],
    registry=REGISTRY,
)
for _how in ("handed_back", "lost"):
    LEASES_TAKEN.labels(_how)
SESSIONS = Counter(
    "index_worker_sessions_total",
    "Streams that broke with jobs running: resumed on a new stream, or given up "
    "(the resume grace ran out)",
    ["how"],
    registry=REGISTRY,
)
for _how in ("resumed", "given_up"):
    SESSIONS.labels(_how)

for _kind in JobKind:
    for _outcome in Outcome:
        JOBS.labels(_kind.value, _outcome.value)

_jobs_children: dict[tuple[str, str], Counter] = {}


def job_finished(kind: str, outcome: str) -> None:
    """JOBS + 1 (label children cached: `labels` is not free per job)."""
    child = _jobs_children.get((kind, outcome))
    if child is None:
        child = _jobs_children[(kind, outcome)] = JOBS.labels(kind, outcome)
    child.inc()
