"""The worker's own view of the ClaimJobs protocol: plain, immutable values.

Only `client` and `convert` know the generated messages; everything else in
the worker (jobs, session, runner) speaks these types, so it can be read and
tested without grpc.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class JobKind(enum.Enum):
    """The index work a job asks for."""

    FROM_SCRATCH = "from-scratch"
    INCREMENTAL = "incremental"


class Outcome(enum.Enum):
    """How an attempt ended, as reported to the server."""

    SUCCEEDED = "succeeded"
    # Retryable: counts toward the job's attempts cap.
    FAILED = "failed"
    # The job cannot succeed (its realm is gone): no retry.
    FAILED_PERMANENTLY = "failed-permanently"
    # The server could not serve the job's files for now (its store is
    # unreachable, it is stopping): the lease is released, which does not
    # count as a failed attempt, and the job runs again later.
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class PathChange:
    """One path of an incremental job."""

    path: str
    deleted: bool


@dataclass(frozen=True)
class Assignment:
    """A job received under a lease; `kind` is None for kinds this worker does not know."""

    lease_id: str
    job_id: str
    realm_id: str
    kind: JobKind | None
    priority: int
    path_changes: tuple[PathChange, ...] = ()
    # W3C traceparent of the call that queued the job; "" when not traced.
    trace_parent: str = ""
    # The files the job reads, when the server sent them with it (a small
    # incremental job: each path of its list that exists, and .gitignore).
    files: tuple[tuple[FileInfo, bytes], ...] | None = None


@dataclass(frozen=True)
class StreamSettings:
    """The server's answer to hello; durations in seconds (0 when the server left them unset)."""

    lease_duration: float
    heartbeat_interval: float
    stream_id: str
    # The server takes a job's last entries with its result.
    result_entries: bool = False
    # Resumable sessions: the secret to quote when reconnecting after this
    # stream breaks ("" when the server releases a broken stream's leases at
    # once), how long the server keeps them, and its answer about the leases
    # this stream's hello asked to re-attach.
    resume_token: str = ""
    resume_grace: float = 0.0
    resumed: tuple[LeaseAck, ...] = ()


@dataclass(frozen=True)
class LeaseAck:
    """What became of a message about one lease."""

    lease_id: str
    accepted: bool
    reason: str = ""
    # A refusal whose job went back to the queue (the server preempted it
    # for a user's job), rather than one whose job ended or moved on.
    requeued: bool = False
    # An acknowledged entry batch (its number), 0 for other acks.
    entries_sequence: int = 0
    # A refusal whose job succeeded (a result sent before a break applied).
    succeeded: bool = False
    # The job still runs under the lease (a heartbeat's or entry batch's ack).
    running: bool = False


@dataclass(frozen=True)
class DrainNotice:
    """The server is shutting down; `grace` seconds remain to send results."""

    grace: float


@dataclass(frozen=True)
class JobOutcome:
    """The result of one lease."""

    lease_id: str
    outcome: Outcome
    error_message: str = ""
    entries_uploaded: int = 0
    # Files the job visited in all (its final progress); 0 when not known.
    files_done: int = 0
    # The job's last entries (index_worker.indexer.IndexEntry) and deleted
    # paths, sent with the result; counted in entries_uploaded.
    entries: tuple[Any, ...] = ()
    deleted: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileInfo:
    """Metadata of a stored realm file; mtime is None when the server left it unset."""

    path: str
    mtime: datetime | None
    size: int
    sha256: str


@dataclass(frozen=True)
class FileBatch:
    """Whole files from one StreamRealmFiles message, in path order; `total`
    is the stream's announced file count on its first batch, else None."""

    files: list[tuple[FileInfo, bytes]]
    total: int | None = None


@dataclass
class Progress:
    """Files visited out of files to visit; mutated by the job, read by heartbeats."""

    done: int = 0
    total: int = 0


class StreamClosedError(Exception):
    """The ClaimJobs stream is closed; nothing more can be sent on it."""


class RealmGoneError(Exception):
    """The job's realm no longer exists (NOT_FOUND from the realm file RPCs)."""


class FileAccessError(Exception):
    """A realm file RPC failed for another reason (retryable at the job level)."""


class FilesUnavailableError(FileAccessError):
    """The server could not answer a realm file RPC for now (UNAVAILABLE,
    RESOURCE_EXHAUSTED, ABORTED): not the job's fault."""
