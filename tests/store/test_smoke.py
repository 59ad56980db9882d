"""A first pass through the store: create, enqueue, claim, upload, complete, search."""

from __future__ import annotations

from datetime import UTC, datetime

from realm_service.domain import Disposition, IndexEntry, JobKind, JobState, PathChange
from realm_service.queue import JobQueue
from realm_service.store import index_sql, realms_sql
from realm_service.store.db import open_database


def test_round_trip(store_url: str) -> None:
    db = open_database(store_url)
    q = JobQueue(db)
    now = datetime.now(UTC)
    with db.transaction() as s:
        realms_sql.insert_new_realm(
            s,
            realm_id="r1",
            display_name="R1",
            priority=10,
            now=now,
            files=[("a.json", b"{}"), ("b.txt", b"hi")],
        )
        first = q.enqueue_in(s, "r1", JobKind.FROM_SCRATCH, 10)
    assert first.disposition is Disposition.INSERTED
    again = q.enqueue("r1", JobKind.FROM_SCRATCH, 20)
    assert again.disposition is Disposition.MERGED and again.job.job_id == first.job.job_id
    assert again.job.priority == 20
    inc = q.enqueue("r1", JobKind.INCREMENTAL, 5, paths=[PathChange("a.json", False)])
    assert inc.disposition is Disposition.MERGED and inc.job.kind is JobKind.FROM_SCRATCH

    leases = q.claim(10, worker="w")
    assert [lease.job.job_id for lease in leases] == [first.job.job_id]
    lease = leases[0]
    assert q.claim(10) == []  # the realm has a running job
    attached = q.enqueue("r1", JobKind.FROM_SCRATCH, 10)
    assert attached.disposition is Disposition.ATTACHED
    entry = IndexEntry(
        path="a.json",
        mtime=now,
        size=2,
        sha256="x",
        media_type="application/vnd.card+json",
        card_type="m/Person",
        title="Ann",
        search_text="ann smith",
    )
    q.add_entries(lease.lease_id, [entry])
    assert q.heartbeat({lease.lease_id: (1, 2)})[lease.lease_id] is not None
    job = q.complete(lease.lease_id, entries_uploaded=1)
    assert job.state is JobState.SUCCEEDED
    assert q.heartbeat(["nope"])["nope"] is None
    with db.transaction() as s:
        realm = realms_sql.get_realm(s, "r1")
        assert (realm.cards, realm.entries, realm.files) == (1, 1, 2)
        found = index_sql.search(
            s,
            realm_id="r1",
            generation=realm.current_generation,
            card_type="m/Person",
            text="SMITH",
            after_path=None,
            limit=10,
        )
    assert [e.path for e in found] == ["a.json"]
    db.close()
