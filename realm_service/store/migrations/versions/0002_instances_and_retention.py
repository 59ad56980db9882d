"""server instances, the instance holding each attempt, idempotency key retention

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_instances",
        sa.Column("instance_id", sa.String(length=40), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_server_instances")),
    )
    with op.batch_alter_table("job_attempts") as batch:
        batch.add_column(
            sa.Column("instance_id", sa.String(length=40), nullable=False, server_default="")
        )
    with op.batch_alter_table("job_attempts") as batch:
        batch.alter_column("instance_id", server_default=None)
    op.create_index(
        op.f("ix_idempotency_keys_create_time"), "idempotency_keys", ["create_time"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_idempotency_keys_create_time"), table_name="idempotency_keys")
    with op.batch_alter_table("job_attempts") as batch:
        batch.drop_column("instance_id")
    op.drop_table("server_instances")
