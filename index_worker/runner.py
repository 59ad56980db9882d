"""The worker process's life: connect, run a session, reconnect, stop on request.

A broken stream does not cost the jobs it held when the server keeps its
leases for a resume grace (its settings carry a resume token): the session
and its connection are carried over, the worker reconnects at once and
re-attaches them (DESIGN.md section 5); once the grace is over they are
given up. Otherwise the worker reconnects with jittered exponential backoff.
Only a refusal that retrying cannot cure (bad token, wrong role, protocol
error) ends the process with an error.
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
        # A session whose stream broke, carried over to the next stream until
        # the loop time given (its resume grace), with its connection.
        self._carry: tuple[Session, Connection, float] | None = None
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
            if self._carry is not None:
                # Re-attach soon: the server keeps the leases for so long.
                left = self._carry[2] - asyncio.get_running_loop().time()
                delay = min(delay, max(0.0, left / 4))
            if error:
                extra = {**fields, "delay_s": round(delay, 3), "error": error}
                logger.warning("stream broken; reconnecting", extra=extra)
            else:
                logger.info("reconnecting", extra={**fields, "delay_s": round(delay, 3)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop_event.wait()
        await self._give_up_carry()
        logger.info("worker stopped", extra=fields)
        return EXIT_OK

    async def _give_up_carry(self) -> None:
        if self._carry is not None:
            session, connection, _ = self._carry
            self._carry = None
            logger.info("session given up", extra={"worker": self.config.worker_id})
            metrics.SESSIONS.labels("given_up").inc()
            await session.abandon()
            await connection.close()

    async def _run_stream(self, backoff: Backoff) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        if self._carry is not None and self._carry[2] <= loop.time():
            await self._give_up_carry()  # the server has released its leases
        carry, self._carry = self._carry, None
        # A carried session's jobs read files over its connection: it stays.
        connection = carry[1] if carry is not None else Connection(config, self._rng)
        keep: tuple[Session, Connection, float] | None = None
        try:
            stream = connection.claim_stream()
            hello = (config.worker_id, self.incarnation_id, config.kinds, config.min_priority)
            resume = carry[0].resume_request() if carry is not None else None
            opening = asyncio.create_task(stream.open(*hello, resume))
            stopped = asyncio.create_task(self._stop_event.wait())
            try:
                await asyncio.wait({opening, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                if not opening.done():
                    opening.cancel()
                    await asyncio.gather(opening, return_exceptions=True)
            if opening.cancelled():
                keep = carry
                return
            try:
                settings = opening.result()
            except StreamBrokenError:
                keep = carry  # try again while the grace lasts
                raise
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
            if carry is not None:
                session = carry[0]
                session.attach(stream, settings)
                metrics.SESSIONS.labels("resumed").inc()
                carry = None
            else:
                session = Session(stream, connection.realm_files(), config, settings)
            self._session = session
            if self.stopping:
                session.request_drain(config.drain_timeout, reason="stop")
            try:
                await session.run()
            except StreamBrokenError:
                if session.detached:
                    grace = settings.resume_grace
                    keep = (session, connection, loop.time() + grace)
                    logger.info(
                        "stream broken; jobs carried over",
                        extra={"worker": config.worker_id, "jobs": session.busy_slots,
                               "grace_s": grace},
                    )  # fmt: skip
                raise
            finally:
                self._session = None
                metrics.CONNECTED.set(0)
            logger.info("stream closed", extra={"worker": config.worker_id})
        finally:
            if keep is not None:
                self._carry = keep
            elif carry is not None:
                self._carry = carry
                await self._give_up_carry()  # closes the connection too
            else:
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
