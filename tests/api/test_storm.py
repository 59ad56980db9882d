"""A reindex storm (DESIGN.md section 4, lanes): 2,000 SYSTEM jobs queued and
every ordinary slot busy with them. A USER job must not wait behind the
backlog: with a reserved slot it is assigned at once, and without one it is
the very next job when a slot frees. Order is asserted, never speed."""

from __future__ import annotations

from collections.abc import Callable

from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import LiveServer
from tests.api.helpers import (
    bulk_insert_realms,
    bulk_queue_from_scratch,
    collect_assignments,
    create_realm,
    entry_for,
    get_job,
    open_stream,
    poll,
    queued_count,
    realm_jobs,
    stored_jobs,
)
from tests.api.worker_stream import StreamClient

STORM = 2000
BULK = 120  # realms for ReindexAllRealms
SYSTEM = 0
USER = 10


def _storm(start: Callable[..., LiveServer], reserved_slots: int) -> LiveServer:
    # Long leases and pings: the storm's jobs are held, never finished.
    live = start(reserved_slots=reserved_slots, lease_seconds=60, ping_seconds=30)
    realms = [f"storm-{i:04d}" for i in range(STORM)]
    bulk_insert_realms(live.srv.db, realms)
    bulk_queue_from_scratch(live.srv.db, realms, priority=SYSTEM)
    assert queued_count(live.srv.db, priority=SYSTEM) == STORM
    return live


def _complete_with_files(live: LiveServer, stream: StreamClient, a: spb.JobAssignment) -> None:
    files = live.stub.ListRealmFiles(
        spb.ListRealmFilesRequest(realm_id=a.job.realm_id), timeout=10
    ).files
    ack = stream.complete(a.lease_id, [entry_for(f) for f in files])
    assert ack.accepted and ack.job_state == pb.Job.STATE_SUCCEEDED, ack


def test_user_job_takes_the_reserved_slot_during_a_storm(
    live_with: Callable[..., LiveServer],
) -> None:
    live = _storm(live_with, reserved_slots=1)
    streams = [open_stream(live.stub, "w1", credits=2), open_stream(live.stub, "w2", credits=2)]
    # Four slots, one reserved: the storm fills three of them.
    held = collect_assignments(streams, 3)
    assert all(a.job.priority == SYSTEM for xs in held.values() for a in xs)
    poll(lambda: queued_count(live.srv.db) == STORM - 3, what="three storm jobs running")

    created = create_realm(live.stub, "urgent", priority=USER)
    # The next job any stream receives is the user's, not the oldest storm job.
    got = collect_assignments(streams, 1)
    ((stream, (a,)),) = [(s, xs) for s, xs in got.items() if xs]
    assert a.job.job_id == created.job.job_id and a.job.priority == USER
    _complete_with_files(live, stream, a)

    assert get_job(live.stub, created.job.job_id).state == pb.Job.STATE_SUCCEEDED
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="urgent")).realm
    assert realm.state == pb.Realm.STATE_READY
    # The backlog has not moved: the user job finished before it drained.
    assert queued_count(live.srv.db, priority=SYSTEM) == STORM - 3
    for xs in held.values():
        for h in xs:
            assert get_job(live.stub, h.job.job_id).state == pb.Job.STATE_RUNNING
    for s in streams:
        s.close()


def test_without_reserved_slots_the_user_job_is_next_when_a_slot_frees(
    live_with: Callable[..., LiveServer],
) -> None:
    live = _storm(live_with, reserved_slots=0)
    streams = [open_stream(live.stub, "w1", credits=2), open_stream(live.stub, "w2", credits=1)]
    held = collect_assignments(streams, 3)
    assert all(a.job.priority == SYSTEM for xs in held.values() for a in xs)

    created = create_realm(live.stub, "urgent", priority=USER)
    # No slot is free: the job waits, queued.
    assert get_job(live.stub, created.job.job_id).state == pb.Job.STATE_QUEUED
    assert all(s.poll() is None for s in streams)

    # A storm job finishes and its worker asks for one more job.
    stream = next(s for s, xs in held.items() if xs)
    done = held[stream][0]
    assert stream.complete(done.lease_id).accepted
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == created.job.job_id and a.job.priority == USER
    _complete_with_files(live, stream, a)
    assert get_job(live.stub, created.job.job_id).state == pb.Job.STATE_SUCCEEDED
    # One storm job done, two held, the rest still queued behind the user's.
    assert queued_count(live.srv.db, priority=SYSTEM) == STORM - 3
    for s in streams:
        s.close()


def test_reindex_all_realms_queues_one_system_job_per_realm(live: LiveServer) -> None:
    """The storm's own entry point: one SYSTEM job per realm, coalescing with
    what each realm already has queued or running."""
    bulk_insert_realms(live.srv.db, [f"bulk-{i:03d}" for i in range(BULK)])
    queued = create_realm(live.stub, "has-queued", priority=USER).job
    running = create_realm(live.stub, "has-running", priority=USER).job
    stream = open_stream(live.stub, "w")
    # Leave "has-queued" queued: the stream takes only the newer realm's job.
    live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="has-running", priority=90))
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == running.job_id

    reply = live.stub.ReindexAllRealms(spb.ReindexAllRealmsRequest(), timeout=120)
    assert (reply.jobs_enqueued, reply.realms) == (BULK, BULK + 2)
    jobs = stored_jobs(live.srv.db)
    assert len(jobs) == len({j.realm_id for j in jobs}) == BULK + 2
    assert {j.priority for j in jobs if j.realm_id.startswith("bulk-")} == {SYSTEM}
    # Merged into the queued job (priority kept at the max), attached to the running one.
    assert [(j.job_id, j.priority) for j in realm_jobs(live.stub, "has-queued")] == [
        (queued.job_id, USER)
    ]
    assert [j.job_id for j in realm_jobs(live.stub, "has-running")] == [running.job_id]

    again = live.stub.ReindexAllRealms(spb.ReindexAllRealmsRequest(priority=5), timeout=120)
    assert (again.jobs_enqueued, again.realms) == (0, BULK + 2)
    assert len(stored_jobs(live.srv.db)) == BULK + 2
    assert {j.priority for j in stored_jobs(live.srv.db) if j.realm_id.startswith("bulk-")} == {5}
    stream.close()
