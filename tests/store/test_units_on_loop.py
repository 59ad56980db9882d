"""A drain's claims and completions run on the event loop on a SQLite file the
process has to itself (`Database.on_loop`, `JobQueue.claim_async`,
`JobQueue.complete_many_async`), and in a store thread everywhere else: on
PostgreSQL, beside another live instance, when the writes' turn is taken,
and when another process holds the file's lock, which the loop never waits
for."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest
from store_helpers import entry, get_realm, make_realm

from realm_service import queue as queue_module
from realm_service.domain import JobKind, JobState, Lease
from realm_service.queue import ON_LOOP_CLAIM, ON_LOOP_COMPLETE, JobQueue
from realm_service.store import claim_sql, leases_sql
from realm_service.store.db import Database, open_database

USER = 50


@pytest.fixture
def alone(queue: JobQueue) -> JobQueue:
    """The queue as a server's is after its first instance refresh found no
    other instance."""
    queue.db.set_others_alive(False)
    return queue


def _queued(queue: JobQueue, n: int, start: int = 0) -> list[int]:
    ids = []
    for i in range(start, start + n):
        make_realm(queue, f"r{i}")
        ids.append(queue.enqueue(f"r{i}", JobKind.FROM_SCRATCH, USER).job.job_id)
    return ids


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """(what, thread, PRAGMA synchronous inside its transaction) for each
    claim and completion that runs, SQLite's setting read in the
    transaction itself (-1 on PostgreSQL)."""
    out: list[tuple[str, int, int]] = []

    def watching(what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(tx: Any, *args: Any, **kwargs: Any) -> Any:
            sync = -1
            if tx.conn.dialect.name == "sqlite":
                sync = tx.conn.exec_driver_sql("PRAGMA synchronous").scalar()
            out.append((what, threading.get_ident(), sync))
            return fn(tx, *args, **kwargs)

        return run

    monkeypatch.setattr(claim_sql, "claim", watching("claim", claim_sql.claim))
    monkeypatch.setattr(leases_sql, "succeed", watching("complete", leases_sql.succeed))
    return out


def _claim_and_complete(queue: JobQueue, n: int) -> tuple[list[Lease], int]:
    """claim_async then complete_many_async of what it got, on a loop of
    this thread; returns the leases and the loop's thread."""

    async def go() -> tuple[list[Lease], int]:
        leases = await queue.claim_async(n, worker="w")
        done = await queue.complete_many_async([(lease.lease_id, 0) for lease in leases])
        assert all(
            not isinstance(d, Exception) and d.state is JobState.SUCCEEDED for d in done.values()
        )
        return leases, threading.get_ident()

    return asyncio.run(go())


def test_a_drains_units_run_on_the_loop_of_a_sqlite_file_alone(
    alone: JobQueue, seen: list[tuple[str, int, int]]
) -> None:
    ids = _queued(alone, 3)
    leases, loop_thread = _claim_and_complete(alone, 3)
    assert sorted(lease.job.job_id for lease in leases) == ids
    threads = {thread for _, thread, _ in seen}
    if alone.db.backend == "postgresql":
        assert loop_thread not in threads
        return
    assert threads == {loop_thread}
    # The claim's commit does not wait for the disk; the completion's does,
    # and so does the next claim's connection once the claim is over.
    assert [(what, sync) for what, _, sync in seen] == [("claim", 1), ("complete", 2)]
    assert [alone.get_job(i).state for i in ids] == [JobState.SUCCEEDED] * 3


def test_a_store_set_to_normal_stays_normal(
    sqlite_url: str, seen: list[tuple[str, int, int]]
) -> None:
    db = open_database(sqlite_url, synchronous="NORMAL")
    try:
        queue = JobQueue(db)
        db.set_others_alive(False)
        _queued(queue, 1)
        _claim_and_complete(queue, 1)
        assert [(what, sync) for what, _, sync in seen] == [("claim", 1), ("complete", 1)]
    finally:
        db.close()


def test_units_run_in_a_thread_beside_another_instance(
    queue: JobQueue, seen: list[tuple[str, int, int]]
) -> None:
    assert queue.db.others_alive  # until a refresh says otherwise
    _queued(queue, 2)
    _, loop_thread = _claim_and_complete(queue, 2)
    assert len(seen) == 2 and loop_thread not in {thread for _, thread, _ in seen}
    if queue.db.backend == "sqlite":
        assert [sync for _, _, sync in seen] == [2, 2]  # a thread's claim syncs


def test_a_big_claim_runs_in_a_thread(alone: JobQueue, seen: list[tuple[str, int, int]]) -> None:
    _queued(alone, 2)

    async def go() -> tuple[int, int]:
        leases = await alone.claim_async(ON_LOOP_CLAIM + 1, worker="w")  # more than the loop's
        return len(leases), threading.get_ident()

    got, loop_thread = asyncio.run(go())
    assert got == 2
    assert [what for what, _, _ in seen] == ["claim"] and seen[0][1] != loop_thread


