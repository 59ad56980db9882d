"""A CreateRealm without a request id has nothing to replay and reads
nothing first: the realm, its files and its first job are written together,
in one statement that commits alone on PostgreSQL (`JobQueue.new_realm`), or
nothing is written when the realm exists."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import pytest
from store_helpers import Statements

from realm_service.domain import SYSTEM, USER, JobKind, JobState
from realm_service.errors import Conflict, RealmAlreadyExists
from realm_service.queue import JobQueue
from realm_service.realms import INDEX_JSON, REALM_JSON, Realms
from realm_service.store import realms_sql
from realm_service.store.db import Database


@pytest.fixture
def realms(queue: JobQueue) -> Iterator[Realms]:
    yield Realms(queue.db, queue, max_file_size=1 << 20, clock=queue.clock)


def _files(db: Database, realm_id: str) -> dict[str, bytes]:
    with db.read_transaction() as tx:
        listed = realms_sql.list_files(tx, realm_id)
        return {f.path: realms_sql.read_file(tx, realm_id=realm_id, path=f.path)[1] for f in listed}


def test_a_create_writes_the_realm_its_files_and_its_job_at_once(realms: Realms) -> None:
    db = realms.db
    # Bytes of every value, NUL included, and a path of many characters.
    db.others_alive = False  # no NOTIFY to send (see the next test)
    odd = bytes(range(256)) * 4
    files = [("docs/a.json", b'{"a": 1}'), ("bin/blob.json", odd), ("\u00e9t\u00e9.json", b"")]
    with Statements(db) as statements:
        created = realms.create(
            realm_id="r", priority=42, display_name="Arr", request_id="", files=files
        )
    if db.backend == "postgresql":
        assert statements.sql == ["WITH"] and statements.in_block == [False]
    else:
        assert statements.sql == ["BEGIN", "INSERT", "INSERT", "INSERT"]
    assert not created.replayed
    assert (created.realm.realm_id, created.realm.display_name, created.realm.files) == (
        "r",
        "Arr",
        len(files) + 2,
    )
    assert realms.get("r") == created.realm
    job = created.job
    assert (job.kind, job.state, job.priority, job.realm_id) == (
        JobKind.FROM_SCRATCH,
        JobState.QUEUED,
        42,
        "r",
    )
    assert realms.queue.get_job(job.job_id) == job
    stored = _files(db, "r")
    assert set(stored) == {REALM_JSON, INDEX_JSON, *(p for p, _ in files)}
    for path, content in files:
        assert stored[path] == content
    with db.read_transaction() as tx:
        listed = {f.path: f for f in realms_sql.list_files(tx, "r")}
    assert listed["bin/blob.json"].sha256 == hashlib.sha256(odd).hexdigest()
    assert listed["bin/blob.json"].size == len(odd)
    assert listed["bin/blob.json"].mtime == created.realm.create_time
    assert "r" in realms.registry


def test_other_instances_are_told_after_the_commit(realms: Realms) -> None:
    db = realms.db
    db.others_alive = True
    with Statements(db) as statements:
        realms.create(realm_id="r", priority=None, display_name="", request_id="", files=[])
    if db.backend == "postgresql":
        # The NOTIFY is a statement of its own, after the create committed.
        assert statements.sql == ["WITH", "SELECT"] and statements.in_block == [False, False]
        assert "pg_notify" in statements.text[1]
    else:
        assert statements.sql == ["BEGIN", "INSERT", "INSERT", "INSERT"]


def test_a_create_of_an_existing_realm_writes_nothing(realms: Realms) -> None:
    first = realms.create(
        realm_id="r", priority=None, display_name="", request_id="", files=[("a.json", b"1")]
    )
    before = _files(realms.db, "r")
    realms.registry.unmount("r")  # as if it were created on another instance
    with pytest.raises(RealmAlreadyExists):
        realms.create(
            realm_id="r",
            priority=SYSTEM,
            display_name="Other",
            request_id="",
            files=[("a.json", b"2"), ("b.json", b"3")],
        )
    assert realms.get("r") == first.realm
    assert _files(realms.db, "r") == before
    assert [j.job_id for j in realms.queue.list_jobs(realm_id="r")] == [first.job.job_id]
    assert realms.queue.get_job(first.job.job_id).priority == USER
    assert "r" not in realms.registry  # the failed create's mount was undone


def test_a_create_that_loses_the_race_leaves_the_winners_mount(
    realms: Realms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two creates of one id in this process: the loser's statement runs
    while the winner's create is under way and after it committed; the
    loser's failure must not unmount the realm the winner made (its job is
    visible), nor may a create that failed alone leave a mount."""
    real_statements = realms.db.statements
    outcome: list[object] = []

    @contextlib.contextmanager
    def statements_after_the_winner() -> Iterator[object]:
        # The loser has mounted; the winner's whole create runs now, then
        # the loser's statement finds its realm.
        monkeypatch.setattr(realms.db, "statements", real_statements)
        outcome.append(
            realms.create(realm_id="r", priority=None, display_name="", request_id="", files=[]).job
        )
        with real_statements() as s:
            yield s

    monkeypatch.setattr(realms.db, "statements", statements_after_the_winner)
    with pytest.raises(RealmAlreadyExists):
        realms.create(realm_id="r", priority=None, display_name="", request_id="", files=[])
    assert len(outcome) == 1
    assert "r" in realms.registry, "the loser unmounted the winner's realm"
    assert len(realms.registry) == 1

    with pytest.raises(RealmAlreadyExists):  # fails, the realm mounted before it
        realms.create(realm_id="r", priority=None, display_name="", request_id="", files=[])
    assert "r" in realms.registry


def test_a_file_the_store_refuses_leaves_no_realm_and_no_job(queue: JobQueue) -> None:
    """One statement (one transaction on SQLite): a file refused by the store
    (a path listed twice; the API refuses it earlier) takes the realm and
    its job with it."""
    with pytest.raises(Conflict), queue.db.statements() as tx:
        queue.new_realm(
            tx,
            realm_id="r",
            display_name="r",
            priority=USER,
            now=queue.clock(),
            files=[("a.json", b"{}"), ("b.json", b"{}"), ("a.json", b"[]")],
        )
    with queue.db.read_transaction() as tx:
        assert not realms_sql.realm_exists(tx, "r")
    assert queue.list_jobs() == []


def test_the_store_function_answers_none_for_an_existing_realm(queue: JobQueue) -> None:
    now = queue.clock()
    with queue.db.statements() as tx:
        created = queue.new_realm(
            tx, realm_id="r", display_name="r", priority=USER, now=now, files=[]
        )
    assert created is not None
    realm, job = created
    assert (realm.files, job.priority) == (0, USER)
    with queue.db.statements() as tx:
        again = queue.new_realm(
            tx, realm_id="r", display_name="r", priority=SYSTEM, now=now, files=[("a", b"")]
        )
    assert again is None
    assert [j.job_id for j in queue.list_jobs()] == [job.job_id]
    assert _files(queue.db, "r") == {}
