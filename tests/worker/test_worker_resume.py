"""Resumable sessions on the worker's side (DESIGN.md section 5): a stream
that breaks while jobs run does not cost them when the server gave a resume
token. The worker reconnects at once, quotes the token with the leases it
holds, carries on with those re-attached (sending again the entry batches
not acknowledged, and results not answered) and stops the others."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from fake_realm_server import WAIT, FakeRealmService, FakeStream, assignment, running
from realm.v1 import realm_service_pb2 as pb

from index_worker import metrics


def run(scenario: Callable[[], Awaitable[Any]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(15):
            await scenario()

    asyncio.run(bounded())


def gated(service: FakeRealmService, realm: str, path: str) -> asyncio.Event:
    gate = asyncio.Event()
    service.gates[(realm, path)] = gate
    return gate


def sessions(how: str) -> float:
    value = metrics.REGISTRY.get_sample_value("index_worker_sessions_total", {"how": how})
    assert value is not None
    return value


async def result_of(stream: FakeStream) -> pb.JobResult:
    (result,) = (await stream.next("results")).results.results
    return result


def test_a_job_carries_on_over_the_next_stream() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"r": {"a.txt": b"a", "b.txt": b"b"}})
        service.resume_token = "token-1"
        gate = gated(service, "r", "b.txt")
        resumed_before = sessions("resumed")
        async with running(service, concurrency=1):
            first = await service.next_stream(0)
            await first.next("credit")
            job = assignment("r")
            await first.assign(job)
            await service.read_started("b.txt")
            first.end(grpc.StatusCode.UNAVAILABLE, "connection reset")
            second = await service.next_stream(1)
            hello = second.requests[0].hello
            assert hello.resume_token == "token-1"
            assert list(hello.resume_lease_ids) == [job.lease_id]
            gate.set()
            result = await result_of(second)
            assert result.lease_id == job.lease_id
            assert result.outcome == pb.JobResult.OUTCOME_SUCCEEDED
            # The job ran on: its read was not cancelled, and the slot it
            # holds was not granted again on the new stream before it ended.
            assert service.cancelled_reads == []
            assert first.of_kind("results") == []
            assert (await second.next("credit")).credit.credits == 1
            assert len(second.of_kind("credit")) == 1
        assert sessions("resumed") == resumed_before + 1

    run(scenario)


def test_a_lease_not_reattached_stops_its_job() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"r": {"a.txt": b"a"}})
        service.resume_token = "token-1"
        service.reattach = set()  # the server released it meanwhile
        gated(service, "r", "a.txt")
        async with running(service, concurrency=1):
            first = await service.next_stream(0)
            await first.next("credit")
            await first.assign(assignment("r"))
            await service.read_started("a.txt")
            first.end(grpc.StatusCode.UNAVAILABLE, "connection reset")
            second = await service.next_stream(1)
            # The slot is free again once the job stopped.
            assert (await second.next("credit")).credit.credits == 1
            async with asyncio.timeout(WAIT):
                while service.cancelled_reads != ["a.txt"]:
                    await asyncio.sleep(0.01)
            assert second.of_kind("results") == []

    run(scenario)


def test_entry_batches_not_acknowledged_are_sent_again() -> None:
    async def scenario() -> None:
        files = {f"{n}.txt": n.encode() for n in "abcd"}
        service = FakeRealmService(realms={"r": files})
        service.resume_token = "token-1"
        # a and b go in batches of their own as c and d come; d waits.
        gate = gated(service, "r", "d.txt")
        async with running(service, concurrency=1, batch_size=1):
            first = await service.next_stream(0)
            await first.next("credit")
            job = assignment("r")
            await first.assign(job)
            one = (await first.next("entries")).entries
            two = (await first.next("entries")).entries
            assert (one.sequence, two.sequence) == (1, 2)
            # Only the first batch is acknowledged before the break.
            await first.send(
                pb.ClaimJobsResponse(
                    acks=pb.LeaseAcks(
                        acks=[pb.LeaseAck(lease_id=job.lease_id, accepted=True, entries_sequence=1)]
                    )
                )
            )
            await asyncio.sleep(0.1)
            first.end(grpc.StatusCode.UNAVAILABLE, "connection reset")
            second = await service.next_stream(1)
            again = (await second.next("entries")).entries
            assert again.sequence == 2 and [e.path for e in again.entries] == ["b.txt"]
            gate.set()
            result = await result_of(second)
            assert result.entries_uploaded == 4
            sent = [r.entries.sequence for r in second.of_kind("entries")]
            assert 1 not in sent, sent

    run(scenario)


def test_a_result_sent_before_the_break_is_sent_again() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"r": {"a.txt": b"a"}})
        service.resume_token = "token-1"
        async with running(service, concurrency=1):
            first = await service.next_stream(0)
            await first.next("credit")
            job = assignment("r")
            await first.assign(job)
            assert (await result_of(first)).lease_id == job.lease_id
            first.end(grpc.StatusCode.UNAVAILABLE, "connection reset")  # no answer came
            second = await service.next_stream(1)
            assert list(second.requests[0].hello.resume_lease_ids) == [job.lease_id]
            assert (await result_of(second)).lease_id == job.lease_id

    run(scenario)
