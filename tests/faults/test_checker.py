"""The history checker on hand-made histories and stores: it must find what
is wrong, and accept what ambiguity allows."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from realm_service.store.tables import Base
from tests.faults.checker import (
    AttemptRecord,
    JobRecord,
    Snapshot,
    Violation,
    check,
    load_snapshot,
)
from tests.faults.history import (
    Call,
    Entry,
    FaultEvent,
    History,
    Outcome,
    ProcessEnd,
    RunInfo,
    read_history,
)

pytestmark = pytest.mark.faults

A, B, C = "a" * 64, "b" * 64, "c" * 64
REALM = "r-1"
PATH = "cards/x.json"


def create(t: float = 0.0, job_id: int = 1, priority: int = 10) -> Call:
    return Call(
        op=1,
        attempt=1,
        client=0,
        method="CreateRealm",
        realm=REALM,
        t0=t,
        t1=t + 0.1,
        outcome=Outcome.OK,
        priority=priority,
        request_id="req-1",
        files={"seed/s.json": C},
        job_id=job_id,
        job_kind="from-scratch",
        job_priority=priority,
        disposition="inserted",
    )


def write(
    op: int, t: float, sha: str, outcome: Outcome = Outcome.OK, code: str = "", job_id: int = 2
) -> Call:
    return Call(
        op=op,
        attempt=1,
        client=0,
        method="WriteRealmFile",
        realm=REALM,
        t0=t,
        t1=t + 0.1,
        outcome=outcome,
        code=code,
        priority=10,
        path=PATH,
        sha256=sha,
        job_id=job_id if outcome is Outcome.OK else None,
        job_kind="incremental",
        job_priority=10 if outcome is Outcome.OK else None,
        disposition="inserted" if outcome is Outcome.OK else "",
    )


def job(
    job_id: int, kind: str = "from-scratch", *, priority: int = 10, attempts: int = 1
) -> JobRecord:
    return JobRecord(job_id, REALM, kind, priority, "succeeded", attempts, 0)


def store(files: dict[str, str], jobs: list[JobRecord], attempts: list[AttemptRecord]) -> Snapshot:
    return Snapshot(
        realms={REALM},
        files={(REALM, path): sha for path, sha in files.items()},
        jobs={j.id: j for j in jobs},
        attempts=attempts,
    )


def completed(attempt_id: int, job_id: int) -> AttemptRecord:
    return AttemptRecord(attempt_id, job_id, f"lease-{attempt_id}", "completed")


def kinds(violations: list[Violation]) -> list[str]:
    return sorted(v.kind for v in violations)


def healthy_store(held: str) -> Snapshot:
    return store(
        {"seed/s.json": C, PATH: held},
        [job(1), job(2, "incremental")],
        [completed(1, 1), completed(2, 2)],
    )


def test_a_lost_write_and_a_job_completed_twice_are_both_reported() -> None:
    history: list[Entry] = [
        RunInfo("none", "sqlite", 10.0, 0),
        create(),
        write(2, 1.0, A),
        write(3, 2.0, B),
    ]
    # The store kept the older content, and job 2 has two completed attempts.
    snapshot = store(
        {"seed/s.json": C, PATH: A},
        [job(1), job(2, "incremental", attempts=2)],
        [completed(1, 1), completed(2, 2), completed(3, 2)],
    )
    violations = check(history, snapshot)
    # The first completion was not under the job's last lease either.
    assert kinds(violations) == [
        "completed-by-stale-lease",
        "job-completed-twice",
        "write-lost",
    ], violations
    lost = next(v for v in violations if v.kind == "write-lost")
    assert PATH in lost.subject and "op 3" in lost.detail


def test_a_clean_history_has_no_violation() -> None:
    history: list[Entry] = [create(), write(2, 1.0, A), write(3, 2.0, B)]
    assert check(history, healthy_store(B)) == []


@pytest.mark.parametrize("held", [A, B])
def test_an_ambiguous_write_may_or_may_not_have_happened(held: str) -> None:
    history: list[Entry] = [
        create(),
        write(2, 1.0, A),
        write(3, 2.0, B, Outcome.AMBIGUOUS, "UNAVAILABLE"),
    ]
    assert check(history, healthy_store(held)) == []


def test_an_ambiguous_write_can_land_after_a_later_acknowledged_one() -> None:
    # The server may still run a call whose client gave up on it.
    history: list[Entry] = [
        create(),
        write(2, 1.0, B, Outcome.AMBIGUOUS, "DEADLINE_EXCEEDED"),
        write(3, 2.0, A),
    ]
    assert check(history, healthy_store(B)) == []


def test_a_killed_server_finishes_nothing_after_its_death() -> None:
    history: list[Entry] = [
        create(),
        write(2, 1.0, B, Outcome.AMBIGUOUS, "UNAVAILABLE"),
        FaultEvent("server-kill", "inject", 1.5),
        write(3, 2.0, A),
    ]
    assert kinds(check(history, healthy_store(B))) == ["write-lost"]


def test_a_refused_write_must_not_be_applied() -> None:
    history: list[Entry] = [
        create(),
        write(2, 1.0, A),
        write(3, 2.0, B, Outcome.FAILED, "INVALID_ARGUMENT"),
    ]
    violations = check(history, healthy_store(B))
    assert kinds(violations) == ["write-lost"]
    assert "refused" in violations[0].detail


def test_an_acknowledged_create_must_leave_its_realm_and_one_first_job() -> None:
    history: list[Entry] = [create()]
    assert kinds(check(history, Snapshot())) == ["create-lost"]
    two_first_jobs = store({"seed/s.json": C}, [job(1), job(2)], [completed(1, 1), completed(2, 2)])
    assert kinds(check(history, two_first_jobs)) == ["extra-first-index"]
    reindex = Call(
        op=2,
        attempt=1,
        client=0,
        method="ReindexRealm",
        realm=REALM,
        t0=1.0,
        t1=1.1,
        outcome=Outcome.AMBIGUOUS,
        code="UNAVAILABLE",
        priority=0,
    )
    assert check([*history, reindex], two_first_jobs) == []


def test_an_ambiguous_create_may_or_may_not_have_made_its_realm() -> None:
    ambiguous = Call(
        op=1,
        attempt=1,
        client=0,
        method="CreateRealm",
        realm=REALM,
        t0=0.0,
        t1=5.0,
        outcome=Outcome.AMBIGUOUS,
        code="DEADLINE_EXCEEDED",
        priority=10,
        request_id="req-1",
    )
    assert check([ambiguous], Snapshot()) == []
    made = store({"seed/s.json": C}, [job(1)], [completed(1, 1)])
    assert check([ambiguous], made) == []


def test_a_lowered_priority_and_a_completion_by_a_stale_lease_are_reported() -> None:
    history: list[Entry] = [create(priority=50)]
    lowered = store(
        {"seed/s.json": C},
        [job(1, priority=10, attempts=2)],
        [completed(1, 1), AttemptRecord(2, 1, "lease-2", "interrupted")],
    )
    assert kinds(check(history, lowered)) == ["completed-by-stale-lease", "priority-lowered"]


def test_a_process_that_exited_on_its_own_is_reported() -> None:
    history: list[Entry] = [
        ProcessEnd("w0", "worker", 10, killed=False, returncode=1, stderr_tail="refused"),
        ProcessEnd("server", "server", 11, killed=True, returncode=-9),
    ]
    violations = check(history, Snapshot())
    assert kinds(violations) == ["process-exited"]
    assert "w0" in violations[0].subject and "refused" in violations[0].detail


def test_the_history_round_trips_through_its_file(tmp_path: Path) -> None:
    entries: list[Entry] = [RunInfo("none", "sqlite", 1.0, 0), create(), write(2, 1.0, A)]
    history = History(tmp_path / "history.jsonl")
    for entry in entries:
        history.add(entry)
    history.close()
    assert read_history(tmp_path / "history.jsonl") == entries


def test_load_snapshot_reads_the_tables_of_the_store(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from realm_service.store.tables import JobAttemptRow, JobRow, RealmFileRow, RealmRow

    url = f"sqlite:///{tmp_path / 'realm.db'}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        session.add(
            RealmRow(
                realm_id=REALM, display_name=REALM, state="ready", created_priority=10,
                create_time=now,
            )
        )  # fmt: skip
        session.add(
            RealmFileRow(realm_id=REALM, path=PATH, content=b"x", mtime=now, size=1, sha256=A)
        )
        session.flush()
        session.add(
            JobRow(
                id=1, realm_id=REALM, kind="from-scratch", priority=10, state="succeeded",
                seq=1, attempt=1, counted_failures=0, create_time=now,
            )
        )  # fmt: skip
        session.flush()
        session.add(
            JobAttemptRow(
                id=1, job_id=1, lease_id="lease-1", worker="w0", start_time=now,
                outcome="completed",
            )
        )  # fmt: skip
    engine.dispose()
    snapshot = load_snapshot(url)
    assert snapshot.realms == {REALM}
    assert snapshot.files == {(REALM, PATH): A}
    assert snapshot.jobs[1] == JobRecord(1, REALM, "from-scratch", 10, "succeeded", 1, 0, None, "")
    assert snapshot.attempts == [AttemptRecord(1, 1, "lease-1", "completed", "w0")]
