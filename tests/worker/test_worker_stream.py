"""The worker against a fake realm service: the ClaimJobs protocol, seen from the server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from fake_realm_server import (
    WAIT,
    FakeRealmService,
    FakeStream,
    assignment,
    drain,
    lost,
    ping_message,
    running,
    start_server,
)
from realm.v1 import realm_service_pb2 as pb

from index_worker import metrics
from index_worker.runner import Worker
from index_worker.session import Session

pytestmark = pytest.mark.timeout(15)


def run(scenario: Callable[[], Awaitable[Any]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(10):
            await scenario()

    asyncio.run(bounded())


async def quiet(stream: FakeStream, kind: str, seconds: float = 0.3) -> None:
    """Assert that the worker sends no further `kind` message for `seconds`."""
    before = len(stream.of_kind(kind))
    await asyncio.sleep(seconds)
    assert len(stream.of_kind(kind)) == before, f"unexpected {kind}: {stream.of_kind(kind)}"


def total_credits(stream: FakeStream) -> int:
    return sum(r.credit.credits for r in stream.of_kind("credit"))


def gated(service: FakeRealmService, realm: str, path: str) -> asyncio.Event:
    gate = asyncio.Event()
    service.gates[(realm, path)] = gate
    return gate


def test_hello_comes_first_then_credits_for_every_slot() -> None:
    async def scenario() -> None:
        service = FakeRealmService()
        async with running(
            service, concurrency=3, min_priority=10, kinds=(), worker_id="pod-1"
        ) as h:
            stream = await service.next_stream(0)
            credit = await stream.next("credit")
            hello = stream.requests[0].hello
            assert stream.kinds()[0] == "hello"
            assert hello.worker_id == "pod-1"
            assert hello.incarnation_id == h.worker.incarnation_id
            assert hello.HasField("min_priority") and hello.min_priority == 10
            assert credit.credit.credits == 3
            assert stream.metadata["authorization"] == "Bearer worker-token"
            await quiet(stream, "credit")

    run(scenario)


def test_credits_never_exceed_free_slots_and_results_come_before_new_credit() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"r1": {"a.txt": b"a"}, "r2": {"b.txt": b"b"}})
        gate1, gate2 = gated(service, "r1", "a.txt"), gated(service, "r2", "b.txt")
        async with running(service, concurrency=2) as _:
            stream = await service.next_stream(0)
            assert (await stream.next("credit")).credit.credits == 2
            first, second = assignment("r1"), assignment("r2")
            await stream.assign(first, second)
            await service.read_started("a.txt")
            await service.read_started("b.txt")
            await quiet(stream, "credit")  # both slots busy: no room to offer

            gate1.set()
            result = await stream.next("results")
            assert [r.lease_id for r in result.results.results] == [first.lease_id]
            credit = await stream.next("credit")
            assert credit.credit.credits == 1
            kinds = stream.kinds()
            assert kinds.index("results") < len(kinds) - 1 - kinds[::-1].index("credit")
            assert total_credits(stream) == 3  # 2 slots + 1 freed

            third = assignment("r1")
            await stream.assign(third)
            await await_result(stream, third.lease_id)
            gate2.set()
            await await_result(stream, second.lease_id)
            # Three jobs were assigned and every one has finished: 2 + 3 credits.
            async with asyncio.timeout(WAIT):
                while total_credits(stream) < 5:
                    await stream.next("credit")
            assert total_credits(stream) == 5
            await quiet(stream, "credit")

    run(scenario)


async def await_result(stream: FakeStream, lease_id: str) -> pb.JobResult:
    async with asyncio.timeout(WAIT):
        while True:
            for message in stream.of_kind("results"):
                for result in message.results.results:
                    if result.lease_id == lease_id:
                        return result
            await asyncio.sleep(0.01)


def test_assignment_beyond_granted_credits_is_released_not_run() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"r": {"a.txt": b"a"}})
        gated(service, "r", "a.txt")
        async with running(service, concurrency=1):
            stream = await service.next_stream(0)
            await stream.next("credit")
            granted, extra = assignment("r"), assignment("r")
            await stream.assign(granted, extra)
            release = await stream.next("release")
            assert list(release.release.lease_ids) == [extra.lease_id]
            await service.read_started("a.txt")
            assert [c[0] for c in service.file_calls].count("StreamRealmFiles") == 1

    run(scenario)


def test_heartbeats_report_progress_of_held_leases() -> None:
    async def scenario() -> None:
        files = {"1.txt": b"one", "2.txt": b"two", "3.txt": b"three"}
        service = FakeRealmService(heartbeat_interval=0.05, realms={"r": files})
        gate = gated(service, "r", "2.txt")
        async with running(service, concurrency=1):
            stream = await service.next_stream(0)
            await stream.next("credit")
            job = assignment("r")
            await stream.assign(job)
            await service.read_started("2.txt")
            async with asyncio.timeout(WAIT):
                while True:
                    beat = await stream.next("heartbeat")
                    (lease,) = beat.heartbeat.leases
                    assert lease.lease_id == job.lease_id
                    if lease.progress.done == 1:
                        break
            assert lease.progress.total == 3
            gate.set()
            assert (await await_result(stream, job.lease_id)).entries_uploaded == 3

    run(scenario)


@pytest.mark.parametrize("handed_back", [False, True], ids=["lost", "handed-back"])
def test_refused_lease_cancels_the_job_and_frees_its_slot(
    handed_back: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease the server ended (lost), or took back to queue the job again
    (a preemption): the job stops, its slot is granted again; the worker
    logs a preemption at INFO ("job handed back"), any other loss as a
    warning, and counts each."""
    how = "handed_back" if handed_back else "lost"
    before = metrics.REGISTRY.get_sample_value("index_worker_leases_taken_total", {"how": how})

    async def scenario() -> None:
        service = FakeRealmService(heartbeat_interval=0.05, realms={"r": {"a.txt": b"a"}})
        gate = gated(service, "r", "a.txt")
        async with running(service, concurrency=1):
            stream = await service.next_stream(0)
            await stream.next("credit")
            job = assignment("r")
            await stream.assign(job)
            await service.read_started("a.txt")
            await stream.next("heartbeat")
            await stream.send(lost(job.lease_id, handed_back=handed_back))
            assert (await stream.next("credit")).credit.credits == 1
            beats_before = len(stream.of_kind("heartbeat"))
            async with asyncio.timeout(WAIT):
                while service.cancelled_reads != ["a.txt"]:
                    await asyncio.sleep(0.01)
            gate.set()
            await quiet(stream, "results")
            assert stream.of_kind("entries") == []
            later = stream.of_kind("heartbeat")[beats_before:]
            assert all(job.lease_id not in str(beat) for beat in later)

    caplog.set_level(logging.INFO, logger="index_worker.session")
    run(scenario)
    after = metrics.REGISTRY.get_sample_value("index_worker_leases_taken_total", {"how": how})
    assert after == (before or 0) + 1
    stopped = [r for r in caplog.records if r.getMessage() in ("job handed back", "job lease lost")]
    assert [(r.getMessage(), r.levelno) for r in stopped] == [
        ("job handed back", logging.INFO) if handed_back else ("job lease lost", logging.WARNING)
    ]


