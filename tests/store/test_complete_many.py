"""complete_many: several results in one transaction, each fenced on its own,
with the same outcome as completing them one by one."""

from __future__ import annotations

import pytest
from store_helpers import entry, get_realm, index_of, make_realm

from realm_service.domain import USER, IndexEntry, Job, JobKind, JobState, Lease, PathChange
from realm_service.errors import StaleLease
from realm_service.queue import JobQueue

FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL
FILES = {"realm.json": b"{}", "a.json": b"{}", "b.json": b"{}"}
FIRST = [entry("realm.json"), entry("a.json", "m/A", "Ann"), entry("b.json", error="bad")]


def indexed_realm(queue: JobQueue, realm_id: str) -> None:
    make_realm(queue, realm_id, FILES)
    queue.enqueue(realm_id, FS, USER)
    [lease] = queue.claim(1)
    queue.add_entries(lease.lease_id, FIRST)
    queue.complete(lease.lease_id, entries_uploaded=len(FIRST))


def start_jobs(queue: JobQueue, prefix: str) -> dict[str, Lease]:
    """Four realms, each with a running job and its entries uploaded: two
    first indexes, a from-scratch rebuild and an incremental patch."""
    indexed_realm(queue, f"{prefix}-rebuild")
    indexed_realm(queue, f"{prefix}-patch")
    for n in range(2):
        make_realm(queue, f"{prefix}-new{n}", FILES)
        queue.enqueue(f"{prefix}-new{n}", FS, USER)
    queue.enqueue(f"{prefix}-rebuild", FS, USER)
    queue.enqueue(
        f"{prefix}-patch",
        INC,
        USER,
        paths=[PathChange("a.json", False), PathChange("b.json", True)],
    )
    leases = {lease.job.realm_id: lease for lease in queue.claim(10)}
    assert len(leases) == 4
    uploads: dict[str, tuple[list[IndexEntry], list[str]]] = {
        f"{prefix}-new0": (FIRST, []),
        f"{prefix}-new1": ([entry("a.json", "m/A", "Only")], []),
        f"{prefix}-rebuild": ([entry("c.json", "m/C", "New")], []),
        f"{prefix}-patch": ([entry("a.json", "m/A", "Ann 2")], ["b.json"]),
    }
    for realm_id, (entries, deleted) in uploads.items():
        queue.add_entries(leases[realm_id].lease_id, entries, deleted)
    return leases


def outcome(queue: JobQueue, realm_id: str) -> tuple[object, ...]:
    realm = get_realm(queue, realm_id)
    return (
        index_of(queue, realm_id),
        (realm.files, realm.entries, realm.cards, realm.errors, realm.state),
    )


def test_a_batch_ends_as_one_by_one_would(queue: JobQueue) -> None:
    single = start_jobs(queue, "one")
    batch = start_jobs(queue, "all")
    for lease in single.values():
        queue.complete(lease.lease_id)
    done = queue.complete_many([(lease.lease_id, 0) for lease in batch.values()])
    assert set(done) == {lease.lease_id for lease in batch.values()}
    for realm_id, lease in batch.items():
        job = done[lease.lease_id]
        assert isinstance(job, Job)
        assert (job.job_id, job.state) == (lease.job.job_id, JobState.SUCCEEDED)
        assert queue.attempts(job.job_id) == [(lease.lease_id, "completed")]
        twin = realm_id.replace("all-", "one-")
        assert outcome(queue, realm_id) == outcome(queue, twin), realm_id
    assert [e.title for e in index_of(queue, "all-patch")] == ["Ann 2", ""]  # b.json gone


def test_each_result_is_fenced_on_its_own(queue: JobQueue) -> None:
    for name in ("good", "released", "short"):
        make_realm(queue, name, FILES)
        queue.enqueue(name, FS, USER)
    leases = {lease.job.realm_id: lease for lease in queue.claim(3)}
    queue.release([leases["released"].lease_id])
    for lease in leases.values():
        if lease.job.realm_id != "released":
            queue.add_entries(lease.lease_id, [entry("a.json", "m/A", "A")])
    good, released, short = (leases[n].lease_id for n in ("good", "released", "short"))
    done = queue.complete_many([(good, 1), (released, 0), (short, 5), ("unknown", 0), (good, 1)])
    assert set(done) == {good, released, short, "unknown"}
    assert isinstance(done[good], Job) and done[good].state is JobState.SUCCEEDED
    for refused in (released, short, "unknown"):
        assert isinstance(done[refused], StaleLease), refused
    # Nothing of a refused result was applied.
    assert index_of(queue, "short") == []
    assert queue.get_job(leases["released"].job.job_id).state is JobState.QUEUED
    # A result whose entry count is wrong ends its attempt as a counted
    # failure (the worker lost entries): the job goes back to the queue, and
    # the lease completes nothing any more.
    short_job = queue.get_job(leases["short"].job.job_id)
    assert short_job.state is JobState.QUEUED
    assert "5 entries reported, 1 received" in short_job.error_message
    assert queue.attempts(short_job.job_id) == [(short, "failed")]
    with pytest.raises(StaleLease):
        queue.complete(short, entries_uploaded=1)
    assert [e.path for e in index_of(queue, "good")] == ["a.json"]


