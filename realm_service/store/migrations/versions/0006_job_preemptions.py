"""how many times each job was preempted (handed back for a user's job)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN with its default kept (as in 0003): on SQLite a batch
    # operation would rebuild the table and lose the claim index's DESC.
    op.add_column(
        "jobs",
        sa.Column("preemptions", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    op.drop_column("jobs", "preemptions")
