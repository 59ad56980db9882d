"""The migrated schema matches the models, with the partial indexes that back
the claim path and the exactly-once rules."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from realm_service.store.db import Database, open_database
from realm_service.store.tables import Base

# SQLite cannot reflect the DESC expression of ix_jobs_claim: autogenerate
# sees it as a different index. It is checked by name and definition below.
UNREFLECTABLE_ON_SQLITE = {"ix_jobs_claim"}


def schema_differences(db: Database) -> list[Any]:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diffs: list[Any] = compare_metadata(context, Base.metadata)
    if db.backend == "sqlite":
        diffs = [
            d
            for d in diffs
            if not (
                isinstance(d, tuple)
                and d[0] in ("add_index", "remove_index")
                and d[1].name in UNREFLECTABLE_ON_SQLITE
            )
        ]
    return diffs


def index_sql(db: Database) -> dict[str, str]:
    """Every index of the jobs table with its definition, as the database has it."""
    with db.engine.connect() as conn:
        if db.backend == "sqlite":
            rows = conn.execute(
                text("SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='jobs'")
            )
        else:
            rows = conn.execute(
                text(
                    "SELECT indexname, indexdef FROM pg_indexes "
                    "WHERE tablename = 'jobs' AND schemaname = current_schema()"
                )
            )
        return {name: (sql or "").lower() for name, sql in rows}


def test_migrated_schema_matches_the_models(db: Database) -> None:
    assert schema_differences(db) == []
    tables = set(inspect(db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_claim_and_uniqueness_indexes_exist_with_their_predicates(db: Database) -> None:
    indexes = index_sql(db)
    claim = indexes["ix_jobs_claim"]
    assert "priority desc" in claim and "seq" in claim and "queued" in claim
    assert "where" in claim
    for name, state in (
        ("uq_jobs_one_queued_per_realm_kind", "queued"),
        ("uq_jobs_one_running_per_realm", "running"),
        ("ix_jobs_lease_expiry", "running"),
    ):
        assert "where" in indexes[name] and state in indexes[name], name
    assert "unique" in indexes["uq_jobs_one_queued_per_realm_kind"]
    assert "unique" in indexes["uq_jobs_one_running_per_realm"]


def test_migrating_again_is_a_no_op(db: Database) -> None:
    with db.engine.connect() as conn:
        head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    again = open_database(db.url)
    try:
        assert schema_differences(again) == []
        with again.engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        assert [v for (v,) in versions] == [head]
    finally:
        again.close()


CLAIM_HEAD = (
    "SELECT id, realm_id FROM jobs WHERE state = 'queued' AND priority >= 0 "
    "ORDER BY priority DESC, seq, id LIMIT 36"
)


def test_the_claim_query_reads_the_claim_index_in_order(db: Database) -> None:
    """The head of the queue comes from the partial index, never from a sort
    of the whole backlog."""
    with db.engine.connect() as conn:
        if db.backend == "sqlite":
            plan = conn.execute(text("EXPLAIN QUERY PLAN " + CLAIM_HEAD)).all()
            detail = " ".join(str(row[-1]) for row in plan)
            assert "ix_jobs_claim" in detail
            assert "TEMP B-TREE" not in detail.upper()
        else:
            # An empty table would be scanned; ask whether the index can serve it.
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            plan = conn.execute(text("EXPLAIN " + CLAIM_HEAD + " FOR UPDATE SKIP LOCKED")).all()
            detail = "\n".join(str(row[0]) for row in plan)
            assert "ix_jobs_claim" in detail
            assert "Sort" not in detail


def test_sqlite_rebuild_for_autoincrement_keeps_rows_and_never_reuses_ids(tmp_path: Any) -> None:
    """Migration 0005 rebuilds jobs and job_attempts on SQLite: rows survive,
    and an id freed by a delete is not handed out again."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, event

    from realm_service.store.db import MIGRATIONS

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _foreign_keys(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA foreign_keys=ON")

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        conn.execute(
            text(
                "INSERT INTO realms (realm_id, display_name, state, created_priority, "
                "create_time, files, cards, errors, entries) "
                "VALUES ('r', 'r', 'indexing', 10, '2026-01-01 00:00:00', 0, 0, 0, 0)"
            )
        )
        for job_id in (1, 2):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, realm_id, kind, priority, state, seq, attempt, "
                    "counted_failures, create_time, error_message, progress_done, "
                    "progress_total, paths, worker, trace_parent) VALUES (:id, 'r', "
                    "'from-scratch', 10, 'succeeded', :id, 1, 0, '2026-01-01 00:00:00', '', "
                    "0, 0, '[]', '', '')"
                ),
                {"id": job_id},
            )
        conn.execute(
            text(
                "INSERT INTO job_attempts (id, job_id, lease_id, worker, start_time, outcome, "
                "error_message, instance_id) VALUES (7, 2, 'l', 'w', '2026-01-01 00:00:00', "
                "'completed', '', '')"
            )
        )
        conn.commit()
        command.upgrade(cfg, "head")
        conn.commit()
        assert conn.execute(text("SELECT id FROM jobs ORDER BY id")).scalars().all() == [1, 2]
        assert conn.execute(text("SELECT job_id FROM job_attempts")).scalars().all() == [2]
        conn.execute(text("DELETE FROM jobs WHERE id = 2"))  # cascades to its attempt
        assert conn.execute(text("SELECT count(*) FROM job_attempts")).scalar() == 0
        conn.execute(
            text(
                "INSERT INTO jobs (realm_id, kind, priority, state, seq, attempt, "
                "counted_failures, create_time, error_message, progress_done, progress_total, "
                "paths, worker) VALUES ('r', 'from-scratch', 10, 'queued', 3, 0, 0, "
                "'2026-01-01 00:00:00', '', 0, 0, '[]', '')"
            )
        )
        assert conn.execute(text("SELECT max(id) FROM jobs")).scalar() == 3
        conn.commit()
    engine.dispose()
