"""Idempotency keys: a request id's first result, kept for a retention."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, delete, insert, or_, select

from realm_service.store.db import Tx
from realm_service.store.tables import IdempotencyKeyRow


def find_key(tx: Tx, scope: str, key: str) -> tuple[str, int | None] | None:
    row = tx.conn.execute(
        select(IdempotencyKeyRow.realm_id, IdempotencyKeyRow.job_id).where(
            IdempotencyKeyRow.scope == scope, IdempotencyKeyRow.key == key
        )
    ).first()
    return None if row is None else (row.realm_id, row.job_id)


def put_key(
    tx: Tx, *, scope: str, key: str, realm_id: str, job_id: int | None, now: datetime
) -> None:
    tx.conn.execute(
        insert(IdempotencyKeyRow).values(
            scope=scope, key=key, realm_id=realm_id, job_id=job_id, create_time=now
        )
    )


def sweep_keys(tx: Tx, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` idempotency keys created before `before`; returns
    how many went. Bounded, so a large backlog of old keys is swept over
    several short transactions instead of one long lock."""
    ids = (
        select(IdempotencyKeyRow.scope, IdempotencyKeyRow.key)
        .where(IdempotencyKeyRow.create_time < before)
        .limit(limit)
    )
    doomed = tx.conn.execute(ids).all()
    if not doomed:
        return 0
    tx.conn.execute(
        delete(IdempotencyKeyRow).where(
            or_(
                *(
                    and_(IdempotencyKeyRow.scope == scope, IdempotencyKeyRow.key == key)
                    for scope, key in doomed
                )
            )
        )
    )
    return len(doomed)


def delete_keys_of(tx: Tx, realm_id: str) -> None:
    """Forget every request id that named the realm."""
    tx.conn.execute(delete(IdempotencyKeyRow).where(IdempotencyKeyRow.realm_id == realm_id))
