"""Builds and runs the gRPC server: servicer, health, reflection, metrics,
the dispatcher, the reaper and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from realm.v1 import realm_service_pb2, realm_service_pb2_grpc

from realm_common import tracing
from realm_common.metrics_http import MetricsServer
from realm_service import metrics
from realm_service.api.auth import AuthInterceptor
from realm_service.api.parsing import ParsingInterceptor
from realm_service.api.reflection import HealthServicer, add_reflection
from realm_service.api.rpc_metrics import RpcMetricsInterceptor
from realm_service.api.servicer import RealmServicer
from realm_service.config import Settings
from realm_service.dispatcher import Dispatcher
from realm_service.domain import JobState, Lease
from realm_service.errors import RealmError
from realm_service.queue import JobQueue, QueueSettings
from realm_service.realms import Realms
from realm_service.store.db import Database, open_database
from realm_service.watch import JobWatch

log = logging.getLogger(__name__)

SERVICE_NAME = "realm.v1.RealmService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STOP_TASKS_SECONDS = 5.0  # how long a stop waits for its background tasks to end
HOUSEKEEPING_SECONDS = 60.0


@dataclass
class RealmServer:
    settings: Settings
    db: Database
    queue: JobQueue
    realms: Realms
    dispatcher: Dispatcher
    watch: JobWatch
    servicer: RealmServicer
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    # Label values reported once, kept so that they can go back to 0.
    _priorities: set[int] = field(default_factory=lambda: set(metrics.KNOWN_PRIORITIES))
    _lanes: set[str] = field(default_factory=set)
    _serving: bool = False

    def healthy(self) -> bool:
        """What /healthz answers: SERVING on the health service."""
        return not self.servicer.draining and self._serving

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await asyncio.to_thread(self.queue.register_instance)
        await self.server.start()
        self.watch.start()
        self.tasks = [
            asyncio.create_task(self.dispatcher.run(), name="dispatcher"),
            asyncio.create_task(self._reaper(), name="reaper"),
            asyncio.create_task(self._health_and_metrics(), name="health"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
        ]
        await self._set_health(True)
        self.tasks.append(asyncio.create_task(self._boot_mount(), name="boot-mount"))
        log.info("serving", extra={"address": self.address, "store": self.db.backend})

    async def _set_health(self, ok: bool) -> None:
        self._serving = ok
        status = SERVING if ok else NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _boot_mount(self) -> None:
        try:
            count = await asyncio.to_thread(self.realms.boot_mount)
            log.info("boot mount done", extra={"realms": count})
        except Exception as e:  # lazy mounts still cover every realm
            log.warning("boot mount failed", extra={"error": str(e)})

    async def _reaper(self) -> None:
        # Often enough that a broken stream's leases go back soon after their
        # resume grace.
        grace = self.settings.resume_grace_seconds or 5.0
        interval = max(0.05, min(5.0, self.settings.lease_seconds / 4, grace / 2))
        while True:
            await asyncio.sleep(interval)
            try:
                # Releases an outage kept from being recorded go first, so
                # that their leases, if expired meanwhile, are not reaped.
                if await asyncio.to_thread(self.queue.release_deferred):
                    self.dispatcher.wake()
            except Exception as e:
                # Never in the way of the reap: a lease whose release keeps
                # failing is reaped as an interruption once it expires.
                log.warning("deferred releases failed", extra={"error": str(e)})
            try:
                # Leases held before the reap: a reaped job's lease among them
                # is the one that expired (later leases are not in the snapshot).
                held = [
                    (stream, lease_id, lease.job.job_id)
                    for stream in list(self.dispatcher.streams.values())
                    for lease_id, lease in list(stream.outstanding.items())
                ]
                jobs = await asyncio.to_thread(
                    functools.partial(
                        self.queue.reap_expired, held={lease_id for _, lease_id, _ in held}
                    )
                )
                if jobs:
                    metrics.LEASES_EXPIRED.inc(len(jobs))
                    reaped = {job.job_id for job in jobs}
                    for stream, lease_id, job_id in held:
                        if job_id in reaped:  # no longer held: free its slot
                            stream.drop(lease_id)
                    self.dispatcher.wake()
            except Exception as e:
                log.warning("reaper failed", extra={"error": str(e)})

    async def _health_and_metrics(self) -> None:
        """Health is SERVING while the store answers and takes writes: the
        write probe (this instance's liveness row) fails on a full disk even
        when reads still work."""
        problem: str | None = None
        while True:
            ok = await asyncio.to_thread(self.db.ping)
            now_problem = None if ok else "the store is unreachable"
            if ok:
                try:
                    await asyncio.to_thread(self.queue.touch_instance, self.dispatcher.workers())
                except RealmError as e:
                    ok, now_problem = False, e.message
            if now_problem != problem:
                if now_problem is None:
                    log.info("store healthy again; SERVING")
                else:
                    log.warning("health NOT_SERVING", extra={"error": now_problem})
                problem = now_problem
            if not self.servicer.draining:
                await self._set_health(ok)
            if ok:
                with contextlib.suppress(Exception):
                    await self._queue_metrics()
            streams = list(self.dispatcher.streams.values())
            metrics.STREAMS.set(len(streams))
            lanes = Counter(str(s.min_priority) for s in streams)
            for lane in self._lanes | set(lanes):
                metrics.WORKERS.labels(lane).set(lanes.get(lane, 0))
            self._lanes |= set(lanes)
            metrics.CREDITS.set(sum(s.credits + s.aside for s in streams))
            metrics.OUTSTANDING.set(sum(s.held_leases for s in streams))
            await asyncio.sleep(2.0)

    async def _queue_metrics(self) -> None:
        """Depth and oldest age for every priority ever seen here, so a
        priority whose jobs are all done reads 0 instead of its last value."""
        depth = await asyncio.to_thread(self.queue.depth)
        running = await asyncio.to_thread(self.queue.running_count)
        now = datetime.now(UTC)
        seen = {priority: (count, oldest) for priority, count, oldest in depth}
        self._priorities |= set(seen)
        for priority in self._priorities:
            count, oldest = seen.get(priority, (0, None))
            metrics.QUEUE_DEPTH.labels(str(priority)).set(count)
            age = max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
            metrics.QUEUE_OLDEST.labels(str(priority)).set(age)
        queued = sum(c for c, _ in seen.values())
        metrics.JOBS.labels(JobState.QUEUED.value).set(queued)
        metrics.JOBS.labels(JobState.RUNNING.value).set(running)
        if await asyncio.to_thread(self.queue.analyze_if_outgrown, queued + running):
            log.info(
                "jobs table analyzed: it outgrew its plans", extra={"live_jobs": queued + running}
            )

    async def _housekeeping(self) -> None:
        """Slow chores: forget request ids past their retention, and rows of
        server instances long dead."""
        retention = timedelta(hours=self.settings.request_id_retention_hours)
        while True:
            try:
                swept = await asyncio.to_thread(self.realms.sweep_request_ids, retention)
                if swept:
                    log.info("request ids swept", extra={"count": swept})
                await asyncio.to_thread(self.queue.forget_dead_instances)
            except RealmError as e:
                log.warning("housekeeping failed", extra={"error": str(e)})
            await asyncio.sleep(HOUSEKEEPING_SECONDS)

    async def drain_and_stop(self) -> None:
        """Stop taking work, tell workers, wait the grace for results, requeue
        the rest, stop."""
        if self.servicer.draining:
            await self.stopped.wait()
            return
        grace = self.settings.drain_grace_seconds
        log.info("draining", extra={"grace_s": grace, "streams": len(self.servicer.sessions)})
        self.servicer.draining = True
        self.dispatcher.paused = True
        await self._set_health(False)
        for session in list(self.servicer.sessions):
            session.drain(grace)
        deadline = asyncio.get_running_loop().time() + grace
        while asyncio.get_running_loop().time() < deadline:
            # Leases held, and hand-offs under way (each settles as a lease
            # or a credit given back).
            if not any(s.held_leases or s.aside for s in self.dispatcher.streams.values()):
                break
            await asyncio.sleep(0.05)
        for session in list(self.servicer.sessions):
            session.close()
        await self.server.stop(grace=1.0)
        for task in self.tasks:
            task.cancel()
        # Bounded: a task that ignores its cancel is reported, not waited on
        # forever, so a stop always ends.
        done, pending = (
            await asyncio.wait(self.tasks, timeout=STOP_TASKS_SECONDS)
            if self.tasks
            else (set(), set())
        )
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning(
                    "task had failed",
                    extra={"task": task.get_name(), "error": str(task.exception())},
                )
        if pending:
            log.warning(
                "tasks still running after the stop",
                extra={
                    "after_s": STOP_TASKS_SECONDS,
                    "tasks": ",".join(sorted(t.get_name() for t in pending)),
                },
            )
        try:
            await asyncio.to_thread(self.queue.unregister_instance)
        except RealmError as e:  # its leases then wait for the instance timeout
            log.warning("could not unregister this instance", extra={"error": str(e)})
        await self.realms.wait_left_behind(STOP_TASKS_SECONDS)
        self.db.close_loop_connections()
        await asyncio.to_thread(self.db.close)
        self.stopped.set()
        log.info("stopped")


def build_server(settings: Settings, *, db: Database | None = None) -> RealmServer:
    owns_db = db is None
    db = db or open_database(settings.store_url, synchronous=settings.sqlite_synchronous)
    queue = JobQueue(
        db,
        settings=QueueSettings(
            lease_duration=timedelta(seconds=settings.lease_seconds),
            max_attempts=settings.max_attempts,
            max_preemptions=settings.max_preemptions,
            resume_grace=timedelta(seconds=settings.resume_grace_seconds),
        ),
    )
    realms = Realms(db, queue, max_file_size=settings.max_file_size)
    dispatcher = Dispatcher(queue, reserved_slots=settings.reserved_slots)
    dispatcher.on_assigned = _record_assignments
    watch = JobWatch(queue)
    auth = AuthInterceptor(settings.tokens) if settings.auth_enabled else None
    servicer = RealmServicer(
        realms,
        queue,
        dispatcher,
        watch,
        heartbeat_seconds=settings.heartbeat_seconds,
        ping_seconds=settings.ping_seconds,
        auth=auth,
    )
    limit = settings.max_message_bytes
    server = grpc.aio.server(
        # Auth first: it keeps the parsing interceptor's deserializer, so a
        # caller without a token gets UNAUTHENTICATED even for garbage bytes.
        # Metrics outermost: a refused call is counted with the code it got.
        interceptors=[
            RpcMetricsInterceptor(),
            *([auth] if auth is not None else []),
            ParsingInterceptor(),
        ],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
            # gRPC sets SO_REUSEPORT by default, which lets a second server
            # bind a port in use and silently take half of its connections.
            ("grpc.so_reuseport", 0),
        ],
    )
    realm_service_pb2_grpc.add_RealmServiceServicer_to_server(servicer, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_reflection(
        server,
        [
            realm_service_pb2.DESCRIPTOR.services_by_name["RealmService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ],
    )
    try:
        if settings.tls_cert:
            with open(settings.tls_key, "rb") as k, open(settings.tls_cert, "rb") as cert:
                creds = grpc.ssl_server_credentials([(k.read(), cert.read())])
            port = server.add_secure_port(settings.listen, creds)
        else:
            port = server.add_insecure_port(settings.listen)
    except RuntimeError as e:  # grpc's "Failed to bind": the port is in use or not ours
        if owns_db:
            db.close()
        raise OSError(f"cannot listen on {settings.listen}: {e}") from e
    return RealmServer(
        settings=settings,
        db=db,
        queue=queue,
        realms=realms,
        dispatcher=dispatcher,
        watch=watch,
        servicer=servicer,
        server=server,
        health=health_servicer,
        port=port,
    )


def _record_assignments(leases: list[Lease]) -> None:
    now = datetime.now(UTC)
    for lease in leases:
        job = lease.job
        metrics.dispatch_latency(job.kind.value, job.priority).observe(
            max(0.0, (now - job.create_time).total_seconds())
        )
        if job.trace_parent:
            tracing.record_span(
                "job queued",
                job.trace_parent,
                job.create_time,
                now,
                {"job": job.job_id, "realm": job.realm_id, "priority": job.priority},
            )
    metrics.ASSIGNED.inc(len(leases))


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    import concurrent.futures

    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=32))
    srv = build_server(settings)
    if settings.metrics_listen:
        try:
            web = MetricsServer(settings.metrics_listen, metrics.REGISTRY, srv.healthy)
        except OSError as e:
            await asyncio.to_thread(srv.db.close)
            raise OSError(f"--metrics-listen {settings.metrics_listen}: {e.strerror or e}") from e
        log.info("metrics", extra={"url": web.url})
        print(f"realm-service metrics on {web.url}", flush=True)
    await srv.start()
    console = None
    if settings.web_listen:
        from realm_service.web import start_console

        try:
            console = await start_console(srv, settings.web_listen)
        except OSError:
            await srv.drain_and_stop()
            raise
        log.info("web console", extra={"url": console.url})
        print(f"realm-service web console on {console.url}", flush=True)
    print(f"realm-service listening on {srv.address}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    await srv.drain_and_stop()
    if console is not None:
        await console.close()
