"""Checkpoints of from-scratch jobs (DESIGN.md section 6): what an attempt
staged survives it; the next attempt stages into the same generation, reads
only the files whose entries were not kept (a changed or deleted file loses
its entry, a changed .gitignore all of them), and its completion counts the
kept entries with those it sent. The realm file stream is read here as a
worker reads it: page by page, under the job's lease."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from store_helpers import FakeClock, index_of, make_realm

from realm_service.domain import SYSTEM, USER, IndexEntry, JobKind, JobState, PathChange
from realm_service.queue import JobQueue
from realm_service.realms import Realms
from realm_service.store import index_sql, realms_sql
from realm_service.store.tables import JobAttemptRow, JobRow

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL
FILES = {f"f{i:02d}.txt": f"file {i}".encode() for i in range(10)}


@pytest.fixture
def realms(queue: JobQueue) -> Realms:
    return Realms(queue.db, queue, max_file_size=1 << 20, clock=queue.clock)


def entry_of(path: str, content: bytes) -> IndexEntry:
    return IndexEntry(
        path=path,
        mtime=datetime(2026, 11, 1, tzinfo=UTC),
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        media_type="text/plain",
        search_text=content.decode(),
    )


def read_all(realms: Realms, realm_id: str, lease_id: str) -> tuple[list[str], int]:
    """Every file the lease's stream sends (paths), and the total announced."""
    page = realms.read_file_page(
        realm_id, lease_id=lease_id, after=None, paths=None, max_bytes=1 << 20, first=True
    )
    total = page.total
    paths = [info.path for info, _ in page.files]
    while page.next_after is not None:
        page = realms.read_file_page(
            realm_id, lease_id=lease_id, after=page.next_after, paths=None, max_bytes=1 << 20
        )
        paths += [info.path for info, _ in page.files]
    assert total is not None
    return paths, total


def staged(queue: JobQueue, realm_id: str, generation: int) -> set[str]:
    with queue.db.read_transaction() as tx:
        return {
            e.path
            for e in index_sql.search(
                tx,
                realm_id=realm_id,
                generation=generation,
                card_type="",
                text="",
                after_path=None,
                limit=10_000,
            )
        }


def interrupt(queue: JobQueue, clock: FakeClock, lease_id: str, how: str) -> None:
    if how == "release":
        queue.release([lease_id], "stream closed")
    elif how == "preempt":
        assert queue.preempt(lease_id, "preempted for job 99 (priority 10)") is not None
    elif how == "fail":
        queue.fail(lease_id, "worker crashed")
    else:
        clock.advance(queue.settings.lease_duration * 2)
        queue.reap_expired()


def files_of(realms: Realms, realm_id: str) -> dict[str, bytes]:
    with realms.db.read_transaction():
        page = realms.read_file_page(
            realm_id, lease_id="", after=None, paths=None, max_bytes=1 << 20, first=True
        )
    return {info.path: content for info, content in page.files}


@pytest.mark.parametrize("how", ["release", "preempt", "fail", "expire"])
def test_a_retry_reads_only_the_files_not_indexed_yet(
    queue: JobQueue, realms: Realms, clock: FakeClock, how: str
) -> None:
    make_realm(queue, "r", FILES)
    job = queue.enqueue("r", FS, SYSTEM).job
    [first] = queue.claim(1)
    paths, total = read_all(realms, "r", first.lease_id)
    assert (paths, total) == (sorted(FILES), 10)
    queue.add_entries(first.lease_id, [entry_of(p, FILES[p]) for p in paths[:6]])
    interrupt(queue, clock, first.lease_id, how)

    [second] = queue.claim(1)
    assert second.job.job_id == job.job_id
    paths, total = read_all(realms, "r", second.lease_id)
    assert (paths, total) == (sorted(FILES)[6:], 4)
    queue.add_entries(second.lease_id, [entry_of(p, FILES[p]) for p in paths])
    done = queue.complete(second.lease_id, entries_uploaded=len(paths))
    assert done.state is JobState.SUCCEEDED
    assert [e.path for e in index_of(queue, "r")] == sorted(FILES)
    # Its generation is the realm's now, no checkpoint: sweeps of the
    # realm's generations do not look at it again.
    with queue.db.read_transaction() as tx:
        assert tx.conn.scalar(select(JobRow.checkpoint).where(JobRow.id == job.job_id)) is None


