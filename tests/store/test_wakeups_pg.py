"""Wake-ups between PostgreSQL instances: a claim that locked claimable jobs
it had no room for tells the other instances to look again, and only them:
not its own dispatcher (it knows), and nobody when no other instance is
alive (the NOTIFY would be heard by no one)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from realm_service.domain import USER, JobKind
from realm_service.queue import JobQueue, QueueSettings
from realm_service.store.db import open_database
from tests.store.test_concurrency_pg import create_realms


def _heard(event: threading.Event, seconds: float) -> bool:
    return event.wait(seconds)


def test_a_claim_with_leftovers_wakes_the_other_instances_only(pg_url: str) -> None:
    settings = QueueSettings(instance_timeout=timedelta(seconds=30))
    db_a, db_b = open_database(pg_url), open_database(pg_url, migrate=False)
    try:
        a = JobQueue(db_a, settings=settings)
        b = JobQueue(db_b, settings=settings)
        heard_a, heard_b = threading.Event(), threading.Event()
        a.on_new_work(heard_a.set)
        b.on_new_work(heard_b.set)
        time.sleep(1.0)  # both listening; their connect-time wake-ups pass
        realms = [f"r{i}" for i in range(6)]
        create_realms(db_a, realms)
        for realm in realms:
            a.enqueue(realm, JobKind.FROM_SCRATCH, priority=USER)
        time.sleep(1.0)
        heard_a.clear()
        heard_b.clear()

        # Both alive: A's claim of 1 leaves claimable jobs locked; B hears.
        b.touch_instance()
        a.touch_instance()
        assert db_a.others_alive
        assert len(a.claim(1, worker="w")) == 1
        assert _heard(heard_b, 5.0), "the other instance was not told to look again"
        assert not heard_a.is_set(), "a claim woke its own dispatcher through NOTIFY"

        # B stops refreshing its row and is taken for dead: A stays quiet.
        db_b.close()
        settings_short = QueueSettings(instance_timeout=timedelta(milliseconds=1))
        a_alone = JobQueue(db_a, settings=settings_short)
        a_alone.instance_id = a.instance_id
        time.sleep(0.05)
        a_alone.touch_instance()
        assert not db_a.others_alive
        heard_a.clear()
        assert len(a.claim(1, worker="w")) == 1
        assert not _heard(heard_a, 1.0)
    finally:
        db_a.close()
        db_b.close()
