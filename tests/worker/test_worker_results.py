"""Results that carry entries are spread over messages of bounded size."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from fake_realm_server import worker_config

from index_worker.indexer import IndexEntry
from index_worker.jobs import MAX_BATCH_BYTES, RESULT_ENTRIES_BYTES
from index_worker.model import JobOutcome, Outcome, StreamSettings
from index_worker.session import Session


class RecordingStream:
    def __init__(self) -> None:
        self.results: list[list[JobOutcome]] = []

    def send_results(self, outcomes: list[JobOutcome]) -> None:
        self.results.append(list(outcomes))

    def send_credit(self, credits: int) -> None:
        pass


def test_results_with_entries_are_split_so_a_message_stays_bounded() -> None:
    per_message = MAX_BATCH_BYTES // RESULT_ENTRIES_BYTES
    entry = IndexEntry("a.json", datetime(2026, 1, 1, tzinfo=UTC), 1, "0" * 64, "text/plain")
    heavy = [
        JobOutcome(f"h{i}", Outcome.SUCCEEDED, entries_uploaded=1, entries=(entry,))
        for i in range(per_message + 5)
    ]
    light = [JobOutcome(f"l{i}", Outcome.SUCCEEDED) for i in range(10)]

    async def scenario() -> list[list[JobOutcome]]:
        stream = RecordingStream()
        session = Session(
            stream,  # type: ignore[arg-type]
            files=object(),  # type: ignore[arg-type]  # no job runs here
            config=worker_config(1, concurrency=0),
            settings=StreamSettings(30.0, 10.0, "s1", result_entries=True),
        )
        session._pending_results = light[:5] + heavy + light[5:]
        session._flush()
        return stream.results

    messages = asyncio.run(scenario())
    assert len(messages) == 2
    assert [sum(bool(o.entries) for o in m) for m in messages] == [per_message, 5]
    sent = [o.lease_id for m in messages for o in m]
    assert sent == [o.lease_id for o in light[:5] + heavy + light[5:]]  # all, in order
