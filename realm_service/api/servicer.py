"""realm.v1.RealmService: convert, call the use case, convert back.

Use cases are synchronous (SQLAlchemy); they run in worker threads so the
event loop keeps serving streams. Errors map to status codes in one place
(`status.py`); anything unexpected is INTERNAL with no details, and the
traceback goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc

from realm_service.api import convert as c
from realm_service.api.auth import AuthInterceptor
from realm_service.api.claim_stream import ClaimSession
from realm_service.api.status import status_of
from realm_service.dispatcher import Dispatcher
from realm_service.domain import SYSTEM, USER, Job, JobKind, validate_priority
from realm_service.errors import InvalidArgument, RealmError, Unavailable
from realm_service.explain import explain
from realm_service.queue import JobQueue
from realm_service.realms import FilePage, Realms
from realm_service.watch import JobWatch

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
Ctx = grpc.aio.ServicerContext[Any, Any]

# CancelJob: the longest reason kept.
MAX_REASON = 500
# StreamRealmFiles: content bytes per message (default, bounds).
DEFAULT_STREAM_MESSAGE_BYTES = 1 << 20
MIN_STREAM_MESSAGE_BYTES = 4 << 10
MAX_STREAM_MESSAGE_BYTES = 4 << 20


def rpc(
    fn: Callable[[Any, Any, Ctx], Awaitable[R]],
) -> Callable[[Any, Any, Ctx], Awaitable[R]]:
    """Translate domain errors to statuses; hide unexpected ones."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Ctx) -> R:
        try:
            return await fn(self, request, context)
        except RealmError as e:
            await context.abort(status_of(e), e.message)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("internal error", extra={"rpc": fn.__name__})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        raise AssertionError("unreachable")

    return wrapper


