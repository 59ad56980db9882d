"""A minimal ClaimJobs client (grpc.aio) that timestamps assignment arrival.

It speaks just enough of the protocol for the benchmarks: hello, credits,
answers to the server's pings, heartbeats for the leases it holds, and an
immediate successful result (plus one fresh credit) for every job it does not
hold. `hold(assignment)` decides which jobs are held: the storm's long jobs.
The arrival time of each job is `time.perf_counter()` taken as soon as the
message is read, before anything else is done with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb

Hold = Callable[[spb.JobAssignment], bool]


def never(_: spb.JobAssignment) -> bool:
    return False


class BenchStream:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        worker_id: str,
        *,
        credits: int,
        hold: Hold = never,
        min_priority: int | None = None,
        hold_seconds: float | None = None,
    ) -> None:
        self.stub = sgrpc.RealmServiceStub(channel)
        self.worker_id = worker_id
        self.initial_credits = credits
        self.hold = hold
        self.min_priority = min_priority
        # Held jobs are completed once held this long (None: never); a job
        # handed back and assigned again starts over.
        self.hold_seconds = hold_seconds
        self._held_since: dict[str, float] = {}
        self.held: dict[str, spb.JobAssignment] = {}
        self.arrivals: dict[str, float] = {}
        self.arrivals_wall: dict[str, float] = {}  # time.time(), to compare with server stamps
        self.start_times: dict[str, float] = {}  # each job's start_time as assigned (epoch s)
        self.completed = 0
        self.refused = 0
        # Held leases the server revoked (a preemption, a cancel); each slot
        # is given back at once, as a worker does once the job has stopped.
        self.revoked = 0
        self._arrival_waiters: dict[str, asyncio.Future[float]] = {}
        self._ack_waiters: dict[str, asyncio.Future[float]] = {}
        self._job_of_lease: dict[str, str] = {}
        self._outbox: asyncio.Queue[spb.ClaimJobsRequest | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.call: grpc.aio.StreamStreamCall[spb.ClaimJobsRequest, spb.ClaimJobsResponse] | None
        self.call = None
        self.heartbeat_seconds = 5.0

    async def open(self) -> None:
        hello = spb.WorkerHello(worker_id=self.worker_id, incarnation_id=f"{self.worker_id}-1")
        if self.min_priority is not None:
            hello.min_priority = self.min_priority
        self.call = self.stub.ClaimJobs()
        await self.call.write(spb.ClaimJobsRequest(hello=hello))
        first = await self.call.read()
        if first is grpc.aio.EOF or not first.HasField("settings"):
            raise RuntimeError(f"no stream settings: {first!r}")
        interval = first.settings.heartbeat_interval.ToTimedelta().total_seconds()
        self.heartbeat_seconds = max(0.5, interval)
        self._tasks = [
            asyncio.create_task(self._write_loop()),
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._heartbeat_loop()),
        ]
        if self.hold_seconds is not None:
            self._tasks.append(asyncio.create_task(self._finish_loop(self.hold_seconds)))
        if self.initial_credits:
            self.credit(self.initial_credits)

    # -- sending ------------------------------------------------------------------

    def send(self, message: spb.ClaimJobsRequest) -> None:
        self._outbox.put_nowait(message)

    def credit(self, n: int) -> None:
        self.send(spb.ClaimJobsRequest(credit=spb.CreditGrant(credits=n)))

    def complete(self, lease_ids: list[str]) -> None:
        """Report the leases as succeeded and give their slots back as credits."""
        for lease_id in lease_ids:
            self.held.pop(lease_id, None)
            self._held_since.pop(lease_id, None)
        self.send(
            spb.ClaimJobsRequest(
                results=spb.JobResults(
                    results=[
                        spb.JobResult(lease_id=lease, outcome=spb.JobResult.OUTCOME_SUCCEEDED)
                        for lease in lease_ids
                    ]
                )
            )
        )
        self.credit(len(lease_ids))

    async def _write_loop(self) -> None:
        assert self.call is not None
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while (message := await self._outbox.get()) is not None:
                await self.call.write(message)
            await self.call.done_writing()

    async def _finish_loop(self, hold_seconds: float) -> None:
        while True:
            await asyncio.sleep(0.02)
            now = time.perf_counter()
            due = [
                lease
                for lease in self.held
                if now - self._held_since.get(lease, now) >= hold_seconds
            ]
            if due:
                self.complete(due)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            if self.held:
                self.send(
                    spb.ClaimJobsRequest(
                        heartbeat=spb.Heartbeat(
                            leases=[
                                spb.LeaseProgress(
                                    lease_id=lease, progress=pb.JobProgress(done=1, total=2)
                                )
                                for lease in self.held
                            ]
                        )
                    )
                )

    # -- receiving ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self.call is not None
        with contextlib.suppress(grpc.aio.AioRpcError):
            while True:
                message = await self.call.read()
                now = time.perf_counter()
                wall = time.time()
                if message is grpc.aio.EOF:
                    return
                kind = message.WhichOneof("message")
                if kind == "assignments":
                    for a in message.assignments.assignments:
                        self.arrivals_wall[a.job.job_id] = wall
                        self.start_times[a.job.job_id] = (
                            a.job.start_time.seconds + a.job.start_time.nanos / 1e9
                        )
                    self._on_assignments(message.assignments.assignments, now)
                elif kind == "acks":
                    for ack in message.acks.acks:
                        if ack.accepted:
                            self.completed += ack.job_state == pb.Job.STATE_SUCCEEDED
                        else:
                            self.refused += 1
                            if self.held.pop(ack.lease_id, None) is not None:
                                self.revoked += 1
                                self.credit(1)
                        job_id = self._job_of_lease.pop(ack.lease_id, None)
                        if job_id is not None and ack.job_state != pb.Job.STATE_RUNNING:
                            self._resolve(self._ack_waiters, job_id, now)
                elif kind == "ping" and not message.ping.reply:
                    self.send(
                        spb.ClaimJobsRequest(ping=spb.Ping(nonce=message.ping.nonce, reply=True))
                    )

    def _on_assignments(self, assignments: list[spb.JobAssignment], now: float) -> None:
        done: list[str] = []
        for a in assignments:
            self.arrivals[a.job.job_id] = now
            self._resolve(self._arrival_waiters, a.job.job_id, now)
            if self.hold(a):
                self.held[a.lease_id] = a
                self._held_since[a.lease_id] = now
            else:
                self._job_of_lease[a.lease_id] = a.job.job_id
                done.append(a.lease_id)
        if done:
            self.complete(done)

    @staticmethod
    def _resolve(waiters: dict[str, asyncio.Future[float]], job_id: str, now: float) -> None:
        future = waiters.get(job_id)
        if future is None:
            future = waiters[job_id] = asyncio.get_running_loop().create_future()
        if not future.done():
            future.set_result(now)

    @staticmethod
    def _future(waiters: dict[str, asyncio.Future[float]], job_id: str) -> asyncio.Future[float]:
        future = waiters.get(job_id)
        if future is None:
            future = waiters[job_id] = asyncio.get_running_loop().create_future()
        return future

    async def arrival(self, job_id: str, timeout: float = 30.0) -> float:
        """perf_counter() at which the job's assignment was read."""
        future = self._future(self._arrival_waiters, job_id)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            if future.done():
                self._arrival_waiters.pop(job_id, None)

    async def acked(self, job_id: str, timeout: float = 30.0) -> float:
        """perf_counter() at which the server acknowledged the job's result."""
        future = self._future(self._ack_waiters, job_id)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            if future.done():
                self._ack_waiters.pop(job_id, None)

    async def close(self, timeout: float = 5.0) -> None:
        self._outbox.put_nowait(None)
        reader = self._tasks[1] if len(self._tasks) > 1 else None
        if reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(reader), timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.call is not None:
            self.call.cancel()
