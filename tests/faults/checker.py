"""Reads a fault run's history and the store it left, and proves the invariants.

The checker never trusts the server's own account of itself: it knows what
clients were told (the history) and what the store holds (read-only SQL on
the tables of `realm_service/store/tables.py`, plus the index as SearchRealm
shows it), and derives every verdict from those two.

A call the client could not get an answer to is ambiguous: it may have taken
effect at any moment from its start until the server process that received
it died (a SIGKILLed server does not finish requests after its death), or
until the end of the run if that server lived on. So an ambiguous write may
legitimately replace a later acknowledged one, and an ambiguous create may or
may not have made its realm; everything acknowledged must be there.

Invariants, each a `kind` of violation:
- create-lost, create-job-wrong, extra-first-index, realm-without-first-index,
  phantom-realm, create-idempotency: each acknowledged create has its realm
  and exactly one from-scratch job created by it, the realm's first job;
  later from-scratch jobs are explained by ReindexRealm calls; a retry with
  the same request id is answered with the first result.
- write-lost, phantom-file, stale-read: the last acknowledged content of
  each path is what the store holds, unless an ambiguous write or delete may
  have replaced it; reads return a state the path may have been in.
- job-completed-twice, completed-by-stale-lease, succeeded-without-completion,
  completed-but-not-succeeded, attempt-count-mismatch, dangling-attempt: a
  job completes once, under its last lease, and its record agrees with its
  attempts.
- priority-lowered: a job's priority is at least every priority it answered
  (merges take the maximum, DESIGN.md section 4), also once it has been
  folded into another job.
- job-not-terminal, job-failed: every job ends, and succeeds (the workload
  holds only content the design says indexes: a card that cannot be parsed
  becomes an error entry, not a failed job).
- fault-counted-as-failure: a fault that is no worker's doing (a server crash,
  a killed worker's closed stream, a cut connection) does not count toward a
  job's attempts cap.
- index-stale: once a realm's jobs have all succeeded, its index describes
  exactly its files.
- process-exited, unclean-stop, server-traceback, worker-traceback: no
  process exits unless the harness killed it, each stops cleanly on SIGTERM,
  and no log holds a traceback.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool

from realm_service.store.tables import JobAttemptRow, JobRow, RealmFileRow, RealmRow
from tests.faults.history import (
    Call,
    Entry,
    FaultEvent,
    LogTraceback,
    Outcome,
    ProcessEnd,
    ProcessStop,
    RunInfo,
)

FROM_SCRATCH = "from-scratch"
TERMINAL = frozenset({"succeeded", "failed"})
MERGED = "merged"
# Files the server writes into every realm itself.
SERVER_FILES = frozenset({"realm.json", "index.json"})
# Faults after which no attempt may count toward a job's cap: none of them is
# a worker's doing, and each leaves the server a way to know it.
NOT_THE_WORKERS_FAULT = frozenset({"none", "server-kill", "worker-kill", "proxy-cut"})
ENQUEUING = frozenset({"CreateRealm", "WriteRealmFile", "DeleteRealmFile", "ReindexRealm"})
# A file that is absent.
ABSENT = ""
FOREVER = float("inf")

# The order violations are reported in: causes before their consequences.
KINDS = (
    "process-exited",
    "server-traceback",
    "worker-traceback",
    "create-lost",
    "create-idempotency",
    "create-job-wrong",
    "realm-without-first-index",
    "extra-first-index",
    "phantom-realm",
    "write-lost",
    "phantom-file",
    "stale-read",
    "job-completed-twice",
    "completed-by-stale-lease",
    "succeeded-without-completion",
    "completed-but-not-succeeded",
    "attempt-count-mismatch",
    "dangling-attempt",
    "priority-lowered",
    "fault-counted-as-failure",
    "job-failed",
    "job-not-terminal",
    "index-stale",
    "unclean-stop",
)


@dataclass(frozen=True)
class Violation:
    kind: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.subject}: {self.detail}"


@dataclass(frozen=True)
class JobRecord:
    id: int
    realm: str
    kind: str
    priority: int
    state: str
    attempt: int
    counted_failures: int
    superseded_by: int | None = None
    error_message: str = ""


@dataclass(frozen=True)
class AttemptRecord:
    id: int
    job_id: int
    lease_id: str
    outcome: str
    worker: str = ""


@dataclass
class Snapshot:
    """What the store holds once the run is over."""

    realms: set[str] = field(default_factory=set)
    # (realm, path) -> sha256
    files: dict[tuple[str, str], str] = field(default_factory=dict)
    jobs: dict[int, JobRecord] = field(default_factory=dict)
    attempts: list[AttemptRecord] = field(default_factory=list)
    # realm -> path -> sha256 of its current index, as SearchRealm shows it;
    # None when the server could not be asked.
    index: dict[str, dict[str, str]] | None = None


def load_snapshot(store_url: str) -> Snapshot:
    """Read-only queries on the store's tables; only the columns checked, so
    columns added later do not matter."""
    engine = create_engine(store_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            snapshot = Snapshot()
            snapshot.realms = set(conn.scalars(select(RealmRow.realm_id)))
            for realm_id, path, sha in conn.execute(
                select(RealmFileRow.realm_id, RealmFileRow.path, RealmFileRow.sha256)
            ):
                snapshot.files[(realm_id, path)] = sha
            for row in conn.execute(
                select(
                    JobRow.id,
                    JobRow.realm_id,
                    JobRow.kind,
                    JobRow.priority,
                    JobRow.state,
                    JobRow.attempt,
                    JobRow.counted_failures,
                    JobRow.superseded_by,
                    JobRow.error_message,
                )
            ):
                job = JobRecord(*row)
                snapshot.jobs[job.id] = job
            snapshot.attempts = [
                AttemptRecord(*row)
                for row in conn.execute(
                    select(
                        JobAttemptRow.id,
                        JobAttemptRow.job_id,
                        JobAttemptRow.lease_id,
                        JobAttemptRow.outcome,
                        JobAttemptRow.worker,
                    ).order_by(JobAttemptRow.id)
                )
            ]
            conn.rollback()
            return snapshot
    finally:
        engine.dispose()


# -- the history, digested ----------------------------------------------------


@dataclass(frozen=True)
class Effect:
    """A change a call made, or may have made, to one path: its new state
    (a sha256, or ABSENT) and when it may have taken effect."""

    state: str
    t0: float
    t1: float
    # The latest moment an ambiguous call may have taken effect.
    until: float
    acknowledged: bool
    what: str


@dataclass
class _History:
    info: RunInfo | None
    calls: list[Call]
    ops: dict[int, list[Call]]
    kills: list[float]
    ends: list[ProcessEnd]
    stops: list[ProcessStop]
    tracebacks: list[LogTraceback]

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> _History:
        h = cls(None, [], defaultdict(list), [], [], [], [])
        for e in entries:
            if isinstance(e, RunInfo):
                h.info = e
            elif isinstance(e, Call):
                h.calls.append(e)
                h.ops[e.op].append(e)
            elif isinstance(e, FaultEvent):
                if e.fault == "server-kill" and e.action == "inject":
                    h.kills.append(e.t)
            elif isinstance(e, ProcessEnd):
                h.ends.append(e)
            elif isinstance(e, ProcessStop):
                h.stops.append(e)
            elif isinstance(e, LogTraceback):
                h.tracebacks.append(e)
        h.kills.sort()
        for attempts in h.ops.values():
            attempts.sort(key=lambda c: c.attempt)
        return h

    def until(self, call: Call) -> float:
        """The latest moment an ambiguous call may have taken effect: the
        death of the server process it may have reached."""
        i = bisect.bisect_left(self.kills, call.t0)
        return self.kills[i] if i < len(self.kills) else FOREVER


def _acked(attempts: Sequence[Call]) -> Call | None:
    return next((c for c in attempts if c.outcome is Outcome.OK), None)


# -- the checks ------------------------------------------------------------------


def check(entries: Iterable[Entry], snapshot: Snapshot) -> list[Violation]:
    """Every violation of the invariants by this history and store, causes first."""
    h = _History.of(entries)
    found: list[Violation] = []
    created = _check_creates(h, snapshot, found)
    _check_files(h, snapshot, created, found)
    _check_jobs(h, snapshot, found)
    _check_priorities(h, snapshot, found)
    _check_index(snapshot, created, found)
    _check_processes(h, found)
    order = {kind: i for i, kind in enumerate(KINDS)}
    return sorted(found, key=lambda v: (order.get(v.kind, len(order)), v.subject))


def _check_creates(h: _History, snap: Snapshot, found: list[Violation]) -> dict[str, Call]:
    """Returns the acknowledged creates by realm."""
    acked: dict[str, Call] = {}
    attempted: set[str] = set()
    for attempts in h.ops.values():
        first = attempts[0]
        if first.method != "CreateRealm":
            continue
        attempted.add(first.realm)
        ok = _acked(attempts)
        for retry in attempts[1:]:
            if retry.code == "ALREADY_EXISTS":
                found.append(
                    Violation(
                        "create-idempotency",
                        f"realm {first.realm}",
                        f"attempt {retry.attempt} of request id {first.request_id} got "
                        f"ALREADY_EXISTS ({retry.detail!r}) after an earlier attempt ended "
                        f"{attempts[0].code or attempts[0].outcome}; a retry must get the "
                        "first result",
                    )
                )
        if ok is None:
            continue
        acked[first.realm] = ok
        if first.realm not in snap.realms:
            found.append(
                Violation(
                    "create-lost",
                    f"realm {first.realm}",
                    f"CreateRealm acknowledged at t={ok.t1:.2f}s (job {ok.job_id}) but the "
                    "store has no such realm",
                )
            )

    by_realm: dict[str, list[JobRecord]] = defaultdict(list)
    for job in snap.jobs.values():
        by_realm[job.realm].append(job)
    reindexes = _reindexes(h)
    for realm_id in sorted(snap.realms):
        if realm_id not in attempted:
            found.append(
                Violation("phantom-realm", f"realm {realm_id}", "no client ever asked for it")
            )
            continue
        jobs = sorted(by_realm.get(realm_id, []), key=lambda j: j.id)
        scratch = [j for j in jobs if j.kind == FROM_SCRATCH]
        ok = acked.get(realm_id)
        if not scratch:
            found.append(
                Violation(
                    "realm-without-first-index",
                    f"realm {realm_id}",
                    f"the realm exists with no from-scratch job (jobs: {_ids(jobs)})",
                )
            )
            continue
        first_id = jobs[0].id
        if ok is not None:
            answered = snap.jobs.get(ok.job_id or -1)
            if answered is None or answered.kind != FROM_SCRATCH or answered.realm != realm_id:
                found.append(
                    Violation(
                        "create-job-wrong",
                        f"realm {realm_id}",
                        f"CreateRealm answered job {ok.job_id}; the store has "
                        f"{answered or 'no such job'}",
                    )
                )
            elif answered.id != first_id:
                found.append(
                    Violation(
                        "create-job-wrong",
                        f"realm {realm_id}",
                        f"CreateRealm answered job {answered.id} but the realm's first job is "
                        f"{jobs[0]}",
                    )
                )
            creation = ok.job_id
        else:
            creation = first_id
        explained = {creation, *reindexes[realm_id].job_ids}
        extra = [j for j in scratch if j.id not in explained]
        # Each ambiguous ReindexRealm may have added one, and a start-up mount
        # re-adds a first index whose job failed (DESIGN.md section 3).
        allowance = reindexes[realm_id].ambiguous + sum(1 for j in scratch if j.state == "failed")
        if len(extra) > allowance:
            found.append(
                Violation(
                    "extra-first-index",
                    f"realm {realm_id}",
                    f"from-scratch jobs {_ids(scratch)}: job {creation} comes from CreateRealm, "
                    f"{sorted(reindexes[realm_id].job_ids)} from acknowledged ReindexRealm "
                    f"calls, {reindexes[realm_id].ambiguous} ambiguous ReindexRealm call(s) "
                    f"may have added one each; {_ids(extra)} are unexplained",
                )
            )
    return acked


@dataclass
class _Reindexes:
    job_ids: set[int] = field(default_factory=set)
    ambiguous: int = 0


def _reindexes(h: _History) -> dict[str, _Reindexes]:
    out: dict[str, _Reindexes] = defaultdict(_Reindexes)
    for call in h.calls:
        if call.method != "ReindexRealm":
            continue
        if call.outcome is Outcome.OK and call.job_id is not None:
            out[call.realm].job_ids.add(call.job_id)
        elif call.outcome is Outcome.AMBIGUOUS:
            out[call.realm].ambiguous += 1
    return out


def _check_files(
    h: _History, snap: Snapshot, created: dict[str, Call], found: list[Violation]
) -> None:
    # A lost realm is reported once, as create-lost, not once per file.
    created = {realm_id: ok for realm_id, ok in created.items() if realm_id in snap.realms}
    effects: dict[tuple[str, str], list[Effect]] = defaultdict(list)
    reads: dict[tuple[str, str], list[Call]] = defaultdict(list)
    refused: dict[tuple[str, str], dict[str, Call]] = defaultdict(dict)
    for realm_id, ok in created.items():
        for path, sha in ok.files.items():
            effects[(realm_id, path)].append(
                Effect(sha, ok.t0, ok.t1, ok.t1, True, f"CreateRealm op {ok.op}")
            )
    for call in h.calls:
        key = (call.realm, call.path)
        if call.realm not in created:
            continue
        if call.method == "ReadRealmFile":
            if call.outcome is Outcome.OK or call.code == "NOT_FOUND":
                reads[key].append(call)
            continue
        if call.method not in ("WriteRealmFile", "DeleteRealmFile"):
            continue
        state = call.sha256 if call.method == "WriteRealmFile" else ABSENT
        what = f"{call.method} op {call.op} attempt {call.attempt}"
        if call.outcome is Outcome.OK:
            effects[key].append(Effect(state, call.t0, call.t1, call.t1, True, what))
        elif call.method == "DeleteRealmFile" and call.code == "NOT_FOUND":
            # Not a change, but an acknowledged sight of the path absent.
            effects[key].append(Effect(ABSENT, call.t0, call.t1, call.t1, True, what + " (absent)"))
        elif call.outcome is Outcome.AMBIGUOUS:
            effects[key].append(Effect(state, call.t0, call.t1, h.until(call), False, what))
        elif call.method == "WriteRealmFile":
            refused[key][state] = call

    for key in sorted(effects):
        realm_id, path = key
        history = sorted(effects[key], key=lambda e: e.t0)
        held = snap.files.get(key, ABSENT)
        allowed, last = _possible(history, FOREVER)
        if held not in allowed:
            detail = (
                f"the store holds {_show(held)}; the last acknowledged change was "
                f"{last.what if last else 'none'} ({_show(last.state) if last else 'absent'}, "
                f"t={last.t0:.2f}-{last.t1:.2f}s)"
                if last
                else f"the store holds {_show(held)}; nothing was acknowledged"
            )
            others = sorted(_show(s) for s in allowed - {last.state if last else ABSENT})
            if others:
                detail += f"; later ambiguous calls could have left {', '.join(others)}"
            if held in refused[key]:
                bad = refused[key][held]
                detail += f"; the held content is that of a refused call ({bad.code}, op {bad.op})"
            found.append(Violation("write-lost", f"realm {realm_id} path {path}", detail))
        for read in reads.get(key, []):
            seen = read.sha256 if read.outcome is Outcome.OK else ABSENT
            could, base = _possible(history, read.t1, before=read.t0)
            if seen not in could:
                found.append(
                    Violation(
                        "stale-read",
                        f"realm {realm_id} path {path}",
                        f"ReadRealmFile op {read.op} at t={read.t0:.2f}-{read.t1:.2f}s returned "
                        f"{_show(seen)}; the path could only hold "
                        f"{', '.join(sorted(_show(s) for s in could))} "
                        f"(last acknowledged: {base.what if base else 'none'})",
                    )
                )

    touched = {key for key in effects} | {(c.realm, c.path) for c in h.calls if c.path}
    for realm_id, path in sorted(snap.files):
        if realm_id in created and path not in SERVER_FILES and (realm_id, path) not in touched:
            found.append(
                Violation("phantom-file", f"realm {realm_id} path {path}", "no client wrote it")
            )


def _possible(
    history: Sequence[Effect], end: float, *, before: float | None = None
) -> tuple[set[str], Effect | None]:
    """The states a path may be in at `end`: that of the last acknowledged
    change (ended before `before`, when given), or that of any ambiguous call
    that may have taken effect after it began and before `end`."""
    limit = end if before is None else before
    acknowledged = [e for e in history if e.acknowledged and e.t1 <= limit]
    last = max(acknowledged, key=lambda e: e.t0, default=None)
    states = {last.state if last else ABSENT}
    since = last.t0 if last else float("-inf")
    for e in history:
        if not e.acknowledged and e.until > since and e.t0 < end:
            states.add(e.state)
    return states, last


def _check_jobs(h: _History, snap: Snapshot, found: list[Violation]) -> None:
    by_job: dict[int, list[AttemptRecord]] = defaultdict(list)
    for a in snap.attempts:
        by_job[a.job_id].append(a)
    fault = h.info.fault if h.info else ""
    for job in sorted(snap.jobs.values(), key=lambda j: j.id):
        attempts = sorted(by_job.get(job.id, []), key=lambda a: a.id)
        subject = f"job {job.id} (realm {job.realm}, {job.kind})"
        outcomes = _summary([a.outcome for a in attempts])
        completed = [a for a in attempts if a.outcome == "completed"]
        if len(completed) > 1:
            found.append(
                Violation(
                    "job-completed-twice",
                    subject,
                    f"{len(completed)} completed attempts (leases "
                    f"{', '.join(a.lease_id for a in completed)}); attempts: {outcomes}",
                )
            )
        if completed and completed[0].id != attempts[-1].id:
            found.append(
                Violation(
                    "completed-by-stale-lease",
                    subject,
                    f"lease {completed[0].lease_id} completed the job but is not its last "
                    f"lease ({attempts[-1].lease_id}, {attempts[-1].outcome}); attempts: "
                    f"{outcomes}",
                )
            )
        if job.state == "succeeded" and not completed:
            found.append(
                Violation(
                    "succeeded-without-completion",
                    subject,
                    f"state succeeded with no completed attempt; attempts: {outcomes}",
                )
            )
        if job.state != "succeeded" and completed:
            found.append(
                Violation(
                    "completed-but-not-succeeded",
                    subject,
                    f"state {job.state} although lease {completed[0].lease_id} completed it",
                )
            )
        if job.attempt != len(attempts):
            found.append(
                Violation(
                    "attempt-count-mismatch",
                    subject,
                    f"the job counts {job.attempt} attempts; {len(attempts)} are recorded "
                    f"({outcomes})",
                )
            )
        if job.state in TERMINAL and any(a.outcome == "running" for a in attempts):
            found.append(
                Violation(
                    "dangling-attempt",
                    subject,
                    f"the job is {job.state} but an attempt is still running: {outcomes}",
                )
            )
        reported_failures = sum(1 for a in attempts if a.outcome == "failed")
        if fault in NOT_THE_WORKERS_FAULT and job.counted_failures > reported_failures:
            found.append(
                Violation(
                    "fault-counted-as-failure",
                    subject,
                    f"{job.counted_failures} attempt(s) counted toward the cap, but workers "
                    f"reported {reported_failures} failure(s); attempts: {outcomes} under "
                    f"fault {fault}",
                )
            )
        live = _live(snap, job)
        if live.state not in TERMINAL:
            via = f" (merged into job {live.id})" if live.id != job.id else ""
            found.append(
                Violation(
                    "job-not-terminal",
                    subject,
                    f"still {live.state}{via} after the settle deadline; attempts: "
                    f"{_summary([a.outcome for a in by_job.get(live.id, [])])}, counted "
                    f"failures {live.counted_failures}, last error {live.error_message[:300]!r}",
                )
            )
        elif job.state == "failed":
            found.append(
                Violation(
                    "job-failed",
                    subject,
                    f"failed after attempts {outcomes}: {job.error_message[:300]!r}",
                )
            )


def _live(snap: Snapshot, job: JobRecord) -> JobRecord:
    """The job a merged one was folded into, following the chain."""
    live = job
    for _ in range(64):
        if live.state != MERGED or live.superseded_by is None:
            break
        nxt = snap.jobs.get(live.superseded_by)
        if nxt is None:
            break
        live = nxt
    return live


def _check_priorities(h: _History, snap: Snapshot, found: list[Violation]) -> None:
    for call in h.calls:
        if call.method not in ENQUEUING or call.outcome is not Outcome.OK or call.job_id is None:
            continue
        asked = call.priority if call.priority is not None else 10
        answered = call.job_priority if call.job_priority is not None else -1
        subject = f"job {call.job_id} (realm {call.realm})"
        attached = call.disposition == "attached"
        if not attached and answered < asked:
            found.append(
                Violation(
                    "priority-lowered",
                    subject,
                    f"{call.method} op {call.op} asked for priority {asked} and was answered "
                    f"with the job at {answered} ({call.disposition})",
                )
            )
        job = snap.jobs.get(call.job_id)
        if job is None:
            continue
        live = _live(snap, job)
        # Attaching to a running job cannot raise what already runs; the job
        # must still never drop below what the answer showed.
        floor = answered if attached else max(asked, answered)
        if live.priority < floor:
            via = f" (merged into job {live.id})" if live.id != job.id else ""
            found.append(
                Violation(
                    "priority-lowered",
                    subject,
                    f"{call.method} op {call.op} at t={call.t1:.2f}s asked for {asked}, was "
                    f"answered {answered} ({call.disposition}); the job{via} now has "
                    f"priority {live.priority}",
                )
            )


def _check_index(snap: Snapshot, created: dict[str, Call], found: list[Violation]) -> None:
    if snap.index is None:
        return
    done: dict[str, bool] = defaultdict(lambda: True)
    for job in snap.jobs.values():
        if job.state not in ("succeeded", MERGED):
            done[job.realm] = False
    for realm_id in sorted(created):
        if realm_id not in snap.realms or not done[realm_id]:
            continue
        files = {p: s for (r, p), s in snap.files.items() if r == realm_id}
        index = snap.index.get(realm_id, {})
        if index == files:
            continue
        missing = sorted(p for p in files if p not in index)
        extra = sorted(p for p in index if p not in files)
        stale = sorted(p for p in files if p in index and index[p] != files[p])
        found.append(
            Violation(
                "index-stale",
                f"realm {realm_id}",
                f"every job succeeded but the index differs from the files: "
                f"missing {missing[:5]}, removed files still indexed {extra[:5]}, "
                f"outdated {stale[:5]}",
            )
        )


def _check_processes(h: _History, found: list[Violation]) -> None:
    for end in h.ends:
        if end.returncode is not None and not end.killed:
            found.append(
                Violation(
                    "process-exited",
                    f"{end.role} {end.name} (pid {end.pid})",
                    f"exited with {end.returncode} without being killed; stderr ends:\n"
                    f"{_indent(end.stderr_tail)}",
                )
            )
    for stop in h.stops:
        if stop.returncode != 0:
            what = "did not stop" if stop.returncode is None else f"exited {stop.returncode}"
            found.append(
                Violation(
                    "unclean-stop",
                    f"{stop.role} {stop.name} (pid {stop.pid})",
                    f"{what} on SIGTERM; stderr ends:\n{_indent(stop.stderr_tail)}",
                )
            )
    for tb in h.tracebacks:
        kind = "server-traceback" if tb.role == "server" else "worker-traceback"
        found.append(Violation(kind, f"{tb.role} {tb.process}", "\n" + _indent(tb.text)))


def _summary(outcomes: Sequence[str]) -> str:
    """Attempt outcomes in order, or counted when there are many (a loop)."""
    if len(outcomes) <= 6:
        return str(list(outcomes))
    counted = ", ".join(f"{n} {k}" for k, n in Counter(outcomes).items())
    return f"{len(outcomes)} ({counted}; last {outcomes[-1]})"


def _ids(jobs: Iterable[JobRecord]) -> list[int]:
    return [j.id for j in jobs]


def _show(state: str) -> str:
    return "nothing (absent)" if state == ABSENT else f"sha256 {state[:12]}"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())
