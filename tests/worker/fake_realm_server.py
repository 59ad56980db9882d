"""A scriptable fake of the realm service's worker-facing RPCs, on a real loopback server.

The test drives each ClaimJobs stream by hand (`FakeStream.send`, `.end`) and
inspects what the worker sent (`FakeStream.next`). ListRealmFiles,
ReadRealmFile and StreamRealmFiles serve in-memory realms; a file's read can
be held back with a gate to keep a job running as long as a test needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from realm.v1 import realm_service_pb2 as pb
from realm.v1 import realm_service_pb2_grpc as pb_grpc
from realm.v1 import resources_pb2 as res

from index_worker.config import WorkerConfig
from index_worker.runner import Worker

MTIME = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
WAIT = 3.0  # seconds any single expectation may take before the test fails
_END = object()


@dataclass
class _Abort:
    code: grpc.StatusCode
    details: str


class FakeStream:
    """One ClaimJobs call as the server sees it."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = metadata
        self.requests: list[pb.ClaimJobsRequest] = []
        self.half_closed = asyncio.Event()
        self.ended = asyncio.Event()
        self._changed = asyncio.Condition()
        self._cursors: dict[str, int] = {}
        self._outbox: asyncio.Queue[object] = asyncio.Queue()

    def of_kind(self, kind: str) -> list[pb.ClaimJobsRequest]:
        return [r for r in self.requests if r.WhichOneof("message") == kind]

    def kinds(self) -> list[str]:
        return [str(r.WhichOneof("message")) for r in self.requests]

    async def next(self, kind: str, timeout: float = WAIT) -> pb.ClaimJobsRequest:
        """The next request of `kind` not yet returned by this method."""
        cursor = self._cursors.get(kind, 0)
        async with asyncio.timeout(timeout), self._changed:
            while len(self.of_kind(kind)) <= cursor:
                await self._changed.wait()
        self._cursors[kind] = cursor + 1
        return self.of_kind(kind)[cursor]

    async def send(self, message: pb.ClaimJobsResponse) -> None:
        self._outbox.put_nowait(message)

    async def assign(self, *assignments: pb.JobAssignment) -> None:
        await self.send(
            pb.ClaimJobsResponse(assignments=pb.JobAssignments(assignments=list(assignments)))
        )

    def end(self, code: grpc.StatusCode | None = None, details: str = "") -> None:
        self._outbox.put_nowait(_END if code is None else _Abort(code, details))

    async def _record(self, request: pb.ClaimJobsRequest) -> None:
        async with self._changed:
            self.requests.append(request)
            self._changed.notify_all()