def test_an_empty_batch_does_nothing(queue: JobQueue) -> None:
    assert queue.complete_many([]) == {}


def test_a_job_that_finishes_reaches_listeners_with_its_final_value(queue: JobQueue) -> None:
    """Followers of a job (WatchJob) get a finished job's value with the
    change instead of reading it: the value must be what a read returns."""
    seen: dict[int, Job | None] = {}
    queue.on_job_change(lambda job_id, finished: seen.__setitem__(job_id, finished))
    leases = start_jobs(queue, "fin")
    first = leases["fin-new0"]
    done = queue.complete_many(
        [(lease.lease_id, 0) for lease in leases.values()], files_done={first.lease_id: 3}
    )
    for lease in leases.values():
        job = done[lease.lease_id]
        assert isinstance(job, Job)
        assert seen[job.job_id] == job == queue.get_job(job.job_id)
    final = seen[first.job.job_id]
    assert final is not None and (final.progress_done, final.progress_total) == (3, 3)

    make_realm(queue, "fin-bad", FILES)
    queue.enqueue("fin-bad", FS, USER)
    [lease] = queue.claim(1)
    seen.clear()
    failed = queue.fail(lease.lease_id, "broken for good", permanent=True)
    assert failed.state is JobState.FAILED
    assert seen[failed.job_id] == failed == queue.get_job(failed.job_id)

    seen.clear()
    queued = queue.enqueue("fin-bad", FS, USER).job  # a change that finishes nothing
    assert seen == {queued.job_id: None}


def test_a_completion_announces_work_only_when_its_realm_has_a_queued_job(
    queue: JobQueue,
) -> None:
    """A finished job frees its realm: its queued job, held back meanwhile,
    may run now, and that is new work. A job queued in another realm is not
    news (it was claimable all along), and announcing it would cost every
    listener a claim that finds nothing."""
    for name in ("waiting", "done", "busy"):
        make_realm(queue, name)
    heard: list[str] = []
    queue.on_new_work(lambda: heard.append("new work"))
    queue.enqueue("done", JobKind.FROM_SCRATCH, USER)
    queue.enqueue("busy", JobKind.FROM_SCRATCH, USER)
    leases = {lease.job.realm_id: lease for lease in queue.claim(2)}
    queue.enqueue("waiting", JobKind.FROM_SCRATCH, USER)  # another realm's
    queue.enqueue("busy", JobKind.INCREMENTAL, USER, paths=[PathChange("a.json", False)])
    heard.clear()
    assert queue.complete(leases["done"].lease_id, entries_uploaded=0).state is JobState.SUCCEEDED
    assert heard == []
    assert queue.complete(leases["busy"].lease_id, entries_uploaded=0).state is JobState.SUCCEEDED
    assert heard == ["new work"]


def test_a_claim_reaches_listeners_with_the_started_jobs_values(queue: JobQueue) -> None:
    """A claim knows what it leaves its jobs as: followers get those values
    with the change (no read), and they must be what a read returns. A change
    that does not know the value says None (the follower reads)."""
    seen: dict[int, list[Job | None]] = {}
    queue.on_job_change(lambda job_id, value: seen.setdefault(job_id, []).append(value))
    leases = start_jobs(queue, "run")
    assert len(leases) == 4
    for lease in leases.values():
        started = seen[lease.job.job_id][-1]
        assert started is not None and started.state is JobState.RUNNING
        assert started == lease.job == queue.get_job(lease.job.job_id)
        assert started.attempt == queue.get_job(lease.job.job_id).attempt >= 1
    patch = leases["run-patch"].job
    assert patch.kind is INC and [c.path for c in patch.path_changes] == ["a.json", "b.json"]


def test_results_whose_entries_all_come_with_them_are_counted_without_a_read(
    queue: JobQueue,
) -> None:
    """`whole` leases staged nothing before their result: the count is that
    of the distinct paths sent with it (a path sent twice is one entry, as
    the store keeps it), and a wrong count fails the attempt as before."""
    for name in ("exact", "twice", "short", "none"):
        make_realm(queue, name, FILES)
        queue.enqueue(name, FS, USER)
    leases = {lease.job.realm_id: lease.lease_id for lease in queue.claim(4)}
    sent = {
        "exact": ([entry("a.json"), entry("b.json")], ["gone.json"]),
        "twice": ([entry("a.json", title="old"), entry("a.json", title="new")], []),
        "short": ([entry("a.json")], []),
        "none": ([], ["gone.json"]),
    }
    uploaded = {"exact": 2, "twice": 1, "short": 3, "none": 0}
    done = queue.complete_many(
        [(leases[n], uploaded[n]) for n in sent],
        entries={leases[n]: sent[n] for n in sent},
        whole=set(leases.values()),
    )
    for name in ("exact", "twice", "none"):
        assert isinstance(done[leases[name]], Job), name
    assert [e.path for e in index_of(queue, "exact")] == ["a.json", "b.json"]
    assert [(e.path, e.title) for e in index_of(queue, "twice")] == [("a.json", "new")]
    assert index_of(queue, "none") == []
    refused = done[leases["short"]]
    assert isinstance(refused, StaleLease)
    assert "3 entries reported, 1 received" in refused.message
    assert index_of(queue, "short") == []
