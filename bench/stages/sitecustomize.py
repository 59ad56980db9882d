"""Time stamps at the stages of an enqueue with a hand-off, in the server.

Put this folder first on PYTHONPATH for `pair_bench.py --only wakeup`: the
interpreter imports this module at start-up in every process it starts,
and in the `realm-service` process only it wraps six functions of the
enqueue's path with stamps of the wall clock, which it appends to
`$REALM_STAGE_DIR/stages-PID.jsonl` (REALM_STAGE_DIR unset: nothing is
wrapped). `report.py` turns them into the median time between stages.
Diagnostics for the bench only: nothing in the service imports it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from typing import Any

_DIR = os.environ.get("REALM_STAGE_DIR", "")


def _install(out: str) -> None:
    from realm_service import dispatcher, queue, realms
    from realm_service.api import servicer
    from realm_service.store import direct, enqueue_sql

    records: list[tuple[str, float]] = []
    lock = threading.Lock()

    def mark(stage: str) -> None:
        records.append((stage, time.time()))
        if len(records) >= 64:
            with lock:
                batch = records[:]
                del records[: len(batch)]
            with open(out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in batch)

    def wrap(owner: Any, name: str, before: str | None, after: str | None) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def stamped(*args: Any, **kwargs: Any) -> Any:
            if before:
                mark(before)
            try:
                return inner(*args, **kwargs)
            finally:
                if after:
                    mark(after)

        setattr(owner, name, stamped)

    rpc = servicer.RealmServicer.ReindexRealm

    async def reindex(self: Any, request: Any, context: Any) -> Any:
        mark("handler")
        try:
            return await rpc(self, request, context)
        finally:
            mark("reply")

    servicer.RealmServicer.ReindexRealm = reindex  # type: ignore[method-assign]
    wrap(realms.Realms, "reindex", "thread", "thread_end")
    wrap(direct, "first", "statement", "statement_end")
    wrap(enqueue_sql, "insert_if_idle", None, "inserted")
    wrap(queue.JobQueue, "_hand_off_in", None, "claimed")
    wrap(dispatcher.Dispatcher, "_settle", "settle", "delivered")


if _DIR and os.path.basename(sys.argv[0]) == "realm-service":
    _install(os.path.join(_DIR, f"stages-{os.getpid()}.jsonl"))
