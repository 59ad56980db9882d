"""`convert.job_pb` writes a job's timestamps and progress into the message
in place; the message must be the one the plain constructor builds, field
for field and byte for byte."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from realm.v1 import resources_pb2 as pb

from realm_service.api import convert as c
from realm_service.domain import Job, JobKind, JobState, PathChange

NOW = datetime(2026, 12, 7, 5, 1, 2, 345678, tzinfo=UTC)


def stamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    out = Timestamp()
    out.FromDatetime(value)
    return out


def plain(job: Job, max_paths: int | None) -> pb.Job:
    changes = job.path_changes if max_paths is None else job.path_changes[:max_paths]
    return pb.Job(
        job_id=str(job.job_id),
        realm_id=job.realm_id,
        kind=c.KIND_TO_PB[job.kind],
        priority=job.priority,
        state=c.JOB_STATE_TO_PB[job.state],
        attempt=job.attempt,
        create_time=stamp(job.create_time),
        start_time=stamp(job.start_time),
        finish_time=stamp(job.finish_time),
        error_message=job.error_message,
        progress=pb.JobProgress(done=job.progress_done, total=job.progress_total),
        path_changes=[pb.PathChange(path=ch.path, deleted=ch.deleted) for ch in changes],
        path_change_count=len(job.path_changes),
        worker_id=job.worker,
    )


BASE = Job(
    job_id=29,
    realm_id="notes",
    kind=JobKind.FROM_SCRATCH,
    priority=-10,
    state=JobState.RUNNING,
    attempt=1,
    create_time=NOW,
    start_time=NOW + timedelta(milliseconds=3),
    worker="w-1",
)

JOBS = {
    "running": BASE,
    "queued, no start": dataclasses.replace(
        BASE, state=JobState.QUEUED, start_time=None, worker=""
    ),
    "finished with progress": dataclasses.replace(
        BASE,
        state=JobState.FAILED,
        finish_time=NOW + timedelta(seconds=2),
        error_message="boom",
        progress_done=3,
        progress_total=9,
    ),
    "naive times are UTC": dataclasses.replace(
        BASE, create_time=datetime(2020, 1, 1, 12, 0, 0, 1), start_time=None
    ),
    "before the epoch": dataclasses.replace(
        BASE, create_time=datetime(1969, 7, 20, 20, 17, 40, 500000, tzinfo=UTC)
    ),
    "the epoch itself": dataclasses.replace(BASE, create_time=datetime(1970, 1, 1, tzinfo=UTC)),
    "many paths": dataclasses.replace(
        BASE,
        kind=JobKind.INCREMENTAL,
        path_changes=tuple(PathChange(path=f"d/{i}.md", deleted=i % 3 == 0) for i in range(150)),
    ),
}


@pytest.mark.parametrize("name", list(JOBS))
@pytest.mark.parametrize("max_paths", [None, c.SHOWN_PATH_CHANGES, 0])
def test_job_message_is_the_plain_one(name: str, max_paths: int | None) -> None:
    job = JOBS[name]
    built = c.job_pb(job, max_paths=max_paths)
    expected = plain(job, max_paths)
    assert built == expected
    assert built.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )
    # Presence, which equality of two messages does not show on its own.
    for field in ("create_time", "start_time", "finish_time", "progress"):
        assert built.HasField(field) == expected.HasField(field), field
