"""`AsyncRealmClient`: the same calls as `RealmClient`, for asyncio (grpc.aio).

Methods that answer once are coroutines; listings and `watch_job` are async
iterators. Request ids, deadlines, retries and errors are as in the sync client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import realm_service_pb2_grpc
from realm.v1 import resources_pb2 as res

from realm_client import _channel
from realm_client._calls import (
    FileAssembler,
    FilesToWrite,
    Follow,
    InitialFiles,
    Pager,
    StreamedFile,
    create_realm_request,
    stream_realm_files_request,
    write_realm_files_request,
)
from realm_client._channel import (
    DEFAULT,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    RetryPolicy,
    Timeout,
    call_metadata,
    new_request_id,
)
from realm_client.client import OnProgress
from realm_client.errors import DeadlineExceeded, from_rpc_error

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Item = TypeVar("_Item")


class AsyncRealmClient:
    """An asyncio client of realm.v1.RealmService; the options are `RealmClient`'s.

    Use it as an async context manager, or `await close()`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008  (frozen)
        watch_breaks: int = 5,
        channel_options: Sequence[tuple[str, Any]] = (),
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.watch_breaks = watch_breaks
        self._token = token
        self._owns_channel = channel is None
        if channel is None:
            options = _channel.channel_options(retry, channel_options)
            creds = _channel.channel_credentials(tls, root_certificates, credentials)
            if creds is None:
                channel = grpc.aio.insecure_channel(target, options=options)
            else:
                channel = grpc.aio.secure_channel(target, creds, options=options)
        self._channel = channel
        self._stub = realm_service_pb2_grpc.RealmServiceStub(channel)

    async def __aenter__(self) -> AsyncRealmClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    # Realms.

    async def create_realm(
        self,
        realm_id: str,
        *,
        display_name: str = "",
        priority: int | None = None,
        initial_files: InitialFiles = (),
        request_id: str | None = None,
        wait: bool = False,
        on_progress: OnProgress | None = None,
        wait_timeout: float | None = None,
        timeout: Timeout = DEFAULT,
    ) -> rs.CreateRealmResponse:
        """Creates a realm and its first index job; see `RealmClient.create_realm`."""
        call_id = request_id or new_request_id()
        request = create_realm_request(realm_id, display_name, priority, initial_files, call_id)
        response = await self._unary(self._stub.CreateRealm, request, call_id, timeout)
        if not wait:
            return response
        job = await self._follow(response.job, call_id, on_progress, wait_timeout)
        realm = await self._get_realm(response.realm.realm_id or realm_id, call_id, timeout)
        return rs.CreateRealmResponse(realm=realm, job=job)

    async def get_realm(self, realm_id: str, *, timeout: Timeout = DEFAULT) -> res.Realm:
        return await self._get_realm(realm_id, new_request_id(), timeout)

    def list_realms(
        self, *, limit: int | None = None, page_size: int = 0, timeout: Timeout = DEFAULT
    ) -> AsyncIterator[res.Realm]:
        """Every realm (or the first `limit`), ordered by id, a page at a time."""
        call_id = new_request_id()

        async def fetch(size: int, token: str) -> tuple[Sequence[res.Realm], str]:
            request = rs.ListRealmsRequest(page_size=size, page_token=token)
            page = await self._unary(self._stub.ListRealms, request, call_id, timeout)
            return page.realms, page.next_page_token

        return _pages(fetch, Pager(limit, page_size))

    async def reindex_realm(
        self,
        realm_id: str,
        *,
        priority: int | None = None,
        content_changed: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> rs.ReindexRealmResponse:
        request = rs.ReindexRealmRequest(realm_id=realm_id, content_changed=content_changed)
        if priority is not None:
            request.priority = priority
        return await self._unary(self._stub.ReindexRealm, request, new_request_id(), timeout)

    async def reindex_all_realms(
        self, *, priority: int | None = None, timeout: Timeout = DEFAULT
    ) -> rs.ReindexAllRealmsResponse:
        request = rs.ReindexAllRealmsRequest()
        if priority is not None:
            request.priority = priority
        return await self._unary(self._stub.ReindexAllRealms, request, new_request_id(), timeout)

    async def delete_realm(
        self, realm_id: str, *, request_id: str | None = None, timeout: Timeout = DEFAULT
    ) -> rs.DeleteRealmResponse:
        """Deletes a realm (admin only); see `RealmClient.delete_realm`."""
        call_id = request_id or new_request_id()
        request = rs.DeleteRealmRequest(realm_id=realm_id, request_id=call_id)
        return await self._unary(self._stub.DeleteRealm, request, call_id, timeout)

    # Files.

    async def write_realm_file(
        self,
        realm_id: str,
        path: str,
        content: bytes,
        *,
        priority: int | None = None,
        timeout: Timeout = DEFAULT,
    ) -> rs.WriteRealmFileResponse:
        request = rs.WriteRealmFileRequest(realm_id=realm_id, path=path, content=content)
        if priority is not None:
            request.priority = priority
        return await self._unary(self._stub.WriteRealmFile, request, new_request_id(), timeout)

    async def delete_realm_file(
        self, realm_id: str, path: str, *, priority: int | None = None, timeout: Timeout = DEFAULT
    ) -> rs.DeleteRealmFileResponse:
        request = rs.DeleteRealmFileRequest(realm_id=realm_id, path=path)
        if priority is not None:
            request.priority = priority
        return await self._unary(self._stub.DeleteRealmFile, request, new_request_id(), timeout)

    async def list_realm_files(
        self, realm_id: str, *, timeout: Timeout = DEFAULT
    ) -> list[res.RealmFile]:
        request = rs.ListRealmFilesRequest(realm_id=realm_id)
        response = await self._unary(self._stub.ListRealmFiles, request, new_request_id(), timeout)
        return list(response.files)

    async def read_realm_file(
        self, realm_id: str, path: str, *, timeout: Timeout = DEFAULT
    ) -> rs.ReadRealmFileResponse:
        request = rs.ReadRealmFileRequest(realm_id=realm_id, path=path)
        return await self._unary(self._stub.ReadRealmFile, request, new_request_id(), timeout)

    async def write_realm_files(
        self,
        realm_id: str,
        *,
        files: FilesToWrite = (),
        deleted_paths: Iterable[str] = (),
        priority: int | None = None,
        timeout: Timeout = DEFAULT,
    ) -> rs.WriteRealmFilesResponse:
        """Writes and deletes many files at once; see `RealmClient.write_realm_files`."""
        request = write_realm_files_request(realm_id, files, deleted_paths, priority)
        return await self._unary(self._stub.WriteRealmFiles, request, new_request_id(), timeout)

    async def stream_realm_files(
        self,
        realm_id: str,
        paths: Iterable[str] | None = None,
        lease_id: str = "",
        *,
        after_path: str = "",
        max_message_bytes: int = 0,
        timeout: Timeout = DEFAULT,
    ) -> AsyncIterator[StreamedFile]:
        """Whole files of the realm; see `RealmClient.stream_realm_files`."""
        request = stream_realm_files_request(
            realm_id, paths, lease_id, after_path, max_message_bytes
        )
        metadata = call_metadata(self._token, new_request_id())
        stream = self._stub.StreamRealmFiles(
            request, timeout=self._timeout(timeout), metadata=metadata
        )
        assembler = FileAssembler()
        try:
            async for response in stream:
                for chunk in response.chunks:
                    whole = assembler.add(chunk)
                    if whole is not None:
                        yield whole
            assembler.finish()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "StreamRealmFiles") from exc
        finally:
            stream.cancel()

    def search_realm(
        self,
        realm_id: str,
        *,
        card_type: str = "",
        text: str = "",
        limit: int | None = None,
        page_size: int = 0,
        timeout: Timeout = DEFAULT,
    ) -> AsyncIterator[res.IndexEntry]:
        call_id = new_request_id()

        async def fetch(size: int, token: str) -> tuple[Sequence[res.IndexEntry], str]:
            request = rs.SearchRealmRequest(
                realm_id=realm_id, card_type=card_type, text=text, page_size=size, page_token=token
            )
            page = await self._unary(self._stub.SearchRealm, request, call_id, timeout)
            return page.entries, page.next_page_token

        return _pages(fetch, Pager(limit, page_size))

    # Jobs.

    async def get_job(self, job_id: str, *, timeout: Timeout = DEFAULT) -> res.Job:
        request = rs.GetJobRequest(job_id=job_id)
        return (await self._unary(self._stub.GetJob, request, new_request_id(), timeout)).job

    def list_jobs(
        self,
        *,
        realm_id: str = "",
        kind: res.JobKind.ValueType = res.JOB_KIND_UNSPECIFIED,
        state: res.Job.State.ValueType = res.Job.STATE_UNSPECIFIED,
        limit: int | None = None,
        page_size: int = 0,
        timeout: Timeout = DEFAULT,
    ) -> AsyncIterator[res.Job]:
        call_id = new_request_id()

        async def fetch(size: int, token: str) -> tuple[Sequence[res.Job], str]:
            request = rs.ListJobsRequest(
                realm_id=realm_id, kind=kind, state=state, page_size=size, page_token=token
            )
            page = await self._unary(self._stub.ListJobs, request, call_id, timeout)
            return page.jobs, page.next_page_token

        return _pages(fetch, Pager(limit, page_size))

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> AsyncIterator[res.Job]:
        """Snapshots of the job until it is terminal, across broken streams."""
        return self._watch(Follow(job_id, self.watch_breaks), new_request_id(), timeout)

    async def wait_for_job(
        self,
        job_id: str,
        *,
        on_progress: OnProgress | None = None,
        timeout: float | None = None,
    ) -> res.Job:
        return await self._follow(res.Job(job_id=job_id), new_request_id(), on_progress, timeout)

    async def cancel_job(
        self, job_id: str, *, reason: str = "", timeout: Timeout = DEFAULT
    ) -> res.Job:
        """Cancels a job (admin only); see `RealmClient.cancel_job`."""
        request = rs.CancelJobRequest(job_id=job_id, reason=reason)
        return (await self._unary(self._stub.CancelJob, request, new_request_id(), timeout)).job

    async def retry_job(self, job_id: str, *, timeout: Timeout = DEFAULT) -> rs.RetryJobResponse:
        """Queues a FAILED or CANCELLED job's work again (admin only); not retried."""
        request = rs.RetryJobRequest(job_id=job_id)
        return await self._unary(self._stub.RetryJob, request, new_request_id(), timeout)

    async def explain_job(
        self, job_id: str, *, timeout: Timeout = DEFAULT
    ) -> rs.ExplainJobResponse:
        request = rs.ExplainJobRequest(job_id=job_id)
        return await self._unary(self._stub.ExplainJob, request, new_request_id(), timeout)

    # The system.

    async def list_workers(self, *, timeout: Timeout = DEFAULT) -> list[rs.Worker]:
        request = rs.ListWorkersRequest()
        response = await self._unary(self._stub.ListWorkers, request, new_request_id(), timeout)
        return list(response.workers)

    async def get_queue_stats(self, *, timeout: Timeout = DEFAULT) -> rs.GetQueueStatsResponse:
        request = rs.GetQueueStatsRequest()
        return await self._unary(self._stub.GetQueueStats, request, new_request_id(), timeout)

    # The calls.

    def _timeout(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is DEFAULT else timeout

    async def _unary(
        self,
        method: Callable[..., Awaitable[_Response]],
        request: _Request,
        request_id: str,
        timeout: Timeout,
    ) -> _Response:
        metadata = call_metadata(self._token, request_id)
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=metadata)
        except grpc.RpcError as exc:
            name = type(request).__name__.removesuffix("Request")
            raise from_rpc_error(exc, name) from exc

    async def _get_realm(self, realm_id: str, request_id: str, timeout: Timeout) -> res.Realm:
        request = rs.GetRealmRequest(realm_id=realm_id)
        return (await self._unary(self._stub.GetRealm, request, request_id, timeout)).realm

    async def _follow(
        self,
        job: res.Job,
        request_id: str,
        on_progress: OnProgress | None,
        timeout: float | None,
    ) -> res.Job:
        follow = Follow(job.job_id, self.watch_breaks)
        if job.state:
            follow.is_new(job)
            if on_progress is not None:
                on_progress(job)
        if not follow.finished:
            async for snapshot in self._watch(follow, request_id, timeout):
                if on_progress is not None:
                    on_progress(snapshot)
        assert follow.last is not None  # _watch returns only at a terminal snapshot
        return follow.last

    async def _watch(
        self, follow: Follow, request_id: str, timeout: float | None
    ) -> AsyncIterator[res.Job]:
        deadline = None if timeout is None else time.monotonic() + timeout
        request = rs.WatchJobRequest(job_id=follow.job_id)
        metadata = call_metadata(self._token, request_id)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceeded(f"job {follow.job_id} did not finish within {timeout:g} s")
            stream = self._stub.WatchJob(request, timeout=left, metadata=metadata)
            error = None
            try:
                async for response in stream:
                    if follow.is_new(response.job):
                        yield response.job
                    if follow.finished:
                        return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, "WatchJob")
            finally:
                stream.cancel()
            pause = follow.broke(error)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(pause)


async def _pages(
    fetch: Callable[[int, str], Awaitable[tuple[Sequence[_Item], str]]], pager: Pager
) -> AsyncIterator[_Item]:
    while not pager.done:
        items, next_token = await fetch(pager.next_size(), pager.token)
        for item in pager.take(items, next_token):
            yield item
