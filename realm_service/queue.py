"""Job queue use cases: enqueue with coalescing, claim, fenced lease
operations, release, reaping. Each public method owns its transaction; the
`*_in` variants run inside a caller's transaction (file writes, realm
creation) so the change and its job commit together.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from realm_service.clock import Clock, utcnow
from realm_service.domain import (
    SYSTEM,
    AttemptOutcome,
    Disposition,
    EnqueueResult,
    IndexEntry,
    Job,
    JobKind,
    JobState,
    Lease,
    PathChange,
    RealmState,
)
from realm_service.errors import Conflict, StaleLease
from realm_service.store import instances_sql, jobs_sql, realms_sql
from realm_service.store.db import Database
from realm_service.store.tables import JobRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueSettings:
    lease_duration: timedelta = timedelta(seconds=30)
    max_attempts: int = 3
    # A server instance that has not refreshed its row for this long is
    # taken for dead: leases its streams held are interruptions, not failures.
    instance_timeout: timedelta = timedelta(seconds=10)


class JobQueue:
    def __init__(
        self, db: Database, *, settings: QueueSettings | None = None, clock: Clock = utcnow
    ) -> None:
        self.db = db
        self.settings = settings or QueueSettings()
        self.clock = clock
        # Names this process in the leases it hands out (job_attempts.instance_id).
        self.instance_id = secrets.token_hex(8)
        # Leases whose streams closed while the store could not record the
        # release; the reaper releases them (as interruptions) once it can.
        self._unreleased: dict[str, str] = {}
        self._unreleased_lock = threading.Lock()

    # -- enqueue ------------------------------------------------------------

    def enqueue(
        self,
        realm_id: str,
        kind: JobKind,
        priority: int,
        *,
        paths: Sequence[PathChange] = (),
        content_changed: bool = False,
    ) -> EnqueueResult:

        def work(session: Session) -> EnqueueResult:
            realms_sql.get_realm(session, realm_id)
            return self.enqueue_in(
                session, realm_id, kind, priority, paths=paths, content_changed=content_changed
            )

        result = self.db.retrying(work)
        self.after_enqueue(result)
        return result

    def enqueue_in(
        self,
        session: Session,
        realm_id: str,
        kind: JobKind,
        priority: int,
        *,
        paths: Sequence[PathChange] = (),
        content_changed: bool = False,
    ) -> EnqueueResult:
        """Coalesce per DESIGN.md section 4. The partial unique index on queued
        jobs makes a concurrent duplicate insert fail; we then merge into the
        winner's row inside a savepoint so the caller's transaction survives."""
        now = self.clock()
        # One change per path, a delete winning, as merges already do: a job
        # must never list a path twice, or as both updated and deleted.
        paths = jobs_sql.merge_paths((), paths)
        for _ in range(3):
            # An incremental change may merge into a queued from-scratch job;
            # a from-scratch one needs (and locks) only its own kind.
            queued = jobs_sql.queued_jobs(
                session,
                realm_id,
                [kind, JobKind.FROM_SCRATCH] if kind is JobKind.INCREMENTAL else [kind],
            )
            if kind is JobKind.INCREMENTAL and kind.value not in queued:
                scratch = queued.get(JobKind.FROM_SCRATCH.value)
                if scratch is not None:  # it has not started: it will see the change
                    jobs_sql.merge_into(scratch, priority)
                    session.flush()
                    return EnqueueResult(jobs_sql.to_job(scratch), Disposition.MERGED)
            target = queued.get(kind.value)
            if target is not None:
                jobs_sql.merge_into(target, priority, paths)
                session.flush()
                return EnqueueResult(jobs_sql.to_job(target), Disposition.MERGED)
            running = jobs_sql.running_job(session, realm_id)
            if running is not None and running.kind == kind.value:
                if kind is JobKind.FROM_SCRATCH and not content_changed:
                    return EnqueueResult(jobs_sql.to_job(running), Disposition.ATTACHED)
                if kind is JobKind.INCREMENTAL:
                    # With content_changed (a file was just written or deleted)
                    # the running job may have read the path already; its result
                    # cannot answer the change, so a follow-up job is queued.
                    incoming = {(c.path, c.deleted) for c in paths}
                    covered = {(c.path, c.deleted) for c in jobs_sql.decode_paths(running.paths)}
                    if incoming and incoming <= covered and not content_changed:
                        return EnqueueResult(jobs_sql.to_job(running), Disposition.ATTACHED)
            row = jobs_sql.try_insert_job(
                session, realm_id=realm_id, kind=kind, priority=priority, now=now, paths=paths
            )
            if row is None:  # a concurrent enqueuer won: merge into its job
                continue
            self.db.announce_new_work(session)
            disposition = (
                Disposition.RERUN_SCHEDULED
                if running is not None and running.kind == kind.value
                else Disposition.INSERTED
            )
            return EnqueueResult(jobs_sql.to_job(row), disposition)
        raise Conflict("could not enqueue: concurrent changes kept winning; retry")

    def first_index_of_new_realm(self, session: Session, realm_id: str, priority: int) -> Job:
        """The first from-scratch job of a realm inserted in this same
        transaction. No job of it can exist yet (a job references the realm
        row, which others see only at commit), so nothing is looked up; the
        store's unique index still refuses a second queued one."""
        row = jobs_sql.insert_job(
            session,
            realm_id=realm_id,
            kind=JobKind.FROM_SCRATCH,
            priority=priority,
            now=self.clock(),
        )
        self.db.announce_new_work(session)
        return jobs_sql.to_job(row)

    def ensure_first_index(self, session: Session, realm_id: str, priority: int) -> Job | None:
        """The mount pipeline's rule: never add a from-scratch job for a realm
        that has one queued, running or completed; raise (never lower) a queued
        one's priority to what the realm's creation asked for."""
        queued = jobs_sql.queued_job(session, realm_id, JobKind.FROM_SCRATCH)
        if queued is not None:
            if queued.priority < priority:
                jobs_sql.raise_priority(session, queued.id, priority)
            return None
        if jobs_sql.has_from_scratch(session, realm_id, ("running", "succeeded")):
            return None
        result = self.enqueue_in(session, realm_id, JobKind.FROM_SCRATCH, priority)
        # A concurrent mount may have inserted it first: we merged into its job
        # (raising its priority) and added nothing, so report nothing added.
        return result.job if result.disposition is Disposition.INSERTED else None

    def after_enqueue(self, result: EnqueueResult) -> None:
        self._after_enqueue_many([result])

    def enqueue_all(self, priority: int, *, batch: int = 500) -> tuple[int, int]:
        """A from-scratch job for every realm, coalesced per DESIGN.md section
        4 as `enqueue_in` would; returns (inserted, realms). A page of realms
        takes a few statements, whatever its size: one inserts the jobs of
        realms with none queued or running, one raises the priority of those
        queued, and a running one is attached to."""
        inserted = realms = 0
        after: str | None = None
        while True:
            ids, results = self.db.retrying(
                functools.partial(
                    self._enqueue_page,
                    after=after,
                    limit=batch,
                    priority=priority,
                    now=self.clock(),
                )
            )
            inserted += self._after_enqueue_many(results)
            realms += len(ids)
            if len(ids) < batch:
                return inserted, realms
            after = ids[-1]

    def _enqueue_page(
        self, session: Session, *, after: str | None, limit: int, priority: int, now: datetime
    ) -> tuple[list[str], list[EnqueueResult]]:
        """One page of `enqueue_all`: its realm ids and what each got."""
        ids = realms_sql.realm_ids_page(session, after=after, limit=limit)
        active = jobs_sql.active_from_scratch(session, ids)
        rows = jobs_sql.try_insert_from_scratch_jobs(
            session, [r for r in ids if r not in active], priority=priority, now=now
        )
        if rows is None:  # a concurrent enqueuer was first: coalesce each
            return ids, [
                self.enqueue_in(session, realm_id, JobKind.FROM_SCRATCH, priority)
                for realm_id in ids
            ]
        if rows:
            self.db.announce_new_work(session)
        outcomes = [(row, Disposition.INSERTED) for row in rows]
        for row in active.values():
            if row.state == "queued":
                jobs_sql.merge_into(row, priority)
                outcomes.append((row, Disposition.MERGED))
            else:  # running, and a reindex does not say the content changed
                outcomes.append((row, Disposition.ATTACHED))
        session.flush()
        return ids, [EnqueueResult(jobs_sql.to_job(r), d) for r, d in outcomes]

    def _after_enqueue_many(self, results: Sequence[EnqueueResult]) -> int:
        """`after_enqueue` for a committed batch; returns how many it added."""
        added = [
            r
            for r in results
            if r.disposition in (Disposition.INSERTED, Disposition.RERUN_SCHEDULED)
        ]
        for r in added:
            log.info(
                "job enqueued job=%s realm=%s kind=%s priority=%s disposition=%s",
                r.job.job_id,
                r.job.realm_id,
                r.job.kind,
                r.job.priority,
                r.disposition,
            )
        if added:
            self.db.new_work_committed()
        if results:
            self.db.jobs_changed([r.job.job_id for r in results])
        return len(added)

    # -- claim ----------------------------------------------------------------

    def claim(
        self,
        limit: int,
        *,
        worker: str = "",
        min_priority: int = 0,
        kinds: Sequence[JobKind] | None = None,
        system_limit: int | None = None,
    ) -> list[Lease]:
        """Lease up to `limit` jobs in priority order. `system_limit` caps how
        many SYSTEM-level jobs this call may take (reserved slots)."""
        if limit <= 0:
            return []
        now = self.clock()
        until = now + self.settings.lease_duration

        def work(session: Session) -> list[Lease]:
            leases, leftover = jobs_sql.claim(
                session,
                limit=limit,
                min_priority=min_priority
                if system_limit is None
                else max(min_priority, SYSTEM + 1),
                max_priority=None,
                kinds=kinds,
                worker=worker,
                now=now,
                lease_until=until,
                instance_id=self.instance_id,
            )
            room = min(limit - len(leases), system_limit or 0)
            if system_limit is not None and room > 0 and min_priority <= SYSTEM:
                more, left_system = jobs_sql.claim(
                    session,
                    limit=room,
                    min_priority=min_priority,
                    max_priority=SYSTEM,
                    kinds=kinds,
                    worker=worker,
                    now=now,
                    lease_until=until,
                    instance_id=self.instance_id,
                )
                leases += more
                leftover = leftover or left_system
            if leftover:
                # Other instances skipped the rows this claim locked and
                # left: wake them to look again once it commits.
                self.db.announce_new_work(session)
            return leases

        leases = self.db.retrying(work)
        for lease in leases:
            log.info(
                "job running job=%s realm=%s lease=%s worker=%s priority=%s attempt=%s",
                lease.job.job_id,
                lease.job.realm_id,
                lease.lease_id,
                worker,
                lease.job.priority,
                lease.job.attempt,
            )
        if leases:
            self.db.jobs_changed([lease.job.job_id for lease in leases])
        return leases

    # -- fenced lease operations ----------------------------------------------

    def heartbeat(
        self, progress: dict[str, tuple[int, int]] | Sequence[str]
    ) -> dict[str, datetime | None]:
        """Extend leases (with optional progress). Maps each lease to its new
        expiry, or None when the lease is not current (nothing changed)."""
        leases = list(progress)
        values = progress if isinstance(progress, dict) else {}
        until = self.clock() + self.settings.lease_duration
        extended = self.db.retrying(
            functools.partial(jobs_sql.extend, lease_ids=leases, until=until, progress=values)
        )
        return {lease: (until if lease in extended else None) for lease in leases}

    def add_entries(
        self, lease_id: str, entries: Sequence[IndexEntry], deleted_paths: Sequence[str] = ()
    ) -> None:
        def work(session: Session) -> None:
            row = jobs_sql.current(session, lease_id, lock=False)
            assert row.lease_attempt_id is not None
            realms_sql.stage_entries(
                session,
                realm_id=row.realm_id,
                generation=row.lease_attempt_id,
                entries=entries,
                deleted_paths=deleted_paths,
            )

        self.db.retrying(work)

    def complete(self, lease_id: str, *, entries_uploaded: int = 0) -> Job:
        """Finish a lease successfully; the job's entries become the realm's index."""
        done = self.complete_many([(lease_id, entries_uploaded)])[lease_id]
        if isinstance(done, StaleLease):
            raise done
        return done

    def complete_many(self, results: Sequence[tuple[str, int]]) -> dict[str, Job | StaleLease]:
        """`complete` for several (lease, entries uploaded) in one transaction.
        Each lease is fenced on its own: one that is not current, or whose
        entry count does not match, is refused (its StaleLease is returned and
        nothing of it is applied) while the others complete."""
        now = self.clock()

        def work(
            session: Session,
        ) -> tuple[dict[str, Job | StaleLease], list[tuple[str, Job]]]:
            done: dict[str, Job | StaleLease] = {}
            rows = jobs_sql.held_many(session, [lease_id for lease_id, _ in results])
            accepted: list[tuple[str, jobs_sql.HeldJob]] = []
            counted: list[tuple[str, jobs_sql.HeldJob, int]] = []
            for lease_id, uploaded in results:
                row = rows.pop(lease_id, None)  # a lease listed twice is current once
                if row is None:
                    done[lease_id] = StaleLease(f"lease {lease_id[:40]!r} is not current")
                elif uploaded:
                    counted.append((lease_id, row, uploaded))
                else:
                    accepted.append((lease_id, row))
            staged = realms_sql.count_staged_many(
                session, [(row.realm_id, row.lease_attempt_id or 0) for _, row, _ in counted]
            )
            for lease_id, row, uploaded in counted:
                received = staged.get((row.realm_id, row.lease_attempt_id or 0), 0)
                if received != uploaded:
                    done[lease_id] = StaleLease(
                        f"lease {lease_id}: {uploaded} entries reported, "
                        f"{received} received; the result was not applied"
                    )
                else:
                    accepted.append((lease_id, row))
            scratch = JobKind.FROM_SCRATCH.value
            realms_sql.switch_generations(
                session,
                [(r.realm_id, r.lease_attempt_id or 0, r.kind == scratch) for _, r in accepted],
                now=now,
            )
            jobs_sql.end_attempts(
                session,
                [row.lease_attempt_id for _, row in accepted if row.lease_attempt_id is not None],
                AttemptOutcome.COMPLETED,
                now,
            )
            succeeded = jobs_sql.succeed_many(session, [row for _, row in accepted], now)
            finished = [
                (lease_id, job) for (lease_id, _), job in zip(accepted, succeeded, strict=True)
            ]
            return done, finished

        done, finished = self.db.retrying(work)
        for lease_id, job in finished:
            done[lease_id] = job
            self._log_end(job, lease_id, "succeeded")
        if finished:
            self.db.jobs_changed([job.job_id for _, job in finished])
            self.db.new_work_committed()  # the realms' next jobs may run now
        return done

    def fail(self, lease_id: str, message: str, *, permanent: bool = False) -> Job:
        """A failed attempt: counts toward the cap; retried until it is reached."""
        now = self.clock()

        def work(session: Session) -> Job:
            row = jobs_sql.current(session, lease_id)
            jobs_sql.end_attempt(session, row.lease_attempt_id, AttemptOutcome.FAILED, now, message)
            return self._count_failure(session, row, message, now, permanent=permanent)

        job = self.db.retrying(work)
        self._log_end(job, lease_id, job.state.value)
        self.db.jobs_changed([job.job_id])
        self.db.new_work_committed()
        return job

    def release(self, lease_ids: Sequence[str], reason: str = "released") -> list[Job]:
        """Interrupted attempts (stream closed, drain, shutdown): requeued at
        once, not counted. Stale leases are skipped."""
        now = self.clock()

        def work(session: Session) -> list[Job]:
            jobs: list[Job] = []
            for lease_id in lease_ids:
                try:
                    row = jobs_sql.current(session, lease_id)
                except StaleLease:
                    continue
                jobs_sql.end_attempt(
                    session, row.lease_attempt_id, AttemptOutcome.INTERRUPTED, now, reason
                )
                jobs_sql.requeue(session, row)
                jobs.append(jobs_sql.to_job(row))
            if jobs:
                self.db.announce_new_work(session)
            return jobs

        jobs = self.db.retrying(work)
        for job in jobs:
            log.info("job requeued job=%s realm=%s reason=%s", job.job_id, job.realm_id, reason)
        if jobs:
            self.db.jobs_changed([j.job_id for j in jobs])
            self.db.new_work_committed()
        return jobs

    def defer_release(self, lease_ids: Sequence[str], reason: str) -> None:
        """Remember leases whose release could not be recorded (the store was
        unreachable): `release_deferred` records it later, and the reaper
        treats them as interrupted if they expire first."""
        with self._unreleased_lock:
            for lease_id in lease_ids:
                self._unreleased[lease_id] = reason

    def release_deferred(self) -> list[Job]:
        """Record the releases `defer_release` kept; they stay kept if the
        store still cannot take them."""
        with self._unreleased_lock:
            pending = dict(self._unreleased)
        if not pending:
            return []
        jobs: list[Job] = []
        for reason in set(pending.values()):
            jobs += self.release([lease for lease, r in pending.items() if r == reason], reason)
        with self._unreleased_lock:
            for lease_id in pending:
                self._unreleased.pop(lease_id, None)
        return jobs

    def reap_expired(self, limit: int = 1000, *, held: Collection[str] | None = None) -> list[Job]:
        """End leases past their expiry. Who held the lease decides how:

        - this instance, and one of its streams still holds it (`held`): the
          worker went silent, a bad attempt: requeued, or failed at the cap;
        - this instance, and no stream holds it (the stream closed while the
          store was unreachable): an interruption, not counted;
        - another instance that is gone (it stopped refreshing its row): an
          interruption; a server crash is not the job's fault;
        - another live instance: left to it, since only it knows whether its
          stream still holds the lease;
        - not recorded (leases from before instances were): a bad attempt.

        With `held` None every lease of this instance counts as held.
        """
        now = self.clock()
        seen_after = now - self.settings.instance_timeout
        with self._unreleased_lock:
            unreleased = set(self._unreleased)

        def work(session: Session) -> tuple[list[Job], list[Job], list[str]]:
            rows = jobs_sql.expired(session, now, limit)
            holders = instances_sql.holders(
                session, [r.lease_attempt_id for r in rows if r.lease_attempt_id is not None]
            )
            others = [h for h in holders.values() if h and h != self.instance_id]
            alive = instances_sql.live(session, others, seen_after)
            counted: list[Job] = []
            interrupted: list[Job] = []
            settled: list[str] = []
            for row in rows:
                holder = holders.get(row.lease_attempt_id or 0, "")
                lease_id = row.lease_id or ""
                if holder == self.instance_id:
                    silent = lease_id not in unreleased and (held is None or lease_id in held)
                    reason = "lease expired" if silent else "stream closed"
                elif holder in alive:
                    continue
                elif holder:
                    silent, reason = False, f"server instance {holder} stopped"
                else:
                    silent, reason = True, "lease expired"
                settled.append(lease_id)
                if silent:
                    jobs_sql.end_attempt(
                        session, row.lease_attempt_id, AttemptOutcome.EXPIRED, now, reason
                    )
                    counted.append(self._count_failure(session, row, reason, now))
                else:
                    jobs_sql.end_attempt(
                        session, row.lease_attempt_id, AttemptOutcome.INTERRUPTED, now, reason
                    )
                    jobs_sql.requeue(session, row)
                    interrupted.append(jobs_sql.to_job(row))
            if counted or interrupted:
                self.db.announce_new_work(session)
            return counted, interrupted, settled

        counted, interrupted, settled = self.db.retrying(work)
        with self._unreleased_lock:
            for lease_id in settled:
                self._unreleased.pop(lease_id, None)
        for job in counted:
            log.info(
                "job lease expired job=%s realm=%s state=%s", job.job_id, job.realm_id, job.state
            )
        for job in interrupted:
            log.info("job requeued job=%s realm=%s reason=lease orphaned", job.job_id, job.realm_id)
        jobs = counted + interrupted
        if jobs:
            self.db.jobs_changed([j.job_id for j in jobs])
            self.db.new_work_committed()
        return jobs

    # -- server instances ---------------------------------------------------------

    def register_instance(self) -> None:
        now = self.clock()
        self.db.retrying(
            functools.partial(instances_sql.register, instance_id=self.instance_id, now=now)
        )

    def touch_instance(self) -> None:
        """Say this instance is alive; also the health check's write probe
        (raises StoreUnavailable or StoreFull when writes cannot commit)."""
        now = self.clock()

        def work(session: Session) -> None:
            if not instances_sql.touch(session, self.instance_id, now):
                instances_sql.register(session, self.instance_id, now)

        self.db.retrying(work)

    def unregister_instance(self) -> None:
        self.db.retrying(functools.partial(instances_sql.remove, instance_ids=[self.instance_id]))

    def forget_dead_instances(self) -> int:
        """Delete rows of instances gone for long: their leases were reaped by then."""
        before = self.clock() - 10 * max(
            self.settings.instance_timeout, self.settings.lease_duration
        )

        def work(session: Session) -> int:
            dead = [i for i in instances_sql.stale(session, before) if i != self.instance_id]
            instances_sql.remove(session, dead)
            return len(dead)

        return self.db.retrying(work)

    def _count_failure(
        self,
        session: Session,
        row: JobRow,
        message: str,
        now: datetime,
        *,
        permanent: bool = False,
    ) -> Job:
        row.counted_failures += 1
        if permanent or row.counted_failures >= self.settings.max_attempts:
            reason = (
                message
                if permanent
                else (f"gave up after {row.counted_failures} failed attempts; last: {message}")
            )
            jobs_sql.finish(row, JobState.FAILED, now, reason)
            realm = realms_sql.get_realm(session, row.realm_id)
            if realm.current_generation is None:
                realms_sql.set_realm_state(session, row.realm_id, RealmState.INDEX_FAILED)
        else:
            row.error_message = message[:2000]
            jobs_sql.requeue(session, row)
        session.flush()
        return jobs_sql.to_job(row)

    def _log_end(self, job: Job, lease_id: str, outcome: str) -> None:
        log.info(
            "job %s job=%s realm=%s lease=%s attempt=%s",
            outcome,
            job.job_id,
            job.realm_id,
            lease_id,
            job.attempt,
        )

    # -- reads --------------------------------------------------------------------

    def get_job(self, job_id: int) -> Job:
        with self.db.read_transaction() as session:
            return jobs_sql.get_job(session, job_id)

    def list_jobs(
        self,
        *,
        realm_id: str | None = None,
        kind: JobKind | None = None,
        state: JobState | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[Job]:
        with self.db.read_transaction() as session:
            return jobs_sql.list_jobs(
                session, realm_id=realm_id, kind=kind, state=state, before_id=before_id, limit=limit
            )

    def attempts(self, job_id: int) -> list[tuple[str, str]]:
        with self.db.read_transaction() as session:
            return jobs_sql.attempts_of(session, job_id)

    def depth(self) -> list[tuple[int, int, datetime | None]]:
        with self.db.read_transaction() as session:
            return jobs_sql.queue_depth(session)
