"""A live RealmService on loopback (SQLite) with a worker that completes every
job over the real ClaimJobs stream, for the asyncio client and the README."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.api.conftest import BASE, LiveServer, start_live_server
from tests.api.helpers import CompletingWorker, open_stream


@contextmanager
def live_server(tmp_path: Path, **settings: Any) -> Iterator[LiveServer]:
    store = f"sqlite:///{tmp_path / 'realm.db'}"
    live, stop = start_live_server(replace(BASE, store_url=store, **settings))
    try:
        yield live
    finally:
        stop()


@contextmanager
def live_system(tmp_path: Path) -> Iterator[LiveServer]:
    """A server without tokens and a worker completing its jobs."""
    with live_server(tmp_path) as live:
        worker = CompletingWorker(open_stream(live.stub, "w1", credits=4), live.stub).start()
        try:
            yield live
        finally:
            worker.finish()
