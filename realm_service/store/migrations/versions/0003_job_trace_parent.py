"""the trace context of the call that queued each job

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A W3C traceparent (55 characters), empty when the call was not traced.
    # A plain ADD COLUMN with its default kept: on SQLite a batch operation
    # would rebuild the table and lose the claim index's DESC.
    op.add_column(
        "jobs",
        sa.Column(
            "trace_parent", sa.String(length=64), nullable=False, server_default=sa.text("''")
        ),
    )


def downgrade() -> None:
    op.drop_column("jobs", "trace_parent")
