"""The worker's gRPC side: the channel, the ClaimJobs stream and the realm file RPCs.

`ClaimStream` owns one ClaimJobs call: a single writer task (grpc.aio allows
one write in flight), a reader that answers the server's pings itself and
hands everything else to a `StreamHandler`, and a liveness watchdog that
probes a silent stream and declares it dead when the probe goes unanswered,
which keepalive alone cannot see through proxies that answer HTTP/2 pings.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import grpc
from realm.v1 import realm_service_pb2 as pb
from realm.v1 import realm_service_pb2_grpc as pb_grpc

from index_worker import convert
from index_worker.config import WorkerConfig
from index_worker.indexer import IndexEntry
from index_worker.model import (
    Assignment,
    DrainNotice,
    FileAccessError,
    FileBatch,
    FileInfo,
    FilesUnavailableError,
    JobKind,
    JobOutcome,
    LeaseAck,
    Progress,
    RealmGoneError,
    StreamClosedError,
    StreamSettings,
)

logger = logging.getLogger(__name__)

# How often a broken file stream is resumed before the job gives up its lease,
# and the pause before the first resumption (doubled for each next one).
STREAM_RETRIES = 3
RESUME_PAUSE = 0.1

# Retrying cannot cure these: the server said the worker itself is wrong.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
HANDSHAKE_TIMEOUT = 10.0
MAX_RECEIVE_BYTES = 64 * 1024 * 1024


class StreamBrokenError(Exception):
    """The stream failed in a way that reconnecting may cure."""


class FatalStreamError(Exception):
    """The server refused this worker in a way that reconnecting cannot cure."""


class StreamHandler(Protocol):
    """What the session does with the server's messages; called on the event loop."""

    def on_assignments(self, assignments: list[Assignment]) -> None: ...

    def on_acks(self, acks: list[LeaseAck]) -> None: ...

    def on_drain(self, notice: DrainNotice) -> None: ...


def channel_options() -> list[tuple[str, int]]:
    """Keepalive finds a dead TCP peer in seconds; fast channel reconnects let our
    own backoff, not grpc's (up to 2 minutes), decide when to retry."""
    return [
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ]


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def describe(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"


def stream_error(error: grpc.aio.AioRpcError) -> Exception:
    if error.code() in FATAL_CODES:
        return FatalStreamError(describe(error))
    return StreamBrokenError(describe(error))


class Backoff:
    """Exponential delays with "equal jitter": half fixed, half random, so that
    a fleet of workers cut off together does not reconnect in lockstep."""

    def __init__(self, base: float, maximum: float, rng: random.Random | None = None) -> None:
        self._base, self._max = base, maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._max, self._base * 2.0 ** min(self._attempt, 32))
        self._attempt += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)


_CLOSE = object()


