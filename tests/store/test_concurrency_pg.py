"""Several processes on one PostgreSQL store, as several server instances would
be: racing enqueues make one job per realm; racing claimers take every job
exactly once and never run two jobs of one realm at the same time."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, insert, select, text

from realm_service.domain import (
    SYSTEM,
    USER,
    Disposition,
    HandOff,
    Job,
    JobKind,
    JobState,
    PathChange,
)
from realm_service.queue import JobQueue, QueueSettings
from realm_service.store import claim_sql
from realm_service.store.db import Database, open_database
from realm_service.store.rows import new_job_values
from realm_service.store.tables import JobAttemptRow, JobRow, RealmRow

SPAWN = multiprocessing.get_context("spawn")
FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL


def create_realms(db: Database, realm_ids: list[str]) -> None:
    now = datetime.now(UTC)
    with db.session_for_tests() as s:
        s.execute(
            insert(RealmRow),
            [
                {
                    "realm_id": realm_id,
                    "display_name": realm_id,
                    "state": "indexing",
                    "created_priority": USER,
                    "create_time": now,
                    "files": 0,
                    "cards": 0,
                    "errors": 0,
                    "entries": 0,
                }
                for realm_id in realm_ids
            ],
        )


def run_processes(target: Callable[..., Any], args: list[tuple[Any, ...]], timeout: float) -> list:  # type: ignore[type-arg]
    """Start one spawned process per args tuple, all released at once by a
    barrier; return what each sent back. Bounded by `timeout` seconds."""
    barrier = SPAWN.Barrier(len(args))
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=_run_one, args=(target, (*a, barrier), results, n), daemon=True)
        for n, a in enumerate(args)
    ]
    for process in processes:
        process.start()
    try:
        gathered = dict(results.get(timeout=timeout) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    failures = [v for v in gathered.values() if isinstance(v, str)]
    assert not failures, failures[0]
    return [gathered[n] for n in range(len(args))]


def _run_one(target: Callable[..., Any], args: tuple[Any, ...], results: Any, n: int) -> None:
    try:
        results.put((n, target(*args)))
    except BaseException as e:  # report, so the test fails with the cause
        import traceback

        results.put((n, f"process {n} failed: {e!r}\n{traceback.format_exc()}"))


# -- (a) racing enqueues ---------------------------------------------------------


def race_first_index(
    url: str, realm_ids: list[str], priority: int, barrier: Any
) -> list[tuple[str, int, str]]:
    """One process of the race: for each realm, wait for the others, then ask
    for the realm's first index (by enqueue, or by the mount pipeline's rule)."""
    db = open_database(url, migrate=False, pool_size=2)
    queue = JobQueue(db)
    out = []
    try:
        for n, realm_id in enumerate(realm_ids):
            barrier.wait(timeout=60)
            if n % 2 == 0:
                result = queue.enqueue(realm_id, FS, priority)
                out.append((realm_id, result.job.job_id, result.disposition.value))
            else:
                with db.transaction() as tx:
                    job = queue.ensure_first_index(tx, realm_id, priority)
                out.append((realm_id, job.job_id if job else -1, "ensure"))
    finally:
        db.close()
    return out


def test_racing_enqueues_make_one_job_per_realm(pg_url: str) -> None:
    realms = [f"race-{i:02d}" for i in range(20)]
    priorities = [SYSTEM, USER, 20, SYSTEM, 50, USER]
    db = open_database(pg_url)
    try:
        create_realms(db, realms)
        results = run_processes(
            race_first_index, [(pg_url, realms, p) for p in priorities], timeout=90
        )
        queue = JobQueue(db)
        for n, realm_id in enumerate(realms):
            [job] = queue.list_jobs(realm_id=realm_id)
            assert (job.kind, job.state) == (FS, JobState.QUEUED)
            assert job.priority == max(priorities)  # raised by each, never lowered
            answers = [r for per_process in results for r in per_process if r[0] == realm_id]
            assert len(answers) == len(priorities)
            if n % 2 == 0:
                # Everyone was told the same job; exactly one inserted it.
                assert {job_id for _, job_id, _ in answers} == {job.job_id}
                assert Counter(d for _, _, d in answers) == {
                    Disposition.INSERTED.value: 1,
                    Disposition.MERGED.value: len(priorities) - 1,
                }
            else:
                # The mount rule: one caller added the job, the others did not.
                added = sorted(job_id for _, job_id, _ in answers)
                assert added == [-1] * (len(priorities) - 1) + [job.job_id]
    finally:
        db.close()


def test_a_mount_that_loses_the_insert_race_reports_no_job(pg_url: str) -> None:
    """Two mounts of one realm: the second finds no job yet, blocks on the
    unique index while the first commits, then merges into its job. It added
    nothing and must say so (callers log and announce a returned job as new)."""
    db = open_database(pg_url)
    queue = JobQueue(db)
    second: list[Job | None] = []
    try:
        create_realms(db, ["r"])
        with db.transaction() as first:
            mine = queue.ensure_first_index(first, "r", SYSTEM)
            assert mine is not None

            def mount_again() -> None:
                with db.transaction() as tx:
                    second.append(queue.ensure_first_index(tx, "r", USER))

            thread = threading.Thread(target=mount_again)
            thread.start()
            wait_for_a_lock_wait(db)
        thread.join(timeout=30)
        assert second == [None]
        [job] = queue.list_jobs(realm_id="r")
        assert (job.job_id, job.priority) == (mine.job_id, USER)  # raised, not added
    finally:
        db.close()


def test_an_enqueue_waiting_on_a_claim_of_the_queued_job_attaches_to_it(pg_url: str) -> None:
    """A reindex arrives while a claim holds the realm's queued from-scratch
    job: the enqueue's locked read of queued jobs waits, and once the claim
    commits the job is running. The enqueue must see it running (attach),
    not find nothing and queue a second from-scratch job. Its one read sees
    the running job as of before the wait, so it counts the queued jobs it
    saw against those it locked, and reads again when one went missing."""
    db = open_database(pg_url)
    queue = JobQueue(db)
    try:
        create_realms(db, ["r"])
        queued = queue.enqueue("r", JobKind.FROM_SCRATCH, USER).job
        result: list[Any] = []
        with db.transaction() as tx:
            [lease] = claim_sql.claim(
                tx,
                limit=1,
                min_priority=0,
                max_priority=None,
                kinds=None,
                worker="w",
                now=datetime.now(UTC),
                lease_until=datetime.now(UTC),
            )
            assert lease.job.job_id == queued.job_id

            def reindex() -> None:
                result.append(queue.enqueue("r", JobKind.FROM_SCRATCH, USER))

            thread = threading.Thread(target=reindex)
            thread.start()
            wait_for_a_lock_wait(db)
        thread.join(timeout=30)
        [outcome] = result
        assert (outcome.disposition, outcome.job.job_id) == (Disposition.ATTACHED, queued.job_id)
        assert [j.job_id for j in queue.list_jobs(realm_id="r")] == [queued.job_id]
    finally:
        db.close()


def wait_for_a_lock_wait(db: Database, timeout: float = 10.0) -> None:
    stop_at = time.monotonic() + timeout
    with db.engine.connect() as conn:
        while time.monotonic() < stop_at:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError("the second mount never waited on the first one's insert")


def test_a_claim_leaving_locked_candidates_wakes_the_other_instances(pg_url: str) -> None:
    """A claim locks more candidate rows than it takes; claimers of other
    instances skip those rows while it runs, so its commit must wake them
    (NOTIFY), or they would sit on free credits until the polling fallback.
    A claim that takes every candidate it locked wakes nobody."""
    realms = [f"left-{i}" for i in range(3)]
    db = open_database(pg_url)
    other = open_database(pg_url, migrate=False)  # another instance's store
    try:
        assert other.channel == db.channel
        create_realms(db, realms)
        queue = JobQueue(db)
        for realm_id in realms:
            queue.enqueue(realm_id, FS, USER)
        woken = threading.Event()
        other.on_new_work(woken.set)
        assert woken.wait(10), "the listener wakes once when it connects"
        woken.clear()

        (first,) = queue.claim(1, worker="a")
        assert woken.wait(10), "the two candidates left were never announced"
        woken.clear()

        taken = queue.claim(5, worker="a")
        assert {lease.job.realm_id for lease in [first, *taken]} == set(realms)
        assert not woken.wait(1.0), "a claim that left nothing woke the other instance"
    finally:
        other.close()
        db.close()


def test_a_claim_blocked_by_a_locked_realm_announces_nothing(pg_url: str) -> None:
    """The only queued job's realm row is locked by another transaction (a file
    write, say): the claim takes nothing, and must not announce work either,
    or every dispatcher, its own included, would claim again at once, over
    and over, while the lock is held."""
    db = open_database(pg_url)
    other = open_database(pg_url, migrate=False)
    try:
        create_realms(db, ["locked"])
        queue = JobQueue(db)
        queue.enqueue("locked", FS, USER)
        woken = threading.Event()
        other.on_new_work(woken.set)
        assert woken.wait(10), "the listener wakes once when it connects"
        woken.clear()
        with db.engine.connect() as holder:
            holder.execute(text("SELECT realm_id FROM realms WHERE realm_id = 'locked' FOR UPDATE"))
            assert queue.claim(4, worker="a") == []
            assert not woken.wait(1.0), "a claim that took nothing announced work"
            holder.rollback()
        (lease,) = queue.claim(4, worker="a")
        assert lease.job.realm_id == "locked"
    finally:
        other.close()
        db.close()


# The claim's statements as PostgreSQL receives them, by their first words.
CANDIDATES = "SELECT jobs.id, jobs.realm_id, jobs.kind"
BUSY = "SELECT jobs.realm_id \nFROM jobs \nWHERE jobs.realm_id = ANY"


def start_unseen(db: Database, job_id: int) -> list[int]:
    """Start a queued job the way no claim of this version does: without
    locking its realm."""
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET state = 'running', attempt = attempt + 1,"
                " lease_id = 'unseen-lease', worker = 'b' WHERE id = :id AND state = 'queued'"
            ),
            {"id": job_id},
        )
    return [job_id]


def test_an_instance_alone_skips_the_busy_check_and_the_unique_index_backs_it(
    pg_url: str,
) -> None:
    """Alone on the store, a claim does not read its locked realms again for
    running jobs (its own claims run one at a time). Should a running job of
    a realm be committed unseen after the claim's candidate read (another
    instance starting up, a writer that takes no realm lock), the unique
    index on running jobs refuses the second job and the claim runs again,
    then leaving the realm alone: never two running jobs of a realm."""
    db = open_database(pg_url)
    other = open_database(pg_url, migrate=False)
    try:
        create_realms(db, ["r", "s", "t"])
        queue = JobQueue(db)
        inc = queue.enqueue("r", INC, USER, paths=[PathChange("x", False)]).job
        scratch = queue.enqueue("r", FS, SYSTEM).job
        s_job = queue.enqueue("s", FS, SYSTEM).job
        db.set_others_alive(False)
        statements: list[str] = []
        raced: list[list[int]] = []

        @event.listens_for(db.engine, "before_cursor_execute")
        def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)
            if statement.startswith("WITH new_attempts") and not raced:
                # After this claim's candidate read (which locked r), before
                # its writes: r's USER job is started unseen and committed.
                done: list[list[int]] = []
                t = threading.Thread(target=lambda: done.append(start_unseen(other, inc.job_id)))
                t.start()
                t.join(10)
                raced.append(done[0])

        taken = queue.claim(2, worker="a", kinds=[FS])
        event.remove(db.engine, "before_cursor_execute", spy)
        assert raced == [[inc.job_id]]
        # The first run took r's from-scratch job too and was refused by the
        # unique index; the second left r (busy) and took s only.
        assert [x.job.job_id for x in taken] == [s_job.job_id]
        assert queue.get_job(scratch.job_id).state is JobState.QUEUED
        assert sum(q.startswith(CANDIDATES) for q in statements) == 2  # run again once
        assert not any(q.startswith(BUSY) for q in statements)
        with db.session_for_tests() as session:
            running = session.execute(
                select(JobRow.realm_id).where(JobRow.state == "running")
            ).all()
        assert sorted(r for (r,) in running) == ["r", "s"]

        # With another instance known, the check is made.
        db.set_others_alive(True)
        statements.clear()
        event.listen(db.engine, "before_cursor_execute", spy)
        raced.append([])  # no racing this time
        t_job = queue.enqueue("t", FS, USER).job
        assert [x.job.job_id for x in queue.claim(2, worker="a")] == [t_job.job_id]
        event.remove(db.engine, "before_cursor_execute", spy)
        assert sum(q.startswith(BUSY) for q in statements) == 1
    finally:
        other.close()
        db.close()


# -- (b) racing claimers -----------------------------------------------------------

REALMS = 300
JOBS_PER_REALM = 10  # 3,000 jobs when the machine keeps up
PRODUCE_S = 12.0  # no follow-up jobs after this; then drain
DEADLINE_S = 180.0  # a bound on a hung run only: a loaded machine drains slower

Record = tuple[int, str, str, datetime, datetime]  # job, realm, lease, start, end


def claimer(url: str, worker: str, batch: int, barrier: Any) -> list[Record]:
    """Claim in batches, "work" a little, complete, and enqueue the realm's
    next job until it has had JOBS_PER_REALM (or the production window ends);
    stop when nothing is queued or running. start/end come from the database's
    clock while the jobs surely run: after the claim committed, before the
    first completion of the batch."""
    db = open_database(url, migrate=False, pool_size=2)
    queue = JobQueue(db, settings=QueueSettings(lease_duration=QueueSettings().lease_duration * 20))
    records: list[Record] = []
    barrier.wait(timeout=60)
    began = time.monotonic()
    try:
        with db.engine.connect() as clock_conn:

            def db_now() -> datetime:
                value: datetime = clock_conn.execute(text("SELECT clock_timestamp()")).scalar_one()
                clock_conn.rollback()
                return value

            while time.monotonic() - began < DEADLINE_S:
                leases = queue.claim(batch, worker=worker)
                if not leases:
                    if not queue.list_jobs(state=JobState.QUEUED, limit=1) and not queue.list_jobs(
                        state=JobState.RUNNING, limit=1
                    ):
                        break  # nothing left anywhere: the run is over
                    time.sleep(0.005)
                    continue
                start = db_now()
                time.sleep(0.002)  # the work: long enough for overlaps to show
                end = db_now()
                for lease in leases:
                    queue.complete(lease.lease_id)
                    job = lease.job
                    records.append((job.job_id, job.realm_id, lease.lease_id, start, end))
                    if time.monotonic() - began < PRODUCE_S:
                        follow_up(queue, job.realm_id, len(records))
    finally:
        db.close()
    return records


def follow_up(queue: JobQueue, realm_id: str, n: int) -> None:
    jobs = queue.list_jobs(realm_id=realm_id, limit=100)
    if len(jobs) >= JOBS_PER_REALM:
        return
    kinds = Counter(j.kind for j in jobs)
    if kinds[FS] <= kinds[INC]:
        queue.enqueue(realm_id, FS, n % 3 * 10, content_changed=True)
    else:
        queue.enqueue(realm_id, INC, n % 3 * 10, paths=[PathChange(f"f{n}.json", False)])


def queue_initial_jobs(db: Database, realms: list[str]) -> None:
    """An incremental and a from-scratch job per realm, inserted in one go."""
    now = datetime.now(UTC)
    base = int(now.timestamp() * 1_000_000)
    rows = []
    for n, realm_id in enumerate(realms):
        for k, (kind, paths) in enumerate(((INC, [PathChange("a.json", False)]), (FS, []))):
            row = new_job_values(
                realm_id=realm_id, kind=kind, priority=(n + k) % 4 * 10, now=now, paths=paths
            )
            row["seq"] = base + 2 * n + k
            rows.append(row)
    with db.session_for_tests() as s:
        s.execute(insert(JobRow), rows)


def test_racing_claimers_take_each_job_once_and_serialize_realms(pg_url: str) -> None:
    realms = [f"drain-{i:03d}" for i in range(REALMS)]
    db = open_database(pg_url)
    try:
        create_realms(db, realms)
        queue_initial_jobs(db, realms)
        results = run_processes(
            claimer, [(pg_url, f"w{p}", 3 + 2 * p) for p in range(4)], timeout=DEADLINE_S + 60
        )
        assert all(results), "every claimer took part"
        records = [r for per_process in results for r in per_process]
        queue = JobQueue(db)
        jobs = queue.list_jobs(limit=100_000)
        assert len(jobs) > 2 * len(realms)  # follow-ups were queued after completions
        assert {j.state for j in jobs} == {JobState.SUCCEEDED}  # drained
        claimed = Counter(job_id for job_id, *_ in records)
        assert max(claimed.values()) == 1  # no job claimed twice
        assert set(claimed) == {j.job_id for j in jobs}  # and every job claimed
        assert len({lease for _, _, lease, _, _ in records}) == len(records)
        with db.session_for_tests() as s:
            attempts = s.execute(select(JobAttemptRow.job_id, JobAttemptRow.outcome)).all()
        assert sorted(attempts) == sorted((j.job_id, "completed") for j in jobs)

        per_realm: dict[str, list[tuple[datetime, datetime, int]]] = defaultdict(list)
        for job_id, realm_id, _, start, end in records:
            assert start < end
            per_realm[realm_id].append((start, end, job_id))
        assert set(per_realm) == set(realms)
        for realm_id, spans in per_realm.items():
            spans.sort()
            for (_, end, before), (start, _, after) in itertools.pairwise(spans):
                assert end < start, f"{realm_id}: jobs {before} and {after} ran at once"
    finally:
        db.close()


def test_a_hand_off_waiting_on_a_realm_does_not_hold_up_the_claims(pg_url: str) -> None:
    """An instance alone runs its claims one at a time. A reindex offered a
    stream's credit (a hand-off) may wait on its realm's row (a bulk write
    holds it): the claims of other realms must go on meanwhile, as they never
    wait on a row themselves (SKIP LOCKED)."""
    db = open_database(pg_url)
    queue = JobQueue(db)
    try:
        create_realms(db, ["busy", "free"])
        free = queue.enqueue("free", JobKind.FROM_SCRATCH, USER).job
        db.set_others_alive(False)
        offer = HandOff("s", "w", 0, (), None)
        reindexed: list[Any] = []
        claimed: list[Any] = []
        with db.session_for_tests() as s:
            s.execute(text("SELECT 1 FROM realms WHERE realm_id = 'busy' FOR UPDATE"))
            reindex = threading.Thread(
                target=lambda: reindexed.append(
                    queue.enqueue("busy", JobKind.FROM_SCRATCH, USER, hand_off=offer)
                )
            )
            reindex.start()
            wait_for_a_lock_wait(db)
            claim = threading.Thread(target=lambda: claimed.extend(queue.claim(1, worker="v")))
            claim.start()
            claim.join(timeout=30)
            assert not claim.is_alive(), "a claim waited for a hand-off's row lock"
            assert [lease.job.job_id for lease in claimed] == [free.job_id]
        reindex.join(timeout=30)
        [result] = reindexed
        assert result.lease is not None and result.job.state is JobState.RUNNING
    finally:
        db.close()
