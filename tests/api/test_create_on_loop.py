"""CreateRealm on the event loop (PostgreSQL): a create without a request id
runs its one statement over the server loop's own connections
(`Realms.create_async`, `Database.loop_statements`); every other create, and
every create on SQLite, runs in a store thread. Both keep the same promises:
the realm is mounted before its job exists, a caller that goes away does not
undo a create, and an outage fails the call with UNAVAILABLE at once and
leaves nothing half-written."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import grpc
import psycopg
import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.realms import LOOP_CREATE_BYTES, LOOP_CREATE_FILES
from tests.api.conftest import BASE, LiveServer, start_live_server
from tests.api.helpers import poll
from tests.faults.proxy import Proxy


def create(live: LiveServer, realm_id: str, **fields: object) -> spb.CreateRealmResponse:
    reply: spb.CreateRealmResponse = live.stub.CreateRealm(
        spb.CreateRealmRequest(realm_id=realm_id, **fields), timeout=10
    )
    return reply


def test_creates_without_a_request_id_run_on_the_loop_on_postgresql(live: LiveServer) -> None:
    pool = live.srv.db.loop_connections
    if live.srv.db.backend == "sqlite":
        assert pool is None
        assert not live.srv.db.runs_on_loop
    else:
        assert pool is not None
        assert live.srv.db.runs_on_loop
    opened = 0 if pool is None else pool.opened

    first = create(live, "plain", priority=7, display_name="Plain")
    assert first.job.state == pb.Job.STATE_QUEUED
    assert first.job.priority == 7
    assert first.realm.display_name == "Plain"
    assert "plain" in live.srv.realms.registry
    small = [pb.FileContent(path="a.txt", content=b"alpha")]
    create(live, "small-files", initial_files=small)
    if pool is not None:
        # One connection of the loop's, made once and kept between calls.
        assert pool.opened == opened + 1
        assert pool.idle == 1

    # A request id (a replay needs a read first) and files beyond the loop's
    # bound run in a store thread: the loop's pool opens nothing more.
    keyed = create(live, "keyed", request_id="req-1")
    again = create(live, "keyed", request_id="req-1")
    assert again.job.job_id == keyed.job.job_id
    big = [
        pb.FileContent(path=f"big-{i}.bin", content=b"x" * (LOOP_CREATE_BYTES // 2 + 1))
        for i in range(2)
    ]
    create(live, "big-files", initial_files=big)
    many = [pb.FileContent(path=f"f-{i}.txt", content=b"") for i in range(LOOP_CREATE_FILES + 1)]
    create(live, "many-files", initial_files=many)
    if pool is not None:
        assert pool.opened == opened + 1

    # Every one of them wrote its files and its one job, whichever way it ran.
    for realm_id, files in [
        ("small-files", ["a.txt"]),
        ("big-files", ["big-0.bin", "big-1.bin"]),
        ("many-files", [f"f-{i}.txt" for i in range(LOOP_CREATE_FILES + 1)]),
    ]:
        listed = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id=realm_id), timeout=10)
        assert {f.path for f in listed.files} >= set(files)
    with pytest.raises(grpc.RpcError) as taken:
        create(live, "plain")
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    jobs = live.stub.ListJobs(spb.ListJobsRequest(realm_id="plain"), timeout=10).jobs
    assert [j.job_id for j in jobs] == [first.job.job_id]


def test_a_create_whose_caller_went_away_still_mounts_its_realm_and_keeps_its_job(
    pg_url: str,
) -> None:
    live, stop = start_live_server(replace(BASE, store_url=pg_url))
    conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")
    realms = live.srv.realms
    finished: list[str] = []
    finish = realms._finish_left_behind

    def finishing(realm_id: str, *rest: Any) -> None:
        finished.append(realm_id)
        finish(realm_id, *rest)

    realms._finish_left_behind = finishing  # type: ignore[method-assign]
    try:
        create(live, "warm")  # the loop's connection is made
        with psycopg.connect(conninfo) as holder:
            # The realms table locked against inserts: the create's statement
            # waits on it, its caller gives up, then the lock goes.
            holder.execute("LOCK TABLE realms IN SHARE MODE")
            call = live.stub.CreateRealm.future(
                spb.CreateRealmRequest(realm_id="left-behind"), timeout=30
            )
            holder_pid = holder.info.backend_pid
            poll(
                lambda: _waiting_inserts(conninfo, holder_pid) > 0,
                timeout=10,
                what="the create's statement waiting on the lock",
            )
            call.cancel()
            with pytest.raises(grpc.FutureCancelledError):
                call.result()
            # The client gives up at once; the server hears of it a moment
            # later. The lock goes only once the handler was cancelled and
            # handed the create to a store thread (whose insert waits on the
            # lock too), or the statement could end well before the cancel
            # reached the handler, and nothing would be left behind.
            poll(
                lambda: finished == ["left-behind"],
                timeout=10,
                what="the cancelled create handed to a store thread",
            )
            holder.rollback()

        def exists() -> bool:
            try:
                live.stub.GetRealm(spb.GetRealmRequest(realm_id="left-behind"), timeout=10)
                return True
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return False

        poll(exists, timeout=10, what="the realm created after its caller left")
        poll(
            lambda: "left-behind" in live.srv.realms.registry,
            timeout=10,
            what="the realm mounted",
        )
        jobs = live.stub.ListJobs(spb.ListJobsRequest(realm_id="left-behind"), timeout=10).jobs
        assert len(jobs) == 1 and jobs[0].state == pb.Job.STATE_QUEUED
        pool = live.srv.db.loop_connections
        assert pool is not None
        poll(lambda: pool.idle == 1, timeout=10, what="the connection back in the pool")
    finally:
        stop()


def _waiting_inserts(conninfo: str, holder_pid: int) -> int:
    """Inserts into realms that wait on the holder's lock (not another test's)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE %s = ANY(pg_blocking_pids(pid)) AND query LIKE '%%INSERT INTO realms%%'",
            (holder_pid,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_create_in_an_outage_fails_unavailable_and_writes_nothing(
    pg_behind_proxy: tuple[str, Proxy],
) -> None:
    url, proxy = pg_behind_proxy
    live, stop = start_live_server(replace(BASE, store_url=url))
    try:
        create(live, "before")
        pool = live.srv.db.loop_connections
        assert pool is not None and pool.idle == 1
        opened = pool.opened
        proxy.cut(down_seconds=3.0)
        with pytest.raises(grpc.RpcError) as failed:
            create(live, "during")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
        assert "store" in (failed.value.details() or "")
        # The broken connection is not kept: the next create makes a new one
        # once the store is back, and the failed realm was never written.
        time.sleep(3.0)

        def created() -> bool:
            try:
                create(live, "after")
                return True
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False

        poll(created, timeout=20, what="a create once the store is back")
        assert pool.opened > opened
        with pytest.raises(grpc.RpcError) as missing:
            live.stub.GetRealm(spb.GetRealmRequest(realm_id="during"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "during" not in live.srv.realms.registry
    finally:
        stop()


def test_a_left_behind_create_whose_statement_had_committed_mounts_its_realm(
    pg_url: str,
) -> None:
    """The cancel may come after the statement committed (at an effect's
    await): the realm exists and was taken back from the mounts. Finishing
    it mounts it and adds nothing: its first job stands."""
    live, stop = start_live_server(replace(BASE, store_url=pg_url))
    try:
        first = create(live, "committed")
        live.srv.realms.registry.unmount("committed")
        assert "committed" not in live.srv.realms.registry
        woken: list[int] = []
        live.srv.db.on_new_work(lambda: woken.append(1))
        live.call(lambda: live.srv.realms._finish_left_behind("committed", 5, "committed", []))
        assert "committed" in live.srv.realms.registry
        assert woken  # its statement's own effects never fired: announced again
        jobs = live.stub.ListJobs(spb.ListJobsRequest(realm_id="committed"), timeout=10).jobs
        assert [j.job_id for j in jobs] == [first.job.job_id]
        # One that left nothing is created now, at its priority.
        live.call(lambda: live.srv.realms._finish_left_behind("fresh", 5, "Fresh", []))
        assert "fresh" in live.srv.realms.registry
        jobs = live.stub.ListJobs(spb.ListJobsRequest(realm_id="fresh"), timeout=10).jobs
        assert [j.priority for j in jobs] == [5]
    finally:
        stop()
