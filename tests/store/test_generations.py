"""Index generations: a job's entries become the realm's index only when it
completes, at once and with the realm's stats; incremental jobs touch only
their paths; a retried job yields the index a single run would."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from store_helpers import FakeClock, entry, get_realm, index_of, make_realm

from realm_service.domain import USER, IndexEntry, JobKind, JobState, PathChange, RealmState
from realm_service.errors import StaleLease
from realm_service.queue import JobQueue

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL

FILES = {
    "realm.json": b"{}",
    "index.json": b"{}",
    "a.json": b"{}",
    "b.json": b"{}",
    "notes.txt": b"hi",
}
FIRST = [
    entry("realm.json"),
    entry("index.json", "m/Index", "Home"),
    entry("a.json", "m/Person", "Ann"),
    entry("b.json", error="unexpected token"),
    entry("notes.txt"),
]


def run_job(
    queue: JobQueue,
    realm_id: str,
    kind: JobKind,
    entries: Sequence[IndexEntry],
    deleted: Sequence[str] = (),
    paths: Sequence[PathChange] = (),
) -> None:
    job = queue.enqueue(realm_id, kind, USER, paths=paths).job
    [lease] = queue.claim(1)
    assert lease.job.job_id == job.job_id
    queue.add_entries(lease.lease_id, entries, deleted)
    assert queue.complete(lease.lease_id, entries_uploaded=len(entries)).state is (
        JobState.SUCCEEDED
    )


def paths_of(queue: JobQueue, realm_id: str) -> list[str]:
    return [e.path for e in index_of(queue, realm_id)]


def test_from_scratch_completion_switches_generation_with_stats(
    queue: JobQueue, clock: FakeClock
) -> None:
    make_realm(queue, "r", FILES)
    assert get_realm(queue, "r").state is RealmState.INDEXING
    assert index_of(queue, "r") == []
    clock.advance(60)
    run_job(queue, "r", FS, FIRST)
    realm = get_realm(queue, "r")
    assert (realm.files, realm.entries, realm.cards, realm.errors) == (5, 5, 2, 1)
    assert realm.state is RealmState.READY
    assert realm.last_index_time == clock()
    first_generation = realm.current_generation
    assert first_generation is not None
    assert index_of(queue, "r") == sorted(FIRST, key=lambda e: e.path)

    # A second from-scratch run: staged entries stay invisible until completion.
    job = queue.enqueue("r", FS, USER).job
    [lease] = queue.claim(1)
    second = [entry("index.json", "m/Index", "Home 2"), entry("c.json", "m/Pet", "Rex")]
    queue.add_entries(lease.lease_id, second[:1])
    queue.add_entries(lease.lease_id, second[1:])
    assert paths_of(queue, "r") == sorted(FILES)
    assert get_realm(queue, "r").current_generation == first_generation
    clock.advance(60)
    queue.complete(lease.lease_id, entries_uploaded=2)
    realm = get_realm(queue, "r")
    assert realm.current_generation not in (None, first_generation)
    assert index_of(queue, "r") == sorted(second, key=lambda e: e.path)
    assert (realm.entries, realm.cards, realm.errors) == (2, 2, 0)
    assert realm.last_index_time == clock()
    assert queue.get_job(job.job_id).state is JobState.SUCCEEDED


def test_a_refused_completion_leaves_the_old_index(queue: JobQueue) -> None:
    make_realm(queue, "r", FILES)
    run_job(queue, "r", FS, FIRST)
    before = (index_of(queue, "r"), get_realm(queue, "r"))
    queue.enqueue("r", FS, USER)
    [lease] = queue.claim(1)
    queue.add_entries(lease.lease_id, [entry("only.json", "m/X", "X")])
    with pytest.raises(StaleLease):  # 3 entries announced, 1 arrived
        queue.complete(lease.lease_id, entries_uploaded=3)
    assert (index_of(queue, "r"), get_realm(queue, "r")) == before
    # The attempt failed (counted) and the job waits for another.
    assert queue.get_job(lease.job.job_id).state is JobState.QUEUED


def test_incremental_completion_replaces_and_deletes_only_its_paths(
    queue: JobQueue, clock: FakeClock
) -> None:
    make_realm(queue, "r", FILES)
    run_job(queue, "r", FS, FIRST)
    generation = get_realm(queue, "r").current_generation
    changes = [
        PathChange("a.json", False),
        PathChange("b.json", False),
        PathChange("notes.txt", True),
        PathChange("d.json", False),
    ]
    new_a = entry("a.json", "m/Person", "Ann Smith")
    fixed_b = entry("b.json", "m/Person", "Bob")
    new_d = entry("d.json", "m/Pet", "Rex")
    clock.advance(5)
    run_job(queue, "r", INC, [new_a, fixed_b, new_d], deleted=["notes.txt"], paths=changes)
    realm = get_realm(queue, "r")
    assert realm.current_generation == generation  # patched in place
    by_path = {e.path: e for e in index_of(queue, "r")}
    assert sorted(by_path) == ["a.json", "b.json", "d.json", "index.json", "realm.json"]
    assert by_path["a.json"] == new_a and by_path["b.json"] == fixed_b
    assert by_path["d.json"] == new_d
    untouched = {e.path: e for e in FIRST}
    assert by_path["index.json"] == untouched["index.json"]
    assert by_path["realm.json"] == untouched["realm.json"]
    assert (realm.entries, realm.cards, realm.errors) == (5, 4, 0)
    assert realm.last_index_time == clock()


def test_incremental_entries_are_invisible_until_completion(queue: JobQueue) -> None:
    make_realm(queue, "r", FILES)
    run_job(queue, "r", FS, FIRST)
    before = index_of(queue, "r")
    queue.enqueue("r", INC, USER, paths=[PathChange("a.json", True)])
    [lease] = queue.claim(1)
    queue.add_entries(lease.lease_id, [], ["a.json"])
    assert index_of(queue, "r") == before
    queue.complete(lease.lease_id)
    assert "a.json" not in paths_of(queue, "r")


def test_re_sent_entries_replace_earlier_ones_of_the_same_attempt(queue: JobQueue) -> None:
    make_realm(queue, "r", FILES)
    queue.enqueue("r", FS, USER)
    [lease] = queue.claim(1)
    queue.add_entries(lease.lease_id, [entry("a.json", "m/Person", "Draft")])
    final = entry("a.json", "m/Person", "Final")
    queue.add_entries(lease.lease_id, [final])
    queue.complete(lease.lease_id, entries_uploaded=1)
    assert index_of(queue, "r") == [final]


def snapshot(queue: JobQueue, realm_id: str) -> tuple[list[IndexEntry], tuple[int, ...]]:
    realm = get_realm(queue, realm_id)
    return index_of(queue, realm_id), (realm.files, realm.entries, realm.cards, realm.errors)


@pytest.mark.parametrize("interruption", ["release", "fail", "expire"])
def test_a_retried_from_scratch_job_yields_the_same_index(
    queue: JobQueue, clock: FakeClock, interruption: str
) -> None:
    make_realm(queue, "once", FILES)
    run_job(queue, "once", FS, FIRST)
    make_realm(queue, "retried", FILES)
    job = queue.enqueue("retried", FS, USER).job
    [lease] = queue.claim(1)
    # The first attempt uploads a partial, different result, then stops.
    queue.add_entries(lease.lease_id, [entry("a.json", "m/Wrong", "Half"), entry("zzz.json")])
    if interruption == "release":
        queue.release([lease.lease_id])
    elif interruption == "fail":
        queue.fail(lease.lease_id, "worker crashed")
    else:
        clock.advance(queue.settings.lease_duration * 2)
        queue.reap_expired()
    [retry] = queue.claim(1)
    assert retry.job.job_id == job.job_id
    queue.add_entries(retry.lease_id, FIRST[:2])
    queue.add_entries(retry.lease_id, FIRST[2:])
    queue.complete(retry.lease_id, entries_uploaded=len(FIRST))
    assert snapshot(queue, "retried") == snapshot(queue, "once")


def test_a_retried_incremental_job_yields_the_same_index(queue: JobQueue) -> None:
    changes = [PathChange("a.json", False), PathChange("b.json", True)]
    new_a = entry("a.json", "m/Person", "Ann 2")
    for realm_id in ("once", "retried"):
        make_realm(queue, realm_id, FILES)
        run_job(queue, realm_id, FS, FIRST)
    run_job(queue, "once", INC, [new_a], ["b.json"], changes)
    job = queue.enqueue("retried", INC, USER, paths=changes).job
    [lease] = queue.claim(1)
    queue.add_entries(lease.lease_id, [entry("a.json", "m/Wrong", "?")], ["notes.txt"])
    queue.fail(lease.lease_id, "timeout")
    [retry] = queue.claim(1)
    assert retry.job.job_id == job.job_id
    queue.add_entries(retry.lease_id, [new_a], ["b.json"])
    queue.complete(retry.lease_id, entries_uploaded=1)
    assert snapshot(queue, "retried") == snapshot(queue, "once")
    assert "notes.txt" in paths_of(queue, "retried")


def test_realms_do_not_share_entries(queue: JobQueue) -> None:
    make_realm(queue, "r1", FILES)
    make_realm(queue, "r2", {"x.json": b"{}"})
    run_job(queue, "r1", FS, FIRST)
    run_job(queue, "r2", FS, [entry("x.json", "m/X", "X")])
    assert paths_of(queue, "r1") == sorted(FILES)
    assert paths_of(queue, "r2") == ["x.json"]
    run_job(queue, "r2", FS, [])
    assert paths_of(queue, "r1") == sorted(FILES)
    assert paths_of(queue, "r2") == []
    assert get_realm(queue, "r2").entries == 0


def test_an_incremental_merge_sweeps_entries_of_attempts_that_never_completed(
    queue: JobQueue,
) -> None:
    from sqlalchemy import func, select

    from realm_service.store.tables import IndexEntryRow

    def stored_rows() -> int:
        with queue.db.session_for_tests() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(IndexEntryRow)
                    .where(IndexEntryRow.realm_id == "r")
                )
                or 0
            )

    make_realm(queue, "r", FILES)
    run_job(queue, "r", FS, FIRST)
    # An incremental attempt stages two entries, then fails: they stay behind.
    queue.enqueue("r", INC, USER, paths=[PathChange("a.json", False)])
    [lease] = queue.claim(1)
    queue.add_entries(lease.lease_id, [entry("a.json", "m/P", "A"), entry("z.json", "m/P", "Z")])
    queue.fail(lease.lease_id, "worker crashed")
    assert stored_rows() == len(FIRST) + 2
    # The retry stages one entry; its merge leaves the index and nothing else.
    [retry] = queue.claim(1)
    new_a = entry("a.json", "m/Person", "Ann 2")
    queue.add_entries(retry.lease_id, [new_a])
    queue.complete(retry.lease_id, entries_uploaded=1)
    assert stored_rows() == len(FIRST)
    assert {e.path: e for e in index_of(queue, "r")}["a.json"] == new_a
    realm = get_realm(queue, "r")
    assert (realm.entries, realm.cards, realm.errors) == (5, 2, 1)


def test_a_big_new_generation_refreshes_postgresql_statistics(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a large generation is switched in, index_entries is analyzed,
    so the next incremental merge finds its rows by primary key."""
    import time

    from sqlalchemy import text

    from realm_service.store import index_sql
    from realm_service.store.db import open_database

    monkeypatch.setattr(index_sql, "ANALYZE_AFTER_ENTRIES", 3)
    queue = JobQueue(open_database(pg_url))

    def analyses() -> int:
        with queue.db.session_for_tests() as s:
            return int(
                s.scalar(
                    text(
                        "SELECT analyze_count FROM pg_stat_user_tables "
                        "WHERE relname = 'index_entries' AND schemaname = current_schema()"
                    )
                )
                or 0
            )

    make_realm(queue, "r", FILES)
    before = analyses()
    run_job(queue, "r", FS, FIRST[:2])  # two entries: under the bound
    run_job(queue, "r", FS, FIRST)  # five: over it
    deadline = time.monotonic() + 10
    while analyses() <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert analyses() == before + 1
