"""Prometheus metrics of the server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

QUEUE_DEPTH = Gauge(
    "realm_queue_depth", "Queued jobs per priority", ["priority"], registry=REGISTRY
)
QUEUE_OLDEST = Gauge(
    "realm_queue_oldest_age_seconds",
    "Age of the oldest queued job per priority",
    ["priority"],
    registry=REGISTRY,
)
DISPATCH_LATENCY = Histogram(
    "realm_dispatch_latency_seconds",
    "From enqueue to lease, per assignment",
    buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 1000),
    registry=REGISTRY,
)
ASSIGNED = Counter("realm_jobs_assigned_total", "Jobs leased to workers", registry=REGISTRY)
LEASES_EXPIRED = Counter("realm_leases_expired_total", "Leases reaped", registry=REGISTRY)
STREAMS = Gauge("realm_streams_connected", "Open ClaimJobs streams", registry=REGISTRY)
CREDITS = Gauge("realm_stream_credits", "Unused credits over all streams", registry=REGISTRY)
OUTSTANDING = Gauge("realm_leases_outstanding", "Leases held by streams", registry=REGISTRY)
