"""Leases on the ClaimJobs stream (DESIGN.md section 5): a cut stream gives
its jobs back at once as interrupted attempts, and anything quoting a lease
that is no longer current is refused and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from realm_service.clock import utcnow
from realm_service.config import Settings
from realm_service.store.tables import IndexEntryRow
from tests.api.conftest import BASE, LiveServer
from tests.api.helpers import (
    attempt_outcomes,
    counted_failures,
    create_realm,
    entry_for,
    get_job,
    open_stream,
    poll,
    store_snapshot,
)
from tests.api.worker_stream import StreamClient


@pytest.fixture
def server_settings(store_url: str) -> Settings:
    """`live` with leases no test here outlives: none expires unless a test makes it."""
    return replace(BASE, store_url=store_url, lease_seconds=60)


def _files(live: LiveServer, realm_id: str) -> list[pb.RealmFile]:
    return list(
        live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id=realm_id), timeout=10).files
    )


def _refusals(stream: StreamClient, count: int) -> list[spb.LeaseAck]:
    acks: list[spb.LeaseAck] = []
    while len(acks) < count:
        acks.extend(stream.acks())
    return acks


@pytest.mark.parametrize("cut", ["cancel", "close"])
def test_stream_cut_mid_job_requeues_at_once_as_interrupted(
    live_with: Callable[..., LiveServer], cut: str
) -> None:
    # A lease of 60 s and pings a minute apart: a requeue seen within the poll
    # below is the cut's, not the reaper's nor the closing of a silent stream.
    # The poll allows for a loaded machine; unloaded, the requeue takes ms.
    live = live_with(lease_seconds=60, ping_seconds=60)
    created = create_realm(live.stub, "cut")
    job_id = created.job.job_id
    first = open_stream(live.stub, "w1", credits=1)
    (a,) = first.assignments(1)
    assert get_job(live.stub, job_id).state == pb.Job.STATE_RUNNING

    first.cancel() if cut == "cancel" else first.close()
    poll(
        lambda: get_job(live.stub, job_id).state == pb.Job.STATE_QUEUED,
        timeout=20,
        what="the job back in the queue",
    )
    assert attempt_outcomes(live.srv.db, int(job_id)) == ["interrupted"]
    assert counted_failures(live.srv.db, int(job_id)) == 0
    job = get_job(live.stub, job_id)
    assert job.attempt == 1 and job.error_message == ""

    second = open_stream(live.stub, "w2", credits=1)
    (b,) = second.assignments(1)
    assert b.job.job_id == job_id and b.lease_id != a.lease_id
    ack = second.complete(b.lease_id, [entry_for(f) for f in _files(live, "cut")])
    assert ack.accepted and ack.job_state == pb.Job.STATE_SUCCEEDED
    assert attempt_outcomes(live.srv.db, int(job_id)) == ["interrupted", "completed"]
    done = get_job(live.stub, job_id)
    assert (done.state, done.attempt) == (pb.Job.STATE_SUCCEEDED, 2)
    second.close()


def test_result_for_a_released_and_re_leased_job_is_refused(live: LiveServer) -> None:
    created = create_realm(live.stub, "again")
    stream = open_stream(live.stub, "w", credits=1)
    (old,) = stream.assignments(1)
    stream.release([old.lease_id])
    (ack,) = stream.acks()
    assert ack.accepted and ack.job_state == pb.Job.STATE_QUEUED
    assert attempt_outcomes(live.srv.db, int(created.job.job_id)) == ["interrupted"]
    assert counted_failures(live.srv.db, int(created.job.job_id)) == 0
    stream.credit(1)
    (new,) = stream.assignments(1)
    assert new.job.job_id == created.job.job_id and new.lease_id != old.lease_id

    before = store_snapshot(live.srv.db)
    realm_before = live.stub.GetRealm(spb.GetRealmRequest(realm_id="again")).realm
    files = _files(live, "again")
    stream.send_entries(old.lease_id, [entry_for(f, title="stale") for f in files])
    stream.heartbeat({old.lease_id: (1, 2)})
    stream.send_result(old.lease_id, entries_uploaded=len(files))
    refused = _refusals(stream, 3)
    assert [(r.lease_id, r.accepted) for r in refused] == [(old.lease_id, False)] * 3
    assert all(r.reason for r in refused)
    assert store_snapshot(live.srv.db) == before
    assert live.stub.GetRealm(spb.GetRealmRequest(realm_id="again")).realm == realm_before
    assert get_job(live.stub, new.job.job_id).state == pb.Job.STATE_RUNNING

    # The current lease still works.
    assert stream.complete(new.lease_id, [entry_for(f) for f in files]).accepted
    stream.close()


def test_result_after_the_lease_expired_and_moved_is_refused_by_the_store(
    live_with: Callable[..., LiveServer],
) -> None:
    """The first stream still believes it holds the lease; only the store's
    fence (the lease id must be the job's current one) stops its writes."""
    live = live_with(lease_seconds=60)
    # The queue's clock is the narrow interface time goes through: jumping it
    # two minutes ahead makes the first lease expired, while the next lease
    # (granted in the jumped time) lives for the rest of the test.
    skew = [timedelta(0)]
    live.srv.queue.clock = lambda: utcnow() + skew[0]
    created = create_realm(live.stub, "moved")
    job_id = created.job.job_id
    stale = open_stream(live.stub, "slow", credits=1)
    (old,) = stale.assignments(1)
    skew[0] = timedelta(minutes=2)
    reaped = live.call(live.srv.queue.reap_expired)
    assert [j.job_id for j in reaped] == [int(job_id)]
    assert attempt_outcomes(live.srv.db, int(job_id)) == ["expired"]
    fresh = open_stream(live.stub, "fast", credits=1)
    (new,) = fresh.assignments(1)
    assert new.job.job_id == job_id and new.lease_id != old.lease_id
    files = _files(live, "moved")

    before = store_snapshot(live.srv.db)
    realm_before = live.stub.GetRealm(spb.GetRealmRequest(realm_id="moved")).realm
    stale.send_result(old.lease_id, entries_uploaded=0)
    (ack,) = stale.acks()
    assert (ack.lease_id, ack.accepted) == (old.lease_id, False)
    assert ack.reason.endswith("is not current: it expired"), ack.reason  # says why
    stale.send_entries(old.lease_id, [entry_for(f, title="stale") for f in files])
    stale.heartbeat({old.lease_id: (5, 5)})
    assert [a.accepted for a in _refusals(stale, 2)] == [False, False]
    assert store_snapshot(live.srv.db) == before
    realm_after = live.stub.GetRealm(spb.GetRealmRequest(realm_id="moved")).realm
    assert realm_after == realm_before and realm_after.stats.entries == 0
    job = get_job(live.stub, job_id)
    assert (job.state, job.attempt) == (pb.Job.STATE_RUNNING, 2)

    ack = fresh.complete(new.lease_id, [entry_for(f) for f in files])
    assert ack.accepted and ack.job_state == pb.Job.STATE_SUCCEEDED
    found = live.stub.SearchRealm(spb.SearchRealmRequest(realm_id="moved")).entries
    assert sorted(e.path for e in found) == sorted(f.path for f in files)
    assert all(e.title != "stale" for e in found)
    assert attempt_outcomes(live.srv.db, int(job_id)) == ["expired", "completed"]
    stale.close()
    fresh.close()


def test_result_with_a_wrong_entry_count_is_refused_and_the_job_retried(
    live_with: Callable[..., LiveServer],
) -> None:
    """Entries lost on the way: the result is refused, the index is left
    alone, and the job goes back to the queue at once (a failed attempt)
    rather than sitting RUNNING under a lease no stream holds any more."""
    live = live_with(lease_seconds=60)
    created = create_realm(live.stub, "short")
    job_id = created.job.job_id
    stream = open_stream(live.stub, "w", credits=1)
    (a,) = stream.assignments(1)
    files = _files(live, "short")
    stream.send_entries(a.lease_id, [entry_for(files[0])])
    stream.send_result(a.lease_id, entries_uploaded=len(files) + 5)
    (ack,) = stream.acks()
    assert (ack.lease_id, ack.accepted) == (a.lease_id, False)
    assert "entries" in ack.reason
    poll(
        lambda: get_job(live.stub, job_id).state == pb.Job.STATE_QUEUED,
        timeout=5,
        what="the job back in the queue",
    )
    assert attempt_outcomes(live.srv.db, int(job_id)) == ["failed"]
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="short")).realm
    assert realm.state == pb.Realm.STATE_INDEXING and realm.stats.entries == 0

    stream.credit(1)
    (b,) = stream.assignments(1)
    assert b.job.job_id == job_id
    assert stream.complete(b.lease_id, [entry_for(f) for f in files]).accepted
    stream.close()


