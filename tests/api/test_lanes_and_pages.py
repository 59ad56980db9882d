"""Dedicated lanes (a stream's minimum priority) and pagination of every
listing: each page walk sees every item exactly once, in the listing's order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.config import Settings
from tests.api.conftest import BASE, LiveServer
from tests.api.helpers import (
    collect_assignments,
    create_realm,
    get_job,
    open_stream,
    stored_jobs,
)
from tests.api.worker_stream import StreamClient


@pytest.fixture
def server_settings(store_url: str) -> Settings:
    """`live` with leases no test here outlives: none expires unless a test makes it."""
    return replace(BASE, store_url=store_url, lease_seconds=60)


def test_a_lane_stream_never_receives_jobs_below_its_minimum(live: LiveServer) -> None:
    low = [create_realm(live.stub, f"low-{i}", priority=0).job.job_id for i in range(3)]
    mid = create_realm(live.stub, "mid", priority=10).job.job_id
    high = create_realm(live.stub, "high", priority=50).job.job_id

    lane = open_stream(live.stub, "lane", credits=5, min_priority=10)
    got = lane.assignments(2)
    # Highest priority first, in one claim.
    assert [(a.job.job_id, a.job.priority) for a in got] == [(high, 50), (mid, 10)]

    # The lane still has three credits, and there are three priority-0 jobs:
    # only a shared stream takes them (four credits, one slot kept in reserve).
    shared = open_stream(live.stub, "shared", credits=4)
    taken = collect_assignments([lane, shared], 3)
    assert taken[lane] == []
    assert sorted(a.job.job_id for a in taken[shared]) == sorted(low)
    assert lane.poll() is None

    # A new job at the lane's floor goes to the lane, which dedicated lanes
    # pick first, even though the shared stream has a free credit too.
    edge = create_realm(live.stub, "edge", priority=10).job.job_id
    (a,) = lane.assignments(1)
    assert a.job.job_id == edge
    for s in (lane, shared):
        s.close()


def test_a_stream_receives_only_the_kinds_it_runs(live: LiveServer) -> None:
    """A worker that runs only incremental jobs never gets a from-scratch one,
    however urgent; the first index waits for a worker that runs it."""
    indexed = create_realm(live.stub, "kinds").job.job_id
    general = open_stream(live.stub, "general", credits=1)
    (a,) = general.assignments(1)
    assert a.job.job_id == indexed and general.complete(a.lease_id).accepted

    hello = spb.WorkerHello(
        worker_id="inc-only", incarnation_id="i", kinds=[pb.JOB_KIND_INCREMENTAL_INDEX]
    )
    picky = StreamClient(live.stub, hello=hello, answer_pings=True)
    picky.settings()
    picky.credit(2)
    urgent = create_realm(live.stub, "urgent-scratch", priority=90).job.job_id
    write = live.stub.WriteRealmFile(
        spb.WriteRealmFileRequest(realm_id="kinds", path="n.txt", content=b"n", priority=5)
    )
    assert write.job.kind == pb.JOB_KIND_INCREMENTAL_INDEX
    (b,) = picky.assignments(1)
    assert b.job.job_id == write.job.job_id
    assert get_job(live.stub, urgent).state == pb.Job.STATE_QUEUED
    general.credit(1)
    (c,) = general.assignments(1)
    assert c.job.job_id == urgent
    assert picky.poll() is None
    for s in (general, picky):
        s.close()


def walk(fetch: Callable[[str], Any], items: Callable[[Any], list[Any]]) -> list[list[Any]]:
    """Every page of a listing, following next_page_token; bounded."""
    pages: list[list[Any]] = []
    token = ""
    for _ in range(1000):
        reply = fetch(token)
        pages.append(items(reply))
        token = reply.next_page_token
        if not token:
            return pages
    raise AssertionError("the listing never ended")


def test_list_realms_pages_walk_every_realm_once(live: LiveServer) -> None:
    ids = sorted(f"page-{i:02d}" for i in range(23))
    for realm_id in reversed(ids):
        create_realm(live.stub, realm_id)
    pages = walk(
        lambda t: live.stub.ListRealms(spb.ListRealmsRequest(page_size=5, page_token=t)),
        lambda r: [x.realm_id for x in r.realms],
    )
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [x for p in pages for x in p] == ids
    # An exact multiple: no empty last page behind a token.
    pages = walk(
        lambda t: live.stub.ListRealms(spb.ListRealmsRequest(page_size=23, page_token=t)),
        lambda r: [x.realm_id for x in r.realms],
    )
    assert pages == [ids]
    default = live.stub.ListRealms(spb.ListRealmsRequest())
    assert [r.realm_id for r in default.realms] == ids and not default.next_page_token


def test_list_jobs_pages_walk_every_job_once_newest_first(live: LiveServer) -> None:
    for i in range(9):
        create_realm(live.stub, f"jobs-{i}")
    for i in range(4):
        live.stub.WriteRealmFile(
            spb.WriteRealmFileRequest(realm_id=f"jobs-{i}", path="x.txt", content=b"x")
        )
    live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="jobs-8", content_changed=True))
    expected = sorted((str(j.job_id) for j in stored_jobs(live.srv.db)), key=int, reverse=True)
    assert len(expected) == 9  # writes and the reindex merged into the queued first indexes

    stream = open_stream(live.stub, "w", credits=3)
    indexed = []
    for a in stream.assignments(3):
        assert stream.complete(a.lease_id).accepted
        indexed.append(a.job.realm_id)
    for realm_id in indexed:  # first index done: these writes make incremental jobs
        live.stub.WriteRealmFile(
            spb.WriteRealmFileRequest(realm_id=realm_id, path="y.txt", content=b"y")
        )
    expected = sorted((str(j.job_id) for j in stored_jobs(live.srv.db)), key=int, reverse=True)
    assert len(expected) == 12

    pages = walk(
        lambda t: live.stub.ListJobs(spb.ListJobsRequest(page_size=5, page_token=t)),
        lambda r: [x.job_id for x in r.jobs],
    )
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [x for p in pages for x in p] == expected

    def filtered(**kw: Any) -> list[str]:
        pages = walk(
            lambda t: live.stub.ListJobs(spb.ListJobsRequest(page_size=2, page_token=t, **kw)),
            lambda r: [(x.job_id, x.realm_id, x.kind, x.state) for x in r.jobs],
        )
        rows = [x for p in pages for x in p]
        assert len(rows) == len(set(rows))
        return [row[0] for row in rows]

    incremental = filtered(kind=pb.JOB_KIND_INCREMENTAL_INDEX)
    assert len(incremental) == 3 and incremental == sorted(incremental, key=int, reverse=True)
    succeeded = filtered(state=pb.Job.STATE_SUCCEEDED)
    assert len(succeeded) == 3
    assert len(filtered(realm_id=indexed[0])) == 2
    assert len(filtered(state=pb.Job.STATE_QUEUED)) == 9
    stream.close()


def test_search_pages_walk_every_entry_once(live: LiveServer) -> None:
    paths = [f"cards/c{i:02d}.json" for i in range(17)]
    created = create_realm(
        live.stub, "searched", initial_files=[pb.FileContent(path=p, content=b"{}") for p in paths]
    )
    stream = open_stream(live.stub, "w", credits=1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == created.job.job_id
    files = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="searched")).files
    entries = [
        pb.IndexEntry(
            path=f.path,
            mtime=f.mtime,
            size=f.size,
            sha256=f.sha256,
            media_type="application/vnd.card+json",
            card_type="m/Even" if i % 2 == 0 else "m/Odd",
            title=f"Card {i}",
            search_text="needle" if i % 3 == 0 else "hay",
        )
        for i, f in enumerate(files)
    ]
    assert stream.complete(a.lease_id, entries).accepted
    all_paths = sorted(f.path for f in files)
    assert len(all_paths) == 19

    def search(**kw: Any) -> list[str]:
        pages = walk(
            lambda t: live.stub.SearchRealm(
                spb.SearchRealmRequest(realm_id="searched", page_size=4, page_token=t, **kw)
            ),
            lambda r: [e.path for e in r.entries],
        )
        assert all(0 < len(p) <= 4 for p in pages) or pages == [[]]
        return [x for p in pages for x in p]

    assert search() == all_paths
    evens = [e.path for e in entries if e.card_type == "m/Even"]
    assert search(card_type="m/Even") == sorted(evens)
    needles = [e.path for e in entries if e.search_text == "needle"]
    assert search(text="NEEDLE") == sorted(needles)
    assert search(text="card 1") == sorted(e.path for e in entries if e.title.startswith("Card 1"))
    assert search(card_type="m/None") == []
    stream.close()