def test_server_ping_is_answered() -> None:
    async def scenario() -> None:
        service = FakeRealmService()
        async with running(service):
            stream = await service.next_stream(0)
            await stream.send(ping_message(42, reply=False))
            answer = await stream.next("ping")
            assert (answer.ping.nonce, answer.ping.reply) == (42, True)

    run(scenario)


def test_silent_stream_is_probed_and_replaced_when_the_probe_goes_unanswered() -> None:
    async def scenario() -> None:
        service = FakeRealmService(answer_pings=False)
        async with running(service, ping_interval=0.2, ping_timeout=0.2) as h:
            first = await service.next_stream(0)
            probe = await first.next("ping")
            assert not probe.ping.reply
            second = await service.next_stream(1)
            assert second.requests[0].hello.incarnation_id == h.worker.incarnation_id
            async with asyncio.timeout(WAIT):
                await first.ended.wait()

    run(scenario)


def test_answered_probe_keeps_the_stream() -> None:
    async def scenario() -> None:
        service = FakeRealmService(answer_pings=True)
        async with running(service, ping_interval=0.1, ping_timeout=0.3):
            stream = await service.next_stream(0)
            for _ in range(3):
                await stream.next("ping")
            assert len(service.streams) == 1

    run(scenario)


def test_server_drain_finishes_fast_jobs_releases_slow_ones_and_closes() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"fast": {"a.txt": b"a"}, "slow": {"b.txt": b"b"}})
        fast_gate = gated(service, "fast", "a.txt")
        gated(service, "slow", "b.txt")
        async with running(service, concurrency=2):
            stream = await service.next_stream(0)
            await stream.next("credit")
            fast, slow = assignment("fast"), assignment("slow")
            await stream.assign(fast, slow)
            await service.read_started("b.txt")
            await stream.send(drain(grace=0.8))
            fast_gate.set()
            result = await await_result(stream, fast.lease_id)
            assert result.outcome == pb.JobResult.OUTCOME_SUCCEEDED
            release = await stream.next("release")
            assert list(release.release.lease_ids) == [slow.lease_id]
            async with asyncio.timeout(WAIT):
                await stream.half_closed.wait()
            assert total_credits(stream) == 2  # nothing granted after the drain
            assert stream.kinds()[-1] == "release"
            # The server went away on purpose; the worker comes back for more.
            await service.next_stream(1)

    run(scenario)


