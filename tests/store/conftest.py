"""Store fixtures: a migrated database per test and a queue on a fake clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from store_helpers import LEASE, MAX_ATTEMPTS, FakeClock

from realm_service.queue import JobQueue, QueueSettings
from realm_service.store.db import Database, open_database


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    database = open_database(store_url)
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(db: Database, clock: FakeClock) -> JobQueue:
    return JobQueue(
        db, settings=QueueSettings(lease_duration=LEASE, max_attempts=MAX_ATTEMPTS), clock=clock
    )
