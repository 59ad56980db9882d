"""A ClaimJobs call that fails on both sides at once (a cut link ends the
reader and the writer in the same moment) raises one error and leaves no
task exception unretrieved (which asyncio logs at ERROR with a traceback)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import grpc
import pytest

from index_worker.client import ClaimStream, StreamBrokenError


class CutCall:
    """A call whose link is gone: every read and write fails at once."""

    def _error(self) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "Stream removed"
        )

    async def read(self) -> Any:
        raise self._error()

    async def write(self, message: Any) -> None:
        raise self._error()

    async def done_writing(self) -> None:
        raise self._error()

    def cancel(self) -> bool:
        return True


class NoHandler:
    def on_assignments(self, assignments: Any) -> None: ...

    def on_acks(self, acks: Any) -> None: ...

    def on_drain(self, notice: Any) -> None: ...


def test_reader_and_writer_failing_together_leave_nothing_unretrieved() -> None:
    unretrieved: list[dict[str, Any]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unretrieved.append(ctx))
        stream = ClaimStream(None, (), ping_interval=60, ping_timeout=60)  # type: ignore[arg-type]
        stream._call = CutCall()  # type: ignore[assignment]
        stream.send_credit(1)  # the writer has something to write, and fails on it
        stream._last_received = asyncio.get_running_loop().time()
        with pytest.raises(StreamBrokenError, match="UNAVAILABLE"):
            await stream.serve(NoHandler())
        await asyncio.sleep(0)
        gc.collect()  # an unretrieved exception is reported when its task is collected
        await asyncio.sleep(0)

    for _ in range(20):  # both tasks must end in one wake-up; repeat to be sure they did
        asyncio.run(scenario())
        gc.collect()
    assert unretrieved == [], unretrieved[0].get("message")
