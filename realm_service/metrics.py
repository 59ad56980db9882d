"""Prometheus metrics of the server (the list, with meanings, is in README.md).

Labelled series that an alert or a dashboard expects to find are created at
import with their known label values, so they read 0 rather than missing
before the first event.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from realm_service.domain import SYSTEM, USER, JobKind, JobState

REGISTRY = CollectorRegistry()
# The standard process_* and python_* series, as the default registry has them.
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

# Job durations run from milliseconds (an empty realm) to hours (a storm).
DURATION_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3600)
PRIORITY_CLASSES = ("system", "user")
KINDS = tuple(kind.value for kind in JobKind)
# Named levels are always reported, so their depth reads 0 with no work.
KNOWN_PRIORITIES = (SYSTEM, USER)


def priority_class(priority: int) -> str:
    return "system" if priority <= SYSTEM else "user"


def run_duration(kind: str, priority: int) -> Any:
    """RUN_DURATION's child for a job (children cached: `labels` is not free)."""
    return _child(RUN_DURATION, kind, priority)


def dispatch_latency(kind: str, priority: int) -> Any:
    """DISPATCH_LATENCY's child for a job, cached as `run_duration`'s."""
    return _child(DISPATCH_LATENCY, kind, priority)


def _child(histogram: Histogram, kind: str, priority: int) -> Any:
    key = (histogram, kind, priority <= SYSTEM)
    child = _children.get(key)
    if child is None:
        child = _children[key] = histogram.labels(kind, priority_class(priority))
    return child


_children: dict[tuple[Histogram, str, bool], Any] = {}


QUEUE_DEPTH = Gauge(
    "realm_queue_depth", "Queued jobs per priority", ["priority"], registry=REGISTRY
)
QUEUE_OLDEST = Gauge(
    "realm_queue_oldest_age_seconds",
    "Age of the oldest queued job per priority (0 when none is queued)",
    ["priority"],
    registry=REGISTRY,
)
JOBS = Gauge("realm_jobs", "Unfinished jobs by state", ["state"], registry=REGISTRY)
DISPATCH_LATENCY = Histogram(
    "realm_dispatch_latency_seconds",
    "Queue wait: from enqueue to lease, per assignment",
    ["kind", "priority_class"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
RUN_DURATION = Histogram(
    "realm_job_run_seconds",
    "From lease to result, per finished attempt",
    ["kind", "priority_class"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
JOBS_FINISHED = Counter(
    "realm_jobs_finished_total",
    "Jobs that reached a final state",
    ["kind", "outcome"],
    registry=REGISTRY,
)
ATTEMPTS = Counter(
    "realm_job_attempts_total",
    "Attempts ended, by how (completed, failed, interrupted, expired)",
    ["kind", "outcome"],
    registry=REGISTRY,
)
PREEMPTIONS = Counter(
    "realm_jobs_preempted_total",
    "SYSTEM jobs handed back (uncounted) for a waiting job of a user",
    ["kind"],
    registry=REGISTRY,
)
LEASES_RESUMED = Counter(
    "realm_leases_resumed_total",
    "Leases of broken ClaimJobs streams: detached (kept for the resume grace), "
    "re-attached by their worker, or refused when a worker asked",
    ["how"],
    registry=REGISTRY,
)
for _how in ("detached", "reattached", "refused"):
    LEASES_RESUMED.labels(_how)
CHECKPOINT_ENTRIES = Counter(
    "realm_checkpoint_entries_kept_total",
    "Index entries of earlier attempts that from-scratch attempts went on from",
    registry=REGISTRY,
)
ASSIGNED = Counter("realm_jobs_assigned_total", "Jobs leased to workers", registry=REGISTRY)
LEASES_EXPIRED = Counter("realm_leases_expired_total", "Leases reaped", registry=REGISTRY)
STREAMS = Gauge("realm_streams_connected", "Open ClaimJobs streams", registry=REGISTRY)
WORKERS = Gauge(
    "realm_workers_connected",
    "Open ClaimJobs streams per lane (the stream's minimum priority)",
    ["lane"],
    registry=REGISTRY,
)
CREDITS = Gauge("realm_stream_credits", "Unused credits over all streams", registry=REGISTRY)
OUTSTANDING = Gauge("realm_leases_outstanding", "Leases held by streams", registry=REGISTRY)
RPCS = Counter(
    "realm_rpcs_total", "Finished RPCs by method and status code", ["method", "code"],
    registry=REGISTRY,
)  # fmt: skip
RPC_LATENCY = Histogram(
    "realm_rpc_duration_seconds",
    "RPC duration by method and status code (streams: until they end)",
    ["method", "code"],
    buckets=(0.0005, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
    registry=REGISTRY,
)

for _kind in KINDS:
    for _cls in PRIORITY_CLASSES:
        DISPATCH_LATENCY.labels(_kind, _cls)
        RUN_DURATION.labels(_kind, _cls)
    for _outcome in ("succeeded", "failed"):
        JOBS_FINISHED.labels(_kind, _outcome)
    for _outcome in ("completed", "failed", "interrupted", "expired"):
        ATTEMPTS.labels(_kind, _outcome)
for _state in (JobState.QUEUED, JobState.RUNNING):
    JOBS.labels(_state.value).set(0)
for _priority in KNOWN_PRIORITIES:
    QUEUE_DEPTH.labels(str(_priority)).set(0)
    QUEUE_OLDEST.labels(str(_priority)).set(0)
