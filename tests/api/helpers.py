"""Helpers of the gRPC tests: bounded polling, store snapshots, bulk realms,
and a small threaded worker that completes whatever its stream is given."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb
from sqlalchemy import func, insert, select, text

from realm_service.domain import SYSTEM, JobKind
from realm_service.store.db import Database
from realm_service.store.rows import new_job_values
from realm_service.store.tables import (
    IdempotencyKeyRow,
    IndexEntryRow,
    JobAttemptRow,
    JobRow,
    RealmFileRow,
    RealmRow,
)
from tests.api.worker_stream import StreamClient

T = TypeVar("T")

# Generous bounds: they only stop a hung test, nothing asserts speed.
WAIT = 15.0
RPC_TIMEOUT = 15.0


def poll(fn: Callable[[], T], *, timeout: float = WAIT, what: str = "a condition") -> T:
    """Call fn until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    """The error a call fails with; fails the test when it succeeds."""
    try:
        fn()
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded; an error was expected")


# -- the store, seen directly -------------------------------------------------


def store_snapshot(db: Database) -> dict[str, Any]:
    """Everything a bad request must leave alone: counts and the rows that matter."""
    with db.session_for_tests() as s:
        return {
            "realms": sorted(
                tuple(r)
                for r in s.execute(
                    select(
                        RealmRow.realm_id,
                        RealmRow.state,
                        RealmRow.files,
                        RealmRow.cards,
                        RealmRow.entries,
                        RealmRow.current_generation,
                    )
                )
            ),
            "jobs": sorted(
                tuple(r)
                for r in s.execute(
                    select(
                        JobRow.id,
                        JobRow.realm_id,
                        JobRow.kind,
                        JobRow.priority,
                        JobRow.state,
                        JobRow.attempt,
                        JobRow.counted_failures,
                        JobRow.paths,
                        JobRow.lease_id,
                    )
                )
            ),
            "files": sorted(
                tuple(r)
                for r in s.execute(
                    select(RealmFileRow.realm_id, RealmFileRow.path, RealmFileRow.sha256)
                )
            ),
            "attempts": sorted(
                tuple(r)
                for r in s.execute(
                    select(JobAttemptRow.id, JobAttemptRow.job_id, JobAttemptRow.outcome)
                )
            ),
            "entries": s.scalar(select(func.count()).select_from(IndexEntryRow)),
            "keys": s.scalar(select(func.count()).select_from(IdempotencyKeyRow)),
        }


@dataclass(frozen=True)
class StoredJob:
    job_id: int
    realm_id: str
    kind: str
    priority: int
    state: str


def stored_jobs(db: Database, realm_id: str | None = None) -> list[StoredJob]:
    """Job rows as stored (including merged ones), oldest first."""
    q = select(JobRow.id, JobRow.realm_id, JobRow.kind, JobRow.priority, JobRow.state)
    if realm_id is not None:
        q = q.where(JobRow.realm_id == realm_id)
    with db.session_for_tests() as s:
        return [StoredJob(*row) for row in s.execute(q.order_by(JobRow.id))]


def attempt_outcomes(db: Database, job_id: int) -> list[str]:
    with db.session_for_tests() as s:
        return list(
            s.scalars(
                select(JobAttemptRow.outcome)
                .where(JobAttemptRow.job_id == job_id)
                .order_by(JobAttemptRow.id)
            )
        )


def counted_failures(db: Database, job_id: int) -> int:
    with db.session_for_tests() as s:
        return int(s.scalar(select(JobRow.counted_failures).where(JobRow.id == job_id)) or 0)


def bulk_insert_realms(db: Database, realm_ids: Sequence[str], *, priority: int = SYSTEM) -> None:
    """Realm rows in one statement, as if created and indexed long ago (a
    deploy's reindex storm finds realms like these): READY, with a current
    generation, no files and no jobs. Being indexed, a server's boot mount
    leaves them alone, so inserting them under a running server races nothing."""
    now = datetime.now(UTC)
    with db.session_for_tests() as s:
        s.execute(
            insert(RealmRow),
            [
                {
                    "realm_id": realm_id,
                    "display_name": realm_id,
                    "state": "ready",
                    "created_priority": priority,
                    "create_time": now,
                    "current_generation": 0,
                    "last_index_time": now,
                    "files": 0,
                    "cards": 0,
                    "errors": 0,
                    "entries": 0,
                }
                for realm_id in realm_ids
            ],
        )


def bulk_queue_from_scratch(
    db: Database, realm_ids: Sequence[str], *, priority: int = SYSTEM
) -> None:
    """One queued from-scratch job per realm, in the given order, in one
    statement: the rows the store's enqueue would write, minus its cost."""
    now = datetime.now(UTC)
    rows = [
        new_job_values(realm_id=realm_id, kind=JobKind.FROM_SCRATCH, priority=priority, now=now)
        for realm_id in realm_ids
    ]
    for i, row in enumerate(rows):
        row["seq"] += i  # enqueue order is the given order
    with db.session_for_tests() as s:
        s.execute(insert(JobRow), rows)


