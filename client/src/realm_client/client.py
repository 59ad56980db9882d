"""`RealmClient`: the realm service's RPCs as typed, blocking methods.

Every method is one logical call: it gets a fresh request id (sent as the
`x-request-id` metadata on each of its RPCs, and as CreateRealm's idempotency
key), the client's deadline unless `timeout=` says otherwise, and raises a
`RealmClientError` subclass with the server's message when the call fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
from realm_client.errors import DeadlineExceeded, from_rpc_error

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Item = TypeVar("_Item")

OnProgress = Callable[[res.Job], object]


class RealmClient:
    """A blocking client of realm.v1.RealmService.

    `target` is `host:port`. `token` is sent as `authorization: Bearer <token>`.
    `tls=True` (or `root_certificates`, PEM bytes to verify the server with, or
    ready `credentials`) makes a TLS channel. `timeout` is each call's deadline
    in seconds (None: no deadline); any method's `timeout=` overrides it.
    `retry` is the channel's retry policy for the RPCs that repeat safely
    (None: no retries). `watch_breaks` is how many breaks in a row, with no new
    snapshot between them, a followed job's watch survives. `channel` uses a
    channel of the caller's (which `close()` leaves open) instead.

    Use it as a context manager, or call `close()`.
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
        channel: grpc.Channel | None = None,
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
                channel = grpc.insecure_channel(target, options=options)
            else:
                channel = grpc.secure_channel(target, creds, options=options)
        self._channel = channel
        self._stub = realm_service_pb2_grpc.RealmServiceStub(channel)

    def __enter__(self) -> RealmClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    # Realms.

    def create_realm(
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
        """Creates a realm and its first index job; returns both.

        `display_name` defaults (server-side) to the id, `priority` to 10
        (USER). `initial_files` is `{path: bytes}` or FileContent messages.
        `request_id` (default: a fresh one) makes the create idempotent: the
        retries of this call, and a later call with the same id, answer the
        first result. With `wait=True` the call follows the job to its end,
        over WatchJob, reconnecting when the stream breaks, calling
        `on_progress(job)` with each snapshot, and returns the realm and job
        as they are then (the job may have FAILED: check `job.state`).
        `wait_timeout` bounds the wait (DeadlineExceeded); None waits as long
        as the job takes.
        """
        call_id = request_id or new_request_id()
        request = create_realm_request(realm_id, display_name, priority, initial_files, call_id)
        response = self._unary(self._stub.CreateRealm, request, call_id, timeout)
        if not wait:
            return response
        job = self._follow(response.job, call_id, on_progress, wait_timeout)
        realm = self._get_realm(response.realm.realm_id or realm_id, call_id, timeout)
        return rs.CreateRealmResponse(realm=realm, job=job)

    def get_realm(self, realm_id: str, *, timeout: Timeout = DEFAULT) -> res.Realm:
        """The realm with its state and stats."""
        return self._get_realm(realm_id, new_request_id(), timeout)

    def list_realms(
        self, *, limit: int | None = None, page_size: int = 0, timeout: Timeout = DEFAULT
    ) -> Iterator[res.Realm]:
        """Every realm (or the first `limit`), ordered by id, a page at a time.

        `page_size` 0 lets the server choose (100); `timeout` applies to each page.
        """
        call_id = new_request_id()

        def fetch(size: int, token: str) -> tuple[Sequence[res.Realm], str]:
            request = rs.ListRealmsRequest(page_size=size, page_token=token)
            page = self._unary(self._stub.ListRealms, request, call_id, timeout)
            return page.realms, page.next_page_token

        return _pages(fetch, Pager(limit, page_size))

    def reindex_realm(
        self,
        realm_id: str,
        *,
        priority: int | None = None,
        content_changed: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> rs.ReindexRealmResponse:
        """Queues a from-scratch index job (coalescing with the realm's own).

        `priority` defaults to 10 (USER); `content_changed` schedules a
        follow-up job instead of attaching to a running one.
        """
        request = rs.ReindexRealmRequest(realm_id=realm_id, content_changed=content_changed)
        if priority is not None:
            request.priority = priority
        return self._unary(self._stub.ReindexRealm, request, new_request_id(), timeout)

    def reindex_all_realms(
        self, *, priority: int | None = None, timeout: Timeout = DEFAULT
    ) -> rs.ReindexAllRealmsResponse:
        """Queues a from-scratch job for every realm (admin only); `priority` defaults to 0."""
        request = rs.ReindexAllRealmsRequest()
        if priority is not None:
            request.priority = priority
        return self._unary(self._stub.ReindexAllRealms, request, new_request_id(), timeout)

    def delete_realm(
        self, realm_id: str, *, request_id: str | None = None, timeout: Timeout = DEFAULT
    ) -> rs.DeleteRealmResponse:
        """Deletes a realm with its files, index and jobs (admin only).

        `request_id` (default: a fresh one, which the call's retries reuse)
        makes the delete idempotent: a repeat with the same id answers
        `replayed=True` instead of NOT_FOUND.
        """
        call_id = request_id or new_request_id()
        request = rs.DeleteRealmRequest(realm_id=realm_id, request_id=call_id)
        return self._unary(self._stub.DeleteRealm, request, call_id, timeout)

    # Files.

    def write_realm_file(
        self,
        realm_id: str,
        path: str,
        content: bytes,
        *,
        priority: int | None = None,
        timeout: Timeout = DEFAULT,
    ) -> rs.WriteRealmFileResponse:
        """Stores a file; its incremental index job (priority default 10) is in the answer."""
        request = rs.WriteRealmFileRequest(realm_id=realm_id, path=path, content=content)
        if priority is not None:
            request.priority = priority
        return self._unary(self._stub.WriteRealmFile, request, new_request_id(), timeout)

    def delete_realm_file(
        self, realm_id: str, path: str, *, priority: int | None = None, timeout: Timeout = DEFAULT
    ) -> rs.DeleteRealmFileResponse:
        """Deletes a file; not retried (a repeat of an applied delete is NOT_FOUND)."""
        request = rs.DeleteRealmFileRequest(realm_id=realm_id, path=path)
        if priority is not None:
            request.priority = priority
        return self._unary(self._stub.DeleteRealmFile, request, new_request_id(), timeout)

    def list_realm_files(self, realm_id: str, *, timeout: Timeout = DEFAULT) -> list[res.RealmFile]:
        """Every file of the realm (metadata), ordered by path."""
        request = rs.ListRealmFilesRequest(realm_id=realm_id)
        response = self._unary(self._stub.ListRealmFiles, request, new_request_id(), timeout)
        return list(response.files)

    def read_realm_file(
        self, realm_id: str, path: str, *, timeout: Timeout = DEFAULT
    ) -> rs.ReadRealmFileResponse:
        """A file's metadata (`.file`) and bytes (`.content`)."""
        request = rs.ReadRealmFileRequest(realm_id=realm_id, path=path)
        return self._unary(self._stub.ReadRealmFile, request, new_request_id(), timeout)

    def write_realm_files(
        self,
        realm_id: str,
        *,
        files: FilesToWrite = (),
        deleted_paths: Iterable[str] = (),
        priority: int | None = None,
        timeout: Timeout = DEFAULT,
    ) -> rs.WriteRealmFilesResponse:
        """Writes and deletes many files in one transaction, all or nothing.

        `files` is `{path: bytes}` or FileContent messages; at most 10,000
        files and deletions together, in one message under the server's limit
        (64 MiB by default). At most one incremental index job (priority
        default 10) takes them all: it and its disposition are in the answer.
        Retried like `write_realm_file` (see `REPEATABLE_RPCS` for deletions).
        """
        request = write_realm_files_request(realm_id, files, deleted_paths, priority)
        return self._unary(self._stub.WriteRealmFiles, request, new_request_id(), timeout)

    def stream_realm_files(
        self,
        realm_id: str,
        paths: Iterable[str] | None = None,
        lease_id: str = "",
        *,
        after_path: str = "",
        max_message_bytes: int = 0,
        timeout: Timeout = DEFAULT,
    ) -> Iterator[StreamedFile]:
        """The realm's files (or those of `paths` that exist), whole, in path order.

        Yields `StreamedFile(path, file, content)`, the chunks of a large file
        put back together (one file's bytes in memory at a time). `lease_id`
        binds the stream to a running job of the realm (required of workers);
        `after_path` resumes after a path; `max_message_bytes` (0: 1 MiB) is
        the content per message. `timeout` bounds the whole stream.
        """
        request = stream_realm_files_request(
            realm_id, paths, lease_id, after_path, max_message_bytes
        )
        metadata = self._metadata(new_request_id())
        stream = self._stub.StreamRealmFiles(
            request, timeout=self._timeout(timeout), metadata=metadata
        )
        assembler = FileAssembler()
        try:
            for response in stream:
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
    ) -> Iterator[res.IndexEntry]:
        """Entries of the realm's index, by card type and/or text, ordered by path."""
        call_id = new_request_id()

        def fetch(size: int, token: str) -> tuple[Sequence[res.IndexEntry], str]:
            request = rs.SearchRealmRequest(
                realm_id=realm_id, card_type=card_type, text=text, page_size=size, page_token=token
            )
            page = self._unary(self._stub.SearchRealm, request, call_id, timeout)
            return page.entries, page.next_page_token

        return _pages(fetch, Pager(limit, page_size))

    # Jobs.

    def get_job(self, job_id: str, *, timeout: Timeout = DEFAULT) -> res.Job:
        request = rs.GetJobRequest(job_id=job_id)
        return self._unary(self._stub.GetJob, request, new_request_id(), timeout).job

    def list_jobs(
        self,
        *,
        realm_id: str = "",
        kind: res.JobKind.ValueType = res.JOB_KIND_UNSPECIFIED,
        state: res.Job.State.ValueType = res.Job.STATE_UNSPECIFIED,
        limit: int | None = None,
        page_size: int = 0,
        timeout: Timeout = DEFAULT,
    ) -> Iterator[res.Job]:
        """Jobs, newest first, of one realm, kind or state when given."""
        call_id = new_request_id()

        def fetch(size: int, token: str) -> tuple[Sequence[res.Job], str]:
            request = rs.ListJobsRequest(
                realm_id=realm_id, kind=kind, state=state, page_size=size, page_token=token
            )
            page = self._unary(self._stub.ListJobs, request, call_id, timeout)
            return page.jobs, page.next_page_token

        return _pages(fetch, Pager(limit, page_size))

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[res.Job]:
        """Snapshots of the job, on every change, until it is terminal.

        A broken stream is opened again (repeats of the last snapshot are left
        out). `timeout` bounds the whole watch (DeadlineExceeded); None has
        no deadline.
        """
        return self._watch(Follow(job_id, self.watch_breaks), new_request_id(), timeout)

    def wait_for_job(
        self,
        job_id: str,
        *,
        on_progress: OnProgress | None = None,
        timeout: float | None = None,
    ) -> res.Job:
        """Follows the job to its end (see `watch_job`); returns its last snapshot."""
        job = res.Job(job_id=job_id)
        return self._follow(job, new_request_id(), on_progress, timeout)

    def cancel_job(self, job_id: str, *, reason: str = "", timeout: Timeout = DEFAULT) -> res.Job:
        """Cancels a queued or running job (admin only); returns it, CANCELLED.

        `reason` (at most 500 characters) becomes its error_message. Idempotent
        on a cancelled job; FailedPrecondition on one that succeeded or failed.
        """
        request = rs.CancelJobRequest(job_id=job_id, reason=reason)
        return self._unary(self._stub.CancelJob, request, new_request_id(), timeout).job

    def retry_job(self, job_id: str, *, timeout: Timeout = DEFAULT) -> rs.RetryJobResponse:
        """Queues a FAILED or CANCELLED job's work again (admin only).

        The answer names the job that will run and how (disposition). Not
        retried on UNAVAILABLE (see `REPEATABLE_RPCS`).
        """
        request = rs.RetryJobRequest(job_id=job_id)
        return self._unary(self._stub.RetryJob, request, new_request_id(), timeout)

    def explain_job(self, job_id: str, *, timeout: Timeout = DEFAULT) -> rs.ExplainJobResponse:
        """Why the job is where it is: a sentence, reasons, where it runs, its attempts."""
        request = rs.ExplainJobRequest(job_id=job_id)
        return self._unary(self._stub.ExplainJob, request, new_request_id(), timeout)

    # The system.

    def list_workers(self, *, timeout: Timeout = DEFAULT) -> list[rs.Worker]:
        """The connected workers' ClaimJobs streams, of every instance."""
        request = rs.ListWorkersRequest()
        response = self._unary(self._stub.ListWorkers, request, new_request_id(), timeout)
        return list(response.workers)

    def get_queue_stats(self, *, timeout: Timeout = DEFAULT) -> rs.GetQueueStatsResponse:
        """Jobs by state, kind and priority, the oldest queued, and recent outcomes."""
        request = rs.GetQueueStatsRequest()
        return self._unary(self._stub.GetQueueStats, request, new_request_id(), timeout)

    # The calls.

    def _metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return call_metadata(self._token, request_id)

    def _timeout(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is DEFAULT else timeout

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        request_id: str,
        timeout: Timeout,
    ) -> _Response:
        try:
            return method(
                request, timeout=self._timeout(timeout), metadata=self._metadata(request_id)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, _method_name(request)) from exc

    def _get_realm(self, realm_id: str, request_id: str, timeout: Timeout) -> res.Realm:
        request = rs.GetRealmRequest(realm_id=realm_id)
        return self._unary(self._stub.GetRealm, request, request_id, timeout).realm

    def _follow(
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
            for snapshot in self._watch(follow, request_id, timeout):
                if on_progress is not None:
                    on_progress(snapshot)
        assert follow.last is not None  # _watch returns only at a terminal snapshot
        return follow.last

    def _watch(self, follow: Follow, request_id: str, timeout: float | None) -> Iterator[res.Job]:
        deadline = None if timeout is None else time.monotonic() + timeout
        request = rs.WatchJobRequest(job_id=follow.job_id)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceeded(f"job {follow.job_id} did not finish within {timeout:g} s")
            stream = self._stub.WatchJob(request, timeout=left, metadata=self._metadata(request_id))
            error = None
            try:
                for response in stream:
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
            time.sleep(pause)


def _method_name(request: object) -> str:
    """`GetRealm` for a GetRealmRequest: the RPC a request belongs to."""
    return type(request).__name__.removesuffix("Request")


def _pages(
    fetch: Callable[[int, str], tuple[Sequence[_Item], str]], pager: Pager
) -> Iterator[_Item]:
    while not pager.done:
        items, next_token = fetch(pager.next_size(), pager.token)
        yield from pager.take(items, next_token)