class ClaimStream:
    """One ClaimJobs call. Use: `open()`, then `serve(handler)` while sending."""

    def __init__(
        self,
        stub: pb_grpc.RealmServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        *,
        ping_interval: float,
        ping_timeout: float,
        rng: random.Random | None = None,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._rng = rng or random.Random()
        self._call: grpc.aio.StreamStreamCall[pb.ClaimJobsRequest, pb.ClaimJobsResponse] | None
        self._call = None
        self._outbox: asyncio.Queue[object] = asyncio.Queue()
        self._closing = False
        self._ping_waiters: dict[int, asyncio.Future[None]] = {}
        self._last_received = 0.0

    async def open(
        self,
        worker_id: str,
        incarnation_id: str,
        kinds: Sequence[JobKind],
        min_priority: int | None,
        resume: tuple[str, Sequence[str]] | None = None,
    ) -> StreamSettings:
        """Start the call, say hello (asking to re-attach the leases of
        `resume`: an earlier stream's token and the leases still held) and
        wait for the stream's settings."""
        call = self._stub.ClaimJobs(metadata=self._metadata)
        self._call = call
        hello = convert.hello(worker_id, incarnation_id, kinds, min_priority, resume)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await call.write(hello)
                first = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise stream_error(exc) from None
        except TimeoutError:
            raise StreamBrokenError(f"no stream settings within {HANDSHAKE_TIMEOUT}s") from None
        if first is grpc.aio.EOF:
            raise StreamBrokenError("the server ended the stream before sending settings")
        assert isinstance(first, pb.ClaimJobsResponse)
        if first.WhichOneof("message") != "settings":
            raise StreamBrokenError(
                f"expected stream settings first, got {first.WhichOneof('message')}"
            )
        self._last_received = asyncio.get_running_loop().time()
        return convert.settings_from_proto(first.settings)

    async def serve(self, handler: StreamHandler) -> None:
        """Run reader, writer and watchdog; return when the server ends the stream.

        Raises StreamBrokenError or FatalStreamError when the call fails.
        """
        reader = asyncio.create_task(self._read_loop(handler), name="claim-reader")
        tasks = {
            reader,
            asyncio.create_task(self._write_loop(), name="claim-writer"),
            asyncio.create_task(self._watch_liveness(), name="claim-watchdog"),
        }
        try:
            while not reader.done():
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                # Read every finished task's outcome before raising one: when
                # two fail together (a cut link ends reader and writer at
                # once), the other's exception must not go unretrieved.
                failures = [t.exception() for t in done if not t.cancelled()]
                for failure in failures:
                    if failure is not None:
                        raise failure
        finally:
            self._closing = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._fail_outbox()

    def send_credit(self, credits: int) -> None:
        self._send(convert.credit(credits))

    def send_heartbeat(self, leases: Sequence[tuple[str, Progress]]) -> None:
        self._send(convert.heartbeat(leases))

    def send_results(self, outcomes: Sequence[JobOutcome]) -> None:
        self._send(convert.results(outcomes))

    def send_release(self, lease_ids: Sequence[str]) -> None:
        self._send(convert.release(lease_ids))

    async def upload(
        self,
        lease_id: str,
        entries: Sequence[IndexEntry],
        deleted_paths: Sequence[str],
        sequence: int = 0,
    ) -> None:
        """Send one entry batch and wait until it is written: the job's backpressure."""
        if self._closing:
            raise StreamClosedError("the ClaimJobs stream is closed")
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        message = convert.entries(lease_id, entries, deleted_paths, sequence)
        self._outbox.put_nowait((message, written))
        await written

    def send_entries(
        self,
        lease_id: str,
        entries: Sequence[IndexEntry],
        deleted_paths: Sequence[str],
        sequence: int,
    ) -> None:
        """Send an entry batch again (after a re-attach), without waiting."""
        self._send(convert.entries(lease_id, entries, deleted_paths, sequence))

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Half-close after everything queued so far; the server then ends the call."""
        if not self._closing:
            self._closing = True
            self._outbox.put_nowait(_CLOSE)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def _send(self, message: pb.ClaimJobsRequest) -> None:
        if self._closing:
            logger.debug("dropped %s: stream closing", message.WhichOneof("message"))
            return
        self._outbox.put_nowait((message, None))

    async def _write_loop(self) -> None:
        call = self._require_call()
        written: asyncio.Future[None] | None = None
        try:
            while True:
                item = await self._outbox.get()
                if item is _CLOSE:
                    await call.done_writing()
                    return
                assert isinstance(item, tuple)
                message, written = item
                await call.write(message)
                if written is not None and not written.done():
                    written.set_result(None)
                written = None
        except grpc.aio.AioRpcError as exc:
            raise stream_error(exc) from None
        except asyncio.InvalidStateError:
            raise StreamBrokenError("the ClaimJobs call has already finished") from None
        finally:
            # An upload whose write the broken call never finished.
            if written is not None and not written.done():
                written.set_exception(StreamClosedError("the ClaimJobs stream is closed"))

    async def _read_loop(self, handler: StreamHandler) -> None:
        call = self._require_call()
        loop = asyncio.get_running_loop()
        while True:
            try:
                message = await call.read()
            except grpc.aio.AioRpcError as exc:
                raise stream_error(exc) from None
            if message is grpc.aio.EOF:
                return
            assert isinstance(message, pb.ClaimJobsResponse)
            self._last_received = loop.time()
            kind = message.WhichOneof("message")
            if kind == "ping":
                self._on_ping(message.ping)
            elif kind == "assignments":
                handler.on_assignments(
                    [convert.assignment_from_proto(a) for a in message.assignments.assignments]
                )
            elif kind == "acks":
                handler.on_acks([convert.ack_from_proto(a) for a in message.acks.acks])
            elif kind == "drain":
                handler.on_drain(convert.drain_from_proto(message.drain))
            else:
                # A repeated settings message or a field from a newer contract.
                logger.debug("ignored server message %s", kind)

    def _on_ping(self, ping: pb.Ping) -> None:
        if not ping.reply:
            self._send(convert.ping(ping.nonce, reply=True))
            return
        waiter = self._ping_waiters.pop(ping.nonce, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _watch_liveness(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            silent = loop.time() - self._last_received
            if silent < self._ping_interval:
                await asyncio.sleep(self._ping_interval - silent)
                continue
            nonce = self._rng.getrandbits(62) + 1
            answered: asyncio.Future[None] = loop.create_future()
            self._ping_waiters[nonce] = answered
            self._send(convert.ping(nonce, reply=False))
            try:
                async with asyncio.timeout(self._ping_timeout):
                    await answered
            except TimeoutError:
                if self._closing:
                    return
                raise StreamBrokenError(
                    f"no answer to a ping within {self._ping_timeout}s after "
                    f"{self._ping_interval}s of silence"
                ) from None
            finally:
                self._ping_waiters.pop(nonce, None)

    def _fail_outbox(self) -> None:
        """Wake jobs waiting on uploads that will never be written."""
        while not self._outbox.empty():
            item = self._outbox.get_nowait()
            if isinstance(item, tuple) and item[1] is not None and not item[1].done():
                item[1].set_exception(StreamClosedError("the ClaimJobs stream is closed"))

    def _require_call(self) -> grpc.aio.StreamStreamCall[pb.ClaimJobsRequest, pb.ClaimJobsResponse]:
        if self._call is None:
            raise RuntimeError("ClaimStream.open() must be called first")
        return self._call


# Codes a realm file RPC may answer when the server cannot serve it for now;
# the job is then released rather than failed.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def file_error(what: str, error: grpc.aio.AioRpcError) -> FileAccessError:
    if error.code() in TRANSIENT_CODES:
        return FilesUnavailableError(f"{what}: {describe(error)}")
    return FileAccessError(f"{what}: {describe(error)}")


class GrpcRealmFiles:
    """ListRealmFiles and ReadRealmFile with a deadline, in the worker's terms,
    each quoting the lease of the job that reads (the server binds a worker's
    reads to the job it holds)."""

    def __init__(
        self,
        stub: pb_grpc.RealmServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        timeout: float,
        lease_id: str = "",
    ) -> None:
        self._stub, self._metadata, self._timeout = stub, metadata, timeout
        self._lease_id = lease_id

    def for_lease(self, lease_id: str) -> GrpcRealmFiles:
        return GrpcRealmFiles(self._stub, self._metadata, self._timeout, lease_id)

    async def list_files(self, realm_id: str) -> list[FileInfo]:
        try:
            response = await self._stub.ListRealmFiles(
                pb.ListRealmFilesRequest(realm_id=realm_id, lease_id=self._lease_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise RealmGoneError(f"realm {realm_id} not found: {exc.details()}") from None
            raise file_error(f"ListRealmFiles({realm_id})", exc) from None
        return [convert.file_info_from_proto(f) for f in response.files]

    async def read_file(self, realm_id: str, path: str) -> tuple[FileInfo, bytes] | None:
        """The file and its bytes, or None on NOT_FOUND (file or realm: ask list_files)."""
        try:
            response = await self._stub.ReadRealmFile(
                pb.ReadRealmFileRequest(realm_id=realm_id, path=path, lease_id=self._lease_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise file_error(f"ReadRealmFile({realm_id}, {path})", exc) from None
        return convert.file_info_from_proto(response.file), response.content

    async def stream_files(
        self, realm_id: str, paths: Sequence[str] | None = None
    ) -> AsyncIterator[FileBatch]:
        """Files of the realm with their content, in path order: all, or those
        of `paths` that exist. A stream that breaks on a transient error is
        resumed after the last whole file, a few times, before giving up
        with FilesUnavailableError. NOT_FOUND (the realm) is RealmGoneError."""
        after = ""
        first = True
        retries = 0
        while True:
            if retries:
                # A resumed call waits for the channel to reconnect (a cut
                # connection) rather than failing at once, after a pause.
                await asyncio.sleep(RESUME_PAUSE * 2 ** (retries - 1))
            call = self._stub.StreamRealmFiles(
                pb.StreamRealmFilesRequest(
                    realm_id=realm_id,
                    lease_id=self._lease_id,
                    paths=list(paths or ()),
                    after_path=after,
                ),
                metadata=self._metadata,
                wait_for_ready=retries > 0,
            )
            parts: list[bytes] = []
            try:
                while True:
                    # No deadline on the whole stream (a big realm takes a
                    # while); a stream silent for the RPC timeout is dead.
                    async with asyncio.timeout(self._timeout):
                        message = await call.read()
                    if message is grpc.aio.EOF:
                        return
                    assert isinstance(message, pb.StreamRealmFilesResponse)
                    batch: list[tuple[FileInfo, bytes]] = []
                    for chunk in message.chunks:
                        parts.append(chunk.content)
                        if chunk.last:
                            content = parts[0] if len(parts) == 1 else b"".join(parts)
                            parts = []
                            batch.append((convert.file_info_from_proto(chunk.file), content))
                            after = chunk.file.path
                    yield FileBatch(batch, message.total_files if first else None)
                    first = False
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise RealmGoneError(f"realm {realm_id} not found: {exc.details()}") from None
                error = file_error(f"StreamRealmFiles({realm_id})", exc)
                if not isinstance(error, FilesUnavailableError) or retries >= STREAM_RETRIES:
                    raise error from None
                retries += 1
                logger.info(
                    "file stream broke; resuming",
                    extra={"realm": realm_id, "after": after, "error": describe(exc)},
                )
            except TimeoutError:
                if retries >= STREAM_RETRIES:
                    raise FilesUnavailableError(
                        f"StreamRealmFiles({realm_id}): no message for {self._timeout} s"
                    ) from None
                retries += 1
            finally:
                call.cancel()


class Connection:
    """A channel to the realm service; every call on it carries the bearer token."""

    def __init__(self, config: WorkerConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng
        if config.tls:
            roots = None
            if config.ca_cert:
                with open(config.ca_cert, "rb") as f:
                    roots = f.read()
            self._channel = grpc.aio.secure_channel(
                config.server,
                grpc.ssl_channel_credentials(root_certificates=roots),
                options=channel_options(),
            )
        else:
            self._channel = grpc.aio.insecure_channel(config.server, options=channel_options())
        self._stub = pb_grpc.RealmServiceStub(self._channel)
        self._metadata = call_metadata(config.token)

    def claim_stream(self) -> ClaimStream:
        return ClaimStream(
            self._stub,
            self._metadata,
            ping_interval=self._config.ping_interval,
            ping_timeout=self._config.ping_timeout,
            rng=self._rng,
        )

    def realm_files(self) -> GrpcRealmFiles:
        return GrpcRealmFiles(self._stub, self._metadata, self._config.rpc_timeout)

    async def close(self) -> None:
        """Cancel every call still open on the channel and release it."""
        await self._channel.close()
