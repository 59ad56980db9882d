"""Idempotent creation and coalescing (DESIGN.md sections 3 and 4), as a
client sees them: the disposition of each request and the jobs it leaves."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.config import Settings
from tests.api.conftest import BASE, LiveServer
from tests.api.helpers import (
    create_realm,
    get_job,
    open_stream,
    realm_jobs,
    rpc_error,
    store_snapshot,
)

INSERTED = pb.DISPOSITION_INSERTED
MERGED = pb.DISPOSITION_MERGED
ATTACHED = pb.DISPOSITION_ATTACHED
RERUN = pb.DISPOSITION_RERUN_SCHEDULED
FROM_SCRATCH = pb.JOB_KIND_FROM_SCRATCH_INDEX
INCREMENTAL = pb.JOB_KIND_INCREMENTAL_INDEX


@pytest.fixture
def server_settings(store_url: str) -> Settings:
    """`live` with leases no test here outlives: none expires unless a test makes it."""
    return replace(BASE, store_url=store_url, lease_seconds=60)


def changes(job: pb.Job) -> list[tuple[str, bool]]:
    return [(c.path, c.deleted) for c in job.path_changes]


def test_create_retried_with_its_request_id_returns_the_first_result(live: LiveServer) -> None:
    files = [pb.FileContent(path="a.txt", content=b"a")]
    first = create_realm(live.stub, "idem", request_id="req-1", priority=30, initial_files=files)
    before = store_snapshot(live.srv.db)
    again = create_realm(live.stub, "idem", request_id="req-1", priority=30, initial_files=files)
    assert again.job.job_id == first.job.job_id and again.job.priority == 30
    assert again.realm.realm_id == "idem" and again.realm.create_time == first.realm.create_time
    assert store_snapshot(live.srv.db) == before

    for request_id in ("", "req-2"):

        def again_with(r: str = request_id) -> None:
            create_realm(live.stub, "idem", request_id=r)

        error = rpc_error(again_with)
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "idem" in (error.details() or "")
    assert store_snapshot(live.srv.db) == before


def test_concurrent_retries_with_one_request_id_create_one_realm(live: LiveServer) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(
            pool.map(lambda _: create_realm(live.stub, "raced", request_id="same"), range(8))
        )
    assert len({r.job.job_id for r in replies}) == 1
    assert [j.job_id for j in realm_jobs(live.stub, "raced")] == [replies[0].job.job_id]
    listed = live.stub.ListRealms(spb.ListRealmsRequest()).realms
    assert [r.realm_id for r in listed] == ["raced"]


def test_concurrent_creates_without_request_id_one_wins(live: LiveServer) -> None:
    def attempt(_: int) -> grpc.StatusCode:
        try:
            create_realm(live.stub, "contested")
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(attempt, range(8)))
    assert sorted(codes, key=str) == sorted(
        [grpc.StatusCode.OK] + [grpc.StatusCode.ALREADY_EXISTS] * 7, key=str
    )
    assert len(realm_jobs(live.stub, "contested")) == 1


def test_reindex_merges_attaches_and_schedules_one_rerun(live: LiveServer) -> None:
    first = create_realm(live.stub, "co").job
    r = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="co", priority=30))
    assert (r.disposition, r.job.job_id, r.job.priority) == (MERGED, first.job_id, 30)
    r = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="co", priority=5))
    assert (r.disposition, r.job.job_id, r.job.priority) == (MERGED, first.job_id, 30)

    stream = open_stream(live.stub, "w", credits=2)
    (a,) = stream.assignments(1)
    assert (a.job.job_id, a.job.priority) == (first.job_id, 30)
    r = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="co"))
    assert (r.disposition, r.job.job_id) == (ATTACHED, first.job_id)
    assert r.job.state == pb.Job.STATE_RUNNING

    rerun = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="co", content_changed=True))
    assert rerun.disposition == RERUN and rerun.job.job_id != first.job_id
    assert rerun.job.state == pb.Job.STATE_QUEUED
    r = live.stub.ReindexRealm(
        spb.ReindexRealmRequest(realm_id="co", content_changed=True, priority=40)
    )
    assert (r.disposition, r.job.job_id, r.job.priority) == (MERGED, rerun.job.job_id, 40)
    assert [(j.job_id, j.state) for j in realm_jobs(live.stub, "co")] == [
        (rerun.job.job_id, pb.Job.STATE_QUEUED),
        (first.job_id, pb.Job.STATE_RUNNING),
    ]

    # The stream's second credit skips the rerun (its realm is busy, however
    # high its priority) and takes another realm's job.
    other = create_realm(live.stub, "other", priority=10).job
    (b,) = stream.assignments(1)
    assert b.job.job_id == other.job_id
    assert stream.complete(a.lease_id).accepted
    stream.credit(1)
    (c,) = stream.assignments(1)
    assert (c.job.job_id, c.job.priority) == (rerun.job.job_id, 40)
    stream.close()


def test_file_writes_and_deletes_coalesce_into_incremental_jobs(live: LiveServer) -> None:
    def write(path: str, priority: int | None = None) -> spb.WriteRealmFileResponse:
        request = spb.WriteRealmFileRequest(realm_id="inc", path=path, content=path.encode())
        if priority is not None:
            request.priority = priority
        return live.stub.WriteRealmFile(request)

    def delete(path: str) -> spb.DeleteRealmFileResponse:
        return live.stub.DeleteRealmFile(spb.DeleteRealmFileRequest(realm_id="inc", path=path))

    first = create_realm(
        live.stub,
        "inc",
        initial_files=[pb.FileContent(path=p, content=b"0") for p in ("a.txt", "b.txt")],
    ).job
    # The first index has not started: it will see the change anyway.
    w = write("c.txt")
    assert (w.disposition, w.job.job_id, w.job.kind) == (MERGED, first.job_id, FROM_SCRATCH)
    assert w.file.path == "c.txt" and w.file.size == 5

    stream = open_stream(live.stub, "w", credits=1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == first.job_id
    # It runs now: changes go to an incremental job, kinds never merge.
    w = write("a.txt")
    assert (w.disposition, w.job.kind) == (INSERTED, INCREMENTAL)
    incremental = w.job.job_id
    assert changes(w.job) == [("a.txt", False)]
    w = write("b.txt", priority=20)
    assert (w.disposition, w.job.job_id, w.job.priority) == (MERGED, incremental, 20)
    assert changes(w.job) == [("a.txt", False), ("b.txt", False)]
    d = delete("a.txt")
    assert (d.disposition, d.job.job_id) == (MERGED, incremental)
    assert changes(d.job) == [("a.txt", True), ("b.txt", False)]  # the delete wins

    assert stream.complete(a.lease_id).accepted
    stream.credit(1)
    (b,) = stream.assignments(1)
    assert b.job.job_id == incremental and b.job.kind == INCREMENTAL
    assert changes(b.job) == [("a.txt", True), ("b.txt", False)]
    # While it runs, a change it does not cover is queued after it.
    d = delete("b.txt")
    assert d.disposition == RERUN and d.job.job_id != incremental
    assert changes(d.job) == [("b.txt", True)]
    d2 = delete("c.txt")
    assert (d2.disposition, d2.job.job_id) == (MERGED, d.job.job_id)
    assert changes(d2.job) == [("b.txt", True), ("c.txt", True)]
    # A from-scratch request next to a running incremental job: a new job.
    r = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="inc"))
    assert r.disposition == INSERTED and r.job.kind == FROM_SCRATCH
    assert r.job.job_id not in (incremental, d.job.job_id, first.job_id)
    assert get_job(live.stub, incremental).state == pb.Job.STATE_RUNNING
    assert stream.complete(b.lease_id).accepted
    files = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="inc")).files
    assert [f.path for f in files] == ["index.json", "realm.json"]
    stream.close()
