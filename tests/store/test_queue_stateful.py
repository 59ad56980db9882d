"""A stateful property test: random sequences of enqueues, claims, lease
operations, preemptions (yields), detaches and re-attaches of broken streams'
leases, checkpoint openings, clock jumps and reaps, checked step by step
against a small model of DESIGN.md sections 4-6 (coalescing, order, serial
runs, fencing, the attempts cap, aging and the preemption cap, resumable
sessions, checkpoints)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, func, select
from store_helpers import LEASE, FakeClock, entry, index_of, make_realm

from realm_service.domain import (
    Disposition,
    HandOff,
    IndexEntry,
    JobKind,
    JobState,
    Lease,
    PathChange,
)
from realm_service.errors import StaleLease
from realm_service.queue import JobQueue, QueueSettings
from realm_service.realms import Realms
from realm_service.store.db import Database, open_database
from realm_service.store.tables import (
    IdempotencyKeyRow,
    IndexEntryRow,
    JobAttemptRow,
    JobRow,
    RealmFileRow,
    RealmRow,
)

REALMS = ("a", "b", "c")
PRIORITIES = (0, 0, 1, 10, 50, 100)
# Low caps, so that random runs reach them often.
MAX_ATTEMPTS = 2
MAX_PREEMPTIONS = 1
FS = JobKind.FROM_SCRATCH
INC = JobKind.INCREMENTAL
GRACE = timedelta(seconds=5)
# Every realm's files; entries are uploaded with their real sha256 (kept by
# a checkpoint) or, as "stale", with another (dropped when it is opened).
FILES = {"x": b"x-content", "y": b"y-content", "z": b"z-content"}
TOKENS = ("t1", "t2")

path_changes = st.lists(
    st.builds(PathChange, st.sampled_from(["x", "y", "z"]), st.booleans()), min_size=1, max_size=4
)
claims = st.tuples(
    st.integers(1, 4),  # limit
    st.sampled_from((0, 0, 1, 10, 50)),  # min_priority
    st.sampled_from([None, [FS], [INC]]),  # kinds
    st.sampled_from([None, None, 0, 1]),  # system_limit
)
ACTIONS = (
    *["claim"] * 3,
    *["fail"] * 2,
    *["enqueue"] * 3,
    *["complete"] * 2,
    "release",
    *["wait"] * 2,
    "reap",
    "heartbeat_and_upload",
    *["preempt"] * 2,
    *["detach"] * 2,
    *["reattach"] * 2,
    *["open_checkpoint"] * 2,
)
Request = tuple[str, JobKind, int, list[PathChange], bool]
requests = st.tuples(
    st.sampled_from(REALMS),
    st.sampled_from(JobKind),
    st.sampled_from(PRIORITIES),
    path_changes,
    st.booleans(),
)


def entry_of(path: str) -> IndexEntry:
    """An entry of the file as it is (its real sha256)."""
    return IndexEntry(
        path=path,
        mtime=datetime(2026, 11, 1, tzinfo=UTC),
        size=len(FILES[path]),
        sha256=hashlib.sha256(FILES[path]).hexdigest(),
        media_type="text/plain",
    )


@dataclass
class ModelJob:
    job_id: int
    realm: str
    kind: JobKind
    priority: int
    seq: int
    state: str = "queued"  # queued | running | succeeded | failed | merged
    paths: dict[str, bool] = field(default_factory=dict)
    failures: int = 0
    claims: int = 0
    lease: str | None = None
    expire: datetime | None = None
    successor: int | None = None
    preemptions: int = 0
    # The resume token its lease was detached with (its stream broke).
    detached: str | None = None
    # Paths with an entry in the generation the attempt stages into, and
    # whether that generation is a checkpoint of earlier attempts (from
    # scratch); the entries the attempt's opening kept (None: not opened).
    # (path -> whether its entry matches the file's content).
    staged: dict[str, bool] = field(default_factory=dict)
    checkpoint: bool = False
    kept: int | None = None
    # Distinct paths this attempt uploaded.
    sent: set[str] = field(default_factory=set)


def merged_paths(old: dict[str, bool], new: Sequence[PathChange]) -> dict[str, bool]:
    out = dict(old)
    for change in new:
        out[change.path] = out.get(change.path, False) or change.deleted
    return out


class QueueMachine(RuleBasedStateMachine):
    """One example: an emptied store with three realms and a fresh model."""

    db: Database

    def __init__(self) -> None:
        super().__init__()
        with self.db.session_for_tests() as s:
            for table in (
                JobAttemptRow,
                IndexEntryRow,
                RealmFileRow,
                IdempotencyKeyRow,
                JobRow,
                RealmRow,
            ):
                s.execute(delete(table))
        self.clock = FakeClock()
        self.queue = JobQueue(
            self.db,
            settings=QueueSettings(
                lease_duration=LEASE, max_attempts=MAX_ATTEMPTS, max_preemptions=MAX_PREEMPTIONS
            ),
            clock=self.clock,
        )
        for realm in REALMS:
            make_realm(self.queue, realm, FILES)
        self.realms = Realms(self.db, self.queue, max_file_size=1 << 20, clock=self.clock)
        self.jobs: dict[int, ModelJob] = {}
        self.seen_leases: list[str] = []

    # -- the model ---------------------------------------------------------

    def _queued(self, realm: str, kind: JobKind) -> ModelJob | None:
        found = [
            j for j in self.jobs.values() if (j.realm, j.kind, j.state) == (realm, kind, "queued")
        ]
        assert len(found) <= 1
        return found[0] if found else None

    def _running(self, realm: str) -> ModelJob | None:
        found = [j for j in self.jobs.values() if (j.realm, j.state) == (realm, "running")]
        assert len(found) <= 1
        return found[0] if found else None

    def _live(self, job: ModelJob) -> ModelJob:
        while job.state == "merged" and job.successor is not None:
            job = self.jobs[job.successor]
        return job

    def _by_lease(self, lease_id: str) -> ModelJob | None:
        for job in self.jobs.values():
            if job.state == "running" and job.lease == lease_id:
                return job
        return None

    def _requeue(self, job: ModelJob) -> None:
        job.lease = None
        job.detached = None
        job.kept = None
        job.sent = set()
        keep = job.kind is FS  # what it staged becomes (or stays) its checkpoint
        other = self._queued(job.realm, job.kind)
        if other is None:
            job.state = "queued"
            job.checkpoint = keep
            if not keep:
                job.staged = {}
            return
        if keep and not other.checkpoint:
            other.checkpoint, other.staged = True, job.staged
        job.checkpoint, job.staged = False, {}
        other.priority = max(other.priority, job.priority)
        other.seq = min(other.seq, job.seq)
        other.preemptions = max(other.preemptions, job.preemptions)
        other.paths = merged_paths(other.paths, [PathChange(p, d) for p, d in job.paths.items()])
        job.state = "merged"
        job.successor = other.job_id

    def _count_failure(self, job: ModelJob, permanent: bool = False) -> None:
        job.failures += 1
        if permanent or job.failures >= MAX_ATTEMPTS:
            job.state = "failed"
            job.lease = None
            job.detached = None
            job.checkpoint, job.staged = False, {}
        else:
            self._requeue(job)

    def _expected_claim(
        self,
        limit: int,
        min_priority: int,
        kinds: list[JobKind] | None,
        system_limit: int | None,
        *,
        max_priority: int | None = None,
    ) -> list[ModelJob]:
        busy = {j.realm for j in self.jobs.values() if j.state == "running"}
        line = sorted(
            (j for j in self.jobs.values() if j.state == "queued"),
            key=lambda j: (-j.priority, j.seq, j.job_id),
        )

        def take(n: int, low: int, high: int | None) -> list[ModelJob]:
            out: list[ModelJob] = []
            for job in line:
                if len(out) >= n:
                    break
                if job.priority < low or (high is not None and job.priority > high):
                    continue
                if max_priority is not None and job.priority > max_priority:
                    continue
                if (kinds and job.kind not in kinds) or job.realm in busy:
                    continue
                out.append(job)
                busy.add(job.realm)
            return out

        if system_limit is None:
            return take(limit, min_priority, None)
        taken = take(limit, max(min_priority, 1), None)
        room = min(limit - len(taken), system_limit)
        if room > 0 and min_priority <= 0:
            taken += take(room, min_priority, 0)
        return taken

    def _pick_lease(self, data: st.DataObject) -> str:
        """Mostly a lease that is current, sometimes any lease ever handed out
        (released, failed, expired, completed, or of an earlier attempt)."""
        held = [j.lease for j in self.jobs.values() if j.state == "running" and j.lease]
        if held and data.draw(st.integers(0, 3), label="current lease?") > 0:
            return data.draw(st.sampled_from(held), label="lease")
        return data.draw(st.sampled_from([*self.seen_leases, "0" * 32]), label="lease")

    # -- rules ---------------------------------------------------------------

    @initialize(requests=st.lists(requests, min_size=1, max_size=6))
    def start(self, requests: list[Request]) -> None:
        for request in requests:
            self._enqueue(*request)

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """One weighted action. A rule per action would let Hypothesis's rule
        choice (it favours some rules and enables a random subset per example)
        produce many runs that never claim, or never finish what they claim."""
        action = data.draw(st.sampled_from(ACTIONS), label="action")
        getattr(self, action)(data)

    def enqueue(self, data: st.DataObject) -> None:
        for request in data.draw(st.lists(requests, min_size=1, max_size=3), label="requests"):
            # Sometimes offered a waiting stream's credit (a hand-off): the
            # enqueue's transaction then claims one job as a claim would.
            offer = data.draw(st.one_of(st.none(), claims), label="hand-off")
            # Below a dedicated lane's minimum, sometimes.
            ceiling = data.draw(st.sampled_from([None, None, 0, 10, 49]), label="max priority")
            self._enqueue(*request, hand_off=offer, max_priority=ceiling)

    def _enqueue(
        self,
        realm: str,
        kind: JobKind,
        priority: int,
        paths: list[PathChange],
        content_changed: bool,
        hand_off: tuple[int, int, list[JobKind] | None, int | None] | None = None,
        max_priority: int | None = None,
    ) -> None:
        if kind is FS:
            paths = []
        offer = None
        if hand_off is not None:
            _, min_priority, kinds, system_limit = hand_off
            offer = HandOff("s", "w", min_priority, tuple(kinds or ()), system_limit, max_priority)
        result = self.queue.enqueue(
            realm, kind, priority, paths=paths, content_changed=content_changed, hand_off=offer
        )
        queued = self._queued(realm, kind)
        running = self._running(realm)
        expected: tuple[Disposition, ModelJob | None]
        if kind is INC and queued is None and (scratch := self._queued(realm, FS)) is not None:
            scratch.priority = max(scratch.priority, priority)
            expected = (Disposition.MERGED, scratch)
        elif queued is not None:
            queued.priority = max(queued.priority, priority)
            queued.paths = merged_paths(queued.paths, paths)
            expected = (Disposition.MERGED, queued)
        elif (
            running is not None
            and running.kind is kind
            and (
                (kind is FS and not content_changed)
                or (
                    kind is INC
                    and not content_changed  # a fresh write: the job may have read it
                    and merged_paths({}, paths).items() <= running.paths.items()
                )
            )
        ):
            expected = (Disposition.ATTACHED, running)
        else:
            same_kind_runs = running is not None and running.kind is kind
            disposition = Disposition.RERUN_SCHEDULED if same_kind_runs else Disposition.INSERTED
            expected = (disposition, None)
        assert result.disposition is expected[0]
        if expected[1] is None:
            assert result.job.job_id not in self.jobs
            self.jobs[result.job.job_id] = ModelJob(
                job_id=result.job.job_id,
                realm=realm,
                kind=kind,
                priority=priority,
                seq=int(self.clock().timestamp() * 1_000_000),
                paths=merged_paths({}, paths),
            )
        else:
            assert result.job.job_id == expected[1].job_id
        job = self.jobs[result.job.job_id]
        assert result.job.priority == job.priority
        assert [(c.path, c.deleted) for c in result.job.path_changes] == sorted(job.paths.items())
        if offer is None or job.state != "queued":
            assert result.lease is None
            return
        expected_claim = self._expected_claim(
            1,
            offer.min_priority,
            list(offer.kinds) or None,
            offer.system_limit,
            max_priority=offer.max_priority,
        )
        got = [result.lease] if result.lease is not None else []
        self._claimed(got, expected_claim)
        assert result.job.state.value == job.state

    def claim(self, data: st.DataObject) -> None:
        limit, min_priority, kinds, system_limit = data.draw(claims, label="claim")
        expected = self._expected_claim(limit, min_priority, kinds, system_limit)
        got = self.queue.claim(
            limit, worker="w", min_priority=min_priority, kinds=kinds, system_limit=system_limit
        )
        self._claimed(got, expected)

    def _claimed(self, got: list[Lease], expected: list[ModelJob]) -> None:
        assert [lease.job.job_id for lease in got] == [j.job_id for j in expected]
        for lease, job in zip(got, expected, strict=True):
            assert lease.lease_id not in {j.lease for j in self.jobs.values()}
            job.state = "running"
            job.lease = lease.lease_id
            job.expire = self.clock() + LEASE
            job.claims += 1
            job.kept, job.sent = None, set()
            if not job.checkpoint:
                job.staged = {}  # a new generation: the attempt's own
            assert lease.expire_time == job.expire
            assert lease.job.attempt == job.claims
            assert lease.preemptions == job.preemptions
        self.seen_leases += [lease.lease_id for lease in got]

    def heartbeat_and_upload(self, data: st.DataObject) -> None:
        lease = self._pick_lease(data)
        job = self._by_lease(lease)
        path = data.draw(st.sampled_from(sorted(FILES)), label="path")
        stale = data.draw(st.sampled_from((False, False, True)), label="stale entry?")
        upload = entry(path) if stale else entry_of(path)
        got = self.queue.heartbeat({lease: (1, 2)})
        if job is None:
            assert got == {lease: None}
            with pytest.raises(StaleLease):
                self.queue.add_entries(lease, [upload])
        else:
            if job.detached:
                # A heartbeat its broken stream had in flight: the lease
                # keeps the grace's expiry (only a re-attach renews it).
                assert got == {lease: None}
            else:
                job.expire = self.clock() + LEASE
                assert got == {lease: job.expire}
            self.queue.add_entries(lease, [upload])
            if job.checkpoint and job.kept is None:
                # Staged without opening the checkpoint: it starts afresh.
                job.staged, job.kept = {}, 0
            job.staged[path] = not stale
            job.sent.add(path)

    def open_checkpoint(self, data: st.DataObject) -> None:
        """The first page of a from-scratch attempt's file stream: it opens
        the job's checkpoint (entries whose file changed go, the rest are
        kept) and lists only the files without an entry."""
        running = [j for j in self.jobs.values() if j.state == "running" and j.kind is FS]
        if not running:
            return
        job = data.draw(st.sampled_from(running), label="job")
        assert job.lease is not None
        page = self.realms.read_file_page(
            job.realm, lease_id=job.lease, after=None, paths=None, max_bytes=1 << 20, first=True
        )
        if job.checkpoint and job.kept is None:
            # Entries of another content than their file's go.
            job.staged = {p: True for p, fresh in job.staged.items() if fresh}
            job.kept = len(job.staged)
        listed = [info.path for info, _ in page.files]
        skip = set(job.staged) if job.kept is not None and job.checkpoint else set()
        assert listed == sorted(set(FILES) - skip), (listed, job)

    def detach(self, data: st.DataObject) -> None:
        """The stream holding some leases broke: each current one is kept
        for the grace, re-attachable with the stream's token."""
        held = [j.lease for j in self.jobs.values() if j.state == "running" and j.lease]
        chosen = data.draw(
            st.lists(st.sampled_from([*held, "stale"]), max_size=3, unique=True), label="detach"
        )
        token = data.draw(st.sampled_from(TOKENS), label="token")
        expected = []
        for lease in chosen:
            job = self._by_lease(lease)
            if job is not None:
                expected.append(lease)
                assert job.expire is not None
                job.expire = min(job.expire, self.clock() + GRACE)
                job.detached = token
        assert self.queue.detach(chosen, token) == expected
        if expected and data.draw(st.booleans(), label="its worker comes back at once?"):
            self.reattach(data)

    def reattach(self, data: st.DataObject) -> None:
        """A worker quotes a token and leases: only those detached with that
        token, of its worker, within their grace come back, as the same
        attempt with a full lease."""
        detached = [j.lease for j in self.jobs.values() if j.detached and j.lease]
        if detached and data.draw(st.integers(0, 3), label="a detached lease?") > 0:
            lease = data.draw(st.sampled_from(detached), label="lease")
        else:
            lease = self._pick_lease(data)
        token = data.draw(st.sampled_from(TOKENS), label="token")
        worker = data.draw(st.sampled_from(("w", "w", "intruder")), label="worker")
        job = self._by_lease(lease)
        got = self.queue.reattach([lease], worker=worker, token=token)[lease]
        ok = (
            job is not None
            and job.detached == token
            and worker == "w"
            and job.expire is not None
            and job.expire > self.clock()
        )
        if not ok:
            assert not isinstance(got, Lease), (got, job)
            return
        assert job is not None and isinstance(got, Lease)
        job.expire = self.clock() + LEASE
        job.detached = None
        assert (got.lease_id, got.job.job_id, got.job.attempt) == (lease, job.job_id, job.claims)
        assert got.expire_time == job.expire

    def complete(self, data: st.DataObject) -> None:
        lease = self._pick_lease(data)
        job = self._by_lease(lease)
        # Mostly the count the attempt sent; sometimes one more (entries lost).
        extra = data.draw(st.sampled_from((0, 0, 0, 1)), label="entries lost")
        uploaded = len(job.sent) + extra if job is not None else 0
        if job is None:
            with pytest.raises(StaleLease):
                self.queue.complete(lease, entries_uploaded=uploaded)
            return
        if job.checkpoint and job.kept is None:
            job.staged, job.kept = {}, 0  # completed without opening it
        received = len(job.staged) - (job.kept or 0)
        if uploaded and received != uploaded:
            with pytest.raises(StaleLease):
                self.queue.complete(lease, entries_uploaded=uploaded)
            self._count_failure(job)
            return
        done = self.queue.complete(lease, entries_uploaded=uploaded)
        assert (done.job_id, done.state) == (job.job_id, JobState.SUCCEEDED)
        if job.kind is FS:
            assert [e.path for e in index_of(self.queue, job.realm)] == sorted(job.staged)
        job.state = "succeeded"
        job.lease = None
        job.detached = None

    def fail(self, data: st.DataObject) -> None:
        lease = self._pick_lease(data)
        permanent = data.draw(st.sampled_from((False,) * 7 + (True,)), label="permanent")
        job = self._by_lease(lease)
        if job is None:
            with pytest.raises(StaleLease):
                self.queue.fail(lease, "boom", permanent=permanent)
            return
        self.queue.fail(lease, "boom", permanent=permanent)
        self._count_failure(job, permanent)

    def release(self, data: st.DataObject) -> None:
        held = [j.lease for j in self.jobs.values() if j.state == "running" and j.lease]
        chosen = data.draw(
            st.lists(st.sampled_from([*held, "stale"]), max_size=3, unique=True), label="release"
        )
        expected = []
        for lease in chosen:
            job = self._by_lease(lease)
            if job is not None:
                expected.append(job.job_id)
                self._requeue(job)
        assert [j.job_id for j in self.queue.release(chosen)] == expected

    def preempt(self, data: st.DataObject) -> None:
        """A running SYSTEM job handed back: uncounted, at the head of its
        priority's line, at most MAX_PREEMPTIONS times."""
        system = [
            j.lease
            for j in self.jobs.values()
            if j.state == "running" and j.priority == 0 and j.lease
        ]
        if system and data.draw(st.booleans(), label="a SYSTEM job's lease?"):
            lease = data.draw(st.sampled_from(system), label="lease")
        else:
            lease = self._pick_lease(data)
        job = self._by_lease(lease)
        got = self.queue.preempt(lease, "for a user")
        if job is None or job.priority > 0 or job.preemptions >= MAX_PREEMPTIONS:
            assert got is None
            return
        assert got is not None and got.job_id == job.job_id
        job.preemptions += 1
        line = [
            j.seq for j in self.jobs.values() if j.state == "queued" and j.priority == job.priority
        ]
        other = self._queued(job.realm, job.kind)
        # Aging within its own priority's line only: folded into a job of
        # another priority, it keeps its place.
        if line and (other is None or other.priority == job.priority):
            job.seq = min(job.seq, min(line) - 1)
        self._requeue(job)

    def wait(self, data: st.DataObject) -> None:
        # 0 keeps enqueue times equal (ties broken by id); 31 s passes a lease.
        self.clock.advance(data.draw(st.sampled_from((0, 0.000001, 0.5, 5, 29, 31)), label="wait"))

    def _expired(self) -> list[ModelJob]:
        now = self.clock()
        return [
            j
            for j in self.jobs.values()
            if j.state == "running" and j.expire is not None and j.expire < now
        ]

    def reap(self, data: st.DataObject) -> None:
        """Leases held by a stream that expire are failures (the worker went
        silent); detached ones, their grace over, interruptions."""
        due = self._expired()
        held = {j.lease for j in self.jobs.values() if j.lease and not j.detached}
        got = self.queue.reap_expired(held=held)
        assert sorted(j.job_id for j in got) == sorted(j.job_id for j in due)
        for job in due:
            if job.detached:
                self._requeue(job)
            else:
                self._count_failure(job)

    # -- invariants --------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        seen = {job.job_id: job for job in self.queue.list_jobs(limit=10_000)}
        assert set(seen) == set(self.jobs)  # no job lost, none invented
        for job_id, model in self.jobs.items():
            live = self._live(model)
            job = seen[job_id]
            assert live.state in ("queued", "running", "succeeded", "failed")
            assert job.state.value == live.state, job_id
            assert job.priority == max(model.priority, live.priority)
            assert [(c.path, c.deleted) for c in job.path_changes] == sorted(live.paths.items())

    @invariant()
    def checkpoints_match_the_model(self) -> None:
        """A queued from-scratch job's checkpoint holds what its attempts
        staged, and only queued or running jobs have one."""
        with self.db.session_for_tests() as s:
            rows = s.execute(
                select(JobRow.id, JobRow.state, JobRow.checkpoint).where(
                    JobRow.checkpoint.is_not(None)
                )
            ).all()
            checkpoints = {job_id: (state, gen) for job_id, state, gen in rows}
            staged = {
                job_id: set(
                    s.scalars(select(IndexEntryRow.path).where(IndexEntryRow.generation == gen))
                )
                for job_id, (_, gen) in checkpoints.items()
            }
        for job_id, model in self.jobs.items():
            if model.state == "queued":
                assert (job_id in checkpoints) == model.checkpoint, (job_id, model)
                if model.checkpoint:
                    assert staged[job_id] == set(model.staged), (job_id, model)
            if model.state in ("failed", "merged"):
                assert job_id not in checkpoints or checkpoints[job_id][0] == "succeeded"

    @invariant()
    def one_running_job_per_realm(self) -> None:
        with self.db.session_for_tests() as s:
            counts = s.execute(
                select(JobRow.realm_id, func.count())
                .where(JobRow.state == "running")
                .group_by(JobRow.realm_id)
            ).all()
        assert all(n == 1 for _, n in counts)

    @invariant()
    def attempts_and_the_cap(self) -> None:
        with self.db.session_for_tests() as s:
            rows = s.execute(select(JobAttemptRow.job_id, JobAttemptRow.outcome)).all()
        outcomes: dict[int, Counter[str]] = {}
        for job_id, outcome in rows:
            outcomes.setdefault(job_id, Counter())[outcome] += 1
        for job_id, model in self.jobs.items():
            seen = outcomes.get(job_id, Counter())
            bad = seen["failed"] + seen["expired"]
            assert bad == model.failures <= MAX_ATTEMPTS
            assert seen["completed"] == (1 if model.state == "succeeded" else 0)
            assert seen["running"] == (1 if model.state == "running" else 0)
            assert sum(seen.values()) == model.claims
            # A detach or a re-attach never starts an attempt; a detached
            # lease whose grace ran out ends as an interruption.
            assert seen["interrupted"] + bad + seen["completed"] + seen["running"] == model.claims
            if model.failures == MAX_ATTEMPTS:
                assert model.state == "failed"


def test_queue_against_the_model(store_url: str) -> None:
    db = open_database(store_url)
    machine = type("Machine", (QueueMachine,), {"db": db})
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                # REALM_MACHINE_EXAMPLES=400 runs a longer search by hand.
                max_examples=int(os.environ.get("REALM_MACHINE_EXAMPLES", 0))
                or (30 if db.backend == "sqlite" else 20),
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        db.close()
