"""Domain objects <-> realm.v1 messages. The only place that knows both."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.domain import (
    Attempt,
    Disposition,
    IndexEntry,
    Job,
    JobKind,
    JobState,
    QueueStats,
    Realm,
    RealmFile,
    RealmState,
    WorkerInfo,
)
from realm_service.errors import InvalidArgument
from realm_service.explain import Explanation, WaitCode

KIND_TO_PB = {
    JobKind.FROM_SCRATCH: pb.JOB_KIND_FROM_SCRATCH_INDEX,
    JobKind.INCREMENTAL: pb.JOB_KIND_INCREMENTAL_INDEX,
}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}
JOB_STATE_TO_PB = {
    JobState.QUEUED: pb.Job.STATE_QUEUED,
    JobState.RUNNING: pb.Job.STATE_RUNNING,
    JobState.SUCCEEDED: pb.Job.STATE_SUCCEEDED,
    JobState.FAILED: pb.Job.STATE_FAILED,
    JobState.CANCELLED: pb.Job.STATE_CANCELLED,
}
JOB_STATE_FROM_PB = {v: k for k, v in JOB_STATE_TO_PB.items()}
REALM_STATE_TO_PB = {
    RealmState.INDEXING: pb.Realm.STATE_INDEXING,
    RealmState.READY: pb.Realm.STATE_READY,
    RealmState.INDEX_FAILED: pb.Realm.STATE_INDEX_FAILED,
    RealmState.INDEX_CANCELLED: pb.Realm.STATE_INDEX_CANCELLED,
}
DISPOSITION_TO_PB = {
    Disposition.INSERTED: pb.DISPOSITION_INSERTED,
    Disposition.MERGED: pb.DISPOSITION_MERGED,
    Disposition.ATTACHED: pb.DISPOSITION_ATTACHED,
    Disposition.RERUN_SCHEDULED: pb.DISPOSITION_RERUN_SCHEDULED,
}

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # the store's times are UTC
    # What FromDatetime computes, without its Python-level steps: a job
    # assignment carries three or four of these.
    since = value - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def from_ts(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def realm_pb(realm: Realm) -> pb.Realm:
    return pb.Realm(
        realm_id=realm.realm_id,
        display_name=realm.display_name,
        state=REALM_STATE_TO_PB[realm.state],
        stats=pb.RealmStats(
            files=realm.files,
            cards=realm.cards,
            errors=realm.errors,
            entries=realm.entries,
            last_index_time=ts(realm.last_index_time),
        ),
        create_time=ts(realm.create_time),
    )


# Client answers list at most this many of a job's paths (path_change_count
# has them all); assignments to workers carry every one.
SHOWN_PATH_CHANGES = 100


def _set_ts(field: Timestamp, value: datetime) -> None:
    """`ts(value)` written into a message's own Timestamp field: no
    Timestamp object of its own, no copy into the message."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # as `ts` reads a naive time
    since = value - _EPOCH
    field.seconds = since.days * 86_400 + since.seconds
    field.nanos = since.microseconds * 1000  # setting a field makes it present


def job_pb(job: Job, *, max_paths: int | None = SHOWN_PATH_CHANGES) -> pb.Job:
    # Built field by field into the one message (its timestamps and progress
    # set in place): a batch of assignments makes 64 of these at a time.
    msg = pb.Job(
        job_id=str(job.job_id),
        realm_id=job.realm_id,
        kind=KIND_TO_PB[job.kind],
        priority=job.priority,
        state=JOB_STATE_TO_PB[job.state],
        attempt=job.attempt,
        error_message=job.error_message,
        path_change_count=len(job.path_changes),
        worker_id=job.worker,
    )
    _set_ts(msg.create_time, job.create_time)
    if job.start_time is not None:
        _set_ts(msg.start_time, job.start_time)
    if job.finish_time is not None:
        _set_ts(msg.finish_time, job.finish_time)
    progress = msg.progress
    progress.done = job.progress_done
    progress.total = job.progress_total
    if job.path_changes:
        changes = job.path_changes if max_paths is None else job.path_changes[:max_paths]
        add = msg.path_changes.add
        for change in changes:
            add(path=change.path, deleted=change.deleted)
    return msg


def file_pb(f: RealmFile) -> pb.RealmFile:
    return pb.RealmFile(path=f.path, mtime=ts(f.mtime), size=f.size, sha256=f.sha256)


def entry_pb(e: IndexEntry) -> pb.IndexEntry:
    return pb.IndexEntry(
        path=e.path,
        mtime=ts(e.mtime),
        size=e.size,
        sha256=e.sha256,
        media_type=e.media_type,
        card_type=e.card_type,
        title=e.title,
        search_text=e.search_text,
        links=list(e.links),
        error_message=e.error_message,
    )


