"""an index of the jobs that hold a checkpoint; succeeded jobs hold none

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A succeeded job's generation is the realm's (or an older one): it is no
    # checkpoint, and sweeps of a realm's generations need only look at the
    # few jobs that hold one.
    op.execute("UPDATE jobs SET checkpoint = NULL WHERE state = 'succeeded'")
    op.create_index(
        "ix_jobs_checkpoint",
        "jobs",
        ["realm_id"],
        unique=False,
        postgresql_where=sa.text("checkpoint IS NOT NULL"),
        sqlite_where=sa.text("checkpoint IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_checkpoint", table_name="jobs")