def test_changed_and_deleted_files_lose_their_kept_entries(
    queue: JobQueue, realms: Realms, clock: FakeClock
) -> None:
    make_realm(queue, "r", FILES)
    queue.enqueue("r", FS, USER)
    [first] = queue.claim(1)
    read_all(realms, "r", first.lease_id)
    queue.add_entries(first.lease_id, [entry_of(p, FILES[p]) for p in sorted(FILES)[:6]])
    queue.release([first.lease_id])
    realms.write_files("r", [("f01.txt", b"changed")], ["f02.txt"], None)

    [second] = queue.claim(1)
    assert second.job.kind is FS  # the from-scratch job keeps its place
    paths, total = read_all(realms, "r", second.lease_id)
    # f01 changed: read again; f02 is gone; f00, f03-f05 are kept.
    assert paths == ["f01.txt", *sorted(FILES)[6:]]
    assert total == 5
    now = files_of(realms, "r")
    queue.add_entries(second.lease_id, [entry_of(p, now[p]) for p in paths])
    queue.complete(second.lease_id, entries_uploaded=len(paths))
    index = {e.path: e for e in index_of(queue, "r")}
    assert sorted(index) == sorted(now)
    assert index["f01.txt"].search_text == "changed"


def test_a_changed_gitignore_drops_the_whole_checkpoint(queue: JobQueue, realms: Realms) -> None:
    make_realm(queue, "r", {**FILES, ".gitignore": b"*.tmp\n"})
    queue.enqueue("r", FS, USER)
    [first] = queue.claim(1)
    read_all(realms, "r", first.lease_id)
    queue.add_entries(first.lease_id, [entry_of(p, FILES[p]) for p in sorted(FILES)[:6]])
    queue.release([first.lease_id])
    realms.write_files("r", [(".gitignore", b"f0*\n")], [], None)

    [second] = queue.claim(1)
    paths, total = read_all(realms, "r", second.lease_id)
    assert paths == [".gitignore", *sorted(FILES)]
    assert total == 11
    assert second.job.kind is FS
    assert staged(queue, "r", _generation(queue, first.lease_id)) == set()


def test_a_stream_opened_twice_counts_the_kept_entries_once(
    queue: JobQueue, realms: Realms
) -> None:
    """A worker whose stream broke opens it again (after the last file it
    had): the entries it sent meanwhile are not taken for kept ones."""
    make_realm(queue, "r", FILES)
    queue.enqueue("r", FS, USER)
    [first] = queue.claim(1)
    queue.add_entries(first.lease_id, [entry_of(p, FILES[p]) for p in sorted(FILES)[:3]])
    read_all(realms, "r", first.lease_id)  # after staging: nothing to keep yet
    queue.release([first.lease_id])
    [second] = queue.claim(1)
    paths, _ = read_all(realms, "r", second.lease_id)
    queue.add_entries(second.lease_id, [entry_of(p, FILES[p]) for p in paths[:2]])
    again, total = read_all(realms, "r", second.lease_id)
    # Only the 3 kept entries are left out of the total (an upper bound).
    assert again == paths[2:] and total == 7
    queue.add_entries(second.lease_id, [entry_of(p, FILES[p]) for p in again])
    queue.complete(second.lease_id, entries_uploaded=len(paths))
    assert [e.path for e in index_of(queue, "r")] == sorted(FILES)


