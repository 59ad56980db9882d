"""How realmctl shows things: aligned tables, key/value blocks, JSON, progress."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO, TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res

NONE = "-"

_Enum = TypeVar("_Enum", bound=int)

JOB_STATE_WORDS: Mapping[res.Job.State.ValueType, str] = {
    res.Job.STATE_QUEUED: "queued",
    res.Job.STATE_RUNNING: "running",
    res.Job.STATE_SUCCEEDED: "succeeded",
    res.Job.STATE_FAILED: "failed",
    res.Job.STATE_CANCELLED: "cancelled",
}
REALM_STATE_WORDS: Mapping[res.Realm.State.ValueType, str] = {
    res.Realm.STATE_INDEXING: "indexing",
    res.Realm.STATE_READY: "ready",
    res.Realm.STATE_INDEX_FAILED: "index-failed",
    res.Realm.STATE_INDEX_CANCELLED: "index-cancelled",
}
JOB_KIND_WORDS: Mapping[res.JobKind.ValueType, str] = {
    res.JOB_KIND_FROM_SCRATCH_INDEX: "from-scratch",
    res.JOB_KIND_INCREMENTAL_INDEX: "incremental",
}
DISPOSITION_WORDS: Mapping[res.Disposition.ValueType, str] = {
    res.DISPOSITION_INSERTED: "inserted",
    res.DISPOSITION_MERGED: "merged",
    res.DISPOSITION_ATTACHED: "attached",
    res.DISPOSITION_RERUN_SCHEDULED: "rerun-scheduled",
}
WAIT_REASON_WORDS: Mapping[rs.WaitReason.Code.ValueType, str] = {
    rs.WaitReason.CODE_JOBS_AHEAD: "jobs-ahead",
    rs.WaitReason.CODE_REALM_BUSY: "realm-busy",
    rs.WaitReason.CODE_NO_WORKERS: "no-workers",
    rs.WaitReason.CODE_NO_MATCHING_WORKER: "no-matching-worker",
    rs.WaitReason.CODE_RESERVED_SLOTS: "reserved-slots",
    rs.WaitReason.CODE_ALL_SLOTS_BUSY: "all-slots-busy",
    rs.WaitReason.CODE_DRAINING: "draining",
}
TERMINAL_JOB_STATES = frozenset(
    {res.Job.STATE_SUCCEEDED, res.Job.STATE_FAILED, res.Job.STATE_CANCELLED}
)
NUMERIC_HEADERS = frozenset(
    {
        "FILES", "CARDS", "ERRORS", "ENTRIES", "SIZE", "PRIORITY", "ATTEMPT", "BATCH", "BYTES",
        "COUNT", "CREDITS", "HELD", "MIN_PRIORITY", "SUCCEEDED", "FAILED", "CANCELLED", "#",
    }
)  # fmt: skip


def word(words: Mapping[_Enum, str], value: _Enum) -> str:
    """The short lowercase word of an enum value; a newer server's value shows as a number."""
    if value == 0:
        return NONE
    return words.get(value, f"unknown({value})")