# google.protobuf.Timestamp's own valid range: 0001-01-01 to 9999-12-31 UTC.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def entry_from_pb(e: pb.IndexEntry, field: str) -> IndexEntry:
    from realm_service.domain import validate_path

    path = validate_path(e.path, f"{field}.path")
    if len(e.sha256) > 64 or len(e.media_type) > 200 or len(e.card_type) > 400:
        raise InvalidArgument(f"{field}: sha256, media_type or card_type is too long")
    # PostgreSQL text cannot hold NUL: refused here, with the field named,
    # rather than failing the whole batch deep in the store.
    for name in ("sha256", "media_type", "card_type", "title", "search_text", "error_message"):
        if "\x00" in getattr(e, name):
            raise InvalidArgument(f"{field}.{name} contains a NUL character (U+0000)")
    if any("\x00" in link for link in e.links):
        raise InvalidArgument(f"{field}.links contains a NUL character (U+0000)")
    if e.HasField("mtime") and not (
        MIN_TIMESTAMP_SECONDS <= e.mtime.seconds <= MAX_TIMESTAMP_SECONDS
        and 0 <= e.mtime.nanos < 1_000_000_000
    ):
        raise InvalidArgument(
            f"{field}.mtime is out of range: seconds {e.mtime.seconds}, nanos {e.mtime.nanos} "
            "(use 0001-01-01 to 9999-12-31)"
        )
    return IndexEntry(
        path=path,
        mtime=from_ts(e.mtime) if e.HasField("mtime") else datetime.fromtimestamp(0, UTC),
        size=max(0, e.size),
        sha256=e.sha256,
        media_type=e.media_type,
        card_type=e.card_type,
        title=e.title[:10_000],
        search_text=e.search_text[:1_000_000],
        links=tuple(e.links[:1000]),
        error_message=e.error_message[:2000],
    )


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"page_size {value} is negative")
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size {value} is over the limit of {MAX_PAGE_SIZE}")
    return value or DEFAULT_PAGE_SIZE


def encode_token(kind: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode_token(kind: str, token: str) -> str | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is malformed") from None
    prefix, sep, value = raw.partition(":")
    if prefix != kind or not sep:
        raise InvalidArgument("page_token does not belong to this listing") from None
    return value


def job_id(value: str, field: str = "job_id") -> int:
    if not value:
        raise InvalidArgument(f"{field} is required")
    # str.isdigit() also accepts non-ASCII digits ("²", "٣"), which int()
    # rejects or silently maps onto another job's id.
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise InvalidArgument(f"{field} {value[:40]!r} is not a job id (decimal digits)")
    return int(value)


# -- job control ----------------------------------------------------------------

WAIT_CODE_TO_PB = {
    WaitCode.JOBS_AHEAD: spb.WaitReason.CODE_JOBS_AHEAD,
    WaitCode.REALM_BUSY: spb.WaitReason.CODE_REALM_BUSY,
    WaitCode.NO_WORKERS: spb.WaitReason.CODE_NO_WORKERS,
    WaitCode.NO_MATCHING_WORKER: spb.WaitReason.CODE_NO_MATCHING_WORKER,
    WaitCode.RESERVED_SLOTS: spb.WaitReason.CODE_RESERVED_SLOTS,
    WaitCode.ALL_SLOTS_BUSY: spb.WaitReason.CODE_ALL_SLOTS_BUSY,
    WaitCode.DRAINING: spb.WaitReason.CODE_DRAINING,
}


def attempt_pb(a: Attempt) -> spb.JobAttempt:
    return spb.JobAttempt(
        number=a.number,
        worker_id=a.worker,
        instance_id=a.instance_id,
        start_time=ts(a.start_time),
        end_time=ts(a.end_time),
        outcome=a.outcome,
        error_message=a.error_message,
    )


def explanation_pb(e: Explanation) -> spb.ExplainJobResponse:
    running = None
    if e.running is not None:
        running = spb.RunningAttempt(
            worker_id=e.running.worker,
            stream_id=e.running.stream_id,
            instance_id=e.running.instance_id,
            lease_expire_time=ts(e.running.lease_expire_time),
            last_heartbeat_time=ts(e.running.last_heartbeat_time),
        )
    return spb.ExplainJobResponse(
        job=job_pb(e.job),
        summary=e.summary,
        reasons=[
            spb.WaitReason(code=WAIT_CODE_TO_PB[r.code], message=r.message) for r in e.reasons
        ],
        jobs_ahead=e.jobs_ahead,
        ahead=[job_pb(j) for j in e.ahead],
        running=running,
        attempts=[attempt_pb(a) for a in e.attempts],
    )


def worker_pb(w: WorkerInfo) -> spb.Worker:
    return spb.Worker(
        worker_id=w.worker_id,
        incarnation_id=w.incarnation_id,
        instance_id=w.instance_id,
        stream_id=w.stream_id,
        kinds=[KIND_TO_PB[k] for k in w.kinds],
        min_priority=w.min_priority,
        credits=w.credits,
        jobs_held=w.jobs_held,
        connect_time=ts(w.connect_time),
        last_message_time=ts(w.last_message_time),
    )


def queue_stats_pb(stats: QueueStats, now: datetime | None = None) -> spb.GetQueueStatsResponse:
    now = now or datetime.now(UTC)

    def finished(counts: dict[JobState, int]) -> spb.FinishedCounts:
        return spb.FinishedCounts(
            succeeded=counts.get(JobState.SUCCEEDED, 0),
            failed=counts.get(JobState.FAILED, 0),
            cancelled=counts.get(JobState.CANCELLED, 0),
        )

    oldest = []
    for priority, created in stats.oldest:
        age = Duration()
        age.FromTimedelta(max(now - created, timedelta(0)))
        oldest.append(spb.OldestQueued(priority=priority, create_time=ts(created), age=age))
    return spb.GetQueueStatsResponse(
        counts=[
            spb.JobCount(
                state=JOB_STATE_TO_PB[state], kind=KIND_TO_PB[kind], priority=priority, count=n
            )
            for state, kind, priority, n in stats.counts
        ],
        oldest=oldest,
        last_minute=finished(stats.last_minute),
        last_hour=finished(stats.last_hour),
    )
