"""Statements on the event loop (`Database.loop_statements`, PostgreSQL):
a create's one statement over psycopg's AsyncConnection, with the store's
errors, effects and pooled connections as in the store threads."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy import JSON, Enum, Integer, bindparam, exc, select, text
from store_helpers import terminate_backend

from realm_service.domain import Disposition, EnqueueResult, HandOff, JobKind, JobState
from realm_service.errors import InvalidArgument, StoreUnavailable
from realm_service.queue import JobQueue, QueueSettings
from realm_service.store import direct, realms_sql
from realm_service.store.db import Database, LoopTx, open_database
from realm_service.store.loop_pool import LoopConnections

NOW = datetime(2026, 12, 8, tzinfo=UTC)


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = open_database(pg_url)
    yield database
    database.close()


async def _create(tx: LoopTx, realm_id: str) -> Any:
    return await realms_sql.create_realm_on_loop(
        tx,
        realm_id=realm_id,
        display_name=realm_id,
        priority=10,
        now=NOW,
        files=[("a.txt", b"alpha")],
        job_priority=10,
        job_time=NOW,
    )


def test_a_create_on_the_loop_writes_and_fires_its_effects_after_it(db: Database) -> None:
    woken: list[str] = []
    changed: list[int] = []
    db.on_job_change(lambda job_id, _value: changed.append(job_id))
    db._new_work_listeners.append(lambda: woken.append("new work"))

    async def run() -> Any:
        async with db.loop_statements() as tx:
            created = await _create(tx, "r1")
            assert woken == []  # effects wait for the unit's end
            again = await _create(tx, "r1")
        db.close_loop_connections()
        return created, again

    created, again = asyncio.run(run())
    realm, job = created
    assert realm.realm_id == "r1" and job.realm_id == "r1" and job.priority == 10
    assert again is None  # the realm was there: nothing written
    assert woken == ["new work"]
    assert changed == [job.job_id]
    with db.read_transaction() as tx:
        assert [f.path for f in realms_sql.list_files(tx, "r1")] == ["a.txt"]


def test_a_word_to_other_instances_is_sent_after_the_statement(db: Database) -> None:
    conninfo = db._conninfo()
    db.others_alive = True
    with psycopg.connect(conninfo, autocommit=True) as listener:
        listener.execute(f'LISTEN "{db.channel}"')

        async def run() -> None:
            async with db.loop_statements() as tx:
                await _create(tx, "told")
            db.close_loop_connections()

        asyncio.run(run())
        heard = [n.payload for n in listener.notifies(timeout=5.0, stop_after=1)]
    assert heard == [db.origin]


def _circular() -> list[object]:
    looped: list[object] = []
    looped.append(looped)
    return looped


@pytest.mark.parametrize(
    ("type_", "value", "error"),
    [
        # PostgreSQL refuses them (DataError): integer out of range, not a number.
        (Integer, 2**40, InvalidArgument),
        (Integer, "not a number", InvalidArgument),
        # The type's processing refuses them before the store sees anything:
        # a ValueError is the request's fault, anything else is not translated.
        (JSON, _circular(), InvalidArgument),
        (JSON, {1, 2}, exc.StatementError),
        # SQLAlchemy's own bind processing refuses it (a LookupError).
        (Enum("a", "b", name="ab", validate_strings=True), "c", exc.StatementError),
    ],
)
def test_values_the_store_refuses_fail_as_in_the_store_threads(
    db: Database, type_: Any, value: object, error: type[Exception]
) -> None:
    statement = select(bindparam("x", type_=type_))

    async def run() -> None:
        try:
            async with db.loop_statements() as tx:
                await direct.first_on_loop(tx, statement, {"x": value})
        finally:
            db.close_loop_connections()

    with pytest.raises(error) as on_loop:
        asyncio.run(run())
    # The same statement in a store thread fails the same way.
    with pytest.raises(error) as in_thread, db.statements() as tx:
        direct.first(tx.conn, statement, {"x": value})
    assert type(on_loop.value) is type(in_thread.value)


def test_an_unreachable_server_fails_at_once_as_unavailable() -> None:
    db = Database("postgresql://postgres@127.0.0.1:1/test")

    async def run() -> None:
        async with db.loop_statements():
            raise AssertionError("no connection to be had")

    try:
        with pytest.raises(StoreUnavailable):
            asyncio.run(run())
    finally:
        db.close()


def _pool(db: Database, ping_after_s: float) -> LoopConnections:
    return LoopConnections(db._conninfo(), size=2, ping_after_s=ping_after_s)


async def _pid(pool: LoopConnections) -> int:
    conn = await pool.acquire()
    try:
        return int(conn.info.backend_pid)
    finally:
        await pool.release(conn)


def test_a_connection_closed_while_idle_is_replaced_unseen(db: Database) -> None:
    pool = _pool(db, ping_after_s=0.0)

    async def run() -> tuple[int, int]:
        first = await _pid(pool)
        assert terminate_backend(db, first)
        second = await _pid(pool)  # pinged, found dead, replaced
        pool.close()
        return first, second

    first, second = asyncio.run(run())
    assert first != second
    assert pool.opened == 2


def test_a_connection_used_a_moment_ago_is_not_pinged_and_not_kept_once_broken(
    db: Database,
) -> None:
    pool = _pool(db, ping_after_s=3600.0)

    async def run() -> None:
        first = await _pid(pool)
        assert await _pid(pool) == first  # the same one, handed out again
        assert terminate_backend(db, first)
        conn = await pool.acquire()
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
        await pool.release(conn)
        assert pool.idle == 0  # broken: closed, not kept
        assert await _pid(pool) != first
        pool.close()

    asyncio.run(run())
    assert pool.opened == 2


def test_the_pool_keeps_at_most_its_size_idle_and_waits_beyond_twice_that(
    db: Database,
) -> None:
    pool = _pool(db, ping_after_s=3600.0)

    async def run() -> None:
        held = [await pool.acquire() for _ in range(4)]  # size 2: 4 open at most
        late = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.2)
        assert not late.done()  # waits for one to come back
        await pool.release(held.pop())
        conn = await asyncio.wait_for(late, 5)
        held.append(conn)
        for conn in held:
            await pool.release(conn)
        assert pool.idle == 2
        pool.close()
        assert pool.idle == 0

    asyncio.run(run())
    assert pool.opened == 4


def test_a_connection_found_broken_takes_the_idle_ones_with_it(db: Database) -> None:
    """As a lost connection invalidates the engine's pool: after a server
    restart the next call fails, not one call for every idle connection."""
    pool = _pool(db, ping_after_s=3600.0)

    async def run() -> None:
        first, second = await pool.acquire(), await pool.acquire()
        pids = [first.info.backend_pid, second.info.backend_pid]
        await pool.release(first)
        await pool.release(second)
        assert pool.idle == 2
        for pid in pids:
            assert terminate_backend(db, pid)
        conn = await pool.acquire()
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
        await pool.release(conn)
        assert pool.idle == 0  # the other one went too, unused
        assert await _pid(pool) not in pids
        pool.close()

    asyncio.run(run())
    assert pool.opened == 3


def test_a_closed_pool_hands_out_nothing_and_closes_what_comes_back(db: Database) -> None:
    async def run() -> None:
        async with db.loop_statements() as tx:
            await _create(tx, "before")
            db.close_loop_connections()  # a stop while a call is out
        pool = db.loop_connections
        assert pool is not None and pool.idle == 0
        with pytest.raises(StoreUnavailable):
            async with db.loop_statements():
                raise AssertionError("no connection after the close")

    asyncio.run(run())


def test_an_idle_reindex_on_the_loop_tells_other_instances(db: Database) -> None:
    """With other instances alive the enqueue's word goes out after its
    insert, and the hand-off's claim (several statements) runs in a thread."""
    queue = JobQueue(db, settings=QueueSettings())
    with db.statements() as tx:
        realms_sql.insert_new_realm(
            tx, realm_id="r", display_name="r", priority=10, now=NOW, files=[]
        )
    db.others_alive = True
    offer = HandOff(stream_id="s", worker="w", min_priority=0, kinds=(), system_limit=None)
    with psycopg.connect(db._conninfo(), autocommit=True) as listener:
        listener.execute(f'LISTEN "{db.channel}"')

        async def run() -> EnqueueResult:
            result = await queue.enqueue_on_loop("r", JobKind.FROM_SCRATCH, 10, hand_off=offer)
            db.close_loop_connections()
            return result

        result = asyncio.run(run())
        heard = [n.payload for n in listener.notifies(timeout=5.0, stop_after=1)]
    assert heard == [db.origin]
    assert result.lease is not None and result.lease.job.job_id == result.job.job_id
    assert queue.get_job(result.job.job_id).state is JobState.RUNNING


