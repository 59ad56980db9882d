"""Reads on PostgreSQL run each statement on its own (no BEGIN, no COMMIT:
one round trip for a one-read call), unless they ask for a block; the
connection a read used goes back to the pool ready for a write transaction
that is one block again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from realm_service.store.db import Database, Tx, open_database

# In a transaction block the transaction began before this statement;
# alone, the statement is the transaction.
_ALONE = text("SELECT transaction_timestamp() = statement_timestamp()")


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = open_database(pg_url)
    yield database
    database.close()


def _pid(tx: Tx) -> int:
    return int(tx.conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_read_runs_its_statements_alone(db: Database) -> None:
    with db.read_transaction() as tx:
        tx.conn.execute(text("SELECT pg_sleep(0.01)"))
        assert tx.conn.execute(_ALONE).scalar_one() is True


def test_a_read_in_a_block_keeps_one(db: Database) -> None:
    with db.read_transaction(block=True) as tx:
        tx.conn.execute(text("SELECT pg_sleep(0.01)"))
        assert tx.conn.execute(_ALONE).scalar_one() is False
        tx.conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        assert tx.conn.execute(text("SHOW plan_cache_mode")).scalar_one() == "force_custom_plan"
    with db.read_transaction(block=True) as tx:
        assert tx.conn.execute(text("SHOW plan_cache_mode")).scalar_one() == "auto"


def test_a_write_after_a_read_on_the_same_connection_is_one_block(db: Database) -> None:
    with db.transaction() as tx:
        tx.conn.execute(text("CREATE TABLE read_then_write (n integer)"))
    with db.read_transaction() as tx:
        read_pid = _pid(tx)
    with pytest.raises(RuntimeError), db.transaction() as tx:
        assert _pid(tx) == read_pid  # the pool hands out the connection used last
        tx.conn.execute(text("SELECT pg_sleep(0.01)"))
        assert tx.conn.execute(_ALONE).scalar_one() is False
        tx.conn.execute(text("INSERT INTO read_then_write VALUES (1)"))
        raise RuntimeError("roll back")
    with db.read_transaction() as tx:
        assert tx.conn.execute(text("SELECT count(*) FROM read_then_write")).scalar_one() == 0
