"""PostgreSQL: transactions that another instance's work makes fail (a unique
index refusing a row, a deadlock PostgreSQL resolves against one of two
transactions) are run again, and both sides' work lands.

Each test holds one side at a chosen statement (a hook on the session, in one
named thread) so the other side's statements fall in between."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import ORMExecuteState, Session
from store_helpers import make_realm

from realm_service.domain import SYSTEM, USER, Disposition, JobKind, JobState, PathChange
from realm_service.queue import JobQueue
from realm_service.realms import Realms
from realm_service.store.db import Database, open_database
from realm_service.store.tables import JobRow

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL


@pytest.fixture
def pg_queue(pg_url: str) -> Iterator[JobQueue]:
    db = open_database(pg_url)
    try:
        yield JobQueue(db)
    finally:
        db.close()


@pytest.fixture
def pause_in_thread() -> Iterator[Callable[[str, Callable[[ORMExecuteState], bool]], None]]:
    """pause(thread_name, when): statements of that thread for which `when`
    is true sleep 0.5 s before they run."""
    hooks: list[Any] = []

    def pause(name: str, when: Callable[[ORMExecuteState], bool]) -> None:
        def hook(state: ORMExecuteState) -> None:
            if threading.current_thread().name == name and when(state):
                time.sleep(0.5)

        event.listen(Session, "do_orm_execute", hook)
        hooks.append(hook)

    yield pause
    for hook in hooks:
        event.remove(Session, "do_orm_execute", hook)


def _in_thread(name: str, fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), name=name)
    thread.start()
    return thread, out


def test_a_release_retries_when_an_enqueue_queued_the_job_under_it(
    pg_queue: JobQueue, pause_in_thread: Any
) -> None:
    """The release finds no queued job to fold into, then a rerun's insert
    commits before the release sets its job queued: the unique index refuses
    it; run again, the release folds the job into the rerun."""
    queue = pg_queue
    make_realm(queue, "r")
    queue.enqueue("r", FS, SYSTEM)
    [lease] = queue.claim(1)
    # The enqueue has inserted its job and holds its commit a moment.
    pause_in_thread("enqueue", lambda st: "pg_notify" in str(st.statement))
    thread, out = _in_thread("enqueue", lambda: queue.enqueue("r", FS, USER, content_changed=True))
    time.sleep(0.2)
    released = queue.release([lease.lease_id])
    thread.join(30)
    assert out[0].disposition is Disposition.RERUN_SCHEDULED
    assert [j.state for j in released] == [JobState.QUEUED]
    rerun = out[0].job.job_id
    # The released job was folded into the rerun, which keeps the higher priority.
    assert _rows(queue.db) == [(lease.job.job_id, "merged"), (rerun, "queued")]
    assert queue.get_job(rerun).priority == USER
    assert queue.heartbeat([lease.lease_id]) == {lease.lease_id: None}  # the lease is gone


def test_a_file_write_and_a_release_that_deadlock_both_land(
    pg_url: str, pause_in_thread: Any
) -> None:
    """A file write locks the realm row, then its jobs; a release of the
    realm's running incremental job updates that job twice, and the second
    update's foreign-key check waits for the realm row: PostgreSQL may end one
    of them as a deadlock. Run again, both land: the requeued job and the
    write's follow-up are one queued job with both paths."""
    db: Database = open_database(pg_url)
    try:
        queue = JobQueue(db)
        realms = Realms(db, queue, max_file_size=1024)
        make_realm(queue, "r")
        queue.enqueue("r", INC, SYSTEM, paths=[PathChange("a.json", False)])
        [lease] = queue.claim(1)
        # The write holds the realm row; the release runs while it waits here.
        pause_in_thread(
            "write",
            lambda st: (
                st.is_select
                and st.statement._for_update_arg is not None  # type: ignore[attr-defined]
                and " realms" not in str(st.statement).split("FROM")[1][:20]
            ),
        )
        thread, out = _in_thread("write", lambda: realms.write_file("r", "b.json", b"{}", USER))
        time.sleep(0.2)
        released = queue.release([lease.lease_id])
        thread.join(30)
        assert out, "the file write did not land"
        assert [j.state for j in released] == [JobState.QUEUED]
        follow_up = out[0][1].job.job_id
        # One queued job holds both changes: the requeued one (the write merged
        # into it), or the write's (the requeued one folded into it).
        states = dict(_rows(db))
        assert states[follow_up] == "queued"
        assert sorted(states.values()) in (["queued"], ["merged", "queued"])
        assert {c.path for c in queue.get_job(follow_up).path_changes} == {"a.json", "b.json"}
    finally:
        db.close()


def _rows(db: Database) -> list[tuple[int, str]]:
    """The stored jobs as they are (ListJobs shows a folded job as its successor)."""
    with db.session_for_tests() as s:
        return [(r.id, r.state) for r in s.scalars(select(JobRow).order_by(JobRow.id))]
