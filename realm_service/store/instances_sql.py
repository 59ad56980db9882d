"""Every SQL statement about server instances: who is running, who died.

A server registers itself at start, refreshes its `seen_time` while it can
write, and deletes its row when it stops. The reaper asks which instances
holding expired leases are gone, so that a lease orphaned by a dead server
counts as an interruption, not as a failure of the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, insert, select, update

from realm_service.domain import JobKind, WorkerInfo
from realm_service.store.db import Tx
from realm_service.store.tables import JobAttemptRow, ServerInstanceRow, WorkerPresenceRow


def register(tx: Tx, instance_id: str, now: datetime) -> None:
    tx.conn.execute(
        insert(ServerInstanceRow).values(instance_id=instance_id, start_time=now, seen_time=now)
    )
    tx.introduce()


def touch(tx: Tx, instance_id: str, now: datetime) -> bool:
    """Refresh the instance's row; False when it is missing (it was declared
    dead and removed while this server could not write, and must register
    again)."""
    result = tx.conn.execute(
        update(ServerInstanceRow)
        .where(ServerInstanceRow.instance_id == instance_id)
        .values(seen_time=now)
        .returning(ServerInstanceRow.instance_id)
    ).first()
    return result is not None


def others_alive(tx: Tx, instance_id: str, seen_after: datetime) -> bool:
    """Whether any other instance refreshed its row after `seen_after`."""
    found = tx.conn.execute(
        select(ServerInstanceRow.instance_id)
        .where(
            ServerInstanceRow.instance_id != instance_id,
            ServerInstanceRow.seen_time > seen_after,
        )
        .limit(1)
    ).first()
    return found is not None


def remove(tx: Tx, instance_ids: Sequence[str]) -> None:
    if instance_ids:
        tx.conn.execute(
            delete(ServerInstanceRow).where(ServerInstanceRow.instance_id.in_(list(instance_ids)))
        )


def live(tx: Tx, instance_ids: Sequence[str], seen_after: datetime) -> set[str]:
    """Those of `instance_ids` that refreshed their row after `seen_after`."""
    wanted = [i for i in set(instance_ids) if i]
    if not wanted:
        return set()
    return set(
        tx.conn.scalars(
            select(ServerInstanceRow.instance_id).where(
                ServerInstanceRow.instance_id.in_(wanted),
                ServerInstanceRow.seen_time > seen_after,
            )
        )
    )


def holders(tx: Tx, attempt_ids: Sequence[int]) -> dict[int, str]:
    """The instance that holds each attempt's lease ('' when not recorded)."""
    if not attempt_ids:
        return {}
    return {
        attempt_id: instance_id
        for attempt_id, instance_id in tx.conn.execute(
            select(JobAttemptRow.id, JobAttemptRow.instance_id).where(
                JobAttemptRow.id.in_(list(attempt_ids))
            )
        )
    }


def stale(tx: Tx, seen_before: datetime) -> list[str]:
    return list(
        tx.conn.scalars(
            select(ServerInstanceRow.instance_id).where(ServerInstanceRow.seen_time < seen_before)
        )
    )


def replace_presence(tx: Tx, instance_id: str, workers: Sequence[WorkerInfo]) -> None:
    """This instance's connected streams, as they are now."""
    tx.conn.execute(delete(WorkerPresenceRow).where(WorkerPresenceRow.instance_id == instance_id))
    if workers:
        tx.conn.execute(
            insert(WorkerPresenceRow),
            [
                {
                    "instance_id": instance_id,
                    "stream_id": w.stream_id,
                    "worker_id": w.worker_id,
                    "incarnation_id": w.incarnation_id,
                    "kinds": ",".join(k.value for k in w.kinds),
                    "min_priority": w.min_priority,
                    "credits": w.credits,
                    "jobs_held": w.jobs_held,
                    "connect_time": w.connect_time,
                    "last_message_time": w.last_message_time,
                }
                for w in workers
            ],
        )


def presence(tx: Tx, *, other_than: str, seen_after: datetime) -> list[WorkerInfo]:
    """The streams other live instances reported."""
    rows = tx.conn.execute(
        select(WorkerPresenceRow)
        .join(
            ServerInstanceRow,
            ServerInstanceRow.instance_id == WorkerPresenceRow.instance_id,
        )
        .where(
            WorkerPresenceRow.instance_id != other_than,
            ServerInstanceRow.seen_time > seen_after,
        )
    )
    return [
        WorkerInfo(
            worker_id=r.worker_id,
            incarnation_id=r.incarnation_id,
            instance_id=r.instance_id,
            stream_id=r.stream_id,
            kinds=tuple(JobKind(k) for k in r.kinds.split(",") if k),
            min_priority=r.min_priority,
            credits=r.credits,
            jobs_held=r.jobs_held,
            connect_time=r.connect_time,
            last_message_time=r.last_message_time,
        )
        for r in rows
    ]
