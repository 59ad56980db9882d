"""Job queue use cases: the policy of the queue (coalescing, the attempts
cap, reserved slots, who reaps a lease and how it counts) over the store's
named transitions. Each public method owns its transaction; the `*_in`
variants run inside a caller's `Tx` (file writes, realm creation) so the
change and its job commit together.

Effects of a change (the dispatcher's wake-up, NOTIFY to other instances,
watchers of a job, log lines) are recorded on the `Tx` by the store and fire
after the commit: no caller has a second step to remember.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from realm_common import tracing
from realm_service import metrics
from realm_service.clock import Clock, utcnow
from realm_service.domain import (
    MAX_JOB_PATHS,
    SYSTEM,
    Attempt,
    AttemptOutcome,
    Disposition,
    EnqueueResult,
    HandOff,
    HeldJob,
    IndexEntry,
    Job,
    JobKind,
    JobState,
    Lease,
    PathChange,
    QueuePosition,
    QueueStats,
    Realm,
    RealmState,
    RunningInfo,
    WorkerInfo,
    merge_paths,
)
from realm_service.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    RealmError,
    StaleLease,
)
from realm_service.store import (
    claim_sql,
    enqueue_sql,
    index_sql,
    instances_sql,
    jobs_sql,
    leases_sql,
    realms_sql,
)
from realm_service.store.db import Database, Effects, LoopTx, Tx, translate_errors

log = logging.getLogger(__name__)

# A small incremental job gets its files with its assignment (read in the
# claim's transaction), so the worker starts without a StreamRealmFiles call:
# at most this many paths, this much content, and this many jobs of a claim.
INLINE_PATHS = 8
INLINE_BYTES = 64 << 10
INLINE_JOBS = 16
# At most this many jobs a claim, and results a completion, run on the event
# loop (Database.on_loop): a unit of a few milliseconds.
ON_LOOP_CLAIM = 128
ON_LOOP_COMPLETE = 128
# ... and a completion that would drop a realm's index of more entries than
# this goes back to a store thread (index_sql.switch_generations).
ON_LOOP_REPLACED = 1_000
GITIGNORE_PATH = ".gitignore"
# Live jobs beyond twice the planner's count of `jobs` by this many: the
# table outgrew the plans cached for it (see `JobQueue.analyze_if_outgrown`).
OUTGROWN_SLACK = 1_000


@dataclass(frozen=True)
class QueueSettings:
    lease_duration: timedelta = timedelta(seconds=30)
    max_attempts: int = 3
    # A server instance that has not refreshed its row for this long is
    # taken for dead: leases its streams held are interruptions, not failures.
    instance_timeout: timedelta = timedelta(seconds=10)
    # Times a SYSTEM job may be preempted for a user's job; 0: never.
    max_preemptions: int = 3
    # How long the leases of a ClaimJobs stream that broke wait for their
    # worker to re-attach them (at most the lease duration); 0: released at
    # once.
    resume_grace: timedelta = timedelta(seconds=5)


def _opened(tx: Tx, held: HeldJob) -> HeldJob:
    """The attempt's checkpoint as it stages or completes: one its worker
    never opened (by reading the realm's listing) is discarded, and the
    attempt starts afresh."""
    if held.checkpoint is None or held.kept is not None:
        return held
    index_sql.discard_checkpoint(tx, held.job_id, held.realm_id, held.checkpoint)
    return dataclasses.replace(held, kept=0)


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
        self._claims_one_at_a_time = threading.Lock()
        db.on_listening(self._ask_who_else)

    # -- subscriptions --------------------------------------------------------

    def on_new_work(self, callback: Callable[[], None]) -> None:
        """Call back (from any thread) when new or requeued work may be claimable,
        here or on another instance sharing the store."""
        self.db.on_new_work(callback)

    def on_job_change(self, callback: Callable[[int, Job | None], None]) -> None:
        """Call back with a job id once this process committed a change to it,
        and the job as the change left it when the change knew it (a claim,
        an ending; else None)."""
        self.db.on_job_change(callback)

    def on_lease_revoked(self, callback: Callable[[str, str], None]) -> None:
        """Call back (from any thread) with (lease id, reason) when a lease is
        revoked (its job cancelled or deleted), here or on another instance."""
        self.db.on_lease_revoked(callback)

    # -- enqueue ------------------------------------------------------------

    def enqueue(
        self,
        realm_id: str,
        kind: JobKind,
        priority: int,
        *,
        paths: Sequence[PathChange] = (),
        content_changed: bool = False,
        hand_off: HandOff | None = None,
    ) -> EnqueueResult:
        """Enqueue (see `enqueue_in`). With `hand_off` (an idle stream's
        credit), one job is claimed for that stream when the enqueue left its
        job queued, in the enqueue's transaction or, for a job it inserted on
        PostgreSQL, right after that insert committed (`_hand_off_after`);
        the result carries the lease."""

        paths = merge_paths((), paths)
        idle = self._enqueue_if_idle(realm_id, kind, priority, paths, hand_off)
        if idle is not None:
            return idle
        return self._enqueue_full(realm_id, kind, priority, paths, content_changed, hand_off)

    async def enqueue_on_loop(
        self,
        realm_id: str,
        kind: JobKind,
        priority: int,
        *,
        content_changed: bool = False,
        hand_off: HandOff | None = None,
    ) -> EnqueueResult:
        """`enqueue` (of no paths) for a caller on the event loop. On
        PostgreSQL the insert into an idle realm and a hand-off's claim of
        one statement run on the loop (`Database.loop_statements`), without
        the hops to a store thread and back; the rest (a realm that is not
        idle, a claim of several statements, SQLite) runs in a store thread
        as `enqueue` runs it."""
        if not self.db.runs_on_loop:
            return await asyncio.to_thread(
                functools.partial(
                    self.enqueue,
                    realm_id,
                    kind,
                    priority,
                    content_changed=content_changed,
                    hand_off=hand_off,
                )
            )
        idle = await self._enqueue_if_idle_on_loop(realm_id, kind, priority, hand_off)
        if idle is not None:
            return idle
        return await asyncio.to_thread(
            self._enqueue_full, realm_id, kind, priority, (), content_changed, hand_off
        )

    def _enqueue_full(
        self,
        realm_id: str,
        kind: JobKind,
        priority: int,
        paths: Sequence[PathChange],
        content_changed: bool,
        hand_off: HandOff | None,
    ) -> EnqueueResult:
        """The enqueue of a realm that is not idle (`enqueue_in`), with its
        hand-off."""

        def work(tx: Tx) -> EnqueueResult:
            result = self.enqueue_in(
                tx,
                realm_id,
                kind,
                priority,
                paths=paths,
                content_changed=content_changed,
                check_realm=True,
            )
            if (
                hand_off is None
                or result.job.state is not JobState.QUEUED
                or self._claimed_after_commit(result)
            ):
                return result
            return self._hand_off_in(tx, result, hand_off, concurrent=self.db.others_alive)

        # Not one of this process's claims run one at a time: the enqueue may
        # wait on a row lock (a realm's write), and claims must not wait with
        # it. Its claim does not check for concurrent ones: it locks its
        # candidates and their realms as any claim does, and in the rare race
        # that check is for (another claim's job of the same realm committed
        # after this statement's snapshot), the unique index on running jobs
        # refuses the second job and the transaction runs again.
        result = self.db.retrying(work)
        if hand_off is None or not self._claimed_after_commit(result):
            return result
        return self._hand_off_after(result, hand_off, None)

    def _claimed_after_commit(self, result: EnqueueResult) -> bool:
        """Whether a hand-off's claim for this enqueue waits until its
        transaction has committed: on PostgreSQL, for a job it inserted and
        left queued (`_hand_off_after`)."""
        return (
            self.db.backend == "postgresql"
            and result.disposition in _INSERTS
            and result.job.state is JobState.QUEUED
        )

    def _enqueue_if_idle(
        self,
        realm_id: str,
        kind: JobKind,
        priority: int,
        paths: Sequence[PathChange],
        hand_off: HandOff | None,
    ) -> EnqueueResult | None:
        """The enqueue of a realm that runs no job and has no queued job to
        coalesce with (the usual case): by the rules of `enqueue_in` it is an
        insert, and the store makes it one statement that inserts only when
        that holds. On PostgreSQL it commits alone, and so does a hand-off's
        claim when it is one statement too: one round trip each, where a
        transaction reading the realm's jobs first made four. A claim of
        several statements (other instances are about) follows in a
        transaction of its own (`_hand_off_after`). On SQLite the insert
        and the claim share one transaction: writers take turns there, and
        two commits would be two syncs. None when the realm is not idle (or
        does not exist): the full enqueue decides."""
        if kind is JobKind.INCREMENTAL and _too_many_paths(None, paths):
            return None
        coalesce_with = [kind, JobKind.FROM_SCRATCH] if kind is JobKind.INCREMENTAL else [kind]
        concurrent = self.db.others_alive
        now = self.clock()
        try:
            with self.db.statements() as tx:
                job = enqueue_sql.insert_if_idle(
                    tx,
                    realm_id=realm_id,
                    kind=kind,
                    coalesce_with=coalesce_with,
                    priority=priority,
                    now=now,
                    paths=paths,
                    trace_parent=tracing.current_traceparent(),
                )
                if job is None:
                    return None
                result = EnqueueResult(job, Disposition.INSERTED)
                tx.on_commit(functools.partial(_log_enqueued, [result]))
                if hand_off is None:
                    return result
                if not tx.each_statement_commits:  # SQLite: one transaction
                    return self._hand_off_in(tx, result, hand_off, concurrent=concurrent)
                if self._one_statement_claim(hand_off, concurrent):
                    # It commits alone too, in this unit: its effects fire
                    # with the insert's (no wake-up for a job it took).
                    return self._hand_off_after(result, hand_off, tx)
                offer = hand_off
        except Conflict:
            # The insert lost a race (its realm deleted meanwhile), or, on
            # SQLite, anything in its transaction did: nothing committed.
            return None
        return self._hand_off_after(result, offer, None)

    async def _enqueue_if_idle_on_loop(
        self, realm_id: str, kind: JobKind, priority: int, hand_off: HandOff | None
    ) -> EnqueueResult | None:
        """`_enqueue_if_idle` of no paths, on the event loop (PostgreSQL):
        the insert, then a hand-off's claim when it is one statement (else
        in a store thread, `_hand_off_after`)."""
        concurrent = self.db.others_alive
        try:
            async with self.db.loop_statements() as tx:
                job = await enqueue_sql.insert_if_idle_on_loop(
                    tx,
                    realm_id=realm_id,
                    kind=kind,
                    coalesce_with=[kind],
                    priority=priority,
                    now=self.clock(),
                    trace_parent=tracing.current_traceparent(),
                )
                if job is None:
                    return None
                result = EnqueueResult(job, Disposition.INSERTED)
                tx.on_commit(functools.partial(_log_enqueued, [result]))
                if hand_off is None:
                    return result
                if not self._one_statement_claim(hand_off, concurrent):
                    offer = hand_off
                else:
                    offer = None
                    result = await self._hand_off_on_loop(tx, result, hand_off)
        except Conflict:  # as in `_enqueue_if_idle`: nothing committed
            return None
        if offer is not None:
            return await asyncio.to_thread(self._hand_off_after, result, offer, None)
        lease = result.lease
        if lease is not None and lease.job.kind is JobKind.INCREMENTAL:
            # A small incremental job ahead of this one was claimed: its
            # files go with it where they fit (`_with_files`), read in a
            # store thread once the loop's connection is back.
            [lease] = await asyncio.to_thread(self._with_files_read, [lease])
            result = dataclasses.replace(result, lease=lease)
        return result

    async def _hand_off_on_loop(
        self, tx: LoopTx, result: EnqueueResult, hand_off: HandOff
    ) -> EnqueueResult:
        """`_hand_off_after` in the idle insert's unit on the loop: the
        claim's one statement, after the insert's commit. A claim that fails
        leaves the enqueue standing, as there."""
        now = self.clock()
        lowest, _ = self._lanes(hand_off.min_priority, hand_off.system_limit)
        try:
            with translate_errors():
                leases = await claim_sql.claim_one_on_loop(
                    tx,
                    min_priority=lowest,
                    max_priority=hand_off.max_priority,
                    kinds=hand_off.kinds or None,
                    worker=hand_off.worker,
                    now=now,
                    lease_until=now + self.settings.lease_duration,
                    instance_id=self.instance_id,
                )
        except Exception as e:
            _hand_off_failed(result, e)
            return result
        return _handed(tx, result, leases)

    def _with_files_read(self, leases: list[Lease]) -> list[Lease]:
        """The leases with their files (`_with_files`), read after their
        claim committed: a read that fails leaves them without (the worker
        reads them), never the claim undone."""
        try:
            with self.db.read_transaction() as tx:
                return _with_files(tx, leases)
        except Exception as e:
            log.warning(
                "could not read a claimed job's files; the worker reads them",
                extra={"error": str(e)},
            )
            return leases

    def _one_statement_claim(self, hand_off: HandOff, concurrent: bool) -> bool:
        """Whether the hand-off's claim is one statement (`claim_sql.claim`,
        with the lanes `_claim_in` gives it), which may commit on its own."""
        return claim_sql.one_statement(
            self.db.backend,
            limit=1,
            concurrent=concurrent,
            system_cap=self._lanes(hand_off.min_priority, hand_off.system_limit)[1],
        )

    def _hand_off_after(
        self, result: EnqueueResult, hand_off: HandOff, tx: Tx | None
    ) -> EnqueueResult:
        """The hand-off's claim once the job's insert has committed: in `tx`,
        a unit whose statements each commit, or else in a unit of its own (a
        transaction, unless the claim is one statement).

        On PostgreSQL a job an enqueue inserted is claimed only once its
        insert has committed. A concurrent enqueue of the same realm that
        found no queued job of the kind waits on the new queued row (the
        unique index of one queued job per realm and kind) and, once that row
        is committed, inserts nothing and coalesces with it. Were the job
        claimed in the inserting transaction, the row would be gone when that
        transaction commits, and the waiting insert would add a second job
        where the rules attach to the running one. (Any claim that commits
        before the waiting insert looks again, this one or a round's, has
        that effect still: a redundant job, in the moment the waiter takes
        to wake.) SQLite's writers take turns: nothing waits there, and the
        claim shares the transaction.

        A claim that fails leaves the enqueue standing as it committed: the
        claim took nothing (another claim started a job of the realm, which
        the unique index on running jobs refused, or the store failed), and
        the dispatcher, woken by the new work, hands the job out."""
        concurrent = self.db.others_alive
        try:
            with translate_errors():
                if tx is not None:
                    return self._hand_off_in(tx, result, hand_off, concurrent=concurrent)
                if self._one_statement_claim(hand_off, concurrent):
                    with self.db.statements() as own:
                        return self._hand_off_in(own, result, hand_off, concurrent=concurrent)
                return self.db.retrying(
                    functools.partial(
                        self._hand_off_in, result=result, hand_off=hand_off, concurrent=concurrent
                    )
                )
        except Exception as e:
            _hand_off_failed(result, e)
            return result

    def _lanes(self, min_priority: int, system_limit: int | None) -> tuple[int, int | None]:
        """A claim's lowest priority and SYSTEM cap as the store takes them.
        With a SYSTEM budget, one statement serves both lanes (the jobs above
        SYSTEM come first in its order); without any, only the jobs above
        SYSTEM are looked at, so that a backlog of SYSTEM work is not scanned
        (and locked) by claims that may take none of it."""
        if system_limit is None or (system_limit > 0 and min_priority <= SYSTEM):
            return min_priority, system_limit
        return max(min_priority, SYSTEM + 1), None

    def _hand_off_in(
        self, tx: Tx, result: EnqueueResult, hand_off: HandOff, *, concurrent: bool
    ) -> EnqueueResult:
        """Claim one job for the offered stream, in the enqueue's transaction
        or right after its insert committed (`_hand_off_after`). The
        claim's order picks it: the enqueued job, or one ahead of it
        that the stream's filter takes. When it took the enqueued job in the
        unit of work that inserted it, the work that unit announced is taken
        already: this process's dispatcher is not woken for it (other
        instances are told, and look for nothing)."""
        now = self.clock()
        leases = self._claim_in(
            tx,
            1,
            worker=hand_off.worker,
            min_priority=hand_off.min_priority,
            max_priority=hand_off.max_priority,
            kinds=hand_off.kinds or None,
            system_limit=hand_off.system_limit,
            now=now,
            until=now + self.settings.lease_duration,
            concurrent=concurrent,
        )
        return _handed(tx, result, leases)

    def enqueue_in(
        self,
        tx: Tx,
        realm_id: str,
        kind: JobKind,
        priority: int,
        *,
        paths: Sequence[PathChange] = (),
        content_changed: bool = False,
        check_realm: bool = False,
    ) -> EnqueueResult:
        """Coalesce per DESIGN.md section 4. The partial unique index on queued
        jobs makes a concurrent duplicate insert fail; we then merge into the
        winner's row inside a savepoint so the caller's transaction survives.
        With `check_realm`, a realm that does not exist is RealmNotFound (a
        queued job of it, found first, proves it exists)."""
        now = self.clock()
        # One change per path, a delete winning, as merges already do: a job
        # must never list a path twice, or as both updated and deleted.
        paths = merge_paths((), paths)
        for _ in range(3):
            # An incremental change may merge into a queued from-scratch job;
            # a from-scratch one needs (and locks) only its own kind.
            queued, running = enqueue_sql.realm_jobs(
                tx,
                realm_id,
                [kind, JobKind.FROM_SCRATCH] if kind is JobKind.INCREMENTAL else [kind],
                check_realm=check_realm,
            )
            if kind is JobKind.INCREMENTAL and kind not in queued:
                scratch = queued.get(JobKind.FROM_SCRATCH)
                if scratch is not None:  # it has not started: it will see the change
                    merged = enqueue_sql.merge(tx, scratch, priority)
                    return EnqueueResult(merged, Disposition.MERGED)
            target = queued.get(kind)
            if kind is JobKind.INCREMENTAL and _too_many_paths(target, paths):
                return self._escalate(tx, realm_id, priority, target, check_realm=check_realm)
            if target is not None:
                return EnqueueResult(
                    enqueue_sql.merge(tx, target, priority, paths), Disposition.MERGED
                )
            if running is not None and running.kind is kind:
                if kind is JobKind.FROM_SCRATCH and not content_changed:
                    return EnqueueResult(running, Disposition.ATTACHED)
                if kind is JobKind.INCREMENTAL:
                    # With content_changed (a file was just written or deleted)
                    # the running job may have read the path already; its result
                    # cannot answer the change, so a follow-up job is queued.
                    incoming = {(c.path, c.deleted) for c in paths}
                    covered = {(c.path, c.deleted) for c in running.path_changes}
                    if incoming and incoming <= covered and not content_changed:
                        return EnqueueResult(running, Disposition.ATTACHED)
            job = enqueue_sql.try_insert_job(
                tx,
                realm_id=realm_id,
                kind=kind,
                priority=priority,
                now=now,
                paths=paths,
                trace_parent=tracing.current_traceparent(),
            )
            if job is None:  # a concurrent enqueuer won: merge into its job
                continue
            disposition = (
                Disposition.RERUN_SCHEDULED
                if running is not None and running.kind is kind
                else Disposition.INSERTED
            )
            result = EnqueueResult(job, disposition)
            tx.on_commit(functools.partial(_log_enqueued, [result]))
            return result
        raise Conflict("could not enqueue: concurrent changes kept winning; retry")

    def _escalate(
        self,
        tx: Tx,
        realm_id: str,
        priority: int,
        queued_incremental: Job | None,
        *,
        check_realm: bool = False,
    ) -> EnqueueResult:
        """More changed paths than an incremental job may list: index the
        realm from scratch instead, folding its queued incremental job (if
        any) into that one, so a path list stays bounded however many writes
        come."""
        if queued_incremental is not None:
            priority = max(priority, queued_incremental.priority)
        result = self.enqueue_in(
            tx,
            realm_id,
            JobKind.FROM_SCRATCH,
            priority,
            content_changed=True,
            check_realm=check_realm,
        )
        if queued_incremental is not None:
            enqueue_sql.supersede(tx, queued_incremental, result.job)
        return result

    def new_realm(
        self,
        tx: Tx,
        *,
        realm_id: str,
        display_name: str,
        priority: int,
        now: datetime,
        files: Sequence[tuple[str, bytes]],
    ) -> tuple[Realm, Job] | None:
        """A realm that does not exist yet, with its files and its first
        from-scratch job at the creation's priority, written together (one
        statement on PostgreSQL, which `Database.statements` may run alone):
        None, and nothing written, when the realm exists."""
        created = realms_sql.create_realm(
            tx,
            realm_id=realm_id,
            display_name=display_name,
            priority=priority,
            now=now,
            files=files,
            **self._first_job(priority),
        )
        return _logged_when_created(tx, created)

    async def new_realm_on_loop(
        self,
        tx: LoopTx,
        *,
        realm_id: str,
        display_name: str,
        priority: int,
        now: datetime,
        files: Sequence[tuple[str, bytes]],
    ) -> tuple[Realm, Job] | None:
        """`new_realm` on the event loop (`Database.loop_statements`)."""
        created = await realms_sql.create_realm_on_loop(
            tx,
            realm_id=realm_id,
            display_name=display_name,
            priority=priority,
            now=now,
            files=files,
            **self._first_job(priority),
        )
        return _logged_when_created(tx, created)

    def announce_work(self) -> None:
        """Work may be claimable whose announcement was lost (a statement
        that committed under a cancel): this process's dispatcher is woken,
        and other instances are told."""
        with self.db.statements() as tx:
            tx.announce_new_work()

    def _first_job(self, priority: int) -> dict[str, Any]:
        """A new realm's first job: at its creation's priority, now, in the
        caller's trace."""
        return {
            "job_priority": priority,
            "job_time": self.clock(),
            "trace_parent": tracing.current_traceparent(),
        }

    def first_index_of_new_realm(self, tx: Tx, realm_id: str, priority: int) -> Job:
        """The first from-scratch job of a realm inserted in this same
        transaction. No job of it can exist yet (a job references the realm
        row, which others see only at commit), so nothing is looked up; the
        store's unique index still refuses a second queued one."""
        job = enqueue_sql.insert_job(
            tx,
            realm_id=realm_id,
            kind=JobKind.FROM_SCRATCH,
            priority=priority,
            now=self.clock(),
            trace_parent=tracing.current_traceparent(),
        )
        tx.on_commit(functools.partial(_log_enqueued, [EnqueueResult(job, Disposition.INSERTED)]))
        return job

    def ensure_first_index(self, tx: Tx, realm_id: str, priority: int) -> Job | None:
        """The mount pipeline's rule: never add a from-scratch job for a realm
        that has one queued, running or completed; raise (never lower) a queued
        one's priority to what the realm's creation asked for."""
        queued, _ = enqueue_sql.realm_jobs(tx, realm_id, [JobKind.FROM_SCRATCH])
        if JobKind.FROM_SCRATCH in queued:
            enqueue_sql.raise_priority(tx, [queued[JobKind.FROM_SCRATCH].job_id], priority)
            return None
        # A cancelled first job stays cancelled: an operator stopped it, and
        # ReindexRealm (or RetryJob) starts another when they want one.
        done = (JobState.RUNNING, JobState.SUCCEEDED, JobState.CANCELLED)
        if enqueue_sql.has_from_scratch(tx, realm_id, done):
            return None
        result = self.enqueue_in(tx, realm_id, JobKind.FROM_SCRATCH, priority)
        # A concurrent mount may have inserted it first: we merged into its job
        # (raising its priority) and added nothing, so report nothing added.
        return result.job if result.disposition is Disposition.INSERTED else None

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
            inserted += sum(1 for r in results if r.disposition is Disposition.INSERTED)
            realms += len(ids)
            if len(ids) < batch:
                return inserted, realms
            after = ids[-1]

    def _enqueue_page(
        self, tx: Tx, *, after: str | None, limit: int, priority: int, now: datetime
    ) -> tuple[list[str], list[EnqueueResult]]:
        """One page of `enqueue_all`: its realm ids and what each got."""
        ids = realms_sql.realm_ids_page(tx, after=after, limit=limit)
        active = enqueue_sql.active_from_scratch(tx, ids)
        jobs = enqueue_sql.try_insert_from_scratch_jobs(
            tx, [r for r in ids if r not in active], priority=priority, now=now
        )
        if jobs is None:  # a concurrent enqueuer was first: coalesce each
            return ids, [
                self.enqueue_in(tx, realm_id, JobKind.FROM_SCRATCH, priority) for realm_id in ids
            ]
        results = [EnqueueResult(job, Disposition.INSERTED) for job in jobs]
        tx.on_commit(functools.partial(_log_enqueued, list(results)))
        queued = [job for job in active.values() if job.state is JobState.QUEUED]
        enqueue_sql.raise_priority(tx, [job.job_id for job in queued], priority)
        for job in active.values():
            if job.state is JobState.QUEUED:
                raised = job if job.priority >= priority else _with_priority(job, priority)
                results.append(EnqueueResult(raised, Disposition.MERGED))
            else:  # running, and a reindex does not say the content changed
                results.append(EnqueueResult(job, Disposition.ATTACHED))
        return ids, results

    # -- claim ----------------------------------------------------------------

    def claim(
        self,
        limit: int,
        *,
        worker: str | Sequence[str] = "",
        min_priority: int = 0,
        kinds: Sequence[JobKind] | None = None,
        system_limit: int | None = None,
    ) -> list[Lease]:
        """Lease up to `limit` jobs in priority order. `system_limit` caps how
        many SYSTEM-level jobs this call may take (reserved slots). `worker`
        names the holder of every lease, or of each in the order they come
        (the dispatcher's plan of which stream gets which)."""
        if limit <= 0:
            return []
        work = self._claim_work(limit, worker, min_priority, kinds, system_limit)
        # "job running" is logged by the dispatcher, which knows the stream
        # each lease goes to. Alone on the store (as of the last refresh of
        # the instances), this process's claims run one at a time and need not
        # guard against each other (claim_sql.claim, `concurrent`; a
        # hand-off's claim is not one of them: JobQueue.enqueue).
        if self.db.others_alive:
            return self.db.retrying(work)
        with self._claims_one_at_a_time:
            return self.db.retrying(work)

    async def claim_async(
        self,
        limit: int,
        *,
        worker: str | Sequence[str] = "",
        min_priority: int = 0,
        kinds: Sequence[JobKind] | None = None,
        system_limit: int | None = None,
    ) -> list[Lease]:
        """`claim` from the event loop: on a SQLite file this process has to
        itself, a claim of at most ON_LOOP_CLAIM jobs runs right here when
        nothing else holds the claims' and the writes' turns
        (`Database.on_loop`); otherwise, and when it would wait for another
        process's lock, in a store thread."""
        if (
            0 < limit <= ON_LOOP_CLAIM
            and self.db.runs_units_on_loop()
            and self._claims_one_at_a_time.acquire(blocking=False)
        ):
            try:
                # A claim a crash undoes only queues its jobs again: its commit
                # does not wait for the disk (DESIGN.md section 7).
                leases = self.db.run_on_loop(
                    self._claim_work(limit, worker, min_priority, kinds, system_limit),
                    sync_commits=False,
                )
            finally:
                self._claims_one_at_a_time.release()
            if leases is not None:
                return leases
        return await asyncio.to_thread(
            self.claim,
            limit,
            worker=worker,
            min_priority=min_priority,
            kinds=kinds,
            system_limit=system_limit,
        )

    def _claim_work(
        self,
        limit: int,
        worker: str | Sequence[str],
        min_priority: int,
        kinds: Sequence[JobKind] | None,
        system_limit: int | None,
    ) -> Callable[[Tx], list[Lease]]:
        now = self.clock()
        until = now + self.settings.lease_duration

        def work(tx: Tx) -> list[Lease]:
            return self._claim_in(
                tx,
                limit,
                worker=worker,
                min_priority=min_priority,
                kinds=kinds,
                system_limit=system_limit,
                now=now,
                until=until,
                concurrent=self.db.others_alive,  # as of this run of `work`
            )

        return work

    def _claim_in(
        self,
        tx: Tx,
        limit: int,
        *,
        worker: str | Sequence[str],
        min_priority: int,
        kinds: Sequence[JobKind] | None,
        system_limit: int | None,
        now: datetime,
        until: datetime,
        concurrent: bool,
        max_priority: int | None = None,
    ) -> list[Lease]:
        lowest, system_cap = self._lanes(min_priority, system_limit)
        leases = claim_sql.claim(
            tx,
            limit=limit,
            min_priority=lowest,
            max_priority=max_priority,
            kinds=kinds,
            worker=worker,
            now=now,
            lease_until=until,
            instance_id=self.instance_id,
            system_cap=system_cap,
            concurrent=concurrent,
        )
        return _with_files(tx, leases)

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
            functools.partial(leases_sql.extend, lease_ids=leases, until=until, progress=values)
        )
        return {lease: (until if lease in extended else None) for lease in leases}

    def stale_reasons(self, lease_ids: Sequence[str]) -> dict[str, str]:
        """Why each of these leases (found not current) is not: its attempt's
        end, for the refusal a worker logs."""
        with self.db.read_transaction() as tx:
            return leases_sql.stale_reasons(tx, lease_ids)

    def add_entries(
        self, lease_id: str, entries: Sequence[IndexEntry], deleted_paths: Sequence[str] = ()
    ) -> None:
        """Stage an entry batch under the lease's generation. A batch the store
        cannot hold ends the attempt (`refuse_entries`) and raises."""
        try:
            self.db.retrying(functools.partial(self._stage, lease_id, entries, deleted_paths))
        except InvalidArgument as e:
            self.refuse_entries(lease_id, e.message)
            raise

    def refuse_entries(self, lease_id: str, reason: str) -> Job | None:
        """An entry batch was refused: the attempt cannot publish a whole
        index, so it ends as a counted failure (a worker that keeps sending a
        poison entry ends its job at the attempts cap). None if the lease is
        no longer current."""
        try:
            return self.fail(lease_id, reason)
        except StaleLease:
            return None

    def _stage(
        self, lease_id: str, entries: Sequence[IndexEntry], deleted_paths: Sequence[str], tx: Tx
    ) -> None:
        # Shared lock: a cancel (or anything ending the lease) waits for this
        # batch to commit, so it sees and drops what the batch staged.
        held = _opened(tx, leases_sql.current(tx, lease_id, share=True))
        assert held.generation is not None
        index_sql.stage_entries(
            tx,
            realm_id=held.realm_id,
            generation=held.generation,
            entries=entries,
            deleted_paths=deleted_paths,
        )

    def complete(self, lease_id: str, *, entries_uploaded: int = 0) -> Job:
        """Finish a lease successfully; the job's entries become the realm's index."""
        done = self.complete_many([(lease_id, entries_uploaded)])[lease_id]
        if isinstance(done, StaleLease):
            raise done
        return done

    def complete_many(
        self,
        results: Sequence[tuple[str, int]],
        *,
        files_done: Mapping[str, int] | None = None,
        entries: Mapping[str, tuple[Sequence[IndexEntry], Sequence[str]]] | None = None,
        whole: Collection[str] = (),
    ) -> dict[str, Job | StaleLease]:
        """`complete` for several (lease, entries uploaded) in one transaction;
        `files_done` is the final progress a worker reported for a lease.
        Each lease is fenced on its own: one that is not current is refused
        (its StaleLease is returned, nothing of it applied). One whose entry
        count does not match what the store received is refused too, and its
        attempt fails (counted): the worker lost entries, so the index it
        would publish is not whole. `entries` are a lease's last entries and
        deleted paths, sent with its result: staged first, in the same
        transaction, and counted (InvalidArgument when the store refuses them:
        nothing of the batch is applied). `whole` names leases none of whose
        entries reached the store before (no entry batch was forwarded for
        them): what they stage is what `entries` holds, counted without a
        read."""
        now = self.clock()
        started = utcnow()
        outcome = self.db.retrying(self._complete_work(results, files_done, entries, whole, now))
        return self._completed(outcome, now, started)

    async def complete_many_async(
        self,
        results: Sequence[tuple[str, int]],
        *,
        files_done: Mapping[str, int] | None = None,
        entries: Mapping[str, tuple[Sequence[IndexEntry], Sequence[str]]] | None = None,
        whole: Collection[str] = (),
    ) -> dict[str, Job | StaleLease]:
        """`complete_many` from the event loop: on a SQLite file this process
        has to itself, at most ON_LOOP_COMPLETE results that carry no entries
        and count none run right here when the writes' turn is free
        (`Database.on_loop`, as `claim_async`). The rest go to a store
        thread: a completion with entries merges and counts them, and one
        whose from-scratch job replaces an index of more than
        ON_LOOP_REPLACED entries rolls back and goes there too, as one that
        would wait for another process's lock does."""
        if (
            len(results) <= ON_LOOP_COMPLETE
            and not entries
            and not any(uploaded for _, uploaded in results)
            and self.db.runs_units_on_loop()
        ):
            now = self.clock()
            started = utcnow()
            outcome = self.db.run_on_loop(
                self._complete_work(
                    results, files_done, None, whole, now, max_replaced=ON_LOOP_REPLACED
                )
            )
            if outcome is not None:
                return self._completed(outcome, now, started)
        return await asyncio.to_thread(
            self.complete_many, results, files_done=files_done, entries=entries, whole=whole
        )

    def _complete_work(
        self,
        results: Sequence[tuple[str, int]],
        files_done: Mapping[str, int] | None,
        entries: Mapping[str, tuple[Sequence[IndexEntry], Sequence[str]]] | None,
        whole: Collection[str],
        now: datetime,
        *,
        max_replaced: int | None = None,
    ) -> Callable[[Tx], tuple[dict[str, Job | StaleLease], list[tuple[str, Job]]]]:
        def work(tx: Tx) -> tuple[dict[str, Job | StaleLease], list[tuple[str, Job]]]:
            done: dict[str, Job | StaleLease] = {}
            rows = {
                lease_id: _opened(tx, held)
                for lease_id, held in leases_sql.held_many(
                    tx, [lease_id for lease_id, _ in results]
                ).items()
            }
            for lease_id, (staged_entries, deleted_paths) in (entries or {}).items():
                held = rows.get(lease_id)
                if held is not None and held.generation is not None:
                    index_sql.stage_entries(
                        tx,
                        realm_id=held.realm_id,
                        generation=held.generation,
                        entries=staged_entries,
                        deleted_paths=deleted_paths,
                    )
            accepted: list[tuple[str, HeldJob]] = []
            counted: list[tuple[str, HeldJob, int]] = []
            stale: list[str] = []
            for lease_id, uploaded in results:
                held = rows.pop(lease_id, None)  # a lease listed twice is current once
                if held is None:
                    stale.append(lease_id)
                elif uploaded:
                    counted.append((lease_id, held, uploaded))
                else:
                    accepted.append((lease_id, held))
            if stale:
                for lease_id, reason in leases_sql.stale_reasons(tx, stale).items():
                    done[lease_id] = StaleLease(reason)
            staged = index_sql.count_staged_many(
                tx,
                [
                    (held.realm_id, held.generation or 0)
                    for lease_id, held, _ in counted
                    if lease_id not in whole or held.kept
                ],
            )
            for lease_id, held, uploaded in counted:
                if lease_id in whole and not held.kept:
                    # Staged by path, an entry replacing a tombstone or an
                    # earlier entry of its path: one row a distinct path.
                    sent = (entries or {}).get(lease_id, ((), ()))[0]
                    received = len({e.path for e in sent}) if held.generation is not None else 0
                else:
                    # Entries kept from a checkpoint count with those sent.
                    received = staged.get((held.realm_id, held.generation or 0), 0) - (
                        held.kept or 0
                    )
                if received != uploaded:
                    message = (
                        f"lease {lease_id}: {uploaded} entries reported, "
                        f"{received} received; the result was not applied"
                    )
                    leases_sql.end_attempt(tx, held.attempt_id, AttemptOutcome.FAILED, now, message)
                    self._count_failure(tx, held, message, now)
                    done[lease_id] = StaleLease(message)
                else:
                    accepted.append((lease_id, held))
            scratch = JobKind.FROM_SCRATCH
            index_sql.switch_generations(
                tx,
                [(h.realm_id, h.generation or 0, h.job.kind is scratch) for _, h in accepted],
                now=now,
                max_replaced=max_replaced,
            )
            succeeded = leases_sql.succeed(
                tx,
                [h for _, h in accepted],
                now,
                files_done={
                    h.job_id: files_done[lease_id]
                    for lease_id, h in accepted
                    if files_done and lease_id in files_done
                },
            )
            finished = [
                (lease_id, job) for (lease_id, _), job in zip(accepted, succeeded, strict=True)
            ]
            return done, finished

        return work

    def _completed(
        self,
        outcome: tuple[dict[str, Job | StaleLease], list[tuple[str, Job]]],
        now: datetime,
        started: datetime,
    ) -> dict[str, Job | StaleLease]:
        """A completion's log lines, metrics and spans, after its commit."""
        done, finished = outcome
        self._log_succeeded(finished, now)
        for lease_id, job in finished:
            done[lease_id] = job
            if job.trace_parent:
                tracing.record_span(
                    "index generation switch",
                    job.trace_parent,
                    started,
                    utcnow(),
                    {"job": job.job_id, "realm": job.realm_id},
                )
        return done

    def fail(self, lease_id: str, message: str, *, permanent: bool = False) -> Job:
        """A failed attempt: counts toward the cap; retried until it is reached."""
        now = self.clock()

        def work(tx: Tx) -> Job:
            held = leases_sql.current(tx, lease_id)
            leases_sql.end_attempt(tx, held.attempt_id, AttemptOutcome.FAILED, now, message)
            return self._count_failure(tx, held, message, now, permanent=permanent)

        job = self.db.retrying(work)
        self._log_end(job, lease_id, "failed" if job.state.terminal else "requeued", now)
        return job

    def release(self, lease_ids: Sequence[str], reason: str = "released") -> list[Job]:
        """Interrupted attempts (stream closed, drain, shutdown): requeued at
        once, not counted. Stale leases are skipped."""
        now = self.clock()

        def work(tx: Tx) -> list[Job]:
            jobs: list[Job] = []
            for lease_id in lease_ids:
                try:
                    held = leases_sql.current(tx, lease_id)
                except StaleLease:
                    continue
                leases_sql.end_attempt(tx, held.attempt_id, AttemptOutcome.INTERRUPTED, now, reason)
                jobs.append(leases_sql.requeue(tx, held, counted=False))
            return jobs

        jobs = self.db.retrying(work)
        for job in jobs:
            metrics.ATTEMPTS.labels(job.kind.value, "interrupted").inc()
            if log.isEnabledFor(logging.INFO):
                log.info("job requeued", extra={**job_fields(job), "reason": reason})
        return jobs

    def detach(self, lease_ids: Sequence[str], token: str) -> list[str]:
        """The stream holding these leases broke (DESIGN.md section 5,
        resumable sessions): each current one is kept for the resume grace
        (its expiry shortened to it), for its worker to re-attach with
        `token`; the reaper releases it as interrupted once the grace is
        over. Returns the leases kept."""
        until = self.clock() + min(self.settings.resume_grace, self.settings.lease_duration)
        kept = self.db.retrying(
            functools.partial(leases_sql.detach, lease_ids=lease_ids, token=token, until=until)
        )
        if kept:
            metrics.LEASES_RESUMED.labels("detached").inc(len(kept))
            log.info("leases detached", extra={"leases": len(kept), "until": until.isoformat()})
        return kept

    def reattach(
        self, lease_ids: Sequence[str], *, worker: str, token: str
    ) -> dict[str, Lease | tuple[str, JobState | None]]:
        """Re-attach leases a worker's earlier stream left detached (`token`
        is that stream's resume token): each current one whose grace has not
        run out gets a full lease and this instance as its holder. The others
        map to why not and their job's state (SUCCEEDED: a result sent
        before the break was applied)."""
        now = self.clock()
        until = now + self.settings.lease_duration
        out = self.db.retrying(
            functools.partial(
                leases_sql.reattach,
                lease_ids=lease_ids,
                worker=worker,
                token=token,
                now=now,
                until=until,
                instance_id=self.instance_id,
            )
        )
        attached = [lease for lease in out.values() if isinstance(lease, Lease)]
        metrics.LEASES_RESUMED.labels("reattached").inc(len(attached))
        for lease in attached:
            log.info("job re-attached", extra=job_fields(lease.job))
        return out

    def preempt(self, lease_id: str, reason: str, *, for_job: int | None = None) -> Job | None:
        """Hand a running SYSTEM job back for a waiting job of a user
        (`for_job`): its attempt ends interrupted (not counted) with
        `reason`, and it is queued again at the head of its priority's line,
        one preemption more (aging: it runs next once SYSTEM work may).
        None, with nothing changed, if `for_job` is no longer queued (a
        claim, maybe of another instance, took it meanwhile), the lease is
        not current, the job is above SYSTEM, or it was preempted
        `max_preemptions` times already (it then runs to the end). The
        caller tells the stream holding the lease."""
        now = self.clock()

        def work(tx: Tx) -> Job | None:
            if for_job is not None and not leases_sql.still_queued(tx, for_job):
                return None
            try:
                held = leases_sql.current(tx, lease_id)
            except StaleLease:
                return None
            if held.job.priority > SYSTEM or held.preemptions >= self.settings.max_preemptions:
                return None
            leases_sql.end_attempt(tx, held.attempt_id, AttemptOutcome.INTERRUPTED, now, reason)
            return leases_sql.requeue(tx, held, counted=False, preempted=True)

        job = self.db.retrying(work)
        if job is not None:
            metrics.ATTEMPTS.labels(job.kind.value, "interrupted").inc()
            metrics.PREEMPTIONS.labels(job.kind.value).inc()
            log.info("job preempted", extra={**job_fields(job), "reason": reason})
        return job

    def first_waiting(
        self, *, min_priority: int, kinds: Sequence[JobKind] | None = None
    ) -> Job | None:
        """The queued job a claim at `min_priority` and above (of `kinds`)
        would take first now, read without locking; None if there is none."""
        with self.db.read_transaction() as tx:
            return claim_sql.first_waiting(tx, min_priority=min_priority, kinds=kinds)

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

        def work(tx: Tx) -> tuple[list[Job], list[Job], list[str]]:
            expired = leases_sql.expired(tx, now, limit)
            holders = instances_sql.holders(
                tx, [h.attempt_id for h in expired if h.attempt_id is not None]
            )
            others = [i for i in holders.values() if i and i != self.instance_id]
            alive = instances_sql.live(tx, others, seen_after)
            counted: list[Job] = []
            interrupted: list[Job] = []
            settled: list[str] = []
            for lease in expired:
                holder = holders.get(lease.attempt_id or 0, "")
                if holder == self.instance_id:
                    silent = lease.lease_id not in unreleased and (
                        held is None or lease.lease_id in held
                    )
                    reason = "lease expired" if silent else "stream closed"
                elif holder in alive:
                    continue
                elif holder:
                    silent, reason = False, f"server instance {holder} stopped"
                else:
                    silent, reason = True, "lease expired"
                settled.append(lease.lease_id)
                if silent:
                    leases_sql.end_attempt(
                        tx, lease.attempt_id, AttemptOutcome.EXPIRED, now, reason
                    )
                    counted.append(self._count_failure(tx, lease, reason, now))
                else:
                    leases_sql.end_attempt(
                        tx, lease.attempt_id, AttemptOutcome.INTERRUPTED, now, reason
                    )
                    interrupted.append(leases_sql.requeue(tx, lease, counted=False))
            return counted, interrupted, settled

        counted, interrupted, settled = self.db.retrying(work)
        with self._unreleased_lock:
            for lease_id in settled:
                self._unreleased.pop(lease_id, None)
        for job in counted:
            metrics.ATTEMPTS.labels(job.kind.value, "expired").inc()
            if job.state.terminal:
                metrics.JOBS_FINISHED.labels(job.kind.value, job.state.value).inc()
            log.info("job lease expired", extra={**job_fields(job), "state": job.state.value})
        for job in interrupted:
            metrics.ATTEMPTS.labels(job.kind.value, "interrupted").inc()
            log.info("job requeued", extra={**job_fields(job), "reason": "lease orphaned"})
        return counted + interrupted

    def _count_failure(
        self, tx: Tx, held: HeldJob, message: str, now: datetime, *, permanent: bool = False
    ) -> Job:
        """The attempts cap: a bad attempt requeues the job, or fails it once
        the cap is reached (at once when the failure is permanent). A realm
        whose first index failed says so."""
        failures = held.counted_failures + 1
        if not permanent and failures < self.settings.max_attempts:
            return leases_sql.requeue(tx, held, counted=True, message=message)
        reason = (
            message if permanent else f"gave up after {failures} failed attempts; last: {message}"
        )
        job = leases_sql.fail(tx, held, now, reason, counted=True)
        if realms_sql.get_realm(tx, held.realm_id).current_generation is None:
            realms_sql.set_realm_state(tx, held.realm_id, RealmState.INDEX_FAILED)
        return job

    def _log_succeeded(self, finished: Sequence[tuple[str, Job]], now: datetime) -> None:
        """`_log_end` for a batch of successes: the metrics counted per kind,
        the lines written as one record (one line per job, realm_common.logs)."""
        if not finished:
            return
        per_kind: dict[str, int] = {}
        for _, job in finished:
            kind = job.kind.value
            per_kind[kind] = per_kind.get(kind, 0) + 1
            if job.start_time is not None:
                metrics.run_duration(kind, job.priority).observe(
                    max(0.0, (now - job.start_time).total_seconds())
                )
        for kind, n in per_kind.items():
            metrics.ATTEMPTS.labels(kind, "completed").inc(n)
            metrics.JOBS_FINISHED.labels(kind, "succeeded").inc(n)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "job succeeded",
                extra={"each": [{**job_fields(job), "lease": lease} for lease, job in finished]},
            )

    def _log_end(self, job: Job, lease_id: str, outcome: str, now: datetime) -> None:
        """An attempt's end in the log and the metrics (no query: the values
        come with the job)."""
        kind = job.kind.value
        metrics.ATTEMPTS.labels(kind, "completed" if outcome == "succeeded" else "failed").inc()
        if job.state.terminal:
            metrics.JOBS_FINISHED.labels(kind, job.state.value).inc()
        if job.start_time is not None:
            metrics.run_duration(kind, job.priority).observe(
                max(0.0, (now - job.start_time).total_seconds())
            )
        if log.isEnabledFor(logging.INFO):
            log.info(f"job {outcome}", extra={**job_fields(job), "lease": lease_id})

    # -- server instances ---------------------------------------------------------

    def register_instance(self) -> None:
        now = self.clock()
        self.db.retrying(
            functools.partial(instances_sql.register, instance_id=self.instance_id, now=now)
        )

    def touch_instance(self, workers: Sequence[WorkerInfo] | None = None) -> None:
        """Say this instance is alive; also the health check's write probe
        (raises StoreUnavailable or StoreFull when writes cannot commit).
        On PostgreSQL, `workers` (this instance's streams) are published for
        the other instances' ListWorkers and ExplainJob."""
        now = self.clock()
        heard = self.db.words_heard

        def work(tx: Tx) -> bool:
            if not instances_sql.touch(tx, self.instance_id, now):
                instances_sql.register(tx, self.instance_id, now)
            if tx.backend != "postgresql":
                return False
            if workers is not None:
                instances_sql.replace_presence(tx, self.instance_id, workers)
            return self._others_alive_in(tx, now)

        self.db.set_others_alive(self.db.retrying(work), heard_before=heard)

    def _others_alive_in(self, tx: Tx, now: datetime) -> bool:
        seen_after = now - self.settings.instance_timeout
        return instances_sql.others_alive(tx, self.instance_id, seen_after)

    def _ask_who_else(self) -> None:
        """Right after the listener (re)connects: until a refresh says this
        instance is alone, each enqueue and claim takes the path that shares
        the store (its own transaction, a word to the others), and the next
        refresh of `touch_instance` is up to one health period away."""
        heard = self.db.words_heard
        with self.db.read_transaction() as tx:
            alive = self._others_alive_in(tx, self.clock())
        self.db.set_others_alive(alive, heard_before=heard)

    def other_instances_workers(self) -> list[WorkerInfo]:
        """Streams of the other live instances sharing the store (PostgreSQL)."""
        if self.db.backend != "postgresql":
            return []
        seen_after = self.clock() - self.settings.instance_timeout
        with self.db.read_transaction() as tx:
            return instances_sql.presence(tx, other_than=self.instance_id, seen_after=seen_after)

    # -- job control ------------------------------------------------------------

    def cancel(self, job_id: int, reason: str) -> Job:
        """Cancel a queued or running job (DESIGN.md section 4, job control).
        A running job's lease is revoked at commit; what it staged goes."""
        now = self.clock()
        reason = reason.strip() or "cancelled"

        def work(tx: Tx) -> Job:
            job, held = leases_sql.cancel(tx, job_id, f"cancelled: {reason}", now)
            if held is not None and held.generation is not None:
                index_sql.drop_generation(tx, held.realm_id, held.generation)
            # A realm without an index whose from-scratch work is now all
            # gone says so (another queued or running one would still index it).
            if job.kind is JobKind.FROM_SCRATCH:
                realm = realms_sql.get_realm(tx, job.realm_id)
                pending = (JobState.QUEUED, JobState.RUNNING)
                if realm.current_generation is None and not enqueue_sql.has_from_scratch(
                    tx, job.realm_id, pending
                ):
                    realms_sql.set_realm_state(tx, job.realm_id, RealmState.INDEX_CANCELLED)
            return job

        job = self.db.retrying(work)
        log.info(
            "job cancelled", extra={"job": job.job_id, "realm": job.realm_id, "reason": reason}
        )
        return job

    def retry(self, job_id: int) -> EnqueueResult:
        """Queue a FAILED or CANCELLED job's work again under the coalescing
        rules, with attempts counted afresh (it is a new job, or one it
        merges into)."""

        def work(tx: Tx) -> EnqueueResult:
            job = jobs_sql.get_job(tx, job_id)
            if job.state not in (JobState.FAILED, JobState.CANCELLED):
                raise FailedPrecondition(
                    f"job {job_id} is {job.state.value}; only failed or cancelled jobs are retried"
                )
            realm = realms_sql.get_realm(tx, job.realm_id, lock=True)
            result = self.enqueue_in(
                tx, job.realm_id, job.kind, job.priority, paths=job.path_changes
            )
            if realm.current_generation is None and realm.state in (
                RealmState.INDEX_FAILED,
                RealmState.INDEX_CANCELLED,
            ):
                realms_sql.set_realm_state(tx, job.realm_id, RealmState.INDEXING)
            return result

        return self.db.retrying(work)

    def unregister_instance(self) -> None:
        self.db.retrying(functools.partial(instances_sql.remove, instance_ids=[self.instance_id]))

    def forget_dead_instances(self) -> int:
        """Delete rows of instances gone for long: their leases were reaped by then."""
        before = self.clock() - 10 * max(
            self.settings.instance_timeout, self.settings.lease_duration
        )

        def work(tx: Tx) -> int:
            dead = [i for i in instances_sql.stale(tx, before) if i != self.instance_id]
            instances_sql.remove(tx, dead)
            return len(dead)

        return self.db.retrying(work)

    # -- reads --------------------------------------------------------------------

    def get_job(self, job_id: int) -> Job:
        with self.db.read_transaction() as tx:
            return jobs_sql.get_job(tx, job_id)

    def list_jobs(
        self,
        *,
        realm_id: str | None = None,
        kind: JobKind | None = None,
        state: JobState | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[Job]:
        with self.db.read_transaction() as tx:
            return jobs_sql.list_jobs(
                tx, realm_id=realm_id, kind=kind, state=state, before_id=before_id, limit=limit
            )

    def attempts(self, job_id: int) -> list[tuple[str, str]]:
        with self.db.read_transaction() as tx:
            return jobs_sql.attempts_of(tx, job_id)

    def depth(self) -> list[tuple[int, int, datetime | None]]:
        with self.db.read_transaction() as tx:
            return jobs_sql.queue_depth(tx)

    def running_count(self) -> int:
        with self.db.read_transaction() as tx:
            return jobs_sql.running_count(tx)

    def analyze_if_outgrown(self, live_jobs: int) -> bool:
        """ANALYZE `jobs` when the queued and running jobs alone outnumber
        twice (and by a thousand) what PostgreSQL's planner last recorded
        for the whole table: a backlog that grew fast (a storm of single
        enqueues, rows written by other means) from a table that was small.
        The generic plans PostgreSQL cached for the hot path while it was
        small read all of it, and stay cached until an ANALYZE, which
        autovacuum would run only up to a minute later. True if it ran."""
        if self.db.backend != "postgresql":
            return False
        with self.db.read_transaction() as tx:
            planned = jobs_sql.planned_rows(tx)
        if live_jobs <= 2 * (planned or 0.0) + OUTGROWN_SLACK:
            return False
        self.db.analyze("jobs")
        return True

    def explain_reads(
        self, job_id: int
    ) -> tuple[Job, list[Attempt], QueuePosition | None, RunningInfo | None]:
        """What the store says about a job for ExplainJob: the job, its
        attempts, its place in the queue (queued) or its lease (running)."""
        with self.db.read_transaction() as tx:
            job = jobs_sql.get_job(tx, job_id)
            attempts = jobs_sql.attempts_detail(tx, job_id)
            place = jobs_sql.position(tx, job) if job.state is JobState.QUEUED else None
            running = jobs_sql.running_info(tx, job_id) if job.state is JobState.RUNNING else None
            return job, attempts, place, running

    def stats(self) -> QueueStats:
        with self.db.read_transaction() as tx:
            return jobs_sql.queue_stats(tx, self.clock())


def _too_many_paths(queued: Job | None, paths: Sequence[PathChange]) -> bool:
    """Whether `paths`, merged into the queued job's, exceed MAX_JOB_PATHS."""
    if len(paths) > MAX_JOB_PATHS:
        return True
    if queued is None or len(queued.path_changes) + len(paths) <= MAX_JOB_PATHS:
        return False
    return len(merge_paths(queued.path_changes, paths)) > MAX_JOB_PATHS


def _with_priority(job: Job, priority: int) -> Job:
    return dataclasses.replace(job, priority=max(job.priority, priority))


def job_fields(job: Job) -> dict[str, object]:
    """The fields of a job's log lines."""
    return {"job": job.job_id, "realm": job.realm_id, "kind": job.kind.value,
            "priority": job.priority, "attempt": job.attempt}  # fmt: skip


# The dispositions of an enqueue that inserted its job.
_INSERTS = frozenset({Disposition.INSERTED, Disposition.RERUN_SCHEDULED})


def _logged_when_created(
    tx: Effects, created: tuple[Realm, Job] | None
) -> tuple[Realm, Job] | None:
    """A new realm's first job is logged as enqueued once it has committed."""
    if created is not None:
        result = EnqueueResult(created[1], Disposition.INSERTED)
        tx.on_commit(functools.partial(_log_enqueued, [result]))
    return created


def _handed(tx: Effects, result: EnqueueResult, leases: list[Lease]) -> EnqueueResult:
    """The enqueue's result with its hand-off's lease, if the claim took a
    job. When it took the enqueued job in the unit of work that inserted
    it, the work that unit announced is taken already: this process's
    dispatcher is not woken for it (other instances are told, and look for
    nothing)."""
    if not leases:
        return result
    lease = leases[0]
    if lease.job.job_id != result.job.job_id:
        return dataclasses.replace(result, lease=lease)
    tx.new_work_taken()
    return dataclasses.replace(result, job=lease.job, lease=lease)


def _hand_off_failed(result: EnqueueResult, error: Exception) -> None:
    """A hand-off's claim failed after its job's insert committed: the job
    stays queued, and the dispatcher, woken by the new work, hands it out.
    A Conflict (another claim started a job of the realm) is no news; the
    store's failures are a warning, anything else an error with its
    traceback."""
    if isinstance(error, Conflict):
        return
    if isinstance(error, RealmError):
        log.warning(
            "hand-off claim failed; the job stays queued",
            extra={"job": result.job.job_id, "error": error.message},
        )
        return
    log.error(
        "hand-off claim failed unexpectedly; the job stays queued",
        extra={"job": result.job.job_id},
        exc_info=error,
    )


def _log_enqueued(results: Sequence[EnqueueResult]) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    for r in results:
        log.info(
            "job enqueued",
            extra={**job_fields(r.job), "disposition": str(r.disposition)},
        )


def _with_files(tx: Tx, leases: list[Lease]) -> list[Lease]:
    """The leases, small incremental jobs with their files (see INLINE_PATHS)."""
    inlined = 0
    for i, lease in enumerate(leases):
        job = lease.job
        if inlined == INLINE_JOBS or job.kind is not JobKind.INCREMENTAL:
            continue
        paths = {change.path for change in job.path_changes}
        if not paths or len(paths) > INLINE_PATHS or GITIGNORE_PATH in paths:
            continue  # a changed .gitignore makes the worker read every file
        inlined += 1
        wanted = sorted(paths | {GITIGNORE_PATH})
        try:
            with translate_errors():
                files = realms_sql.files_with_content(tx, job.realm_id, wanted)
        except RealmError as e:
            if not tx.each_statement_commits:
                raise
            # The claim has committed on its own: its lease goes out
            # without the files (the worker reads them), not lost.
            log.warning(
                "could not read a claimed job's files; the worker reads them",
                extra={"job": job.job_id, "error": e.message},
            )
            continue
        if sum(len(content) for _, content in files) <= INLINE_BYTES:
            leases[i] = dataclasses.replace(lease, files=tuple(files))
    return leases