def test_a_claim_of_one_statement_commits_without_the_flush_and_only_itself(
    db: Database,
) -> None:
    """A claim of one statement that commits alone (on the loop, or in a
    store thread's autocommit) runs with `synchronous_commit` off: a
    deferred trigger sees the setting at its commit. One in a transaction
    of other writes (an enqueue's merge with its hand-off) or in a round's
    transaction keeps it on, and the setting never outlives its
    transaction on the connections that creates and enqueues share."""
    with db.transaction() as tx:
        for sql in (
            "CREATE TABLE seen (setting text)",
            "CREATE FUNCTION see() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " INSERT INTO seen VALUES (current_setting('synchronous_commit'));"
            " RETURN NULL; END $$",
            "CREATE CONSTRAINT TRIGGER see AFTER INSERT ON job_attempts"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION see()",
        ):
            tx.conn.execute(text(sql))
    queue = JobQueue(db, settings=QueueSettings())
    for realm_id in ("a", "b", "c", "d"):
        with db.statements() as tx:
            realms_sql.insert_new_realm(
                tx, realm_id=realm_id, display_name=realm_id, priority=10, now=NOW, files=[]
            )
    db.others_alive = False
    offer = HandOff(stream_id="s", worker="w", min_priority=0, kinds=(), system_limit=None)

    async def run() -> tuple[EnqueueResult, str]:
        result = await queue.enqueue_on_loop("a", JobKind.FROM_SCRATCH, 10, hand_off=offer)
        pool = db.loop_connections
        assert pool is not None and pool.idle == 1
        conn = await pool.acquire()  # the one the enqueue used
        try:
            cur = await conn.execute("SHOW synchronous_commit")
            row = await cur.fetchone()
        finally:
            await pool.release(conn)
        db.close_loop_connections()
        assert row is not None
        return result, str(row[0])

    result, after_on_loop = asyncio.run(run())
    assert result.lease is not None  # claimed on the loop, in one statement
    assert after_on_loop == "on"
    fs = JobKind.FROM_SCRATCH
    # In a store thread, after the idle insert, committing alone.
    assert queue.enqueue("b", fs, 10, hand_off=offer).lease is not None
    # In the transaction of an enqueue that merged into a queued job.
    queue.enqueue("c", fs, 10)
    merged = queue.enqueue("c", fs, 20, hand_off=offer)
    assert merged.disposition is Disposition.MERGED and merged.lease is not None
    # In a round's transaction.
    queue.enqueue("d", fs, 10)
    [lease] = queue.claim(1, worker="w")
    assert lease.job.realm_id == "d"
    with db.statements() as tx:
        seen = [r[0] for r in tx.conn.execute(text("SELECT setting FROM seen"))]
        assert tx.conn.execute(text("SHOW synchronous_commit")).scalar_one() == "on"
    assert seen == ["off", "off", "on", "on"]
