"""Faults that must not stop the pair, seen from a ClaimJobs stream: a poison
entry fails its own job at the attempts cap and leaves the stream and its
other jobs alone; a store outage ends streams with UNAVAILABLE (workers
reconnect) and costs no attempts; a full disk says so and turns health
NOT_SERVING until space is back."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests import conftest as root
from tests.api.conftest import BASE, LiveServer, start_live_server
from tests.api.helpers import (
    attempt_outcomes,
    counted_failures,
    create_realm,
    entry_for,
    get_job,
    open_stream,
    poll,
)
from tests.faults.proxy import Proxy

MAX_ATTEMPTS = 3


def files_of(live: LiveServer, realm_id: str) -> list[pb.RealmFile]:
    return list(live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id=realm_id)).files)


@pytest.mark.parametrize(
    "poison",
    [
        {"title": "evil\x00title"},
        {"mtime": Timestamp(seconds=10**15)},
    ],
    ids=["nul-title", "mtime-1e15"],
)
def test_a_poison_entry_fails_its_job_at_the_cap_and_spares_the_stream(
    live_with: Callable[..., LiveServer], poison: dict[str, Any]
) -> None:
    """Before: the store's DataError ended the stream with OK, the job was
    released uncounted and handed out again, hundreds of times a minute,
    and every loop interrupted the stream's healthy jobs."""
    live = live_with(max_attempts=MAX_ATTEMPTS, reserved_slots=0)
    bad = create_realm(live.stub, "poison", priority=50).job
    good = create_realm(live.stub, "healthy", priority=10).job
    stream = open_stream(live.stub, "w", credits=2)
    leases = {a.job.realm_id: a.lease_id for a in stream.assignments(2)}
    for attempt in range(1, MAX_ATTEMPTS + 1):
        if attempt > 1:
            stream.credit(1)
            (again,) = stream.assignments(1)
            assert again.job.job_id == bad.job_id
            leases["poison"] = again.lease_id
        (f, *_) = files_of(live, "poison")
        bad_entry = entry_for(f)
        for name, value in poison.items():
            if isinstance(value, Timestamp):
                getattr(bad_entry, name).CopyFrom(value)
            else:
                setattr(bad_entry, name, value)
        stream.send_entries(leases["poison"], [bad_entry])
        (ack,) = stream.acks()
        assert not ack.accepted and ack.lease_id == leases["poison"]
        assert "entries[0]" in ack.reason, ack.reason
        job = get_job(live.stub, bad.job_id)
        expected = pb.Job.STATE_FAILED if attempt == MAX_ATTEMPTS else pb.Job.STATE_QUEUED
        assert job.state == expected, (attempt, job)
    assert attempt_outcomes(live.srv.db, int(bad.job_id)) == ["failed"] * MAX_ATTEMPTS
    assert counted_failures(live.srv.db, int(bad.job_id)) == MAX_ATTEMPTS
    # The healthy job on the same stream was never interrupted.
    ack = stream.complete(leases["healthy"], [entry_for(f) for f in files_of(live, "healthy")])
    assert ack.accepted and ack.job_state == pb.Job.STATE_SUCCEEDED
    assert attempt_outcomes(live.srv.db, int(good.job_id)) == ["completed"]
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="poison")).realm
    assert realm.state == pb.Realm.STATE_INDEX_FAILED
    stream.close()


# -- a PostgreSQL outage, through a proxy the test can cut -----------------------------


def job_state(live: LiveServer, job_id: str) -> int | None:
    """The job's state, or None while the server cannot answer."""
    try:
        return int(get_job(live.stub, job_id).state)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return None
        raise


def health_status(live: LiveServer) -> int:
    stub = health_pb2_grpc.HealthStub(live.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(reply.status)


def test_a_store_outage_ends_streams_unavailable_and_costs_no_attempt(
    pg_behind_proxy: tuple[str, Proxy],
) -> None:
    """Before: the stream ended INVALID_ARGUMENT, which workers treat as
    fatal (every worker exited), and the failed release in the handler's
    `finally` later counted as an expired attempt."""
    url, proxy = pg_behind_proxy
    live, stop = start_live_server(replace(BASE, store_url=url, lease_seconds=4.0))
    try:
        job = create_realm(live.stub, "outage").job
        stream = open_stream(live.stub, "w", credits=1)
        (a,) = stream.assignments(1)
        proxy.cut(down_seconds=6.0)
        stream.heartbeat({a.lease_id: (1, 2)})
        error = stream.wait_closed(timeout=10)
        assert error is not None
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), error
        assert error.code() != grpc.StatusCode.INVALID_ARGUMENT
        assert "store" in (error.details() or ""), error.details()
        poll(
            lambda: health_status(live) == health_pb2.HealthCheckResponse.NOT_SERVING,
            timeout=10,
            what="health NOT_SERVING during the outage",
        )
        # Once the store is back, the lease the stream held is released as an
        # interruption (it may have expired meanwhile: still not counted).
        poll(
            lambda: job_state(live, job.job_id) == pb.Job.STATE_QUEUED,
            timeout=30,
            what="the job back in the queue after the outage",
        )
        assert attempt_outcomes(live.srv.db, int(job.job_id)) == ["interrupted"]
        assert counted_failures(live.srv.db, int(job.job_id)) == 0
        poll(
            lambda: health_status(live) == health_pb2.HealthCheckResponse.SERVING,
            timeout=15,
            what="health SERVING again",
        )
        # And work goes on: a new stream gets the job and completes it.
        again = open_stream(live.stub, "w2", credits=1)
        (b,) = again.assignments(1, timeout=15)
        assert b.job.job_id == job.job_id
        ack = again.complete(b.lease_id, [entry_for(f) for f in files_of(live, "outage")])
        assert ack.accepted and ack.job_state == pb.Job.STATE_SUCCEEDED
        again.close()
    finally:
        stop()


# -- a full disk under SQLite, on a small tmpfs --------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs here: {result.stderr.strip()}"
        if root.IN_CI:
            pytest.fail(f"the full-disk test needs a tmpfs in CI; {reason}")
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> Path:
    filler = path / "filler"
    # Unbuffered, and the error suppressed around the close too: a buffered
    # file's close would flush what the failed write left and raise again.
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    return filler


def test_a_full_disk_says_so_and_turns_health_not_serving(small_disk: Path) -> None:
    """Before: UNAVAILABLE 'store unreachable' while health stayed SERVING."""
    url = f"sqlite:///{small_disk / 'realm.db'}"
    live, stop = start_live_server(replace(BASE, store_url=url))
    try:
        create_realm(live.stub, "before")
        filler = fill(small_disk)
        with pytest.raises(grpc.RpcError) as full:
            live.stub.CreateRealm(
                spb.CreateRealmRequest(
                    realm_id="after",
                    initial_files=[pb.FileContent(path="big.bin", content=bytes(60_000))],
                ),
                timeout=30,
            )
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, full.value
        assert "disk full" in (full.value.details() or "")
        poll(
            lambda: health_status(live) == health_pb2.HealthCheckResponse.NOT_SERVING,
            timeout=15,
            what="health NOT_SERVING on a full disk",
        )
        # What was stored is intact and readable meanwhile.
        realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="before"), timeout=10).realm
        assert realm.realm_id == "before"
        filler.unlink()
        poll(
            lambda: health_status(live) == health_pb2.HealthCheckResponse.SERVING,
            timeout=15,
            what="health SERVING once space is back",
        )
        assert create_realm(live.stub, "after").realm.realm_id == "after"
    finally:
        stop()