def test_an_incremental_merge_in_between_spares_the_checkpoint(
    queue: JobQueue, realms: Realms
) -> None:
    make_realm(queue, "r", FILES)
    queue.enqueue("r", FS, USER)
    [lease] = queue.claim(1)
    read_all(realms, "r", lease.lease_id)
    queue.add_entries(lease.lease_id, [entry_of(p, FILES[p]) for p in sorted(FILES)])
    queue.complete(lease.lease_id, entries_uploaded=len(FILES))

    rebuild = queue.enqueue("r", FS, SYSTEM).job
    [first] = queue.claim(1)
    read_all(realms, "r", first.lease_id)
    queue.add_entries(first.lease_id, [entry_of(p, FILES[p]) for p in sorted(FILES)[:6]])
    # A user's incremental job of the realm, queued meanwhile, runs first and
    # merges into the current generation; the sweep of abandoned
    # generations spares the rebuild's checkpoint.
    queue.enqueue("r", INC, USER, paths=[PathChange("f00.txt", False)])
    queue.release([first.lease_id])
    [inc] = queue.claim(1)
    assert inc.job.kind is INC
    queue.add_entries(inc.lease_id, [entry_of("f00.txt", FILES["f00.txt"])])
    queue.complete(inc.lease_id, entries_uploaded=1)

    [second] = queue.claim(1)
    assert second.job.job_id == rebuild.job_id
    paths, _ = read_all(realms, "r", second.lease_id)
    assert paths == sorted(FILES)[6:]
    queue.add_entries(second.lease_id, [entry_of(p, FILES[p]) for p in paths])
    queue.complete(second.lease_id, entries_uploaded=len(paths))
    assert [e.path for e in index_of(queue, "r")] == sorted(FILES)


def test_a_first_index_by_another_job_spares_the_checkpoint(
    queue: JobQueue, realms: Realms
) -> None:
    """A realm never indexed: an incremental job completing while the first
    from-scratch job waits to run again becomes the realm's first generation,
    a switch that replaces everything of the realm but that job's own
    checkpoint."""
    make_realm(queue, "r", FILES)
    first_job = queue.enqueue("r", FS, SYSTEM).job
    [first] = queue.claim(1)
    read_all(realms, "r", first.lease_id)
    queue.add_entries(first.lease_id, [entry_of(p, FILES[p]) for p in sorted(FILES)[:6]])
    queue.enqueue("r", INC, USER, paths=[PathChange("f09.txt", False)])
    queue.fail(first.lease_id, "worker crashed")
    [inc] = queue.claim(1)
    assert inc.job.kind is INC
    queue.add_entries(inc.lease_id, [entry_of("f09.txt", FILES["f09.txt"])])
    queue.complete(inc.lease_id, entries_uploaded=1)
    assert [e.path for e in index_of(queue, "r")] == ["f09.txt"]
    with queue.db.read_transaction() as tx:
        kept = tx.conn.scalar(select(JobRow.checkpoint).where(JobRow.id == first_job.job_id))
    assert kept is not None
    assert staged(queue, "r", kept) == set(sorted(FILES)[:6])

    [second] = queue.claim(1)
    assert second.job.job_id == first_job.job_id
    paths, _ = read_all(realms, "r", second.lease_id)
    assert paths == sorted(FILES)[6:]
    queue.add_entries(second.lease_id, [entry_of(p, FILES[p]) for p in paths])
    queue.complete(second.lease_id, entries_uploaded=len(paths))
    assert [e.path for e in index_of(queue, "r")] == sorted(FILES)


def test_cancelling_a_job_drops_its_checkpoint(queue: JobQueue, realms: Realms) -> None:
    make_realm(queue, "r", FILES)
    job = queue.enqueue("r", FS, USER).job
    [first] = queue.claim(1)
    read_all(realms, "r", first.lease_id)
    queue.add_entries(first.lease_id, [entry_of(p, FILES[p]) for p in sorted(FILES)[:6]])
    queue.release([first.lease_id])
    assert len(staged(queue, "r", _generation(queue, first.lease_id))) == 6
    queue.cancel(job.job_id, "no longer wanted")
    assert staged(queue, "r", _generation(queue, first.lease_id)) == set()