def test_bad_entries_are_refused_and_end_the_attempt(live: LiveServer) -> None:
    """Entries that fail validation are refused with the field named. They
    are not a protocol violation (the stream and its other jobs go on), but
    the attempt is over and counts: a worker that keeps sending a bad entry
    ends its job FAILED at the attempts cap instead of looping forever."""
    bad_batches = {
        "picky-path": ([pb.IndexEntry(path="../outside.json")], [], "entries[0].path"),
        "picky-deleted": ([], ["/abs"], "deleted_paths"),
        "picky-sha": ([pb.IndexEntry(path="ok.json", sha256="f" * 65)], [], "sha256"),
    }
    jobs = {realm_id: create_realm(live.stub, realm_id).job for realm_id in bad_batches}
    create_realm(live.stub, "fine")
    stream = open_stream(live.stub, "w", credits=4)
    leases = {a.job.realm_id: a.lease_id for a in stream.assignments(4)}
    for realm_id, (entries, deleted, field) in bad_batches.items():
        stream.send_entries(leases[realm_id], entries, deleted_paths=deleted)
        (refused,) = _refusals(stream, 1)
        assert (refused.lease_id, refused.accepted) == (leases[realm_id], False)
        assert field in refused.reason, refused.reason
        job_id = int(jobs[realm_id].job_id)
        assert attempt_outcomes(live.srv.db, job_id) == ["failed"]
        assert counted_failures(live.srv.db, job_id) == 1
        assert get_job(live.stub, jobs[realm_id].job_id).state == pb.Job.STATE_QUEUED
    # Nothing of the bad batches was staged, and the stream still works.
    with live.srv.db.session_for_tests() as s:
        assert s.query(IndexEntryRow).count() == 0
    ack = stream.complete(leases["fine"], [entry_for(f) for f in _files(live, "fine")])
    assert ack.accepted and ack.job_state == pb.Job.STATE_SUCCEEDED
    stream.close()


