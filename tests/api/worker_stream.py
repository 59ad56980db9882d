"""A hand-driven ClaimJobs stream for tests: send any message, read replies
with timeouts. It speaks the protocol only as far as a test tells it to
(with `answer_pings`, it also answers the server's liveness probes, so a
stream that holds leases for a long time is not closed as silent)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb

Metadata = Sequence[tuple[str, str]]


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class StreamClient:
    def __init__(
        self,
        stub: sgrpc.RealmServiceStub,
        *,
        hello: spb.WorkerHello | None = None,
        send_hello: bool = True,
        metadata: Metadata = (),
        answer_pings: bool = False,
    ) -> None:
        self.answer_pings = answer_pings
        self._out: queue.Queue[spb.ClaimJobsRequest | None] = queue.Queue()
        self.inbox: queue.Queue[spb.ClaimJobsResponse | grpc.RpcError | None] = queue.Queue()
        self.error: grpc.RpcError | None = None
        if send_hello:
            self.send(
                spb.ClaimJobsRequest(
                    hello=hello or spb.WorkerHello(worker_id="test-worker", incarnation_id="inc")
                )
            )
        self.call = stub.ClaimJobs(self._requests(), metadata=tuple(metadata))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[spb.ClaimJobsRequest]:
        while (message := self._out.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for message in self.call:
                if self.answer_pings and message.HasField("ping") and not message.ping.reply:
                    self.send(
                        spb.ClaimJobsRequest(ping=spb.Ping(nonce=message.ping.nonce, reply=True))
                    )
                self.inbox.put(message)
        except grpc.RpcError as e:
            self.error = e
            self.inbox.put(e)
            return
        self.inbox.put(None)

    def send(self, message: spb.ClaimJobsRequest) -> None:
        self._out.put(message)

    def credit(self, n: int) -> None:
        self.send(spb.ClaimJobsRequest(credit=spb.CreditGrant(credits=n)))

    def next(self, timeout: float = 10.0, *, skip_pings: bool = True) -> spb.ClaimJobsResponse:
        """The next message; queue.Empty after `timeout` seconds in all (the
        server's pings, skipped, do not extend it)."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.inbox.get(timeout=_left(deadline))
            if isinstance(item, grpc.RpcError):
                raise item
            if item is None:
                raise EOFError("the server closed the stream")
            if skip_pings and item.HasField("ping"):
                continue
            return item

    def poll(self, timeout: float = 0.0) -> spb.ClaimJobsResponse | None:
        """The next message other than a ping, or None if none came in time."""
        try:
            return self.next(timeout) if timeout > 0 else self._next_nowait()
        except queue.Empty:
            return None

    def _next_nowait(self) -> spb.ClaimJobsResponse:
        while True:
            item = self.inbox.get_nowait()
            if isinstance(item, grpc.RpcError):
                raise item
            if item is None:
                raise EOFError("the server closed the stream")
            if not item.HasField("ping"):
                return item

    def settings(self) -> spb.StreamSettings:
        message = self.next()
        assert message.HasField("settings"), message
        return message.settings

    def assignments(self, count: int, timeout: float = 10.0) -> list[spb.JobAssignment]:
        got: list[spb.JobAssignment] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            message = self.next(_left(deadline))
            if message.HasField("assignments"):
                got.extend(message.assignments.assignments)
        return got

    def acks(self, timeout: float = 10.0) -> list[spb.LeaseAck]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(_left(deadline))
            if message.HasField("acks"):
                return list(message.acks.acks)

    def complete(self, lease_id: str, entries: Sequence[pb.IndexEntry] = ()) -> spb.LeaseAck:
        if entries:
            self.send(
                spb.ClaimJobsRequest(
                    entries=spb.IndexEntryBatch(lease_id=lease_id, entries=list(entries))
                )
            )
        self.send(
            spb.ClaimJobsRequest(
                results=spb.JobResults(
                    results=[
                        spb.JobResult(
                            lease_id=lease_id,
                            outcome=spb.JobResult.OUTCOME_SUCCEEDED,
                            entries_uploaded=len(entries),
                        )
                    ]
                )
            )
        )
        (ack,) = self.acks()
        return ack

    def heartbeat(self, progress: Mapping[str, tuple[int, int]]) -> None:
        """Heartbeat the given leases with (done, total) progress."""
        self.send(
            spb.ClaimJobsRequest(
                heartbeat=spb.Heartbeat(
                    leases=[
                        spb.LeaseProgress(lease_id=lease, progress=pb.JobProgress(done=d, total=t))
                        for lease, (d, t) in progress.items()
                    ]
                )
            )
        )

    def send_entries(
        self,
        lease_id: str,
        entries: Sequence[pb.IndexEntry],
        deleted_paths: Sequence[str] = (),
    ) -> None:
        self.send(
            spb.ClaimJobsRequest(
                entries=spb.IndexEntryBatch(
                    lease_id=lease_id, entries=list(entries), deleted_paths=list(deleted_paths)
                )
            )
        )

    def send_result(
        self,
        lease_id: str,
        outcome: spb.JobResult.Outcome.ValueType = spb.JobResult.OUTCOME_SUCCEEDED,
        *,
        error_message: str = "",
        entries_uploaded: int = 0,
    ) -> None:
        self.send(
            spb.ClaimJobsRequest(
                results=spb.JobResults(
                    results=[
                        spb.JobResult(
                            lease_id=lease_id,
                            outcome=outcome,
                            error_message=error_message,
                            entries_uploaded=entries_uploaded,
                        )
                    ]
                )
            )
        )

    def release(self, lease_ids: Sequence[str]) -> None:
        self.send(spb.ClaimJobsRequest(release=spb.ReleaseLeases(lease_ids=list(lease_ids))))

    def wait_closed(self, timeout: float = 10.0) -> grpc.RpcError | None:
        """Drain replies until the stream ends; returns its error, if any."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.inbox.get(timeout=_left(deadline))
            if isinstance(item, grpc.RpcError):
                return item
            if item is None:
                return None

    def close(self) -> None:
        self._out.put(None)

    def cancel(self) -> None:
        self.call.cancel()
