"""How job rows map to domain values, and back: the one place that knows the
stored state strings, the hidden MERGED state, the path-list encoding and the
columns of a new job.

Private to `store/`: the rest of the server sees domain values only.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Row

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


# The columns `new_job_values` gives, in its order.
NEW_JOB_FIELDS = (
    "realm_id", "kind", "priority", "state", "seq", "attempt", "counted_failures",
    "create_time", "error_message", "progress_done", "progress_total", "paths",
    "worker", "trace_parent",
)  # fmt: skip


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


# The columns a job value is made of, and those of a held job besides.
JOB_FIELDS = (
    "id", "realm_id", "kind", "priority", "state", "attempt", "create_time",
    "start_time", "finish_time", "error_message", "progress_done",
    "progress_total", "paths", "trace_parent", "worker",
)  # fmt: skip
HELD_FIELDS = (
    *JOB_FIELDS, "lease_id", "lease_attempt_id", "counted_failures", "preemptions",
    "checkpoint", "checkpoint_kept",
)  # fmt: skip
_KINDS = {kind.value: kind for kind in JobKind}
# The state a client is shown for each stored one: a merged job's own row
# shows queued (`to_job` with `shown` shows its successor's).
_SHOWN = {state.value: state for state in JobState} | {MERGED: JobState.QUEUED}


def kind_of(value: str) -> JobKind:
    """JobKind(value), without the enum's Python lookup."""
    return _KINDS.get(value) or JobKind(value)


def _shown(value: str) -> JobState:
    return _SHOWN.get(value) or JobState(value)


def _job(
    job_id: int, realm_id: str, kind: str, priority: int, state: str, attempt: int,
    create_time: datetime, start_time: datetime | None, finish_time: datetime | None,
    error_message: str, progress_done: int, progress_total: int, paths: str,
    trace_parent: str, worker: str,
) -> Job:  # fmt: skip
    return make_job(
        job_id=job_id,
        realm_id=realm_id,
        kind=kind_of(kind),
        priority=priority,
        state=_shown(state),
        attempt=attempt,
        create_time=create_time,
        start_time=start_time,
        finish_time=finish_time,
        error_message=error_message,
        progress_done=progress_done,
        progress_total=progress_total,
        path_changes=decode_paths(paths),
        trace_parent=trace_parent,
        worker=worker,
    )


def make_held(**fields: Any) -> HeldJob:
    """HeldJob(**fields) with every field given, made as `make_job` makes a
    job (a test keeps it equal to the real constructor)."""
    held = object.__new__(HeldJob)
    held.__dict__.update(fields)
    return held


def _held(values: Sequence[Any]) -> HeldJob:
    lease_id, attempt_id, counted_failures, preemptions, checkpoint, kept = values[15:]
    return make_held(
        job=_job(*values[:15]),
        lease_id=lease_id or "",
        attempt_id=attempt_id,
        counted_failures=counted_failures,
        preemptions=preemptions,
        checkpoint=checkpoint,
        kept=kept,
    )


@functools.cache
def picker(fields: tuple[str, ...], wanted: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """Reads the columns `wanted` by position from a row of a result whose
    columns are `fields`: a Row's attribute access runs Python code (about
    0.5-0.7 us a column, most of a job's mapping), its indexing does not."""
    positions = [fields.index(name) for name in wanted]
    if len(positions) == 1:  # itemgetter of one position returns the bare value
        (only,) = positions
        return lambda row: (row[only],)
    return operator.itemgetter(*positions)


def job_reader(fields: Sequence[str]) -> Callable[[Any], Job]:
    """Maps Core rows of a result with columns `fields` (`result.keys()`,
    including at least `JOB_FIELDS`) to jobs; the fast path of batch reads."""
    pick = picker(tuple(fields), JOB_FIELDS)
    return lambda row: _job(*pick(row))


def held_reader(fields: Sequence[str]) -> Callable[[Any], HeldJob]:
    """As `job_reader`, to held jobs (the columns include `HELD_FIELDS`)."""
    pick = picker(tuple(fields), HELD_FIELDS)
    return lambda row: _held(pick(row))


def to_job(row: Any, shown: Any = None) -> Job:
    """A job as clients see it, from a Core row, a JobRow or any object with
    its columns; a merged job shows the state of its successor (`shown`)."""
    if shown is None and isinstance(row, Row):
        return job_reader(row._fields)(row)
    live = shown if shown is not None else row
    return _job(
        row.id,
        row.realm_id,
        row.kind,
        max(row.priority, live.priority),
        live.state,
        live.attempt,
        row.create_time,
        live.start_time,
        live.finish_time,
        live.error_message,
        live.progress_done,
        live.progress_total,
        live.paths,
        row.trace_parent,
        live.worker,
    )


def to_held(row: Any) -> HeldJob:
    if isinstance(row, Row):
        return held_reader(row._fields)(row)
    return _held([getattr(row, name) for name in HELD_FIELDS])