@dataclass
class FakeRealmService(pb_grpc.RealmServiceServicer):
    heartbeat_interval: float = 10.0
    answer_pings: bool = True
    refuse: grpc.StatusCode | None = None
    realms: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gates: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    file_calls: list[tuple[str, str, str]] = field(default_factory=list)
    file_metadata: list[dict[str, str]] = field(default_factory=list)
    cancelled_reads: list[str] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)
    # Resumable sessions: the token each stream's settings carry ("" for
    # none), and which leases a hello may re-attach (None: all it names).
    resume_token: str = ""
    reattach: set[str] | None = None
    _stream_added: asyncio.Condition = field(default_factory=asyncio.Condition)
    _read_started: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def next_stream(self, index: int, timeout: float = WAIT) -> FakeStream:
        """The index-th ClaimJobs stream, once its first message has arrived."""
        async with asyncio.timeout(timeout):
            async with self._stream_added:
                while len(self.streams) <= index:
                    await self._stream_added.wait()
            stream = self.streams[index]
            async with stream._changed:
                while not stream.requests:
                    await stream._changed.wait()
        return stream

    async def read_started(self, path: str, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout), self._read_started:
            while not {("ReadRealmFile", path), ("StreamedFile", path)} & {
                (c[0], c[2]) for c in self.file_calls
            }:
                await self._read_started.wait()

    async def ClaimJobs(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        stream = FakeStream(dict(context.invocation_metadata() or ()))
        async with self._stream_added:
            self.streams.append(stream)
            self._stream_added.notify_all()
        try:
            first = await context.read()
            if first is grpc.aio.EOF:
                return
            await stream._record(first)
            if self.refuse is not None:
                await context.abort(self.refuse, "refused by the fake")
            settings = pb.StreamSettings(
                lease_duration=_duration(30.0),
                heartbeat_interval=_duration(self.heartbeat_interval),
                stream_id=f"s{len(self.streams)}",
                resume_token=self.resume_token,
                resume_grace=_duration(5.0 if self.resume_token else 0.0),
            )
            hello = first.hello
            for lease_id in hello.resume_lease_ids:
                ok = hello.resume_token == self.resume_token and (
                    self.reattach is None or lease_id in self.reattach
                )
                settings.resumed.append(
                    pb.LeaseAck(
                        lease_id=lease_id,
                        accepted=ok,
                        reason="" if ok else "not re-attached by the fake",
                        job_state=res.Job.STATE_RUNNING if ok else res.Job.STATE_QUEUED,
                    )
                )
            await context.write(pb.ClaimJobsResponse(settings=settings))
            reader = asyncio.create_task(self._pump(stream, context))
            try:
                await self._write_outbox(stream, context)
            finally:
                reader.cancel()
                with suppress(asyncio.CancelledError):
                    await reader
        finally:
            stream.ended.set()

    async def _pump(self, stream: FakeStream, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                stream.half_closed.set()
                stream.end()  # a real server ends the call once the worker closes
                return
            await stream._record(request)
            is_probe = request.WhichOneof("message") == "ping" and not request.ping.reply
            if is_probe and self.answer_pings:
                await stream.send(ping_message(request.ping.nonce, reply=True))

    async def _write_outbox(
        self, stream: FakeStream, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        while True:
            item = await stream._outbox.get()
            if item is _END:
                return
            if isinstance(item, _Abort):
                await context.abort(item.code, item.details)
            await context.write(item)

    async def ListRealmFiles(  # type: ignore[override]
        self, request: pb.ListRealmFilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListRealmFilesResponse:
        self._note_call("ListRealmFiles", request.realm_id, "", context)
        files = self.realms.get(request.realm_id)
        if files is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"realm {request.realm_id}")
        return pb.ListRealmFilesResponse(
            files=[_realm_file(path, content) for path, content in sorted(files.items())]
        )

    async def ReadRealmFile(  # type: ignore[override]
        self, request: pb.ReadRealmFileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReadRealmFileResponse:
        self._note_call("ReadRealmFile", request.realm_id, request.path, context)
        async with self._read_started:
            self._read_started.notify_all()
        gate = self.gates.get((request.realm_id, request.path))
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled_reads.append(request.path)
                raise
        files = self.realms.get(request.realm_id)
        if files is None or request.path not in files:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.realm_id}/{request.path}")
        content = files[request.path]
        return pb.ReadRealmFileResponse(file=_realm_file(request.path, content), content=content)

    async def StreamRealmFiles(  # type: ignore[override]
        self, request: pb.StreamRealmFilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamRealmFilesResponse]:
        """One file a message, in path order; a gated file waits for its gate."""
        self._note_call("StreamRealmFiles", request.realm_id, "", context)
        files = self.realms.get(request.realm_id)
        if files is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"realm {request.realm_id}")
        wanted = sorted(set(request.paths) & set(files) if request.paths else files)
        wanted = [p for p in wanted if p > request.after_path]
        yield pb.StreamRealmFilesResponse(total_files=len(wanted))
        for path in wanted:
            self._note_call("StreamedFile", request.realm_id, path, context)
            async with self._read_started:
                self._read_started.notify_all()
            gate = self.gates.get((request.realm_id, path))
            if gate is not None:
                try:
                    await gate.wait()
                except asyncio.CancelledError:
                    self.cancelled_reads.append(path)
                    raise
            if path not in files:
                continue
            content = files[path]
            chunk = pb.FileChunk(file=_realm_file(path, content), content=content, last=True)
            yield pb.StreamRealmFilesResponse(chunks=[chunk])

    def _note_call(
        self, rpc: str, realm_id: str, path: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self.file_calls.append((rpc, realm_id, path))
        self.file_metadata.append(dict(context.invocation_metadata() or ()))


_lease_ids = itertools.count(1)


def assignment(
    realm_id: str,
    *,
    kind: int = res.JOB_KIND_FROM_SCRATCH_INDEX,
    changes: tuple[tuple[str, bool], ...] = (),
    job_id: str | None = None,
) -> pb.JobAssignment:
    number = next(_lease_ids)
    return pb.JobAssignment(
        lease_id=f"lease-{number}",
        job=res.Job(
            job_id=job_id or str(number),
            realm_id=realm_id,
            kind=kind,  # type: ignore[arg-type]
            priority=10,
            state=res.Job.STATE_RUNNING,
            path_changes=[res.PathChange(path=p, deleted=d) for p, d in changes],
        ),
    )


def ping_message(nonce: int, *, reply: bool) -> pb.ClaimJobsResponse:
    return pb.ClaimJobsResponse(ping=pb.Ping(nonce=nonce, reply=reply))


def lost(lease_id: str, *, handed_back: bool = False) -> pb.ClaimJobsResponse:
    """A refusal of the lease; `handed_back`: as after a preemption (the job
    queued again)."""
    ack = pb.LeaseAck(lease_id=lease_id, accepted=False, reason="lease superseded")
    if handed_back:
        ack.reason = "lease revoked: preempted for job 7 (priority 10)"
        ack.job_state = res.Job.STATE_QUEUED
    return pb.ClaimJobsResponse(acks=pb.LeaseAcks(acks=[ack]))


def drain(grace: float) -> pb.ClaimJobsResponse:
    return pb.ClaimJobsResponse(drain=pb.Drain(grace=_duration(grace)))


async def start_server(service: FakeRealmService, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_RealmServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


def worker_config(port: int, **overrides: Any) -> WorkerConfig:
    settings: dict[str, Any] = {
        "server": f"127.0.0.1:{port}",
        "token": "worker-token",
        "worker_id": "w1",
        "concurrency": 2,
        "reconnect_backoff_base": 0.05,
        "reconnect_backoff_max": 0.2,
        "drain_timeout": 2.0,
        "rpc_timeout": 5.0,
    }
    settings.update(overrides)
    return WorkerConfig(**settings)


@dataclass
class Harness:
    service: FakeRealmService
    server: grpc.aio.Server
    port: int
    worker: Worker
    task: asyncio.Task[int]

    async def exit_code(self, timeout: float = WAIT) -> int:
        async with asyncio.timeout(timeout):
            return await self.task


@asynccontextmanager
async def running(service: FakeRealmService, **overrides: Any) -> AsyncIterator[Harness]:
    """A fake server and a worker connected to it; both stopped afterwards."""
    server, port = await start_server(service)
    worker = Worker(worker_config(port, **overrides))
    task = asyncio.create_task(worker.run())
    try:
        yield Harness(service, server, port, worker, task)
    finally:
        worker.stop()
        worker.stop()  # skip the drain: the test is over
        with suppress(Exception):
            async with asyncio.timeout(WAIT):
                await task
        await server.stop(None)


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _realm_file(path: str, content: bytes) -> res.RealmFile:
    mtime = Timestamp()
    mtime.FromDatetime(MTIME)
    return res.RealmFile(
        path=path, mtime=mtime, size=len(content), sha256=hashlib.sha256(content).hexdigest()
    )