async def call(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    return await asyncio.to_thread(fn, *args, **kwargs)


class RealmServicer(sgrpc.RealmServiceServicer):
    def __init__(
        self,
        realms: Realms,
        queue: JobQueue,
        dispatcher: Dispatcher,
        watch: JobWatch,
        *,
        heartbeat_seconds: float,
        ping_seconds: float,
        auth: AuthInterceptor | None = None,
    ) -> None:
        self.auth = auth
        self.realms = realms
        self.queue = queue
        self.dispatcher = dispatcher
        self.watch = watch
        self.heartbeat_seconds = heartbeat_seconds
        self.ping_seconds = ping_seconds
        self.sessions: set[ClaimSession] = set()
        self.draining = False

    def _check_serving(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another instance")

    @rpc
    async def CreateRealm(
        self, request: spb.CreateRealmRequest, context: Ctx
    ) -> spb.CreateRealmResponse:
        self._check_serving()
        result = await self.realms.create_async(
            realm_id=request.realm_id,
            priority=request.priority if request.HasField("priority") else None,
            display_name=request.display_name,
            request_id=request.request_id,
            files=[(f.path, f.content) for f in request.initial_files],
        )
        job, realm = result.job, result.realm
        if request.wait_for_index and not job.state.terminal:
            job = await self.watch.wait_terminal(job.job_id, context.time_remaining())
            realm = await call(self.realms.get, request.realm_id)
        return spb.CreateRealmResponse(realm=c.realm_pb(realm), job=c.job_pb(job))

    @rpc
    async def GetRealm(self, request: spb.GetRealmRequest, context: Ctx) -> spb.GetRealmResponse:
        return spb.GetRealmResponse(realm=c.realm_pb(await call(self.realms.get, request.realm_id)))

    @rpc
    async def ListRealms(
        self, request: spb.ListRealmsRequest, context: Ctx
    ) -> spb.ListRealmsResponse:
        size = c.page_size(request.page_size)
        after = c.decode_token("realms", request.page_token)
        realms = await call(self.realms.list_realms, after=after, limit=size + 1)
        token = c.encode_token("realms", realms[size - 1].realm_id) if len(realms) > size else ""
        return spb.ListRealmsResponse(
            realms=[c.realm_pb(r) for r in realms[:size]], next_page_token=token
        )

    @rpc
    async def ReindexRealm(
        self, request: spb.ReindexRealmRequest, context: Ctx
    ) -> spb.ReindexRealmResponse:
        self._check_serving()
        priority = request.priority if request.HasField("priority") else None
        # A worker waiting for work gets the job from the enqueue itself
        # (Dispatcher.enqueue).
        result = await self.dispatcher.enqueue(
            USER if priority is None else priority,
            JobKind.FROM_SCRATCH,
            functools.partial(
                self.realms.reindex_on_loop, request.realm_id, priority, request.content_changed
            ),
        )
        return spb.ReindexRealmResponse(
            job=c.job_pb(result.job), disposition=c.DISPOSITION_TO_PB[result.disposition]
        )

    @rpc
    async def ReindexAllRealms(
        self, request: spb.ReindexAllRealmsRequest, context: Ctx
    ) -> spb.ReindexAllRealmsResponse:
        self._check_serving()
        priority = validate_priority(
            request.priority if request.HasField("priority") else None, SYSTEM
        )
        inserted, realms = await call(self.queue.enqueue_all, priority)
        return spb.ReindexAllRealmsResponse(jobs_enqueued=inserted, realms=realms)

    @rpc
    async def WriteRealmFile(
        self, request: spb.WriteRealmFileRequest, context: Ctx
    ) -> spb.WriteRealmFileResponse:
        self._check_serving()
        stored, result = await call(
            self.realms.write_file,
            request.realm_id,
            request.path,
            request.content,
            request.priority if request.HasField("priority") else None,
        )
        return spb.WriteRealmFileResponse(
            file=c.file_pb(stored),
            job=c.job_pb(result.job),
            disposition=c.DISPOSITION_TO_PB[result.disposition],
        )

    @rpc
    async def DeleteRealmFile(
        self, request: spb.DeleteRealmFileRequest, context: Ctx
    ) -> spb.DeleteRealmFileResponse:
        self._check_serving()
        result = await call(
            self.realms.delete_file,
            request.realm_id,
            request.path,
            request.priority if request.HasField("priority") else None,
        )
        return spb.DeleteRealmFileResponse(
            job=c.job_pb(result.job), disposition=c.DISPOSITION_TO_PB[result.disposition]
        )

    async def _check_worker(self, realm_id: str, lease_id: str, context: Ctx) -> None:
        if self.auth is not None and self.auth.role_of(context.invocation_metadata()) == "worker":
            await call(self.realms.check_worker_access, realm_id, lease_id)

    @rpc
    async def ListRealmFiles(
        self, request: spb.ListRealmFilesRequest, context: Ctx
    ) -> spb.ListRealmFilesResponse:
        await self._check_worker(request.realm_id, request.lease_id, context)
        files = await call(self.realms.list_files, request.realm_id)
        return spb.ListRealmFilesResponse(files=[c.file_pb(f) for f in files])

    @rpc
    async def ReadRealmFile(
        self, request: spb.ReadRealmFileRequest, context: Ctx
    ) -> spb.ReadRealmFileResponse:
        await self._check_worker(request.realm_id, request.lease_id, context)
        stored, content = await call(self.realms.read_file, request.realm_id, request.path)
        return spb.ReadRealmFileResponse(file=c.file_pb(stored), content=content)

    async def StreamRealmFiles(  # type: ignore[override]  # the reader/writer form
        self, request: spb.StreamRealmFilesRequest, context: Ctx
    ) -> None:
        try:
            await self._stream_files(request, context)
        except RealmError as e:
            await context.abort(status_of(e), e.message)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("internal error in StreamRealmFiles")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    async def _stream_files(self, request: spb.StreamRealmFilesRequest, context: Ctx) -> None:
        budget = request.max_message_bytes or DEFAULT_STREAM_MESSAGE_BYTES
        if not MIN_STREAM_MESSAGE_BYTES <= budget <= MAX_STREAM_MESSAGE_BYTES:
            raise InvalidArgument(
                f"max_message_bytes {request.max_message_bytes} is out of range: use 0 (1 MiB) "
                f"or {MIN_STREAM_MESSAGE_BYTES}-{MAX_STREAM_MESSAGE_BYTES}"
            )
        await self._check_worker(request.realm_id, request.lease_id, context)

        def first_page() -> tuple[list[str] | None, FilePage]:
            paths, after = self.realms.start_file_stream(
                request.realm_id, list(request.paths), request.after_path
            )
            page = self.realms.read_file_page(
                request.realm_id,
                lease_id=request.lease_id,
                after=after,
                paths=paths,
                max_bytes=4 * budget,
                first=True,
            )
            return paths, page

        paths, page = await call(first_page)
        message = spb.StreamRealmFilesResponse(total_files=page.total or 0)
        size = 0
        sent_any = False

        async def send() -> None:
            nonlocal message, size, sent_any
            await context.write(message)
            message, size, sent_any = spb.StreamRealmFilesResponse(), 0, True

        while True:
            for info, content in page.files:
                meta = c.file_pb(info)
                if size and size + len(content) > budget:
                    await send()
                if len(content) <= budget:
                    message.chunks.append(
                        spb.FileChunk(file=meta, offset=0, content=content, last=True)
                    )
                    size += len(content) + 1
                    continue
                for offset in range(0, len(content), budget):
                    part = content[offset : offset + budget]
                    message.chunks.append(
                        spb.FileChunk(
                            file=meta,
                            offset=offset,
                            content=part,
                            last=offset + budget >= len(content),
                        )
                    )
                    size = len(part)
                    await send()
            if page.next_after is None:
                break
            page = await call(
                self.realms.read_file_page,
                request.realm_id,
                lease_id=request.lease_id,
                after=page.next_after,
                paths=paths,
                max_bytes=4 * budget,
            )
        if size or not sent_any:
            await send()

    @rpc
    async def WriteRealmFiles(
        self, request: spb.WriteRealmFilesRequest, context: Ctx
    ) -> spb.WriteRealmFilesResponse:
        self._check_serving()
        written = await call(
            self.realms.write_files,
            request.realm_id,
            [(f.path, f.content) for f in request.files],
            list(request.deleted_paths),
            request.priority if request.HasField("priority") else None,
        )
        result = written.result
        return spb.WriteRealmFilesResponse(
            files=[c.file_pb(f) for f in written.files],
            deleted=written.deleted,
            job=c.job_pb(result.job),
            disposition=c.DISPOSITION_TO_PB[result.disposition],
        )

    @rpc
    async def SearchRealm(
        self, request: spb.SearchRealmRequest, context: Ctx
    ) -> spb.SearchRealmResponse:
        size = c.page_size(request.page_size)
        after = c.decode_token("search", request.page_token)
        entries = await call(
            self.realms.search,
            request.realm_id,
            card_type=request.card_type,
            text=request.text,
            after_path=after,
            limit=size + 1,
        )
        token = c.encode_token("search", entries[size - 1].path) if len(entries) > size else ""
        return spb.SearchRealmResponse(
            entries=[c.entry_pb(e) for e in entries[:size]], next_page_token=token
        )

    # -- job control ------------------------------------------------------------

    @rpc
    async def CancelJob(self, request: spb.CancelJobRequest, context: Ctx) -> spb.CancelJobResponse:
        job_id = c.job_id(request.job_id)
        if len(request.reason) > MAX_REASON:
            raise InvalidArgument(f"reason is longer than {MAX_REASON} characters")
        if any(ord(ch) < 0x20 for ch in request.reason):
            raise InvalidArgument("reason contains control characters")
        job = await call(self.queue.cancel, job_id, request.reason)
        return spb.CancelJobResponse(job=c.job_pb(job))

    @rpc
    async def RetryJob(self, request: spb.RetryJobRequest, context: Ctx) -> spb.RetryJobResponse:
        self._check_serving()
        result = await call(self.queue.retry, c.job_id(request.job_id))
        return spb.RetryJobResponse(
            job=c.job_pb(result.job), disposition=c.DISPOSITION_TO_PB[result.disposition]
        )

    @rpc
    async def DeleteRealm(
        self, request: spb.DeleteRealmRequest, context: Ctx
    ) -> spb.DeleteRealmResponse:
        self._check_serving()
        deletion = await call(self.realms.delete, request.realm_id, request.request_id)
        return spb.DeleteRealmResponse(
            jobs_cancelled=deletion.jobs_cancelled,
            files_deleted=deletion.files_deleted,
            replayed=deletion.replayed,
        )

    @rpc
    async def ExplainJob(
        self, request: spb.ExplainJobRequest, context: Ctx
    ) -> spb.ExplainJobResponse:
        found = await explain(
            self.queue, self.dispatcher, c.job_id(request.job_id), draining=self.draining
        )
        return c.explanation_pb(found)

    @rpc
    async def ListWorkers(
        self, request: spb.ListWorkersRequest, context: Ctx
    ) -> spb.ListWorkersResponse:
        others = await call(self.queue.other_instances_workers)
        workers = sorted(
            [*self.dispatcher.workers(), *others],
            key=lambda w: (w.worker_id, w.instance_id, w.stream_id),
        )
        return spb.ListWorkersResponse(workers=[c.worker_pb(w) for w in workers])

    @rpc
    async def GetQueueStats(
        self, request: spb.GetQueueStatsRequest, context: Ctx
    ) -> spb.GetQueueStatsResponse:
        return c.queue_stats_pb(await call(self.queue.stats))

    @rpc
    async def GetJob(self, request: spb.GetJobRequest, context: Ctx) -> spb.GetJobResponse:
        job = await call(self.queue.get_job, c.job_id(request.job_id))
        return spb.GetJobResponse(job=c.job_pb(job))

    @rpc
    async def ListJobs(self, request: spb.ListJobsRequest, context: Ctx) -> spb.ListJobsResponse:
        size = c.page_size(request.page_size)
        before = c.decode_token("jobs", request.page_token)
        if before is not None and not (before.isascii() and before.isdigit()):
            raise InvalidArgument("page_token is malformed")
        if request.realm_id:
            from realm_service.domain import validate_realm_id

            validate_realm_id(request.realm_id)
        if request.kind and request.kind not in c.KIND_FROM_PB:
            raise InvalidArgument(f"kind {request.kind} is unknown")
        if request.state and request.state not in c.JOB_STATE_FROM_PB:
            raise InvalidArgument(f"state {request.state} is unknown")
        jobs = await call(
            self.queue.list_jobs,
            realm_id=request.realm_id or None,
            kind=c.KIND_FROM_PB.get(request.kind),
            state=c.JOB_STATE_FROM_PB.get(request.state),
            before_id=int(before) if before else None,
            limit=size + 1,
        )
        token = c.encode_token("jobs", str(jobs[size - 1].job_id)) if len(jobs) > size else ""
        return spb.ListJobsResponse(jobs=[c.job_pb(j) for j in jobs[:size]], next_page_token=token)

    async def WatchJob(  # type: ignore[override]  # the reader/writer form
        self, request: spb.WatchJobRequest, context: Ctx
    ) -> None:
        # Written, not yielded (as ClaimJobs): a cancel lands here, and the
        # follow is closed at once rather than when the garbage collector
        # finalizes it.
        try:
            job_id = c.job_id(request.job_id)
            last: Job | None = None
            async with contextlib.aclosing(self.watch.follow(job_id)) as snapshots:
                async for job in snapshots:
                    if job != last:
                        await context.write(spb.WatchJobResponse(job=c.job_pb(job)))
                        last = job
        except RealmError as e:
            await context.abort(status_of(e), e.message)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("internal error", extra={"rpc": "WatchJob"})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    async def ClaimJobs(  # type: ignore[override]  # the reader/writer form
        self, request_iterator: AsyncIterator[spb.ClaimJobsRequest], context: Ctx
    ) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        session = ClaimSession(
            self.queue,
            self.dispatcher,
            heartbeat_seconds=self.heartbeat_seconds,
            ping_seconds=self.ping_seconds,
        )
        self.sessions.add(session)
        try:
            await session.run(request_iterator, context)
        finally:
            self.sessions.discard(session)
