"""How job rows map to domain values, and back: the one place that knows the
stored state strings, the hidden MERGED state, the path-list encoding and the
columns of a new job.

Private to `store/`: the rest of the server sees domain values only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from realm_service.domain import HeldJob, Job, JobKind, JobState, PathChange

QUEUED = JobState.QUEUED.value
RUNNING = JobState.RUNNING.value
SUCCEEDED = JobState.SUCCEEDED.value
FAILED = JobState.FAILED.value
CANCELLED = JobState.CANCELLED.value
# A job folded into another (named by `superseded_by`) while both were queued.
# Clients are shown the state of the job it was folded into.
MERGED = "merged"
ACTIVE = (QUEUED, RUNNING)


def seq_of(now: datetime) -> int:
    """Queue order among equal priorities: the enqueue time in microseconds."""
    return int(now.timestamp() * 1_000_000)


def encode_paths(changes: Iterable[PathChange]) -> str:
    return json.dumps(sorted([c.path, c.deleted] for c in changes))


def decode_paths(raw: str) -> tuple[PathChange, ...]:
    if not raw or raw == "[]":  # every from-scratch job
        return ()
    return tuple(PathChange(str(p), bool(d)) for p, d in json.loads(raw))


def new_job_values(
    *,
    realm_id: str,
    kind: JobKind,
    priority: int,
    now: datetime,
    paths: Sequence[PathChange] = (),
    trace_parent: str = "",
) -> dict[str, Any]:
    """Every column of a newly queued job: the one definition of a new job,
    used by the store's inserts, the tests and the benchmarks."""
    return {
        "realm_id": realm_id,
        "kind": kind.value,
        "priority": priority,
        "state": QUEUED,
        "seq": seq_of(now),
        "attempt": 0,
        "counted_failures": 0,
        "create_time": now,
        "error_message": "",
        "progress_done": 0,
        "progress_total": 0,
        "paths": encode_paths(paths),
        "worker": "",
        "trace_parent": trace_parent,
    }


def make_job(**fields: Any) -> Job:
    """Job(**fields) for the claim and completion path, where jobs are made
    by the batch: every field given, no defaults, so the frozen dataclass's
    __init__ (one object.__setattr__ per field) can be skipped. A test keeps
    it equal to the real constructor."""
    job = object.__new__(Job)
    job.__dict__.update(fields)
    return job


def job_with(job: Job, **changes: Any) -> Job:
    """dataclasses.replace(job, **changes) without re-running __init__."""
    new = object.__new__(Job)
    state = new.__dict__
    state.update(job.__dict__)
    state.update(changes)
    return new


def to_job(row: Any, shown: Any = None) -> Job:
    """A job as clients see it, from a JobRow or any row with its columns; a
    merged job shows the state of its successor (`shown`)."""
    live = shown if shown is not None else row
    state = live.state if live.state != MERGED else QUEUED
    return make_job(
        job_id=row.id,
        realm_id=row.realm_id,
        kind=JobKind(row.kind),
        priority=max(row.priority, live.priority),
        state=JobState(state),
        attempt=live.attempt,
        create_time=row.create_time,
        start_time=live.start_time,
        finish_time=live.finish_time,
        error_message=live.error_message,
        progress_done=live.progress_done,
        progress_total=live.progress_total,
        path_changes=decode_paths(live.paths),
        trace_parent=row.trace_parent,
        worker=live.worker,
    )


def to_held(row: Any) -> HeldJob:
    return HeldJob(
        job=to_job(row),
        lease_id=row.lease_id or "",
        attempt_id=row.lease_attempt_id,
        counted_failures=row.counted_failures,
        preemptions=row.preemptions,
        checkpoint=row.checkpoint,
        kept=row.checkpoint_kept,
    )