def _complete_async(queue: JobQueue, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], int]:
    async def go() -> tuple[dict[str, Any], int]:
        return await queue.complete_many_async(*args, **kwargs), threading.get_ident()

    return asyncio.run(go())


def _claimed(queue: JobQueue, n: int) -> list[Lease]:
    leases = queue.claim(n, worker="w")
    assert len(leases) == n
    return leases


def test_completions_with_entries_or_many_results_run_in_a_thread(
    alone: JobQueue, seen: list[tuple[str, int, int]]
) -> None:
    """Results that send entries, or count entries sent before, merge and
    count them: a store thread's work; so is a batch of more results than
    the loop takes."""
    _queued(alone, 3)
    sent, uploaded, bare = _claimed(alone, 3)
    alone.add_entries(uploaded.lease_id, [entry("a.md"), entry("b.md")])
    done, loop_thread = _complete_async(
        alone,
        [(sent.lease_id, 1)],
        entries={sent.lease_id: ([entry("c.md")], [])},
        whole={sent.lease_id},
    )
    assert done[sent.lease_id].state is JobState.SUCCEEDED
    done, _ = _complete_async(alone, [(uploaded.lease_id, 2)])
    assert done[uploaded.lease_id].state is JobState.SUCCEEDED
    too_many = [(bare.lease_id, 0)] + [(f"unknown-{i}", 0) for i in range(ON_LOOP_COMPLETE)]
    done, _ = _complete_async(alone, too_many)
    assert done[bare.lease_id].state is JobState.SUCCEEDED
    assert sum(isinstance(d, Exception) for d in done.values()) == ON_LOOP_COMPLETE
    completions = [thread for what, thread, _ in seen if what == "complete"]
    assert len(completions) == 3 and loop_thread not in completions
    assert get_realm(alone, "r0").entries == 1 and get_realm(alone, "r1").entries == 2