def test_a_job_that_fails_for_good_drops_its_checkpoint(queue: JobQueue, realms: Realms) -> None:
    make_realm(queue, "r", FILES)
    queue.enqueue("r", FS, USER)
    [first] = queue.claim(1)
    read_all(realms, "r", first.lease_id)
    queue.add_entries(first.lease_id, [entry_of(p, FILES[p]) for p in sorted(FILES)[:6]])
    generation = _generation(queue, first.lease_id)
    queue.release([first.lease_id])
    [first] = queue.claim(1)
    queue.fail(first.lease_id, "bad realm", permanent=True)
    assert staged(queue, "r", generation) == set()


def _generation(queue: JobQueue, lease_id: str) -> int:
    """The generation the lease's attempt staged into (its attempt id)."""
    with queue.db.read_transaction() as tx:
        found = tx.conn.scalar(select(JobAttemptRow.id).where(JobAttemptRow.lease_id == lease_id))
    assert found is not None
    return int(found)


@pytest.mark.parametrize("chunk", [1, 3, 4, 10_000])
def test_kept_files_are_skipped_across_chunks_of_the_listing(
    queue: JobQueue, realms: Realms, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """The listing compares files and kept entries a chunk of paths at a
    time; gaps anywhere (first, last, across chunk bounds) come out in order."""
    monkeypatch.setattr(realms_sql, "SKIP_CHUNK", chunk)
    make_realm(queue, "r", FILES)
    queue.enqueue("r", FS, USER)
    [first] = queue.claim(1)
    read_all(realms, "r", first.lease_id)
    kept = ["f01.txt", "f02.txt", "f03.txt", "f05.txt", "f08.txt", "f09.txt"]
    queue.add_entries(first.lease_id, [entry_of(p, FILES[p]) for p in kept])
    queue.release([first.lease_id])
    [second] = queue.claim(1)
    paths, total = read_all(realms, "r", second.lease_id)
    assert paths == ["f00.txt", "f04.txt", "f06.txt", "f07.txt"]
    assert total == 4
    with queue.db.read_transaction() as tx:
        # A page of two, then the rest after the last one handed out.
        page = realms_sql.file_page(
            tx,
            "r",
            after=None,
            paths=None,
            limit=2,
            skip_generation=_generation(queue, first.lease_id),
        )
        rest = realms_sql.file_page(
            tx,
            "r",
            after=page[-1].path,
            paths=None,
            limit=10,
            skip_generation=_generation(queue, first.lease_id),
        )
    assert [f.path for f in page] == ["f00.txt", "f04.txt"]
    assert [f.path for f in rest] == ["f06.txt", "f07.txt"]


@pytest.mark.parametrize("resumed", [False, True])
def test_deleted_paths_sent_by_a_from_scratch_job_are_not_indexed(
    queue: JobQueue, realms: Realms, resumed: bool
) -> None:
    """A path a from-scratch attempt reports deleted leaves no entry in the
    index it switches in, also when that attempt resumed a checkpoint (its
    generation is the job's checkpoint until it succeeds, and the sweep
    spares only other jobs' checkpoints)."""
    make_realm(queue, "r", FILES)
    queue.enqueue("r", FS, USER)
    [lease] = queue.claim(1)
    read_all(realms, "r", lease.lease_id)
    if resumed:
        queue.add_entries(lease.lease_id, [entry_of(p, FILES[p]) for p in sorted(FILES)[:6]])
        queue.release([lease.lease_id])
        [lease] = queue.claim(1)
    paths, _ = read_all(realms, "r", lease.lease_id)
    queue.add_entries(lease.lease_id, [entry_of(p, FILES[p]) for p in paths], ["ghost.txt"])
    queue.complete(lease.lease_id, entries_uploaded=len(paths))
    assert [e.path for e in index_of(queue, "r")] == sorted(FILES)
    with queue.db.read_transaction() as tx:
        assert realms_sql.get_realm(tx, "r").entries == len(FILES)
