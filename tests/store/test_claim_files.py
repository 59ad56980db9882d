"""A small incremental job is claimed with its files (each existing path of its
list, and .gitignore), read in the claim's transaction; other jobs without."""

from __future__ import annotations

import hashlib

from store_helpers import make_realm

from realm_service.domain import USER, JobKind, PathChange
from realm_service.queue import INLINE_BYTES, INLINE_JOBS, INLINE_PATHS, JobQueue

INC = JobKind.INCREMENTAL


def changed(*paths: str, deleted: tuple[str, ...] = ()) -> list[PathChange]:
    return [PathChange(p, False) for p in paths] + [PathChange(p, True) for p in deleted]


def test_a_small_incremental_job_is_claimed_with_its_files(queue: JobQueue) -> None:
    files = {".gitignore": b"*.tmp\n", "a.json": b'{"a": 1}', "b.json": b"{}"}
    make_realm(queue, "small", files)
    queue.enqueue("small", INC, USER, paths=changed("a.json", deleted=("gone.json",)))
    [lease] = queue.claim(1)
    assert lease.files is not None
    assert [(f.path, content) for f, content in lease.files] == [
        (".gitignore", b"*.tmp\n"),
        ("a.json", b'{"a": 1}'),
    ]
    stored = lease.files[1][0]
    assert (stored.size, stored.sha256) == (8, hashlib.sha256(b'{"a": 1}').hexdigest())


def test_other_jobs_are_claimed_without_files(queue: JobQueue) -> None:
    many = {f"f{i:02d}.json": b"{}" for i in range(INLINE_PATHS + 1)}
    make_realm(queue, "many", many)
    queue.enqueue("many", INC, USER, paths=changed(*many))
    make_realm(queue, "big", {"big.json": b"x" * (INLINE_BYTES + 1)})
    queue.enqueue("big", INC, USER, paths=changed("big.json"))
    make_realm(queue, "ignore", {".gitignore": b"", "a.json": b"{}"})
    queue.enqueue("ignore", INC, USER, paths=changed(".gitignore"))
    make_realm(queue, "scratch", {"a.json": b"{}"})
    queue.enqueue("scratch", JobKind.FROM_SCRATCH, USER)
    leases = queue.claim(10)
    assert {lease.job.realm_id for lease in leases} == {"many", "big", "ignore", "scratch"}
    assert [lease.files for lease in leases] == [None] * 4


def test_a_claim_sends_files_with_a_bounded_number_of_jobs(queue: JobQueue) -> None:
    for i in range(INLINE_JOBS + 2):
        make_realm(queue, f"r{i:02d}", {"a.json": b"{}"})
        queue.enqueue(f"r{i:02d}", INC, USER, paths=changed("a.json"))
    leases = queue.claim(INLINE_JOBS + 2)
    assert len(leases) == INLINE_JOBS + 2
    assert sum(lease.files is not None for lease in leases) == INLINE_JOBS