def test_a_completion_replacing_a_big_index_goes_to_a_thread(
    alone: JobQueue, seen: list[tuple[str, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A from-scratch job that ends with no entries drops its realm's index:
    past ON_LOOP_REPLACED entries the loop's try rolls back (nothing of it
    stays) and a store thread completes it; a small one stays on the loop."""
    monkeypatch.setattr(queue_module, "ON_LOOP_REPLACED", 3)
    _queued(alone, 2)
    big, small = _claimed(alone, 2)
    alone.add_entries(big.lease_id, [entry(f"{i}.md") for i in range(4)])
    alone.add_entries(small.lease_id, [entry(f"{i}.md") for i in range(3)])
    alone.complete_many([(big.lease_id, 4), (small.lease_id, 3)])
    for realm_id in ("r0", "r1"):
        alone.enqueue(realm_id, JobKind.FROM_SCRATCH, USER)
    seen.clear()
    leases = {lease.job.realm_id: lease for lease in _claimed(alone, 2)}
    seen.clear()
    done, loop_thread = _complete_async(alone, [(leases["r0"].lease_id, 0)])
    assert done[leases["r0"].lease_id].state is JobState.SUCCEEDED
    done, _ = _complete_async(alone, [(leases["r1"].lease_id, 0)])
    assert done[leases["r1"].lease_id].state is JobState.SUCCEEDED
    threads = [thread for what, thread, _ in seen if what == "complete"]
    if alone.db.backend == "sqlite":
        assert threads[0] != loop_thread and threads[1] == loop_thread
    assert len(threads) == 2  # the loop's try of the big one wrote nothing
    assert get_realm(alone, "r0").entries == 0 and get_realm(alone, "r1").entries == 0
    assert [outcome for _, outcome in alone.attempts(leases["r0"].job.job_id)] == ["completed"]


def test_a_taken_turn_sends_the_claim_to_a_thread_and_the_loop_goes_on(
    alone: JobQueue, seen: list[tuple[str, int, int]]
) -> None:
    """Another unit of this process holds the writes' turn (a long
    transaction in a store thread): the loop does not wait for it."""
    ids = _queued(alone, 1)
    inside, release = threading.Event(), threading.Event()

    def long_write() -> None:
        with alone.db.transaction():
            inside.set()
            assert release.wait(10)

    async def go() -> tuple[list[Lease], int, int]:
        writer = asyncio.create_task(asyncio.to_thread(long_write))
        assert await asyncio.to_thread(inside.wait, 10)
        claim = asyncio.create_task(alone.claim_async(1, worker="w"))
        ticks = 0
        while ticks < 5:  # the loop runs while the claim waits in its thread
            await asyncio.sleep(0.01)
            ticks += 1
        if alone.db.backend == "sqlite":  # PostgreSQL's transactions take no turns
            assert not claim.done()
        release.set()
        await writer
        return await claim, ticks, threading.get_ident()

    leases, ticks, loop_thread = asyncio.run(go())
    assert [lease.job.job_id for lease in leases] == ids and ticks == 5
    if alone.db.backend == "sqlite":
        assert [(what, sync) for what, _, sync in seen] == [("claim", 2)]
    assert seen[0][1] != loop_thread


def test_units_meeting_another_process_lock_wait_in_a_thread(
    sqlite_url: str, seen: list[tuple[str, int, int]]
) -> None:
    """The loop's connection does not wait for the file's lock: its unit
    writes nothing and goes to a store thread, which waits (busy timeout)
    while the loop goes on; then the claim and the completion are whole."""
    db = open_database(sqlite_url)
    try:
        queue = JobQueue(db)
        db.set_others_alive(False)
        ids = _queued(queue, 2)
        other = sqlite3.connect(
            sqlite_url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False
        )
        try:

            async def under_lock(unit: Callable[[], Any]) -> tuple[Any, int, int]:
                other.execute("BEGIN IMMEDIATE")
                task = asyncio.create_task(unit())
                ticks = 0
                while ticks < 5:
                    await asyncio.sleep(0.01)
                    ticks += 1
                assert not task.done()
                other.execute("ROLLBACK")
                return await task, ticks, threading.get_ident()

            leases, ticks, loop_thread = asyncio.run(
                under_lock(lambda: queue.claim_async(2, worker="w"))
            )
            assert sorted(lease.job.job_id for lease in leases) == ids and ticks == 5
            done, ticks, loop_thread = asyncio.run(
                under_lock(
                    lambda: queue.complete_many_async([(lease.lease_id, 0) for lease in leases])
                )
            )
            assert ticks == 5
            assert all(not isinstance(d, Exception) for d in done.values())
        finally:
            other.close()
        # Each ran once, in a thread (the loop's try stopped at its BEGIN),
        # and each job has one attempt, completed.
        assert [what for what, _, _ in seen] == ["claim", "complete"]
        assert all(thread != loop_thread for _, thread, _ in seen)
        for job_id in ids:
            assert queue.get_job(job_id).state is JobState.SUCCEEDED
            assert [outcome for _, outcome in queue.attempts(job_id)] == ["completed"]
        # The loop's units come back once the file is free.
        seen.clear()
        more = _queued(queue, 1, start=2)
        _, loop_thread = _claim_and_complete(queue, 1)
        assert [(what, thread) for what, thread, _ in seen] == [
            ("claim", loop_thread),
            ("complete", loop_thread),
        ]
        assert queue.get_job(more[0]).state is JobState.SUCCEEDED
    finally:
        db.close()


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://"])
def test_a_memory_database_runs_nothing_on_the_loop(url: str) -> None:
    """Another connection to it would be another database."""
    db = open_database(url, migrate=False)
    try:
        db.set_others_alive(False)
        assert not db.runs_units_on_loop()
        with db.on_loop() as here:
            assert not here
    finally:
        db.close()


def test_the_loop_unit_keeps_its_turn_to_its_own_thread(alone: JobQueue) -> None:
    """While a unit runs on the loop, a store thread's transaction waits for
    the turn and then runs on the shared pool, never on the loop's
    connection."""
    db: Database = alone.db
    if db.backend != "sqlite":
        with db.on_loop() as here:
            assert not here
        return
    engines: list[Any] = []

    def in_thread() -> None:
        with db.transaction() as tx:
            engines.append(tx.conn.engine)

    with db.on_loop() as here:
        assert here
        with db.transaction() as tx:
            engines.append(tx.conn.engine)
        worker = threading.Thread(target=in_thread)
        worker.start()
        worker.join(0.2)
        assert worker.is_alive()  # waits for the turn
    worker.join(10)
    assert engines[0] is not db.engine and engines[1] is db.engine


def test_a_unit_that_fails_gives_the_turn_back(alone: JobQueue) -> None:
    """A unit that raises leaves nothing held: a store thread's transaction
    runs at once after it, on the shared pool, and the loop's next unit
    runs on the loop again with its commits synced as set."""
    db = alone.db
    with pytest.raises(RuntimeError), db.on_loop(sync_commits=False) as here:
        assert here is (db.backend == "sqlite")
        raise RuntimeError("the unit failed")
    done = threading.Event()

    def in_thread() -> None:
        with db.transaction() as tx:
            assert tx.conn.engine is db.engine
        done.set()

    threading.Thread(target=in_thread).start()
    assert done.wait(5)
    if db.backend == "sqlite":
        with db.on_loop() as here, db.transaction() as tx:
            assert here and tx.conn.engine is not db.engine
            assert tx.conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