def _result_with(
    lease_id: str, entries: list[pb.IndexEntry], deleted: list[str], uploaded: int
) -> spb.ClaimJobsRequest:
    return spb.ClaimJobsRequest(
        results=spb.JobResults(
            results=[
                spb.JobResult(
                    lease_id=lease_id,
                    outcome=spb.JobResult.OUTCOME_SUCCEEDED,
                    entries_uploaded=uploaded,
                    entries=entries,
                    deleted_paths=deleted,
                )
            ]
        )
    )


def test_entries_sent_with_a_result_are_staged_with_it(live: LiveServer) -> None:
    """A job's last entries may ride on its result (the server says so in
    its settings): staged in the result's transaction, counted, fenced, and
    checked like an entries message."""
    jobs = {r: create_realm(live.stub, r).job for r in ("inline", "split", "miscount", "bad")}
    stream = open_stream(live.stub, "w", credits=4)
    leases = {a.job.realm_id: a.lease_id for a in stream.assignments(4)}
    files = {r: _files(live, r) for r in jobs}

    # All entries with the result: the realm's index is them.
    entries = [entry_for(f) for f in files["inline"]]
    stream.send(_result_with(leases["inline"], entries, [], len(entries)))
    (ack,) = stream.acks()
    assert ack.accepted and ack.job_state == pb.Job.STATE_SUCCEEDED
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="inline")).realm
    assert realm.stats.entries == len(entries)

    # Some in an entries message, the rest with the result: counted together.
    first, *rest = [entry_for(f) for f in files["split"]]
    stream.send_entries(leases["split"], [first])
    stream.send(_result_with(leases["split"], rest, [], 1 + len(rest)))
    (ack,) = stream.acks()
    assert ack.accepted
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="split")).realm
    assert realm.stats.entries == 1 + len(rest)

    # A wrong count refuses the result: nothing of it stays.
    wrong = [entry_for(f) for f in files["miscount"]]
    stream.send(_result_with(leases["miscount"], wrong, [], len(wrong) + 1))
    (ack,) = stream.acks()
    assert not ack.accepted and "entries" in ack.reason
    assert attempt_outcomes(live.srv.db, int(jobs["miscount"].job_id)) == ["failed"]
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="miscount")).realm
    assert realm.stats.entries == 0  # staged under the failed attempt, never switched in

    # A bad entry refuses the result and fails the attempt, counted.
    stream.send(_result_with(leases["bad"], [pb.IndexEntry(path="../x.json")], [], 1))
    (ack,) = _refusals(stream, 1)
    assert not ack.accepted and "results.results[0].entries[0].path" in ack.reason, ack.reason
    assert attempt_outcomes(live.srv.db, int(jobs["bad"].job_id)) == ["failed"]
    assert counted_failures(live.srv.db, int(jobs["bad"].job_id)) == 1
    with live.srv.db.session_for_tests() as s:
        staged = {row.realm_id for row in s.query(IndexEntryRow)}
    assert "bad" not in staged  # refused before anything was staged
    stream.close()


def test_too_many_entries_with_a_result_end_the_stream(live: LiveServer) -> None:
    create_realm(live.stub, "flood")
    stream = open_stream(live.stub, "w", credits=1)
    (a,) = stream.assignments(1)
    many = [pb.IndexEntry(path=f"f{i}.json") for i in range(1001)]
    stream.send(_result_with(a.lease_id, many, [], len(many)))
    ended = stream.wait_closed()
    assert ended is not None and ended.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "results.results[0].entries: more than 1000" in (ended.details() or "")


def test_deferred_releases_that_keep_failing_do_not_stop_the_reaper(
    live_with: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper first records releases an outage kept back; when that keeps
    failing, leases past their expiry are still reaped."""
    live = live_with(lease_seconds=1.0, ping_seconds=60)

    def still_failing() -> list[object]:
        raise RuntimeError("the deferred release failed again")

    monkeypatch.setattr(live.srv.queue, "release_deferred", still_failing)
    created = create_realm(live.stub, "silent")
    job_id = created.job.job_id
    stream = open_stream(live.stub, "w1", credits=1)
    stream.assignments(1)  # then silent: no heartbeat
    poll(
        lambda: get_job(live.stub, job_id).state == pb.Job.STATE_QUEUED,
        timeout=20,
        what="the expired lease reaped",
    )
    assert attempt_outcomes(live.srv.db, int(job_id)) == ["expired"]
    stream.cancel()