def test_stop_finishes_or_releases_jobs_closes_and_returns_zero() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"fast": {"a.txt": b"a"}, "slow": {"b.txt": b"b"}})
        fast_gate = gated(service, "fast", "a.txt")
        gated(service, "slow", "b.txt")
        async with running(service, concurrency=2, drain_timeout=0.5) as h:
            stream = await service.next_stream(0)
            await stream.next("credit")
            fast, slow = assignment("fast"), assignment("slow")
            await stream.assign(fast, slow)
            await service.read_started("b.txt")
            h.worker.stop()
            fast_gate.set()
            assert (await await_result(stream, fast.lease_id)).entries_uploaded == 1
            release = await stream.next("release")
            assert list(release.release.lease_ids) == [slow.lease_id]
            assert await h.exit_code() == 0
            assert stream.half_closed.is_set()
            assert total_credits(stream) == 2
            assert len(service.streams) == 1

    run(scenario)


def test_stream_ended_without_drain_cancels_jobs_and_reconnects() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"r": {"a.txt": b"a"}})
        gated(service, "r", "a.txt")
        async with running(service, concurrency=1):
            first = await service.next_stream(0)
            await first.next("credit")
            await first.assign(assignment("r"))
            await service.read_started("a.txt")
            first.end()
            second = await service.next_stream(1)
            # The held job was dropped with the old stream: the slot is free again.
            assert (await second.next("credit")).credit.credits == 1
            async with asyncio.timeout(WAIT):
                while service.cancelled_reads != ["a.txt"]:
                    await asyncio.sleep(0.01)

    run(scenario)


def test_reconnects_with_the_same_incarnation_after_the_server_restarts() -> None:
    async def scenario() -> None:
        service = FakeRealmService()
        async with running(service) as h:
            await (await service.next_stream(0)).next("credit")
            await h.server.stop(None)
            await asyncio.sleep(0.3)  # a few failed attempts with backoff
            revived = FakeRealmService()
            server, _ = await start_server(revived, port=h.port)
            try:
                stream = await revived.next_stream(0)
                hello = stream.requests[0].hello
                assert hello.incarnation_id == h.worker.incarnation_id
                assert (await stream.next("credit")).credit.credits == 2
            finally:
                h.worker.stop()
                h.worker.stop()
                assert await h.exit_code() == 0
                await server.stop(None)

    run(scenario)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    ],
)
def test_refusal_that_retrying_cannot_cure_stops_the_worker_with_an_error(
    code: grpc.StatusCode,
) -> None:
    async def scenario() -> None:
        service = FakeRealmService(refuse=code)
        async with running(service) as h:
            assert await h.exit_code() == 1
            assert len(service.streams) == 1

    run(scenario)


def test_unreachable_server_is_retried_until_stopped() -> None:
    async def scenario() -> None:
        service = FakeRealmService()
        server, port = await start_server(service)
        await server.stop(None)
        from fake_realm_server import worker_config

        worker = Worker(worker_config(port))
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.3)
        assert not task.done()
        worker.stop()
        async with asyncio.timeout(WAIT):
            assert await task == 0

    run(scenario)


def test_failing_side_task_stops_the_worker_with_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken_heartbeats(self: Session) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("heartbeat bug")

    monkeypatch.setattr(Session, "_heartbeat_loop", broken_heartbeats)

    async def scenario() -> None:
        service = FakeRealmService()
        async with running(service) as h:
            with pytest.raises(RuntimeError, match="heartbeat bug"):
                await h.exit_code()
            assert len(service.streams) == 1

    run(scenario)


def test_progress_reaches_the_server_within_a_second_between_heartbeats() -> None:
    async def scenario() -> None:
        files = {"a.txt": b"a", "b.txt": b"b", "c.txt": b"c"}
        service = FakeRealmService(realms={"r": files}, heartbeat_interval=60.0)
        gate = gated(service, "r", "c.txt")
        async with running(service, concurrency=1):
            stream = await service.next_stream(0)
            await stream.next("credit")
            job = assignment("r")
            await stream.assign(job)
            await service.read_started("c.txt")
            # a and b are indexed, c is held back: the job is running, and its
            # progress goes out long before the 60 s heartbeat is due.
            loop = asyncio.get_running_loop()
            started = loop.time()
            beat = await stream.next("heartbeat", timeout=2.5)
            assert loop.time() - started < 2.0
            (lease,) = beat.heartbeat.leases
            assert lease.lease_id == job.lease_id
            assert (lease.progress.done, lease.progress.total) == (2, 3)
            # Unchanged progress is not sent again before the heartbeat is due.
            await quiet(stream, "heartbeat", 1.5)
            gate.set()
            result = await stream.next("results")
            assert result.results.results[0].progress.done == 3

    run(scenario)
