"""What the store refuses and how it says so: values it cannot hold, a full
disk, durable commits by default, and request ids that expire."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, text
from store_helpers import FakeClock, entry, make_realm

from realm_service.domain import USER, JobKind
from realm_service.errors import InvalidArgument, RealmAlreadyExists, StoreFull
from realm_service.queue import JobQueue
from realm_service.realms import Realms
from realm_service.store.db import Database, open_database
from realm_service.store.tables import IdempotencyKeyRow, IndexEntryRow


def staged_rows(db: Database) -> int:
    with db.session_for_tests() as s:
        return s.query(IndexEntryRow).count()


@pytest.mark.parametrize(
    "bad",
    [
        {"size": 2**70},  # beyond a 64-bit integer on both stores
        {"title": "evil\x00title"},  # PostgreSQL text cannot hold NUL
    ],
    ids=["huge-size", "nul-title"],
)
def test_values_the_store_cannot_hold_are_invalid_arguments(
    queue: JobQueue, bad: dict[str, Any]
) -> None:
    """Before, such a value escaped as a raw DataError (a poison entry that
    looped forever); now it is the request's fault, with nothing written."""
    make_realm(queue, "r")
    queue.enqueue("r", JobKind.FROM_SCRATCH, USER)
    [lease] = queue.claim(1)
    poison = dataclasses.replace(entry("cards/a.json"), **bad)
    if queue.db.backend == "sqlite" and "title" in bad:
        queue.add_entries(lease.lease_id, [poison])  # SQLite stores NUL as it is
        return
    with pytest.raises(InvalidArgument, match="the store refused a value"):
        queue.add_entries(lease.lease_id, [entry("cards/b.json"), poison])
    assert staged_rows(queue.db) == 0


def test_a_full_sqlite_store_says_disk_full(sqlite_url: str) -> None:
    db = open_database(sqlite_url)
    try:
        # SQLite's own limit on the file's pages gives the same SQLITE_FULL
        # as a full disk, without needing a small file system.
        @event.listens_for(db.engine, "connect")
        def _cap(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA max_page_count = 64")
            cur.close()

        db.engine.dispose()
        queue = JobQueue(db)
        realms = Realms(db, queue, max_file_size=1024 * 1024)
        realms.create(realm_id="fits", priority=None, display_name="", request_id="", files=[])
        with pytest.raises(StoreFull, match="disk full"):
            realms.create(
                realm_id="too-big",
                priority=None,
                display_name="",
                request_id="",
                files=[("big.bin", bytes(512 * 1024))],
            )
        # What was stored before is intact and still readable.
        assert realms.get("fits").realm_id == "fits"
    finally:
        db.close()


def test_sqlite_commits_are_durable_by_default(sqlite_url: str) -> None:
    for wanted, code in (("default", 2), ("NORMAL", 1)):
        db = open_database(sqlite_url, **({} if wanted == "default" else {"synchronous": wanted}))
        try:
            with db.engine.connect() as conn:
                assert conn.execute(text("PRAGMA synchronous")).scalar_one() == code, wanted
        finally:
            db.close()
    with pytest.raises(ValueError, match="FULL or NORMAL"):
        Database(sqlite_url, synchronous="OFF")


def test_request_ids_are_forgotten_after_their_retention(db: Database, clock: FakeClock) -> None:
    queue = JobQueue(db, clock=clock)
    realms = Realms(db, queue, max_file_size=1024, clock=clock)

    def create(realm_id: str, request_id: str) -> int:
        result = realms.create(
            realm_id=realm_id, priority=None, display_name="", request_id=request_id, files=[]
        )
        return result.job.job_id

    old_job = create("old", "req-old")
    clock.advance(timedelta(hours=23))
    new_job = create("new", "req-new")
    clock.advance(timedelta(hours=2))
    # Within retention a retry answers with the first result.
    assert create("new", "req-new") == new_job
    assert realms.sweep_request_ids(timedelta(hours=24), batch=1) == 1
    with db.session_for_tests() as s:
        assert [k.key for k in s.query(IdempotencyKeyRow)] == ["req-new"]
    # Past retention the id is a new request: the realm exists, so it is refused.
    with pytest.raises(RealmAlreadyExists):
        create("old", "req-old")
    assert old_job > 0
