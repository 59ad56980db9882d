"""Generated realm.v1 messages <-> the worker's own values (model, indexer).

The only module besides `client` that knows the generated code; keeping the
translation here lets jobs and sessions be plain Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from realm.v1 import realm_service_pb2 as pb
from realm.v1 import resources_pb2 as res

from index_worker.indexer import IndexEntry
from index_worker.model import (
    Assignment,
    DrainNotice,
    FileInfo,
    JobKind,
    JobOutcome,
    LeaseAck,
    Outcome,
    PathChange,
    Progress,
    StreamSettings,
)

_KIND_TO_PROTO = {
    JobKind.FROM_SCRATCH: res.JOB_KIND_FROM_SCRATCH_INDEX,
    JobKind.INCREMENTAL: res.JOB_KIND_INCREMENTAL_INDEX,
}
_KIND_FROM_PROTO = {value: key for key, value in _KIND_TO_PROTO.items()}
_OUTCOME_TO_PROTO = {
    Outcome.SUCCEEDED: pb.JobResult.OUTCOME_SUCCEEDED,
    Outcome.FAILED: pb.JobResult.OUTCOME_FAILED,
    Outcome.FAILED_PERMANENTLY: pb.JobResult.OUTCOME_FAILED_PERMANENTLY,
}


def hello(
    worker_id: str,
    incarnation_id: str,
    kinds: Sequence[JobKind],
    min_priority: int | None,
    resume: tuple[str, Sequence[str]] | None = None,
) -> pb.ClaimJobsRequest:
    message = pb.WorkerHello(
        worker_id=worker_id,
        incarnation_id=incarnation_id,
        kinds=[_KIND_TO_PROTO[kind] for kind in kinds],
    )
    if resume is not None:
        message.resume_token = resume[0]
        message.resume_lease_ids.extend(resume[1])
    if min_priority is not None:
        message.min_priority = min_priority
    return pb.ClaimJobsRequest(hello=message)


def credit(credits: int) -> pb.ClaimJobsRequest:
    return pb.ClaimJobsRequest(credit=pb.CreditGrant(credits=credits))


def heartbeat(leases: Iterable[tuple[str, Progress]]) -> pb.ClaimJobsRequest:
    return pb.ClaimJobsRequest(
        heartbeat=pb.Heartbeat(
            leases=[
                pb.LeaseProgress(
                    lease_id=lease_id,
                    progress=res.JobProgress(done=progress.done, total=progress.total),
                )
                for lease_id, progress in leases
            ]
        )
    )


def entries(
    lease_id: str, batch: Sequence[IndexEntry], deleted_paths: Sequence[str], sequence: int = 0
) -> pb.ClaimJobsRequest:
    return pb.ClaimJobsRequest(
        entries=pb.IndexEntryBatch(
            lease_id=lease_id,
            entries=[entry_to_proto(entry) for entry in batch],
            deleted_paths=list(deleted_paths),
            sequence=sequence,
        )
    )


def results(outcomes: Iterable[JobOutcome]) -> pb.ClaimJobsRequest:
    return pb.ClaimJobsRequest(
        results=pb.JobResults(
            results=[
                pb.JobResult(
                    lease_id=outcome.lease_id,
                    outcome=_OUTCOME_TO_PROTO[outcome.outcome],
                    error_message=outcome.error_message,
                    entries_uploaded=outcome.entries_uploaded,
                    progress=(
                        res.JobProgress(done=outcome.files_done, total=outcome.files_done)
                        if outcome.files_done
                        else None
                    ),
                    entries=[entry_to_proto(entry) for entry in outcome.entries],
                    deleted_paths=list(outcome.deleted),
                )
                for outcome in outcomes
            ]
        )
    )


def release(lease_ids: Iterable[str]) -> pb.ClaimJobsRequest:
    return pb.ClaimJobsRequest(release=pb.ReleaseLeases(lease_ids=list(lease_ids)))


def ping(nonce: int, reply: bool) -> pb.ClaimJobsRequest:
    return pb.ClaimJobsRequest(ping=pb.Ping(nonce=nonce, reply=reply))


def settings_from_proto(message: pb.StreamSettings) -> StreamSettings:
    return StreamSettings(
        lease_duration=_seconds(message.lease_duration),
        heartbeat_interval=_seconds(message.heartbeat_interval),
        stream_id=message.stream_id,
        result_entries=message.result_entries,
        resume_token=message.resume_token,
        resume_grace=_seconds(message.resume_grace),
        resumed=tuple(ack_from_proto(a) for a in message.resumed),
    )


def assignment_from_proto(message: pb.JobAssignment) -> Assignment:
    job = message.job
    return Assignment(
        lease_id=message.lease_id,
        job_id=job.job_id,
        realm_id=job.realm_id,
        kind=_KIND_FROM_PROTO.get(job.kind),
        priority=job.priority,
        path_changes=tuple(
            PathChange(path=change.path, deleted=change.deleted) for change in job.path_changes
        ),
        trace_parent=message.trace_parent,
        files=_included_files(message),
    )


def _included_files(message: pb.JobAssignment) -> tuple[tuple[FileInfo, bytes], ...] | None:
    """The files sent with the job, or None (the job reads them itself) when
    none were sent or one is not whole (it would be taken for deleted)."""
    if not message.files_included or any(
        chunk.offset != 0 or not chunk.last for chunk in message.files
    ):
        return None
    return tuple((file_info_from_proto(chunk.file), chunk.content) for chunk in message.files)


def ack_from_proto(message: pb.LeaseAck) -> LeaseAck:
    return LeaseAck(
        lease_id=message.lease_id,
        accepted=message.accepted,
        reason=message.reason,
        requeued=not message.accepted and message.job_state == res.Job.STATE_QUEUED,
        entries_sequence=message.entries_sequence,
        succeeded=not message.accepted and message.job_state == res.Job.STATE_SUCCEEDED,
        running=message.job_state == res.Job.STATE_RUNNING,
    )


def drain_from_proto(message: pb.Drain) -> DrainNotice:
    return DrainNotice(grace=_seconds(message.grace))


def file_info_from_proto(message: res.RealmFile) -> FileInfo:
    mtime = message.mtime.ToDatetime(tzinfo=UTC) if message.HasField("mtime") else None
    return FileInfo(path=message.path, mtime=mtime, size=message.size, sha256=message.sha256)


def entry_to_proto(entry: IndexEntry) -> res.IndexEntry:
    return res.IndexEntry(
        path=entry.path,
        mtime=_timestamp(entry.mtime),
        size=entry.size,
        sha256=entry.sha256,
        media_type=entry.media_type,
        card_type=entry.card_type,
        title=entry.title,
        search_text=entry.search_text,
        links=list(entry.links),
        error_message=entry.error_message,
    )


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    # Naive datetimes are taken as UTC, like everything else in the system.
    stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return stamp
