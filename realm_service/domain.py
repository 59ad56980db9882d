"""Pure domain types and validation for realms, files and jobs.

Standard library only: every other layer imports this module, it imports none.
"""

from __future__ import annotations

import enum
import posixpath
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from realm_service.errors import InvalidArgument

SYSTEM = 0
USER = 10
MIN_PRIORITY = 0
MAX_PRIORITY = 100

MAX_PATH_LENGTH = 1024
MAX_PATH_SEGMENT = 255
DEFAULT_MAX_FILE_SIZE = 4 * 1024 * 1024
MAX_DISPLAY_NAME = 200
MAX_REQUEST_ID = 128
# Paths an incremental job may list; more changes make a from-scratch job.
MAX_JOB_PATHS = 1000

REALM_JSON = "realm.json"
INDEX_JSON = "index.json"

# Used with fullmatch only: `$` also matches before a trailing "\n", so with
# `match` "abc\n" passed and reached the store.
_REALM_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class JobKind(enum.StrEnum):
    FROM_SCRATCH = "from-scratch"
    INCREMENTAL = "incremental"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class AttemptOutcome(enum.StrEnum):
    """How one lease of a job ended."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # released: stream closed, drain, shutdown
    EXPIRED = "expired"
    CANCELLED = "cancelled"  # CancelJob or DeleteRealm revoked the lease


class Disposition(enum.StrEnum):
    INSERTED = "inserted"
    MERGED = "merged"
    ATTACHED = "attached"
    RERUN_SCHEDULED = "rerun-scheduled"


class RealmState(enum.StrEnum):
    INDEXING = "indexing"
    READY = "ready"
    INDEX_FAILED = "index-failed"
    INDEX_CANCELLED = "index-cancelled"


@dataclass(frozen=True)
class PathChange:
    path: str
    deleted: bool


@dataclass(frozen=True)
class Realm:
    realm_id: str
    display_name: str
    state: RealmState
    create_time: datetime
    files: int = 0
    cards: int = 0
    errors: int = 0
    entries: int = 0
    last_index_time: datetime | None = None
    current_generation: int | None = None
    created_priority: int = USER


@dataclass(frozen=True)
class RealmFile:
    path: str
    mtime: datetime
    size: int
    sha256: str


@dataclass(frozen=True)
class Job:
    job_id: int
    realm_id: str
    kind: JobKind
    priority: int
    state: JobState
    attempt: int
    create_time: datetime
    start_time: datetime | None = None
    finish_time: datetime | None = None
    error_message: str = ""
    progress_done: int = 0
    progress_total: int = 0
    path_changes: tuple[PathChange, ...] = ()
    # W3C traceparent of the call that queued the job ("" when not traced):
    # the worker continues that trace.
    trace_parent: str = ""
    # The worker holding the job, or that held its last attempt.
    worker: str = ""


# How a preempted attempt's message begins (its attempt ends interrupted with
# it, and refusals of the stopped worker's late messages quote it).
PREEMPTED_FOR = "preempted for job"


def preemption_reason(job_id: int, priority: int) -> str:
    """Why a SYSTEM job was handed back: for which waiting job."""
    return f"{PREEMPTED_FOR} {job_id} (priority {priority})"


@dataclass(frozen=True)
class HeldJob:
    """A running job as the transitions of its lease need it: the job, and
    the lease bookkeeping kept beside it (the attempt, failures so far)."""

    job: Job
    lease_id: str
    attempt_id: int | None
    counted_failures: int
    preemptions: int = 0
    # A from-scratch job's checkpoint (an earlier attempt's generation, which
    # this attempt stages into too) and the entries of it kept for this
    # attempt (None until its file stream opened).
    checkpoint: int | None = None
    kept: int | None = None

    @property
    def generation(self) -> int | None:
        """The generation this attempt stages into."""
        return self.checkpoint if self.checkpoint is not None else self.attempt_id

    @property
    def job_id(self) -> int:
        return self.job.job_id

    @property
    def realm_id(self) -> str:
        return self.job.realm_id


@dataclass(frozen=True)
class EnqueueResult:
    job: Job
    disposition: Disposition
    # The lease an enqueue took for the idle stream it was offered (HandOff):
    # of this job (which `job` then shows running) or of one ahead of it in
    # the queue.
    lease: Lease | None = None


@dataclass(frozen=True)
class HandOff:
    """One credit of an idle ClaimJobs stream, offered to an enqueue: it
    also claims one job for the stream (JobQueue.enqueue), the claim's own
    order choosing which, so a job enqueued while a worker waits starts
    without waiting for a claim round. The dispatcher makes the offer and
    settles it."""

    stream_id: str
    worker: str
    min_priority: int
    kinds: tuple[JobKind, ...]
    # SYSTEM-level jobs the claim may take (reserved slots); None: no limit.
    system_limit: int | None
    # The highest priority it may take: jobs above are a dedicated lane's
    # (one with free credits, which a claim round serves first).
    max_priority: int | None = None


@dataclass(frozen=True)
class Lease:
    """One attempt of a job: the right to run it until expire_time."""

    lease_id: str
    job: Job
    expire_time: datetime
    # A small incremental job's files as its claim read them (each existing
    # path of its list, and .gitignore), sent with the assignment; None when
    # the worker reads what it needs itself.
    files: tuple[tuple[RealmFile, bytes], ...] | None = None
    # Times the job was preempted before this attempt.
    preemptions: int = 0


@dataclass(frozen=True)
class IndexEntry:
    path: str
    mtime: datetime
    size: int
    sha256: str
    media_type: str
    card_type: str = ""
    title: str = ""
    search_text: str = ""
    links: tuple[str, ...] = field(default_factory=tuple)
    error_message: str = ""

    @property
    def is_card(self) -> bool:
        return bool(self.card_type) and not self.error_message


def merge_paths(old: Iterable[PathChange], new: Iterable[PathChange]) -> tuple[PathChange, ...]:
    """Union by path; a delete wins over an update of the same path."""
    merged: dict[str, bool] = {}
    for change in [*old, *new]:
        merged[change.path] = merged.get(change.path, False) or change.deleted
    return tuple(PathChange(p, d) for p, d in sorted(merged.items()))


def validate_realm_id(realm_id: str, field_name: str = "realm_id") -> str:
    if not realm_id:
        raise InvalidArgument(f"{field_name} is required")
    if not _REALM_ID.fullmatch(realm_id):
        raise InvalidArgument(
            f"{field_name} {realm_id[:80]!r} is invalid: use 1-63 characters of [a-z0-9-], "
            "starting and ending with a letter or digit"
        )
    return realm_id


def validate_priority(priority: int | None, default: int, field_name: str = "priority") -> int:
    if priority is None:
        return default
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidArgument(
            f"{field_name} {priority} is out of range: use {MIN_PRIORITY}-{MAX_PRIORITY}"
        )
    return priority


def _refused_in_path(cp: int) -> str | None:
    """What kind of code point a path may not hold, or None when it may."""
    if cp < 0x20:
        return "a control character"
    if cp == 0x7F:
        return "DEL"
    if 0x80 <= cp <= 0x9F:
        return "a C1 control character"
    if cp in (0x2028, 0x2029):
        # Unicode line breaks: a log line or listing row holding one is cut in two.
        return "a line or paragraph separator"
    if cp in _BIDI_CONTROLS:
        # They reorder how the rest of the name is displayed, so a path can
        # show as another one (the "Trojan Source" trick).
        return "a bidirectional formatting control"
    if cp == 0xFEFF:
        return "a byte order mark"
    if 0xD800 <= cp <= 0xDFFF:
        return "an unpaired surrogate"  # not encodable as UTF-8: no store can hold it
    if 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE:
        return "a noncharacter"
    return None


_BIDI_CONTROLS = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def validate_path(path: str, field_name: str = "path") -> str:
    """Check a relative POSIX path inside a realm; return its NFC form, the
    one to store, look up and answer with.

    Normalizing first makes the NFC and NFD spellings of a name (macOS tools
    often send NFD, most others NFC) one file rather than two that look the
    same. The refused code points are invariant under NFC, so
    checking them on the normalized path reports what the caller sent.
    """
    if not path:
        raise InvalidArgument(f"{field_name} is required")
    # NFC turns at most four code points into one (the longest canonical
    # decomposition), so a longer input cannot fit in MAX_PATH_LENGTH bytes;
    # refusing it here bounds the normalizing work.
    if len(path) > 4 * MAX_PATH_LENGTH:
        raise InvalidArgument(f"{field_name} is longer than {MAX_PATH_LENGTH} bytes")
    path = unicodedata.normalize("NFC", path)
    for i, c in enumerate(path):
        kind = _refused_in_path(ord(c))
        if kind is not None:
            raise InvalidArgument(
                f"{field_name} contains U+{ord(c):04X} ({kind}) at character {i}; "
                "paths may not contain control, separator, bidirectional, BOM, "
                "surrogate or noncharacter code points"
            )
    if len(path.encode("utf-8")) > MAX_PATH_LENGTH:
        raise InvalidArgument(f"{field_name} is longer than {MAX_PATH_LENGTH} bytes")
    if path.startswith("/"):
        raise InvalidArgument(f"{field_name} {path[:80]!r} must be relative (no leading '/')")
    if "\\" in path:
        raise InvalidArgument(f"{field_name} {path[:80]!r} must use '/' as separator")
    segments = path.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise InvalidArgument(f"{field_name} {path[:80]!r} has an empty, '.' or '..' segment")
        if len(segment) > MAX_PATH_SEGMENT:
            raise InvalidArgument(f"{field_name} has a segment longer than {MAX_PATH_SEGMENT}")
    if posixpath.normpath(path) != path:
        raise InvalidArgument(f"{field_name} {path[:80]!r} is not normalized")
    return path


_REALM_JSON_RESERVED = (
    "realm.json is reserved: the server writes it when the realm is created, "
    "with its display name; clients may not write or delete it"
)
_INDEX_JSON_NOT_DELETABLE = (
    "index.json is reserved: it is the realm's root card; clients may replace it but not delete it"
)
_INDEX_JSON_AT_CREATE = (
    "index.json is reserved: the server writes the realm's root card when the realm "
    "is created; replace it with WriteRealmFile afterwards"
)


def check_client_write(path: str, field_name: str = "path") -> None:
    """Refuse a client's write of a file the server owns. `path` is validated."""
    if path == REALM_JSON:
        raise InvalidArgument(f"{field_name}: {_REALM_JSON_RESERVED}")


