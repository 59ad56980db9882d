"""connected workers of every instance, for ListWorkers and ExplainJob

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per ClaimJobs stream, rewritten by its instance every few
    # seconds; the rows of an instance go with it.
    op.create_table(
        "worker_presence",
        sa.Column("instance_id", sa.String(length=40), nullable=False),
        sa.Column("stream_id", sa.String(length=40), nullable=False),
        sa.Column("worker_id", sa.String(length=200), nullable=False),
        sa.Column("incarnation_id", sa.String(length=200), nullable=False),
        sa.Column("kinds", sa.String(length=100), nullable=False),
        sa.Column("min_priority", sa.Integer(), nullable=False),
        sa.Column("credits", sa.Integer(), nullable=False),
        sa.Column("jobs_held", sa.Integer(), nullable=False),
        sa.Column("connect_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_message_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["server_instances.instance_id"],
            name=op.f("fk_worker_presence_instance_id_server_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_id", "stream_id", name=op.f("pk_worker_presence")),
    )


def downgrade() -> None:
    op.drop_table("worker_presence")
