"""Boot mounts act only on realms whose first index is missing or queued
below their creation's priority, and never add a second from-scratch job."""

from __future__ import annotations

from datetime import UTC, datetime

from realm_service.domain import JobKind, JobState
from realm_service.queue import JobQueue
from realm_service.realms import Realms
from realm_service.store import enqueue_sql, realms_sql
from realm_service.store.db import open_database


def test_boot_mount_fills_missing_first_index_and_raises_low_priority(store_url: str) -> None:
    db = open_database(store_url)
    queue = JobQueue(db)
    realms = Realms(db, queue, max_file_size=1024)
    now = datetime.now(UTC)
    with db.transaction() as s:
        for rid in ("has-job", "no-job", "low-job"):
            realms_sql.insert_new_realm(s, realm_id=rid, display_name=rid, priority=10, now=now)
        queue.enqueue_in(s, "has-job", JobKind.FROM_SCRATCH, 10)
        queue.enqueue_in(s, "low-job", JobKind.FROM_SCRATCH, 0)
    with db.transaction() as s:
        ids = realms_sql.realm_ids_page(s, after=None, limit=10, unindexed_only=True)
    assert ids == ["low-job", "no-job"]

    assert realms.boot_mount() == 2
    jobs = {j.realm_id: j for j in queue.list_jobs(limit=10)}
    assert len(queue.list_jobs(limit=10)) == 3
    assert jobs["no-job"].priority == 10 and jobs["no-job"].state is JobState.QUEUED
    assert jobs["low-job"].priority == 10  # raised, never lowered
    assert realms.boot_mount() == 0  # a second boot finds nothing to do
    with db.transaction() as s:
        assert not enqueue_sql.has_from_scratch(s, "missing", (JobState.QUEUED,))
    db.close()
