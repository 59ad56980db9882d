"""The worker process's life: connect, run a session, reconnect, stop on request.

A broken stream costs the jobs it held (the server requeues them when it sees
the stream end), so the worker simply reconnects with jittered exponential
backoff. Only a refusal that retrying cannot cure (bad token, wrong role,
protocol error) ends the process with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import uuid

from index_worker import metrics
from index_worker.client import Backoff, Connection, FatalStreamError, StreamBrokenError
from index_worker.config import WorkerConfig
from index_worker.session import Session

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 1


class Worker:
    """An index worker. `await run()` until `stop()`; all calls on the event loop's thread."""

    def __init__(self, config: WorkerConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        # Fresh per process start, kept across reconnects: lets the server
        # tell a restarted worker from a reconnecting one.
        self.incarnation_id = str(uuid.uuid4())
        self._rng = rng or random.Random()
        self._stop_requests = 0
        self._stop_event = asyncio.Event()
        self._session: Session | None = None
        self._streams_opened = 0
        metrics.SLOTS.labels("total").set(config.concurrency)
        metrics.SLOTS.labels("busy").set_function(self._busy_slots)

    def _busy_slots(self) -> float:
        session = self._session
        return 0 if session is None else session.busy_slots

    def healthy(self) -> bool:
        """What /healthz answers: the stream is open and the worker not stopping."""
        return self._session is not None and not self.stopping

    @property
    def stopping(self) -> bool:
        return self._stop_requests > 0

    def stop(self) -> None:
        """Drain and exit; a second call gives up on running jobs at once."""
        self._stop_requests += 1
        self._stop_event.set()
        if self._session is not None:
            timeout = self.config.drain_timeout if self._stop_requests == 1 else 0.0
            self._session.request_drain(timeout, reason="stop")

    async def run(self) -> int:
        """Serve until stopped (returns 0) or refused by the server (returns 1).

        Unexpected failures of the worker's own tasks propagate.
        """
        fields = {"worker": self.config.worker_id, "incarnation": self.incarnation_id}
        logger.info("worker starting", extra={**fields, "server": self.config.server})
        backoff = Backoff(
            self.config.reconnect_backoff_base, self.config.reconnect_backoff_max, self._rng
        )
        while not self.stopping:
            error = ""
            try:
                await self._run_stream(backoff)
            except FatalStreamError as exc:
                logger.error(
                    "server refused the worker; not retrying", extra={**fields, "error": str(exc)}
                )
                return EXIT_REFUSED
            except StreamBrokenError as exc:
                error = str(exc)
            if self.stopping:
                break
            delay = backoff.next_delay()
            if error:
                extra = {**fields, "delay_s": round(delay, 3), "error": error}
                logger.warning("stream broken; reconnecting", extra=extra)
            else:
                logger.info("reconnecting", extra={**fields, "delay_s": round(delay, 3)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop_event.wait()
        logger.info("worker stopped", extra=fields)
        return EXIT_OK

    async def _run_stream(self, backoff: Backoff) -> None:
        config = self.config
        connection = Connection(config, self._rng)
        try:
            stream = connection.claim_stream()
            hello = (config.worker_id, self.incarnation_id, config.kinds, config.min_priority)
            opening = asyncio.create_task(stream.open(*hello))
            stopped = asyncio.create_task(self._stop_event.wait())
            try:
                await asyncio.wait({opening, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                if not opening.done():
                    opening.cancel()
                    await asyncio.gather(opening, return_exceptions=True)
            if opening.cancelled():
                return
            settings = opening.result()
            backoff.reset()
            self._streams_opened += 1
            if self._streams_opened > 1:
                metrics.RECONNECTS.inc()
            metrics.CONNECTED.set(1)
            logger.info(
                "stream open",
                extra={
                    "worker": config.worker_id,
                    "stream": settings.stream_id,
                    "lease_s": settings.lease_duration,
                    "heartbeat_s": settings.heartbeat_interval,
                },
            )
            session = Session(stream, connection.realm_files(), config, settings)
            self._session = session
            if self.stopping:
                session.request_drain(config.drain_timeout, reason="stop")
            try:
                await session.run()
            finally:
                self._session = None
                metrics.CONNECTED.set(0)
            logger.info("stream closed", extra={"worker": config.worker_id})
        finally:
            await connection.close()


async def run_until_signalled(worker: Worker) -> int:
    """Run the worker with SIGTERM and SIGINT mapped to `stop()` (drain, then exit 0)."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, worker.stop)
    try:
        return await worker.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
