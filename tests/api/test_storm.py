"""A reindex storm (DESIGN.md section 4, lanes): 2,000 SYSTEM jobs queued and
every ordinary slot busy with them. A USER job must not wait behind the
backlog: with a reserved slot it is assigned at once, and without one it is
the very next job when a slot frees. Order is asserted, never speed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import LiveServer
from tests.api.helpers import (
    attempt_outcomes,
    bulk_insert_realms,
    bulk_queue_from_scratch,
    collect_assignments,
    counted_failures,
    create_realm,
    entry_for,
    get_job,
    open_stream,
    poll,
    queued_count,
    realm_jobs,
    store_held,
    stored_jobs,
)
from tests.api.worker_stream import StreamClient

STORM = 2000
BULK = 120  # realms for ReindexAllRealms
SYSTEM = 0
USER = 10


def _storm(start: Callable[..., LiveServer], reserved_slots: int, **settings: Any) -> LiveServer:
    # Long leases and pings: the storm's jobs are held, never finished.
    live = start(reserved_slots=reserved_slots, lease_seconds=60, ping_seconds=30, **settings)
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


def test_without_reserved_slots_nor_preemption_the_user_job_is_next_when_a_slot_frees(
    live_with: Callable[..., LiveServer],
) -> None:
    live = _storm(live_with, reserved_slots=0, max_preemptions=0)
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


def test_a_user_jobs_slot_stays_reserved_while_its_result_is_recorded(
    live_with: Callable[..., LiveServer],
) -> None:
    """A worker grants a finished job's slot right after its result, and the
    server takes the credit while it still records the result (the claim for
    it runs meanwhile). The slot a USER job leaves is the reserved one: the
    credit brings no SYSTEM job, then or after."""
    live = _storm(live_with, reserved_slots=1)
    stream = open_stream(live.stub, "w1", credits=2)
    (system,) = stream.assignments(1)  # two slots, one reserved
    assert system.job.priority == SYSTEM
    created = create_realm(live.stub, "urgent", priority=USER)
    (user,) = stream.assignments(1)
    assert user.job.job_id == created.job.job_id
    with store_held(live.srv.db, int(user.job.job_id)):
        stream.send_result(user.lease_id)
        stream.credit(1)
        time.sleep(0.5)  # the credit is taken while the result waits
    (ack,) = stream.acks()
    assert ack.accepted and ack.job_state == pb.Job.STATE_SUCCEEDED, ack
    late = stream.poll(timeout=1.0)
    assert late is None, late
    assert queued_count(live.srv.db, priority=SYSTEM) == STORM - 1
    assert get_job(live.stub, system.job.job_id).state == pb.Job.STATE_RUNNING
    stream.close()


def _revocations(streams: list[StreamClient]) -> dict[StreamClient, list[spb.LeaseAck]]:
    """The refused acks (revocations) each stream has received so far."""
    got: dict[StreamClient, list[spb.LeaseAck]] = {}
    for s in streams:
        while (message := s.poll()) is not None:
            assert message.HasField("acks"), message
            got.setdefault(s, []).extend(a for a in message.acks.acks if not a.accepted)
    return got


def test_without_a_free_slot_a_user_job_preempts_the_system_job_with_least_progress(
    live_with: Callable[..., LiveServer],
) -> None:
    """No reserved slot and every slot busy with the storm: the user's job
    does not wait for a SYSTEM job to end. The SYSTEM job with the least
    progress is handed back (its worker told to stop, the job queued again,
    the attempt interrupted and not counted), the freed slot takes the user
    job, and the preempted job is the next SYSTEM job to run."""
    live = _storm(live_with, reserved_slots=0)
    streams = [open_stream(live.stub, "w1", credits=2), open_stream(live.stub, "w2", credits=1)]
    held = collect_assignments(streams, 3)
    assert all(a.job.priority == SYSTEM for xs in held.values() for a in xs)
    leases = {a.lease_id: (s, a) for s, xs in held.items() for a in xs}
    # Two of them report progress; the third (on w1) has done nothing yet.
    w1, w2 = streams
    (least,) = [a for a in held[w1] if a.lease_id != held[w1][0].lease_id]
    w1.heartbeat({held[w1][0].lease_id: (5, 10)})
    w2.heartbeat({held[w2][0].lease_id: (1, 10)})
    for s in streams:
        assert all(ack.accepted for ack in s.acks())

    created = create_realm(live.stub, "urgent", priority=USER)
    revoked = poll(lambda: _revocations(streams), what="a revocation")
    assert list(revoked) == [w1] and [a.lease_id for a in revoked[w1]] == [least.lease_id]
    (ack,) = revoked[w1]
    assert ack.job_state == pb.Job.STATE_QUEUED
    assert ack.reason == (
        f"lease revoked: preempted for job {created.job.job_id} (priority {USER})"
    )
    preempted = int(least.job.job_id)
    assert get_job(live.stub, least.job.job_id).state == pb.Job.STATE_QUEUED
    assert attempt_outcomes(live.srv.db, preempted) == ["interrupted"]
    assert counted_failures(live.srv.db, preempted) == 0
    # The stopped job's late result is refused by the fence.
    late = w1.complete(least.lease_id)
    assert (late.accepted, late.reason) == (False, "lease is not held by this stream")

    # Until the worker gives the slot back, ExplainJob says what is under way.
    explained = live.stub.ExplainJob(spb.ExplainJobRequest(job_id=created.job.job_id))
    assert any(
        r.code == spb.WaitReason.CODE_ALL_SLOTS_BUSY
        and "a SYSTEM job was preempted for it" in r.message
        for r in explained.reasons
    ), explained

    # The worker frees the slot: the user's job takes it.
    w1.credit(1)
    (a,) = w1.assignments(1)
    assert a.job.job_id == created.job.job_id and a.job.priority == USER
    _complete_with_files(live, w1, a)
    assert get_job(live.stub, created.job.job_id).state == pb.Job.STATE_SUCCEEDED
    # The next slot for SYSTEM work takes the preempted job first, ahead of
    # the 1,997 storm jobs queued before it was.
    w1.credit(1)
    (again,) = w1.assignments(1)
    assert again.job.job_id == least.job.job_id and again.job.attempt == 2
    assert not set(leases) & {again.lease_id}
    assert queued_count(live.srv.db, priority=SYSTEM) == STORM - 3
    for s in streams:
        s.close()


def test_a_job_is_preempted_at_most_max_preemptions_times(
    live_with: Callable[..., LiveServer],
) -> None:
    """Aging has a ceiling: a SYSTEM job handed back `max_preemptions` times
    runs to its end, and a user's job then waits for a slot to free."""
    live = _storm(live_with, reserved_slots=0, max_preemptions=1)
    stream = open_stream(live.stub, "w1", credits=1)
    (first,) = stream.assignments(1)
    assert first.job.priority == SYSTEM
    one = create_realm(live.stub, "urgent-1", priority=USER)
    acks = poll(lambda: _revocations([stream]), what="the first preemption")[stream]
    assert [a.lease_id for a in acks] == [first.lease_id]
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == one.job.job_id
    _complete_with_files(live, stream, a)
    stream.credit(1)
    (again,) = stream.assignments(1)
    assert again.job.job_id == first.job.job_id and again.job.attempt == 2

    two = create_realm(live.stub, "urgent-2", priority=USER)
    # Preempted once already: it keeps its slot; the user's job waits.
    assert stream.poll(timeout=1.5) is None
    assert get_job(live.stub, two.job.job_id).state == pb.Job.STATE_QUEUED
    assert stream.complete(again.lease_id).accepted
    stream.credit(1)
    (b,) = stream.assignments(1)
    assert b.job.job_id == two.job.job_id
    assert attempt_outcomes(live.srv.db, int(first.job.job_id)) == ["interrupted", "completed"]
    stream.close()


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
