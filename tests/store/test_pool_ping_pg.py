"""Pooled PostgreSQL connections: one idle for a while is pinged before it is
handed out, so a connection the server closed meanwhile (a restart, an idle
timeout) is replaced without failing a transaction; one used a moment ago is
handed out without that round trip."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text
from store_helpers import terminate_backend

from realm_service.errors import StoreUnavailable
from realm_service.store import db as db_module
from realm_service.store.db import Database, open_database


def _backend_pid(db: Database) -> int:
    with db.transaction() as tx:
        return int(tx.conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(db: Database, pid: int) -> None:
    assert terminate_backend(db, pid)


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = open_database(pg_url)
    yield database
    database.close()


def test_a_connection_closed_while_idle_is_replaced_unseen(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 0.0)
    pid = _backend_pid(db)
    _terminate(db, pid)
    # The pooled connection is dead; the ping finds it and a new one serves.
    new_pid = _backend_pid(db)
    assert new_pid != pid


def test_a_connection_used_a_moment_ago_is_not_pinged(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_S", 3600.0)
    pid = _backend_pid(db)
    _terminate(db, pid)
    # Not pinged: the transaction meets the dead connection and fails as the
    # store being unavailable, with nothing applied ...
    with pytest.raises(StoreUnavailable):
        _backend_pid(db)
    # ... and the pool let go of it: the next transaction gets a live one.
    assert _backend_pid(db) != pid


def _prepared(db: Database) -> tuple[int, set[str]]:
    """The backend and the statements psycopg prepared on it (a statement run
    five times on a connection is prepared)."""
    with db.transaction() as tx:
        pid = int(tx.conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        names = set(tx.conn.scalars(text("SELECT name FROM pg_prepared_statements")))
        return pid, names


def test_a_health_ping_keeps_the_connections_prepared_statements(db: Database) -> None:
    """The health check's ping ends its transaction with a commit: a
    ROLLBACK makes psycopg deallocate every statement it had prepared on
    the connection, and the pool hands the health check the connection used
    last, the busiest one, whose statements were then parsed and planned
    again after every check."""
    for _ in range(6):
        pid, before = _prepared(db)
    assert before, "the repeated statements were not prepared"
    assert db.ping()
    again, after = _prepared(db)
    assert again == pid  # the same pooled connection (the pool is last in, first out)
    assert before <= after
