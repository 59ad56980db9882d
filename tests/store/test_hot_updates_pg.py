"""PostgreSQL: the pages of job attempts and realms leave room for their
updates (migration 0009), so that ending a batch of attempts and switching
their realms' generations writes the new row versions beside the old ones
and touches none of the tables' indexes (HOT updates): the rows keep their
pages, and PostgreSQL counts the updates as HOT."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import bindparam, text

from realm_service.queue import JobQueue
from realm_service.store.db import open_database
from realm_service.store.tables import Base

JOBS = 200  # several pages of attempts and of realms
# The realms have been indexed before (a reindex): a realm's first index
# makes its row longer (its generation and index time set), and rows that
# grow may need more room than their page keeps.


@pytest.fixture
def queue(pg_url: str) -> Iterator[JobQueue]:
    db = open_database(pg_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO realms (realm_id, display_name, state, created_priority,"
                    " create_time, files, cards, errors, entries, current_generation,"
                    " last_index_time)"
                    " SELECT 'r' || x, 'r', 'ready', 0, now(), 0, 0, 0, 0, 0, now()"
                    " FROM generate_series(1, :n) AS x"
                ),
                {"n": JOBS},
            )
            conn.execute(
                text(
                    "INSERT INTO jobs (realm_id, kind, priority, state, seq, attempt,"
                    " counted_failures, create_time, error_message, paths, trace_parent,"
                    " progress_done, progress_total, preemptions, worker)"
                    " SELECT realm_id, 'from-scratch', 0, 'queued', 1000, 0, 0, now(), '',"
                    " '[]', '', 0, 0, 0, '' FROM realms"
                )
            )
        yield JobQueue(db)
    finally:
        db.close()


def pages(queue: JobQueue, table: str) -> dict[Any, int]:
    """Each row's page, by key."""
    key = "id" if table == "job_attempts" else "realm_id"
    with queue.db.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT {key}, (ctid::text::point)[0] FROM {table}"))
        return {k: int(page) for k, page in rows}


def test_the_settings_are_in_place_as_the_models_declare_them(queue: JobQueue) -> None:
    with queue.db.engine.connect() as conn:
        options = dict(
            conn.execute(
                text(
                    "SELECT relname, array_to_string(reloptions, ',') FROM pg_class"
                    " WHERE relnamespace = current_schema()::regnamespace"
                    " AND relname IN ('job_attempts', 'realms')"
                )
            ).all()
        )
    declared = {
        name: ",".join(f"{k}={v}" for k, v in table.dialect_options["postgresql"]["with"].items())
        for name, table in Base.metadata.tables.items()
        if table.dialect_options["postgresql"]["with"]
    }
    assert options == declared == {"job_attempts": "fillfactor=50", "realms": "fillfactor=50"}


def test_ending_attempts_and_switching_generations_keep_rows_in_their_pages(
    queue: JobQueue,
) -> None:
    leases = []
    while len(leases) < JOBS:
        batch = queue.claim(64, worker="w")
        assert batch
        leases.extend(batch)
    attempts_before, realms_before = pages(queue, "job_attempts"), pages(queue, "realms")
    assert len(set(attempts_before.values())) > 1 and len(set(realms_before.values())) > 1
    for i in range(0, JOBS, 64):
        done = queue.complete_many([(lease.lease_id, 0) for lease in leases[i : i + 64]])
        assert not any(isinstance(v, Exception) for v in done.values())
    with queue.db.engine.connect() as conn:
        ended = conn.execute(
            text("SELECT count(*) FROM job_attempts WHERE outcome = 'completed'")
        ).scalar_one()
        switched = conn.execute(
            text("SELECT count(*) FROM realms WHERE current_generation IS NOT NULL")
        ).scalar_one()
    assert ended == JOBS and switched == JOBS
    assert pages(queue, "job_attempts") == attempts_before
    assert pages(queue, "realms") == realms_before
    # And PostgreSQL counted each of those updates as HOT (the pool's
    # connections closed: each backend reports its counts as it exits).
    queue.db.engine.dispose()
    assert hot_updates(queue, {"job_attempts": JOBS, "realms": JOBS}) == {
        "job_attempts": (JOBS, JOBS),
        "realms": (JOBS, JOBS),
    }


def hot_updates(queue: JobQueue, expected: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(updates, HOT updates) of each table, once the updates expected are
    counted (at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        with queue.db.engine.connect() as conn:
            found = {
                name: (int(upd), int(hot))
                for name, upd, hot in conn.execute(
                    text(
                        "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                        " WHERE schemaname = current_schema() AND relname IN :names"
                    ).bindparams(bindparam("names", expanding=True)),
                    {"names": sorted(expected)},
                )
            }
        queue.db.engine.dispose()
        counted = all(found.get(name, (0, 0))[0] >= n for name, n in expected.items())
        if counted or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