def check_client_delete(path: str, field_name: str = "path") -> None:
    """Refuse a client's delete of a file every realm must have. `path` is validated."""
    if path == REALM_JSON:
        raise InvalidArgument(f"{field_name}: {_REALM_JSON_RESERVED}")
    if path == INDEX_JSON:
        raise InvalidArgument(f"{field_name}: {_INDEX_JSON_NOT_DELETABLE}")


def check_initial_file(path: str, field_name: str) -> None:
    """Refuse an initial file the server itself writes into a new realm."""
    if path == REALM_JSON:
        raise InvalidArgument(f"{field_name}: {_REALM_JSON_RESERVED}")
    if path == INDEX_JSON:
        raise InvalidArgument(f"{field_name}: {_INDEX_JSON_AT_CREATE}")


def validate_content(content: bytes, max_size: int, field_name: str = "content") -> bytes:
    if len(content) > max_size:
        raise InvalidArgument(
            f"{field_name} is {len(content)} bytes; the limit is {max_size} bytes"
        )
    return content


def validate_display_name(name: str, realm_id: str) -> str:
    if len(name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(f"display_name is longer than {MAX_DISPLAY_NAME} characters")
    if any(ord(c) < 0x20 for c in name):
        raise InvalidArgument("display_name contains control characters")
    return name or realm_id


def validate_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters")
    if any(ord(c) < 0x20 for c in request_id):
        raise InvalidArgument("request_id contains control characters")
    return request_id


# -- job control and its reads --------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One lease of a job, as job_attempts records it."""

    number: int
    worker: str
    instance_id: str
    start_time: datetime
    end_time: datetime | None
    outcome: str
    error_message: str


@dataclass(frozen=True)
class RunningInfo:
    """Where a running job's lease stands (lease ids stay secret)."""

    worker: str
    instance_id: str
    lease_expire_time: datetime | None
    # Its stream broke: the lease waits (until its expiry) for the worker to
    # re-attach it.
    detached: bool = False


@dataclass(frozen=True)
class QueuePosition:
    """A queued job's place among claimable jobs."""

    ahead: int
    first_ahead: tuple[Job, ...]
    realm_running: Job | None


@dataclass(frozen=True)
class WorkerInfo:
    """One connected ClaimJobs stream, on this instance or another."""

    worker_id: str
    incarnation_id: str
    instance_id: str
    stream_id: str
    kinds: tuple[JobKind, ...]
    min_priority: int
    credits: int
    jobs_held: int
    connect_time: datetime
    last_message_time: datetime


@dataclass(frozen=True)
class QueueStats:
    counts: tuple[tuple[JobState, JobKind, int, int], ...]  # state, kind, priority, count
    oldest: tuple[tuple[int, datetime], ...]  # priority, oldest queued create_time
    last_minute: dict[JobState, int]
    last_hour: dict[JobState, int]


@dataclass(frozen=True)
class RealmDeletion:
    jobs_cancelled: int
    files_deleted: int
    revoked_leases: tuple[str, ...]
    replayed: bool = False
