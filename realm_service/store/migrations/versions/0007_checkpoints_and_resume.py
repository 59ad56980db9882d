"""checkpoints of from-scratch jobs and resumable ClaimJobs sessions

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (as in 0003 and 0006): on SQLite a batch operation
    # would rebuild the table and lose the claim index's DESC.
    op.add_column("jobs", sa.Column("checkpoint", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("checkpoint_kept", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("checkpoint_gitignore", sa.String(64), nullable=True))
    op.add_column("job_attempts", sa.Column("resume_token", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("job_attempts", "resume_token")
    op.drop_column("jobs", "checkpoint_gitignore")
    op.drop_column("jobs", "checkpoint_kept")
    op.drop_column("jobs", "checkpoint")
