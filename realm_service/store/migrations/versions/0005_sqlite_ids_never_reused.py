"""job and attempt ids never reused on SQLite (AUTOINCREMENT)

DeleteRealm deletes a realm's jobs; SQLite would then hand the highest
deleted ids out again (a rowid is the largest one plus one), and a client
holding an old job id would find an unrelated job under it. AUTOINCREMENT
makes ids grow for good. SQLite cannot add it to a table in place: jobs and
job_attempts are rebuilt, rows, constraints and indexes kept as they were.
PostgreSQL's sequences never reuse ids: nothing to do there.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JOB_COLUMNS = (
    "id, realm_id, kind, priority, state, seq, attempt, counted_failures, create_time, "
    "start_time, finish_time, error_message, progress_done, progress_total, paths, lease_id, "
    "lease_attempt_id, lease_expire_time, worker, superseded_by, trace_parent"
)
ATTEMPT_COLUMNS = (
    "id, job_id, lease_id, worker, start_time, end_time, outcome, error_message, instance_id"
)


def _jobs_table(name: str, autoincrement: bool) -> str:
    key = (
        "id INTEGER NOT NULL CONSTRAINT pk_jobs PRIMARY KEY AUTOINCREMENT"
        if autoincrement
        else "id INTEGER NOT NULL"
    )
    pk = "" if autoincrement else "CONSTRAINT pk_jobs PRIMARY KEY (id), "
    return f"""CREATE TABLE {name} (
        {key},
        realm_id VARCHAR(63) NOT NULL,
        kind VARCHAR(20) NOT NULL,
        priority INTEGER NOT NULL,
        state VARCHAR(20) NOT NULL,
        seq BIGINT NOT NULL,
        attempt INTEGER NOT NULL,
        counted_failures INTEGER NOT NULL,
        create_time DATETIME NOT NULL,
        start_time DATETIME,
        finish_time DATETIME,
        error_message TEXT NOT NULL,
        progress_done BIGINT NOT NULL,
        progress_total BIGINT NOT NULL,
        paths TEXT NOT NULL,
        lease_id VARCHAR(40),
        lease_attempt_id BIGINT,
        lease_expire_time DATETIME,
        worker VARCHAR(200) NOT NULL,
        superseded_by BIGINT,
        trace_parent VARCHAR(64) DEFAULT '' NOT NULL,
        {pk}CONSTRAINT fk_jobs_realm_id_realms FOREIGN KEY(realm_id)
            REFERENCES realms (realm_id) ON DELETE CASCADE,
        CONSTRAINT uq_jobs_lease_id UNIQUE (lease_id)
    )"""


def _attempts_table(autoincrement: bool) -> str:
    key = (
        "id INTEGER NOT NULL CONSTRAINT pk_job_attempts PRIMARY KEY AUTOINCREMENT"
        if autoincrement
        else "id INTEGER NOT NULL"
    )
    pk = "" if autoincrement else "CONSTRAINT pk_job_attempts PRIMARY KEY (id), "
    return f"""CREATE TABLE job_attempts (
        {key},
        job_id BIGINT NOT NULL,
        lease_id VARCHAR(40) NOT NULL,
        worker VARCHAR(200) NOT NULL,
        start_time DATETIME NOT NULL,
        end_time DATETIME,
        outcome VARCHAR(20) NOT NULL,
        error_message TEXT NOT NULL,
        instance_id VARCHAR(40) NOT NULL,
        {pk}CONSTRAINT uq_job_attempts_lease_id UNIQUE (lease_id),
        CONSTRAINT fk_job_attempts_job_id_jobs FOREIGN KEY(job_id)
            REFERENCES jobs (id) ON DELETE CASCADE
    )"""


INDEXES = (
    "CREATE INDEX ix_jobs_lease_expiry ON jobs (lease_expire_time) WHERE state = 'running'",
    "CREATE INDEX ix_jobs_realm ON jobs (realm_id, id)",
    "CREATE INDEX ix_jobs_claim ON jobs (priority DESC, seq, id) WHERE state = 'queued'",
    "CREATE UNIQUE INDEX uq_jobs_one_queued_per_realm_kind ON jobs (realm_id, kind) "
    "WHERE state = 'queued'",
    "CREATE UNIQUE INDEX uq_jobs_one_running_per_realm ON jobs (realm_id) WHERE state = 'running'",
    "CREATE INDEX ix_job_attempts_job ON job_attempts (job_id)",
)


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # job_attempts refers to jobs: keep its rows aside and drop it first, so
    # that dropping jobs (an implicit DELETE with foreign keys on) cascades
    # to nothing.
    op.execute(f"CREATE TABLE job_attempts_kept AS SELECT {ATTEMPT_COLUMNS} FROM job_attempts")
    op.execute("DROP TABLE job_attempts")
    op.execute(_jobs_table("jobs_rebuilt", autoincrement))
    op.execute(f"INSERT INTO jobs_rebuilt ({JOB_COLUMNS}) SELECT {JOB_COLUMNS} FROM jobs")
    op.execute("DROP TABLE jobs")
    op.execute("ALTER TABLE jobs_rebuilt RENAME TO jobs")
    op.execute(_attempts_table(autoincrement))
    op.execute(
        f"INSERT INTO job_attempts ({ATTEMPT_COLUMNS}) "
        f"SELECT {ATTEMPT_COLUMNS} FROM job_attempts_kept"
    )
    op.execute("DROP TABLE job_attempts_kept")
    for ddl in INDEXES:
        op.execute(ddl)


def upgrade() -> None:
    _rebuild(autoincrement=True)


def downgrade() -> None:
    _rebuild(autoincrement=False)
