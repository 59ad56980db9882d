"""PostgreSQL: room in the pages of attempts and realms for their updates

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Each attempt row is updated once, when its attempt ends: usually in one
# transaction with the attempts claimed beside it (and so stored beside it).
# A realm row is updated by every index job of the realm that completes; in a
# reindex of every realm, the realms whose jobs complete together are those
# stored together. None of the columns these updates set is indexed, so
# PostgreSQL can write the new version into the same page without touching
# the indexes (a HOT update), if the page has room for it: half of each page
# is kept for that, room for every row on it to be updated once in one
# transaction. Full pages (the default) left none: in a 3,000-job drain 9 of
# 6,000 attempt updates and a third of the realm updates were HOT; with half
# of each page kept, all of them were, and the drain wrote 20% less
# write-ahead log. The price is space: new rows fill a page only half, so
# the attempts' history can take up to twice the pages of full ones once
# vacuum has let new rows reuse the space that updates left (right after a
# drain of 1,800 jobs and a VACUUM: 66 pages against 61, the old versions
# of full pages taking space too). The setting applies to pages filled from
# now on; existing pages keep their rows as they are (docs/OPERATIONS.md,
# Store connections).
FILLFACTOR = {"job_attempts": 50, "realms": 50}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has no such setting
    for table, percent in FILLFACTOR.items():
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {percent})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in FILLFACTOR:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
