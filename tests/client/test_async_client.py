"""AsyncRealmClient against a real server on loopback, with a worker that
completes the jobs over ClaimJobs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import realm_client
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realm_client import AsyncRealmClient

from tests.client.live import live_server, live_system

SUCCEEDED = res.Job.STATE_SUCCEEDED
CANCELLED = res.Job.STATE_CANCELLED


def test_create_wait_then_the_other_calls(tmp_path: Path) -> None:
    async def scenario(address: str) -> None:
        progress: list[res.Job] = []
        async with AsyncRealmClient(address, timeout=15) as client:
            created = await client.create_realm(
                "notes",
                display_name="Team notes",
                initial_files={"a.txt": b"alpha", "b.txt": b"beta"},
                wait=True,
                on_progress=progress.append,
            )
            assert created.job.state == SUCCEEDED
            assert created.realm.state == res.Realm.STATE_READY
            assert created.realm.display_name == "Team notes"
            assert progress[-1].state == SUCCEEDED
            assert [p.job_id for p in progress] == [created.job.job_id] * len(progress)

            # Files, and the incremental job a write queues.
            written = await client.write_realm_file("notes", "c.txt", b"gamma", priority=20)
            assert written.file.size == 5 and written.job.priority == 20
            done = await client.wait_for_job(written.job.job_id, timeout=15)
            assert done.state == SUCCEEDED
            read = await client.read_realm_file("notes", "c.txt")
            assert read.content == b"gamma"
            paths = [f.path for f in await client.list_realm_files("notes")]
            assert {"a.txt", "b.txt", "c.txt"} <= set(paths)
            await client.delete_realm_file("notes", "c.txt")
            with pytest.raises(realm_client.NotFound):
                await client.read_realm_file("notes", "c.txt")

            # Paged listings, across pages of two.
            for name in ("r1", "r2", "r3"):
                await client.create_realm(name)
            ids = [r.realm_id async for r in client.list_realms(page_size=2)]
            assert ids == ["notes", "r1", "r2", "r3"]
            assert [r.realm_id async for r in client.list_realms(limit=3)] == ids[:3]
            entries = [e.path async for e in client.search_realm("notes", page_size=1)]
            assert {"a.txt", "b.txt"} <= set(entries)
            jobs = [j async for j in client.list_jobs(realm_id="notes")]
            assert created.job.job_id in {j.job_id for j in jobs}
            assert (await client.get_job(created.job.job_id)).state == SUCCEEDED
            snapshots = [j async for j in client.watch_job(created.job.job_id)]
            assert [s.state for s in snapshots] == [SUCCEEDED]

            again = await client.reindex_realm("notes")
            assert again.job.realm_id == "notes"
            assert (await client.get_realm("notes")).realm_id == "notes"

    with live_system(tmp_path) as live:
        asyncio.run(scenario(live.address))


def test_request_ids_make_a_repeated_create_exactly_once(tmp_path: Path) -> None:
    async def scenario(address: str) -> None:
        async with AsyncRealmClient(address) as client:
            first = await client.create_realm("once", request_id="req-1")
            repeat = await client.create_realm("once", request_id="req-1")
            assert repeat.job.job_id == first.job.job_id
            with pytest.raises(realm_client.AlreadyExists) as raised:
                await client.create_realm("once", request_id="req-2")
            assert "once" in raised.value.message
            jobs = [j async for j in client.list_jobs(realm_id="once")]
            assert len(jobs) == 1

    with live_server(tmp_path) as live:
        asyncio.run(scenario(live.address))


def test_server_errors_keep_their_message(tmp_path: Path) -> None:
    async def scenario(address: str) -> None:
        async with AsyncRealmClient(address) as client:
            with pytest.raises(realm_client.NotFound) as missing:
                await client.get_realm("nope")
            with pytest.raises(realm_client.InvalidArgument) as bad:
                await client.create_realm("Bad_Id")
            with pytest.raises(realm_client.NotFound):
                async for _ in client.watch_job("999999"):
                    pass
        assert "nope" in missing.value.message and missing.value.method == "GetRealm"
        assert "realm_id" in bad.value.message

    with live_server(tmp_path) as live:
        asyncio.run(scenario(live.address))


def test_bearer_tokens_and_roles(tmp_path: Path) -> None:
    tokens = {"client-t": "client", "admin-t": "admin"}

    async def scenario(address: str) -> None:
        async with AsyncRealmClient(address) as anonymous:
            with pytest.raises(realm_client.Unauthenticated):
                await anonymous.get_realm("x")
        async with AsyncRealmClient(address, token="client-t") as client:
            with pytest.raises(realm_client.NotFound):
                await client.get_realm("x")
            with pytest.raises(realm_client.PermissionDenied):
                await client.reindex_all_realms()
        async with AsyncRealmClient(address, token="admin-t") as admin:
            assert (await admin.reindex_all_realms()).realms == 0

    with live_server(tmp_path, tokens=tokens) as live:
        asyncio.run(scenario(live.address))


def test_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def scenario() -> None:
        fast = realm_client.RetryPolicy(initial_backoff=0.01, max_backoff=0.02)
        async with AsyncRealmClient(f"127.0.0.1:{port}", retry=fast, timeout=5) as client:
            with pytest.raises(realm_client.Unavailable):
                await client.get_job("1")

    asyncio.run(scenario())


def test_bulk_files_and_job_control(tmp_path: Path) -> None:
    """Without a worker, jobs stay queued: cancel, retry, explain, stats, then
    StreamRealmFiles and WriteRealmFiles, then DeleteRealm."""
    big = bytes(range(256)) * 40  # 10,240 bytes: three chunks at 4 KiB a message

    async def scenario(address: str) -> None:
        async with AsyncRealmClient(address, timeout=15) as client:
            created = await client.create_realm("bulk", initial_files={"big.bin": big})
            job_id = created.job.job_id

            explained = await client.explain_job(job_id)
            assert explained.job.job_id == job_id
            assert explained.summary
            codes = {reason.code for reason in explained.reasons}
            assert rs.WaitReason.CODE_NO_WORKERS in codes
            assert await client.list_workers() == []
            stats = await client.get_queue_stats()
            queued = [c for c in stats.counts if c.state == res.Job.STATE_QUEUED]
            assert sum(c.count for c in queued) == 1

            cancelled = await client.cancel_job(job_id, reason="not now")
            assert cancelled.state == res.Job.STATE_CANCELLED
            assert "not now" in cancelled.error_message
            again = await client.cancel_job(job_id)  # idempotent on a cancelled job
            assert again.state == res.Job.STATE_CANCELLED
            assert (await client.wait_for_job(job_id, timeout=10)).state == CANCELLED
            retried = await client.retry_job(job_id)
            assert retried.job.state == res.Job.STATE_QUEUED
            assert retried.disposition == res.DISPOSITION_INSERTED
            with pytest.raises(realm_client.FailedPrecondition):
                await client.retry_job(retried.job.job_id)  # queued: nothing to retry

            written = await client.write_realm_files(
                "bulk", files={"a.txt": b"alpha", "b/c.txt": b"gamma"}, priority=30
            )
            assert [f.path for f in written.files] == ["a.txt", "b/c.txt"]
            assert written.job.priority == 30
            removed = await client.write_realm_files("bulk", deleted_paths=["a.txt"])
            assert removed.deleted == 1
            with pytest.raises(realm_client.NotFound):
                await client.write_realm_files("bulk", deleted_paths=["a.txt"])

            streamed = [s async for s in client.stream_realm_files("bulk", max_message_bytes=4096)]
            by_path = {s.path: s for s in streamed}
            assert by_path["big.bin"].content == big
            assert by_path["big.bin"].file.size == len(big)
            assert by_path["b/c.txt"].content == b"gamma"
            assert "a.txt" not in by_path
            assert [s.path for s in streamed] == sorted(by_path)
            some = [s.path async for s in client.stream_realm_files("bulk", ["b/c.txt", "zz"])]
            assert some == ["b/c.txt"]

            deleted = await client.delete_realm("bulk", request_id="del-1")
            assert deleted.files_deleted >= 3 and not deleted.replayed
            assert deleted.jobs_cancelled >= 1
            replay = await client.delete_realm("bulk", request_id="del-1")
            assert replay.replayed
            with pytest.raises(realm_client.NotFound):
                await client.get_realm("bulk")
            with pytest.raises(realm_client.NotFound):
                await client.delete_realm("bulk")

    with live_server(tmp_path) as live:
        asyncio.run(scenario(live.address))


def test_workers_are_listed(tmp_path: Path) -> None:
    async def scenario(address: str) -> None:
        async with AsyncRealmClient(address) as client:
            workers = await client.list_workers()
            assert [w.worker_id for w in workers] == ["w1"]
            assert workers[0].credits + workers[0].jobs_held >= 1

    with live_system(tmp_path) as live:
        asyncio.run(scenario(live.address))
