"""Helpers of the store tests: a fake clock and readers that see the store the
way a client would (realms, the current index)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event

from realm_service.dispatcher import WorkerStream
from realm_service.domain import USER, IndexEntry, JobKind, Lease, Realm
from realm_service.queue import JobQueue
from realm_service.store import index_sql, realms_sql
from realm_service.store.db import Database

LEASE = timedelta(seconds=30)
MAX_ATTEMPTS = 3


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta | float) -> datetime:
        self.now += delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        return self.now


def make_realm(
    queue: JobQueue,
    realm_id: str,
    files: dict[str, bytes] | None = None,
    priority: int = USER,
) -> Realm:
    """A realm row (and files) with no job: tests enqueue explicitly."""
    now = queue.clock()
    with queue.db.transaction() as s:
        return realms_sql.insert_new_realm(
            s,
            realm_id=realm_id,
            display_name=realm_id.upper(),
            priority=priority,
            now=now,
            files=list((files or {}).items()),
        )


def get_realm(queue: JobQueue, realm_id: str) -> Realm:
    with queue.db.transaction() as s:
        return realms_sql.get_realm(s, realm_id)


def index_of(queue: JobQueue, realm_id: str) -> list[IndexEntry]:
    """Every entry searches can see in the realm's current generation, by path."""
    with queue.db.transaction() as s:
        realm = realms_sql.get_realm(s, realm_id)
        return index_sql.search(
            s,
            realm_id=realm_id,
            generation=realm.current_generation,
            card_type="",
            text="",
            after_path=None,
            limit=10_000,
        )


def entry(path: str, card_type: str = "", title: str = "", error: str = "") -> IndexEntry:
    return IndexEntry(
        path=path,
        mtime=datetime(2026, 11, 1, tzinfo=UTC),
        size=len(path),
        sha256=path.encode().hex()[:64],
        media_type="application/vnd.card+json" if card_type else "text/plain",
        card_type=card_type,
        title=title,
        search_text=title.lower(),
        error_message=error,
    )


def waiting_stream(
    credits: int,
    got: list[Lease],
    *,
    min_priority: int = 0,
    kinds: tuple[JobKind, ...] = (),
    worker_id: str = "w",
) -> WorkerStream:
    """A ClaimJobs stream's ledger with `credits` free; what it is handed
    goes to `got`."""
    stream = WorkerStream(
        worker_id=worker_id,
        incarnation_id="i",
        kinds=kinds,
        min_priority=min_priority,
        deliver=got.extend,
    )
    stream.grant(credits)
    return stream


def woken_calls(queue: JobQueue) -> list[int]:
    """Calls of this process's new-work listeners from now on. On PostgreSQL
    the first listener starts the LISTEN connection, which wakes everyone
    once it is connected: that call is awaited and left out."""
    calls: list[int] = []
    others_alive = queue.db.others_alive
    # Called after the queue's own question of who else is there (its
    # callback came first), which would overwrite what the test set.
    listening = threading.Event()
    queue.db.on_listening(listening.set)
    queue.on_new_work(lambda: calls.append(1))
    if queue.db.backend == "postgresql":
        assert listening.wait(10), "the LISTEN connection did not come up"
        assert calls
        calls.clear()
        # A (re)connect assumes other instances until it asked who is
        # there; the test says it.
        queue.db.others_alive = others_alive
    return calls


class Statements:
    """The first word of each statement a database runs while recording
    (SQLite's BEGIN included: it is a statement there; its COMMIT is not),
    and on PostgreSQL whether a transaction block was open before it: so the
    first statement of a block is False, the later ones True, and one that
    commits alone is False."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.sql: list[str] = []
        self.in_block: list[bool] = []
        self.text: list[str] = []
        self.recording = False

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.recording:
            self.sql.append(statement.split(None, 1)[0].upper())
            self.text.append(statement)
            if self.db.backend == "postgresql":
                status = conn.connection.dbapi_connection.info.transaction_status
                self.in_block.append(status != 0)  # 0: psycopg's TransactionStatus.IDLE

    def __enter__(self) -> Statements:
        self.sql.clear()
        self.in_block.clear()
        self.text.clear()
        self.recording = True
        event.listen(self.db.engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.recording = False
        event.remove(self.db.engine, "before_cursor_execute", self)


def terminate_backend(db: Database, pid: int) -> bool:
    """End PostgreSQL backend `pid` (a connection of `db`'s pool) from a
    connection of its own, waiting until it is gone; whether it was found."""
    import psycopg

    conninfo = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
    return row == (True,)
