"""The regression that started it all (DESIGN.md section 3): realms created
while workers wait with free credits get exactly one from-scratch job each, at
the creation's priority, and the worker's file requests for the job it holds
never wait on the realm's index. With PostgreSQL, the same holds across two
server instances sharing one store."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.config import Settings
from tests.api.conftest import BASE, LiveServer, start_live_server
from tests.api.helpers import (
    CompletingWorker,
    collect_assignments,
    create_realm,
    get_job,
    open_stream,
    poll,
    realm_jobs,
    stored_jobs,
)

REALMS = 40
USER = 10


@pytest.fixture
def server_settings(store_url: str) -> Settings:
    """`live` with leases no test here outlives: none expires unless a test makes it."""
    return replace(BASE, store_url=store_url, lease_seconds=60)


def _create_concurrently(live: LiveServer, realm_ids: list[str]) -> list[spb.CreateRealmResponse]:
    with ThreadPoolExecutor(max_workers=10) as pool:
        return list(pool.map(lambda r: create_realm(live.stub, r, priority=USER), realm_ids))


def _all_succeeded(live: LiveServer, jobs: list[str]) -> Callable[[], bool]:
    return lambda: all(get_job(live.stub, j).state == pb.Job.STATE_SUCCEEDED for j in jobs)


def _assert_one_first_index_each(
    live: LiveServer, created: list[spb.CreateRealmResponse], priority: int
) -> None:
    for response in created:
        realm_id = response.realm.realm_id
        listed = realm_jobs(live.stub, realm_id)
        assert [(j.job_id, j.kind, j.priority) for j in listed] == [
            (response.job.job_id, pb.JOB_KIND_FROM_SCRATCH_INDEX, priority)
        ], realm_id
        rows = stored_jobs(live.srv.db, realm_id)
        assert [(str(r.job_id), r.kind, r.priority) for r in rows] == [
            (response.job.job_id, "from-scratch", priority)
        ], realm_id


def test_creates_racing_waiting_workers_enqueue_one_job_each(live: LiveServer) -> None:
    workers = [
        CompletingWorker(open_stream(live.stub, f"w{i}", credits=3), live.stub).start()
        for i in range(4)
    ]
    try:
        created = _create_concurrently(live, [f"realm-{i:02d}" for i in range(REALMS)])
        jobs = [r.job.job_id for r in created]
        assert len(set(jobs)) == REALMS
        assert {r.job.priority for r in created} == {USER}
        poll(_all_succeeded(live, jobs), what="every first index to succeed")
    finally:
        for w in workers:
            w.finish()

    _assert_one_first_index_each(live, created, USER)
    assigned = Counter(a.job.job_id for w in workers for a in w.assigned)
    assert assigned == Counter(jobs), "each job is assigned exactly once"
    assert sorted(j for w in workers for j in w.completed) == sorted(jobs)
    assert not [ack for w in workers for ack in w.refused]
    for response in created:
        realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id=response.realm.realm_id)).realm
        assert realm.state == pb.Realm.STATE_READY
        assert realm.stats.entries == 2  # realm.json and index.json


def test_worker_reads_files_of_a_held_job_at_once(live: LiveServer) -> None:
    """The reference system deadlocked here: the realm's file requests waited
    on the realm's pending index, which was the very job the worker held."""
    stream = open_stream(live.stub, "w", credits=1)
    created = create_realm(
        live.stub, "held", initial_files=[pb.FileContent(path="cards/a.json", content=b"{}")]
    )
    (a,) = stream.assignments(1)
    assert a.job.job_id == created.job.job_id
    assert get_job(live.stub, a.job.job_id).state == pb.Job.STATE_RUNNING
    files = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="held"), timeout=5).files
    assert [f.path for f in files] == ["cards/a.json", "index.json", "realm.json"]
    read = live.stub.ReadRealmFile(
        spb.ReadRealmFileRequest(realm_id="held", path="cards/a.json"), timeout=5
    )
    assert read.content == b"{}" and read.file.sha256 == files[0].sha256
    stream.close()