def iso_time(timestamp: Timestamp) -> str:
    """ISO-8601 UTC to the second, or '-' when unset."""
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return NONE
    moment = datetime.fromtimestamp(timestamp.seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def is_set(timestamp: Timestamp) -> bool:
    return timestamp.seconds != 0 or timestamp.nanos != 0


def seconds_text(seconds: float) -> str:
    """`0.4s`, `12s`, `3m05s`, `2h07m`."""
    if seconds < 0:
        return NONE
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def duration_text(duration: Duration) -> str:
    return seconds_text(duration.seconds + duration.nanos / 1e9)


def job_duration(job: res.Job) -> str:
    """How long the job's last attempt ran until the job finished; '-' until then."""
    if not (is_set(job.start_time) and is_set(job.finish_time)):
        return NONE
    start = job.start_time.seconds + job.start_time.nanos / 1e9
    finish = job.finish_time.seconds + job.finish_time.nanos / 1e9
    return seconds_text(finish - start)


def cell(value: object) -> str:
    """A value on one line: control characters (newlines, tabs) become spaces."""
    text = str(value)
    if text == "":
        return NONE
    return "".join(ch if ch.isprintable() else " " for ch in text)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns padded to their widest cell; counts (NUMERIC_HEADERS) right-aligned."""
    lines = [list(headers), *([cell(value) for value in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    out = []
    for line in lines:
        parts = []
        for i, text in enumerate(line):
            last = i == len(headers) - 1
            if headers[i] in NUMERIC_HEADERS:
                parts.append(text.rjust(widths[i]))
            else:
                parts.append(text if last else text.ljust(widths[i]))
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """A `key: value` block with the values aligned; an empty key continues the line above."""
    width = max(len(key) for key, _ in pairs) + 1
    lines = []
    for key, value in pairs:
        label = f"{key}:" if key else ""
        lines.append(f"{label:<{width}} {cell(value)}")
    return "\n".join(lines)


def message_dict(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping of a message, field names as in the proto, defaults included."""
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def json_text(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


# Renderers of the resources.


def progress_text(progress: res.JobProgress) -> str:
    if progress.total <= 0:
        return f"{progress.done}/?" if progress.done else NONE
    return f"{progress.done}/{progress.total}"


def job_summary(job: res.Job) -> str:
    """`17 (from-scratch, priority 10, queued)`."""
    kind = word(JOB_KIND_WORDS, job.kind)
    state = word(JOB_STATE_WORDS, job.state)
    return f"{job.job_id} ({kind}, priority {job.priority}, {state})"


def realm_fields(realm: res.Realm) -> list[tuple[str, object]]:
    stats = realm.stats
    return [
        ("realm_id", realm.realm_id),
        ("name", realm.display_name),
        ("state", word(REALM_STATE_WORDS, realm.state)),
        ("files", stats.files),
        ("entries", stats.entries),
        ("cards", stats.cards),
        ("errors", stats.errors),
        ("created", iso_time(realm.create_time)),
        ("last indexed", iso_time(stats.last_index_time)),
    ]


def realms_table(realms: Sequence[res.Realm]) -> str:
    headers = ["REALM_ID", "NAME", "STATE", "FILES", "CARDS", "ERRORS", "CREATED", "LAST_INDEXED"]
    rows = [
        [
            realm.realm_id,
            realm.display_name,
            word(REALM_STATE_WORDS, realm.state),
            realm.stats.files,
            realm.stats.cards,
            realm.stats.errors,
            iso_time(realm.create_time),
            iso_time(realm.stats.last_index_time),
        ]
        for realm in realms
    ]
    return table(headers, rows)


def job_fields(job: res.Job) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = [
        ("job_id", job.job_id),
        ("realm", job.realm_id),
        ("kind", word(JOB_KIND_WORDS, job.kind)),
        ("priority", job.priority),
        ("state", word(JOB_STATE_WORDS, job.state)),
        ("attempt", job.attempt),
        ("progress", progress_text(job.progress)),
        ("created", iso_time(job.create_time)),
        ("started", iso_time(job.start_time)),
        ("finished", iso_time(job.finish_time)),
    ]
    if job.error_message:
        pairs.append(("error", job.error_message))
    for i, change in enumerate(job.path_changes):
        label = "paths" if i == 0 else ""
        pairs.append((label, f"{change.path} (deleted)" if change.deleted else change.path))
    return pairs


def jobs_table(jobs: Sequence[res.Job]) -> str:
    """A row per job. ATTEMPT is the attempts started; WORKER the worker
    holding the job or that held its last attempt (`realmctl explain JOB`
    shows every attempt)."""
    headers = [
        "JOB_ID", "REALM", "KIND", "PRIORITY", "STATE", "ATTEMPT", "WORKER", "PROGRESS",
        "CREATED", "FINISHED", "DURATION", "ERROR",
    ]  # fmt: skip
    rows = [
        [
            job.job_id,
            job.realm_id,
            word(JOB_KIND_WORDS, job.kind),
            job.priority,
            word(JOB_STATE_WORDS, job.state),
            job.attempt,
            job.worker_id,
            progress_text(job.progress),
            iso_time(job.create_time),
            iso_time(job.finish_time),
            job_duration(job),
            job.error_message,
        ]
        for job in jobs
    ]
    return table(headers, rows)


def explain_text(answer: rs.ExplainJobResponse) -> str:
    """The sentence, then what there is of: reasons, jobs ahead, where it runs, attempts."""
    parts = [cell(answer.summary) if answer.summary else f"job {job_summary(answer.job)}"]
    if answer.reasons:
        reasons = [[word(WAIT_REASON_WORDS, r.code), r.message] for r in answer.reasons]
        parts.append(table(["REASON", "DETAIL"], reasons))
    if answer.jobs_ahead or answer.ahead:
        parts.append(f"jobs ahead: {answer.jobs_ahead}\n{jobs_table(answer.ahead)}")
    if answer.HasField("running"):
        run = answer.running
        parts.append(
            fields(
                [
                    ("worker", run.worker_id),
                    ("instance", run.instance_id),
                    ("stream", run.stream_id),
                    ("lease expires", iso_time(run.lease_expire_time)),
                    ("last heartbeat", iso_time(run.last_heartbeat_time)),
                    ("progress", progress_text(answer.job.progress)),
                ]
            )
        )
    if answer.attempts:
        rows = [
            [
                a.number,
                a.worker_id,
                a.instance_id,
                iso_time(a.start_time),
                iso_time(a.end_time),
                a.outcome,
                a.error_message,
            ]
            for a in answer.attempts
        ]
        parts.append(
            table(["#", "WORKER", "INSTANCE", "STARTED", "ENDED", "OUTCOME", "ERROR"], rows)
        )
    return "\n\n".join(parts)


def workers_table(workers: Sequence[rs.Worker]) -> str:
    headers = [
        "WORKER", "INSTANCE", "KINDS", "MIN_PRIORITY", "CREDITS", "HELD",
        "CONNECTED", "LAST_MESSAGE", "STREAM",
    ]  # fmt: skip
    rows = [
        [
            w.worker_id,
            w.instance_id,
            ",".join(word(JOB_KIND_WORDS, k) for k in w.kinds) or "all",
            w.min_priority,
            w.credits,
            w.jobs_held,
            iso_time(w.connect_time),
            iso_time(w.last_message_time),
            w.stream_id,
        ]
        for w in workers
    ]
    return table(headers, rows)


def queue_stats_text(stats: rs.GetQueueStatsResponse) -> str:
    counts = [
        [word(JOB_STATE_WORDS, c.state), word(JOB_KIND_WORDS, c.kind), c.priority, c.count]
        for c in stats.counts
    ]
    oldest = [[o.priority, iso_time(o.create_time), duration_text(o.age)] for o in stats.oldest]
    windows = [
        [name, f.succeeded, f.failed, f.cancelled]
        for name, f in (("last minute", stats.last_minute), ("last hour", stats.last_hour))
    ]
    return "\n\n".join(
        [
            table(["STATE", "KIND", "PRIORITY", "COUNT"], counts),
            table(["PRIORITY", "OLDEST_QUEUED", "AGE"], oldest),
            table(["FINISHED", "SUCCEEDED", "FAILED", "CANCELLED"], windows),
        ]
    )


def files_table(files: Sequence[res.RealmFile]) -> str:
    headers = ["PATH", "SIZE", "MTIME", "SHA256"]
    rows = [[f.path, f.size, iso_time(f.mtime), f.sha256[:12]] for f in files]
    return table(headers, rows)


def entries_table(entries: Sequence[res.IndexEntry]) -> str:
    headers = ["PATH", "CARD_TYPE", "TITLE", "ERROR"]
    rows = [[e.path, e.card_type, e.title, e.error_message] for e in entries]
    return table(headers, rows)


# Progress of a job on stderr.


@dataclass
class ProgressBar:
    """Done/total files of a job: redrawn in place on a terminal, a line per change otherwise."""

    stream: TextIO
    in_place: bool
    width: int = 30
    _last: tuple[int, int, int] | None = field(default=None, init=False)
    _drawn: int = field(default=0, init=False)

    @classmethod
    def for_stream(cls, stream: TextIO) -> ProgressBar:
        isatty = getattr(stream, "isatty", None)
        return cls(stream, in_place=bool(isatty and isatty()))

    def render(self, job: res.Job) -> str:
        done, total = job.progress.done, job.progress.total
        if job.state == res.Job.STATE_SUCCEEDED and total > 0:
            done = total
        if total > 0:
            filled = min(self.width, self.width * done // total)
            count = f"{min(done, total)}/{total}"
        else:
            filled = 0
            count = f"{done}/?"
        bar = "#" * filled + "." * (self.width - filled)
        return f"job {job.job_id} [{bar}] {count} files  {word(JOB_STATE_WORDS, job.state)}"

    def update(self, job: res.Job) -> None:
        key = (job.state, job.progress.done, job.progress.total)
        if key == self._last:
            return
        self._last = key
        text = self.render(job)
        if self.in_place:
            # Pad to wipe a longer previous line.
            self.stream.write("\r" + text.ljust(self._drawn))
            self._drawn = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.in_place and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


@dataclass
class Console:
    """Where a command writes: results to stdout (text or JSON), the rest to stderr."""

    stdout: TextIO
    stderr: TextIO
    as_json: bool = False

    def print(self, text: str) -> None:
        if text:
            self.stdout.write(text + "\n")

    def print_json(self, value: object) -> None:
        self.stdout.write(json_text(value) + "\n")

    def write_bytes(self, data: bytes) -> None:
        self.stdout.flush()
        buffer = getattr(self.stdout, "buffer", None)
        if buffer is None:
            self.stdout.write(data.decode("utf-8", errors="replace"))
            return
        buffer.write(data)
        buffer.flush()

    def note(self, text: str) -> None:
        self.stderr.write(text + "\n")

    def error(self, message: str) -> None:
        self.stderr.write(f"realmctl: error: {message}\n")
        self.stderr.flush()

    def progress_bar(self) -> ProgressBar:
        return ProgressBar.for_stream(self.stderr)