def queued_count(db: Database, *, priority: int | None = None) -> int:
    q = select(func.count()).select_from(JobRow).where(JobRow.state == "queued")
    if priority is not None:
        q = q.where(JobRow.priority == priority)
    with db.session_for_tests() as s:
        return int(s.scalar(q) or 0)


# -- RPC shortcuts ----------------------------------------------------------------


def create_realm(
    stub: sgrpc.RealmServiceStub, realm_id: str, **kwargs: Any
) -> spb.CreateRealmResponse:
    return stub.CreateRealm(
        spb.CreateRealmRequest(realm_id=realm_id, **kwargs), timeout=RPC_TIMEOUT
    )


def get_job(stub: sgrpc.RealmServiceStub, job_id: str) -> pb.Job:
    return stub.GetJob(spb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT).job


def realm_jobs(stub: sgrpc.RealmServiceStub, realm_id: str) -> list[pb.Job]:
    return list(
        stub.ListJobs(
            spb.ListJobsRequest(realm_id=realm_id, page_size=1000), timeout=RPC_TIMEOUT
        ).jobs
    )


def entry_for(f: pb.RealmFile, **kwargs: Any) -> pb.IndexEntry:
    """An index entry a worker could have produced for a stored file."""
    return pb.IndexEntry(
        path=f.path,
        mtime=f.mtime,
        size=f.size,
        sha256=f.sha256,
        media_type="application/json",
        **kwargs,
    )


def hello(worker_id: str, *, min_priority: int | None = None) -> spb.WorkerHello:
    h = spb.WorkerHello(worker_id=worker_id, incarnation_id=f"{worker_id}-inc")
    if min_priority is not None:
        h.min_priority = min_priority
    return h


def open_stream(
    stub: sgrpc.RealmServiceStub,
    worker_id: str,
    *,
    credits: int = 0,
    min_priority: int | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> StreamClient:
    """A connected stream (settings received) with `credits` granted."""
    stream = StreamClient(
        stub,
        hello=hello(worker_id, min_priority=min_priority),
        metadata=metadata,
        answer_pings=True,
    )
    stream.settings()
    if credits:
        stream.credit(credits)
    return stream


def collect_assignments(
    streams: Iterable[StreamClient], count: int, *, timeout: float = WAIT
) -> dict[StreamClient, list[spb.JobAssignment]]:
    """Read assignments from several streams until `count` arrived in total."""
    streams = list(streams)
    got: dict[StreamClient, list[spb.JobAssignment]] = {s: [] for s in streams}
    deadline = time.monotonic() + timeout
    while sum(len(v) for v in got.values()) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} assignments expected, got {got}")
        for s in streams:
            message = s.poll(0.02)
            if message is not None and message.HasField("assignments"):
                got[s].extend(message.assignments.assignments)
    return got


# -- a worker that completes everything ---------------------------------------------


@dataclass
class CompletingWorker:
    """Drives a StreamClient in a thread: for every assignment it lists and
    reads the realm's files through `file_stub` (which may be another server),
    uploads one entry per file, sends the result and grants one more credit."""

    stream: StreamClient
    file_stub: sgrpc.RealmServiceStub
    completed: list[str] = field(default_factory=list)  # job ids whose result was accepted
    assigned: list[spb.JobAssignment] = field(default_factory=list)
    refused: list[spb.LeaseAck] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _jobs: dict[str, str] = field(default_factory=dict)  # lease id -> job id

    def start(self) -> CompletingWorker:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                message = self.stream.poll(0.05)
                if message is None:
                    continue
                if message.HasField("assignments"):
                    for a in message.assignments.assignments:
                        self.assigned.append(a)
                        self._jobs[a.lease_id] = a.job.job_id
                        self._work(a)
                elif message.HasField("acks"):
                    for ack in message.acks.acks:
                        if ack.accepted:
                            self.completed.append(self._jobs[ack.lease_id])
                        else:
                            self.refused.append(ack)
        except BaseException as e:
            self.errors.append(e)

    def _work(self, a: spb.JobAssignment) -> None:
        realm_id = a.job.realm_id
        files = self.file_stub.ListRealmFiles(
            spb.ListRealmFilesRequest(realm_id=realm_id), timeout=RPC_TIMEOUT
        ).files
        read = self.file_stub.ReadRealmFile(
            spb.ReadRealmFileRequest(realm_id=realm_id, path="realm.json"), timeout=RPC_TIMEOUT
        )
        if json.loads(read.content)["id"] != realm_id:
            raise AssertionError(f"realm.json of {realm_id} is {read.content!r}")
        entries = [entry_for(f) for f in files]
        self.stream.send_entries(a.lease_id, entries)
        self.stream.send_result(a.lease_id, entries_uploaded=len(entries))
        self.stream.credit(1)

    def finish(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(WAIT)
        self.stream.close()
        if self.errors:
            raise self.errors[0]


@contextlib.contextmanager
def store_held(db: Database, job_id: int) -> Iterator[None]:
    """Another transaction holds what recording the job's result needs: the
    job's row on PostgreSQL, the write lock on SQLite."""
    lock = " FOR UPDATE" if db.backend == "postgresql" else ""
    with db.engine.begin() as conn:
        conn.execute(text(f"SELECT id FROM jobs WHERE id = :id{lock}"), {"id": job_id})
        yield