@pytest.fixture
def two_servers(pg_url: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two instances over one PostgreSQL schema."""
    a, stop_a = start_live_server(replace(BASE, store_url=pg_url, lease_seconds=60))
    b, stop_b = start_live_server(replace(BASE, store_url=pg_url, lease_seconds=60))
    try:
        yield a, b
    finally:
        stop_b()
        stop_a()


def test_two_servers_worker_on_a_files_from_b(two_servers: tuple[LiveServer, LiveServer]) -> None:
    a, b = two_servers
    workers = [
        CompletingWorker(open_stream(a.stub, f"w{i}", credits=3), file_stub=b.stub).start()
        for i in range(4)
    ]
    ids = [f"realm-{i:02d}" for i in range(REALMS)]
    try:
        created = _create_concurrently(a, ids)
        jobs = [r.job.job_id for r in created]
        poll(_all_succeeded(a, jobs), what="every first index to succeed")
    finally:
        for w in workers:
            w.finish()
    # B served the worker's file requests by lazily mounting each realm...
    assert all(r in b.srv.realms.registry for r in ids)
    # ...and that mount enqueued nothing: one job per realm, at the creation's priority.
    _assert_one_first_index_each(a, created, USER)
    _assert_one_first_index_each(b, created, USER)
    assert Counter(x.job.job_id for w in workers for x in w.assigned) == Counter(jobs)


def test_two_servers_notify_wakes_the_other_and_never_double_assigns(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    a, b = two_servers
    # B's dispatcher must learn of A's work through NOTIFY: its polling
    # fallback is pushed far beyond the time this test waits.
    b.srv.dispatcher.poll_seconds = 3600
    on_b = open_stream(b.stub, "wb", credits=1)
    first = create_realm(a.stub, "notified", priority=USER)
    (got,) = on_b.assignments(1, timeout=10)
    assert got.job.job_id == first.job.job_id
    assert on_b.complete(got.lease_id).accepted

    a.srv.dispatcher.poll_seconds = 3600
    streams = [
        open_stream(s.stub, f"w{i}-{n}", credits=4)
        for n, s in (("a", a), ("b", b))
        for i in range(2)
    ]
    streams.append(on_b)
    on_b.credit(4)
    created = _create_concurrently(a, [f"race-{i:02d}" for i in range(20)])
    got_by_stream = collect_assignments(streams, len(created), timeout=15)
    assigned = Counter(x.job.job_id for xs in got_by_stream.values() for x in xs)
    assert assigned == Counter(r.job.job_id for r in created)
    # Streams on B took some of A's work without A's in-process signal.
    assert any(got_by_stream[s] for s in (streams[2], streams[3], on_b))
    for s, xs in got_by_stream.items():
        for x in xs:
            assert s.complete(x.lease_id).accepted
        s.close()
    for r in created:
        assert get_job(a.stub, r.job.job_id).state == pb.Job.STATE_SUCCEEDED
    assert Counter(j.realm_id for j in stored_jobs(a.srv.db)) == Counter(
        ["notified"] + [r.realm.realm_id for r in created]
    )


def test_two_servers_racing_one_create_make_one_realm_and_one_job(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    a, b = two_servers
    servers = [a, b] * 4

    def create(args: tuple[int, str, str]) -> tuple[str, str]:
        i, realm_id, request_id = args
        try:
            reply = create_realm(servers[i].stub, realm_id, request_id=request_id)
        except grpc.RpcError as e:
            return e.code().name, ""
        return "OK", reply.job.job_id

    with ThreadPoolExecutor(max_workers=8) as pool:
        retried = list(pool.map(create, [(i, "retried", "one-key") for i in range(8)]))
        raced = list(pool.map(create, [(i, "raced", "") for i in range(8)]))
    # Retries with one request id all get the first result...
    assert {code for code, _ in retried} == {"OK"}
    assert len({job for _, job in retried}) == 1
    # ...and without one, a single create wins.
    assert sorted(code for code, _ in raced) == ["ALREADY_EXISTS"] * 7 + ["OK"]
    (won,) = [job for code, job in raced if code == "OK"]
    assert sorted((str(j.job_id), j.realm_id, j.priority) for j in stored_jobs(a.srv.db)) == sorted(
        [(retried[0][1], "retried", USER), (won, "raced", USER)]
    )
