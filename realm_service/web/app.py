"""The web console's HTTP side: aiohttp on the server's own event loop.

Pages are rendered on the server (Jinja2, autoescaped); a page's live part is
re-rendered and pushed over server-sent events (`/live/...`), at most once a
second. Reads and actions call the same use cases as the gRPC servicer
(JobQueue, Realms, explain); nothing here touches the store directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web

from realm_service.domain import MAX_PRIORITY, MIN_PRIORITY, JobKind, JobState
from realm_service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RealmError,
    Unavailable,
)
from realm_service.explain import explain
from realm_service.web.overview import Overview, Snapshot
from realm_service.web.session import Session, Sessions, csrf_ok, same_origin

if TYPE_CHECKING:
    from realm_service.server import RealmServer

log = logging.getLogger(__name__)

LIVE_SECONDS = 1.0  # the fastest any page is pushed
LIST_LIVE_SECONDS = 2.0  # job lists re-read at this pace
MAX_REASON = 500
PAGE = 100
ERRORS_SCAN = 5000  # index entries looked at for a realm's errors by file
SERVER: web.AppKey[RealmServer] = web.AppKey("server")
SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions")
OVERVIEW: web.AppKey[Overview] = web.AppKey("overview")
TEMPLATES: web.AppKey[jinja2.Environment] = web.AppKey("templates")
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping")
SESSION_KEY = "realm.session"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
STATUS = {
    NotFound: 404,
    InvalidArgument: 400,
    PermissionDenied: 403,
    FailedPrecondition: 409,
    Unavailable: 503,
}


# -- building and running --------------------------------------------------------


@dataclass
class Console:
    runner: web.AppRunner
    app: web.Application
    url: str

    async def close(self) -> None:
        self.app[STOPPING].set()
        await self.app[OVERVIEW].stop()
        await self.runner.cleanup()


async def start_console(srv: RealmServer, listen: str) -> Console:
    """Serve the console on `listen` (host:port; port 0 picks a free one)."""
    settings = srv.settings
    tls: ssl.SSLContext | None = None
    if settings.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(settings.tls_cert, settings.tls_key)
    app = build_app(srv, secure=tls is not None)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    site = web.TCPSite(runner, host, int(port), ssl_context=tls, reuse_port=False)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"--web-listen {listen}: {e.strerror or e}") from e
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else int(port)
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown}:{bound}/"
    return Console(runner, app, url)


def build_app(srv: RealmServer, *, secure: bool = False) -> web.Application:
    app = web.Application(middlewares=[_headers, _errors, _authenticate], client_max_size=64 * 1024)
    app[SERVER] = srv
    app[SESSIONS] = Sessions(dict(srv.settings.tokens), secure_cookie=secure)
    app[OVERVIEW] = Overview(
        srv.queue,
        srv.dispatcher,
        srv.db.backend,
        serving=srv.healthy,
        draining=lambda: srv.servicer.draining,
    )
    app[TEMPLATES] = _templates()
    app[STOPPING] = asyncio.Event()
    app.on_startup.append(_start_overview)
    app.on_shutdown.append(_stop_streams)
    app.add_routes(
        [
            web.get("/", overview_page),
            web.get("/live/", overview_live),
            web.get("/jobs", jobs_page),
            web.get("/live/jobs", jobs_live),
            web.get("/jobs/{job_id}", job_page),
            web.get("/live/jobs/{job_id}", job_live),
            web.post("/jobs/{job_id}/cancel", cancel_job),
            web.post("/jobs/{job_id}/retry", retry_job),
            web.get("/realms", realms_page),
            web.get("/realms/{realm_id}", realm_page),
            web.post("/realms/{realm_id}/reindex", reindex_realm),
            web.post("/realms/{realm_id}/delete", delete_realm),
            web.get("/workers", workers_page),
            web.get("/live/workers", workers_live),
            web.get("/login", login_page),
            web.post("/login", login),
            web.post("/logout", logout),
            web.static("/static", _static_dir(), append_version=False),
        ]
    )
    return app


def _static_dir() -> str:
    from pathlib import Path

    return str(Path(__file__).with_name("static"))


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("realm_service.web", "templates"),
        autoescape=True,  # every string from a user or the store is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ts"] = _ts
    env.filters["ago"] = _ago
    env.filters["secs"] = _secs
    return env


async def _start_overview(app: web.Application) -> None:
    app[OVERVIEW].start()


async def _stop_streams(app: web.Application) -> None:
    app[STOPPING].set()


# -- middlewares ---------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RealmError as e:
        code = next((c for t, c in STATUS.items() if isinstance(e, t)), 500)
        return _page(request, "error.html", {"message": e.message}, status=code)


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every page needs a session; every POST passes the cross-site checks
    before anything else reads its body."""
    if request.path.startswith("/static/"):
        return await handler(request)
    sessions = request.app[SESSIONS]
    if request.method == "POST" and not same_origin(request):
        return _refused(request, "cross-site request refused")
    session = sessions.current(request)
    if request.path in ("/login", "/logout"):
        request[SESSION_KEY] = session
        return await handler(request)
    new_session = False
    if session is None and not sessions.auth_enabled and request.method == "GET":
        # Without tokens the console is open (loopback only, or --insecure),
        # like the gRPC API; the session still carries the CSRF token.
        session = Session("admin", "", 0.0)
        new_session = True
    if session is None:
        if request.method == "GET" and not request.path.startswith("/live/"):
            raise web.HTTPSeeOther("/login")
        return _refused(request, "sign in first", status=401)
    if request.method == "POST":
        form = await request.post()
        if not csrf_ok(session, str(form.get("csrf", ""))):
            return _refused(request, "the form's CSRF token is missing or wrong")
    request[SESSION_KEY] = session
    if not new_session:
        return await handler(request)
    # The cookie must be on the page's response, before a stream starts.
    pending = web.Response()
    request[SESSION_KEY] = sessions.open(pending, "admin")
    response = await handler(request)
    for morsel in pending.cookies.values():
        response.cookies[morsel.key] = morsel
    return response


def _refused(request: web.Request, message: str, status: int = 403) -> web.StreamResponse:
    log.warning("web console request refused", extra={"path": request.path, "error": message})
    return _page(request, "error.html", {"message": message}, status=status)


def _session(request: web.Request) -> Session:
    session: Session = request[SESSION_KEY]
    return session


def _admin(request: web.Request) -> None:
    if not _session(request).admin:
        raise PermissionDenied(f"role {_session(request).role!r} may not do that")


def _check_serving(request: web.Request) -> None:
    if request.app[SERVER].servicer.draining:
        raise Unavailable("the server is draining; try another instance")


# -- rendering -------------------------------------------------------------------------


def _page(
    request: web.Request, name: str, context: dict[str, Any], status: int = 200
) -> web.Response:
    session: Session | None = request.get(SESSION_KEY)
    sessions = request.app[SESSIONS]
    body = (
        request.app[TEMPLATES]
        .get_template(name)
        .render(
            session=session,
            auth_enabled=sessions.auth_enabled,
            path=request.path,
            **context,
        )
    )
    return web.Response(text=body, content_type="text/html", charset="utf-8", status=status)


def _fragment(request: web.Request, name: str, context: dict[str, Any]) -> str:
    return request.app[TEMPLATES].get_template(name).render(session=_session(request), **context)


async def _stream(
    request: web.Request, frames: AsyncIterator[dict[str, Any]]
) -> web.StreamResponse:
    """Server-sent events: one JSON message per frame; `end` closes the page's source."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    stopping = request.app[STOPPING]
    try:
        async for frame in frames:
            if stopping.is_set():
                break
            event = "end" if frame.pop("end", False) else "message"
            data = frame.get("encoded") or json.dumps(frame)
            await response.write(f"event: {event}\ndata: {data}\n\n".encode())
            if event == "end":
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return response


async def _ticks(request: web.Request, seconds: float) -> AsyncIterator[None]:
    stopping = request.app[STOPPING]
    while not stopping.is_set():
        yield
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)


# -- overview ----------------------------------------------------------------------------


async def overview_page(request: web.Request) -> web.Response:
    overview = request.app[OVERVIEW]
    snapshot = overview.latest or await overview.read()
    return _page(request, "overview.html", {"s": snapshot, "chart": overview.series()})


async def overview_live(request: web.Request) -> web.StreamResponse:
    overview = request.app[OVERVIEW]

    async def frames() -> AsyncIterator[dict[str, Any]]:
        seen: Snapshot | None = None
        overview.watch()
        try:
            while True:
                seen = await overview.next(seen)
                yield {"encoded": _overview_frame(request, seen)}
        finally:
            overview.unwatch()

    return await _stream(request, _until_stopped(request, frames()))


_encoded: dict[int, tuple[Snapshot, str]] = {}


def _overview_frame(request: web.Request, snapshot: Snapshot) -> str:
    """Rendered and encoded once per snapshot, however many pages watch (the
    overview has no actions, so every role sees the same)."""
    key = id(request.app)
    cached = _encoded.get(key)
    if cached is not None and cached[0] is snapshot:
        return cached[1]
    html = _fragment(request, "overview_live.html", {"s": snapshot})
    encoded = json.dumps({"html": html, "chart": request.app[OVERVIEW].series()})
    _encoded[key] = (snapshot, encoded)
    return encoded


async def _until_stopped(
    request: web.Request, frames: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    """`frames`, ended as soon as the console stops (a frame may wait long)."""
    stopping = asyncio.ensure_future(request.app[STOPPING].wait())
    try:
        while True:
            step = asyncio.ensure_future(anext(frames))
            done, _ = await asyncio.wait({step, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        stopping.cancel()
        with contextlib.suppress(Exception):
            await frames.aclose()  # type: ignore[attr-defined]


# -- jobs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobFilter:
    state: JobState | None
    kind: JobKind | None
    realm: str
    priority: int | None
    before: int | None

    @classmethod
    def of(cls, request: web.Request) -> JobFilter:
        q = request.query
        try:
            state = JobState(q["state"]) if q.get("state") else None
            kind = JobKind(q["kind"]) if q.get("kind") else None
            priority = int(q["priority"]) if q.get("priority") else None
            before = int(q["before"]) if q.get("before") else None
        except ValueError as e:
            raise InvalidArgument(f"bad filter: {e}") from e
        if priority is not None and not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidArgument(f"priority must be within [{MIN_PRIORITY}, {MAX_PRIORITY}]")
        realm = q.get("realm", "").strip()
        if len(realm) > 63:
            raise InvalidArgument("realm is at most 63 characters")
        return cls(state, kind, realm, priority, before)

    def query(self) -> dict[str, str]:
        out = {
            "state": self.state.value if self.state else "",
            "kind": self.kind.value if self.kind else "",
            "realm": self.realm,
            "priority": "" if self.priority is None else str(self.priority),
        }
        return {k: v for k, v in out.items() if v}


async def _jobs(request: web.Request, f: JobFilter) -> dict[str, Any]:
    queue = request.app[SERVER].queue
    # Priority is not a filter of the store's list: read more, keep the matching.
    limit = PAGE if f.priority is None else PAGE * 10
    jobs = await asyncio.to_thread(
        lambda: queue.list_jobs(
            realm_id=f.realm or None, kind=f.kind, state=f.state, before_id=f.before, limit=limit
        )
    )
    if f.priority is not None:
        jobs = [j for j in jobs if j.priority == f.priority]
    more = len(jobs) >= PAGE
    jobs = jobs[:PAGE]
    return {"jobs": jobs, "filter": f, "more": more, "next_before": jobs[-1].job_id if jobs else 0}


async def jobs_page(request: web.Request) -> web.Response:
    f = JobFilter.of(request)
    context = await _jobs(request, f)
    return _page(
        request,
        "jobs.html",
        {**context, "states": list(JobState), "kinds": list(JobKind), "live_query": f.query()},
    )


async def jobs_live(request: web.Request) -> web.StreamResponse:
    f = JobFilter.of(request)

    async def frames() -> AsyncIterator[dict[str, Any]]:
        async for _ in _ticks(request, LIST_LIVE_SECONDS):
            context = await _jobs(request, f)
            yield {"html": _fragment(request, "jobs_live.html", context)}

    return await _stream(request, frames())


def _job_id(request: web.Request) -> int:
    raw = request.match_info["job_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidArgument(f"job id must be a number (got {raw[:40]!r})")
    return int(raw)


async def _job(request: web.Request, job_id: int) -> dict[str, Any]:
    srv = request.app[SERVER]
    found = await explain(srv.queue, srv.dispatcher, job_id, draining=srv.servicer.draining)
    return {"x": found, "job": found.job}


async def job_page(request: web.Request) -> web.Response:
    context = await _job(request, _job_id(request))
    done = request.query.get("done", "")
    return _page(request, "job.html", {**context, "done": DONE.get(done, "")})


async def job_live(request: web.Request) -> web.StreamResponse:
    job_id = _job_id(request)

    async def frames() -> AsyncIterator[dict[str, Any]]:
        async for _ in _ticks(request, LIVE_SECONDS):
            try:
                context = await _job(request, job_id)
            except NotFound:
                yield {"html": "<p>This job no longer exists.</p>", "end": True}
                return
            terminal = context["job"].state.terminal
            yield {"html": _fragment(request, "job_live.html", context), "end": terminal}
            if terminal:
                return

    return await _stream(request, frames())


DONE = {
    "cancelled": "Cancelled.",
    "retried": "Queued again.",
    "reindexed": "A reindex is queued.",
}


async def cancel_job(request: web.Request) -> web.StreamResponse:
    _admin(request)
    job_id = _job_id(request)
    form = await request.post()
    reason = str(form.get("reason", "")).strip() or "cancelled from the web console"
    if len(reason) > MAX_REASON:
        raise InvalidArgument(f"reason is longer than {MAX_REASON} characters")
    if any(ord(ch) < 0x20 for ch in reason):
        raise InvalidArgument("reason contains control characters")
    queue = request.app[SERVER].queue
    await asyncio.to_thread(queue.cancel, job_id, reason)
    raise web.HTTPSeeOther(f"/jobs/{job_id}?done=cancelled")


async def retry_job(request: web.Request) -> web.StreamResponse:
    _admin(request)
    _check_serving(request)
    result = await asyncio.to_thread(request.app[SERVER].queue.retry, _job_id(request))
    raise web.HTTPSeeOther(f"/jobs/{result.job.job_id}?done=retried")


# -- realms --------------------------------------------------------------------------------


async def realms_page(request: web.Request) -> web.Response:
    after = request.query.get("after") or None
    realms = request.app[SERVER].realms
    found = await asyncio.to_thread(lambda: realms.list_realms(after=after, limit=PAGE + 1))
    return _page(
        request,
        "realms.html",
        {
            "realms": found[:PAGE],
            "next_after": found[PAGE - 1].realm_id if len(found) > PAGE else "",
        },
    )


async def realm_page(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    realm_id = request.match_info["realm_id"]
    realm = await asyncio.to_thread(srv.realms.get, realm_id)
    card_type = request.query.get("type", "")
    text = request.query.get("text", "")
    searched = "type" in request.query or "text" in request.query
    hits = (
        await asyncio.to_thread(
            lambda: srv.realms.search(
                realm_id, card_type=card_type, text=text, after_path=None, limit=PAGE
            )
        )
        if searched
        else []
    )
    entries = await asyncio.to_thread(
        lambda: srv.realms.search(
            realm_id, card_type="", text="", after_path=None, limit=ERRORS_SCAN
        )
    )
    errors = [e for e in entries if e.error_message]
    jobs = await asyncio.to_thread(lambda: srv.queue.list_jobs(realm_id=realm_id, limit=PAGE))
    done = DONE.get(request.query.get("done", ""), "")
    return _page(
        request,
        "realm.html",
        {
            "realm": realm,
            "errors": errors,
            "errors_partial": len(entries) >= ERRORS_SCAN,
            "searched": searched,
            "card_type": card_type,
            "text": text,
            "hits": hits,
            "jobs": jobs,
            "done": done,
        },
    )


async def reindex_realm(request: web.Request) -> web.StreamResponse:
    _admin(request)
    _check_serving(request)
    realm_id = request.match_info["realm_id"]
    await asyncio.to_thread(request.app[SERVER].realms.reindex, realm_id, None, False)
    raise web.HTTPSeeOther(f"/realms/{realm_id}?done=reindexed")


async def delete_realm(request: web.Request) -> web.StreamResponse:
    _admin(request)
    _check_serving(request)
    realm_id = request.match_info["realm_id"]
    form = await request.post()
    if str(form.get("confirm", "")) != realm_id:
        raise InvalidArgument("to delete a realm, type its id in the confirmation box")
    deletion = await asyncio.to_thread(request.app[SERVER].realms.delete, realm_id, "")
    return _page(
        request,
        "deleted.html",
        {"realm_id": realm_id, "deletion": deletion},
    )


# -- workers -------------------------------------------------------------------------------


async def _workers(request: web.Request) -> dict[str, Any]:
    srv = request.app[SERVER]
    others = await asyncio.to_thread(srv.queue.other_instances_workers)
    workers = sorted(
        [*srv.dispatcher.workers(), *others],
        key=lambda w: (w.instance_id, w.worker_id, w.stream_id),
    )
    return {"workers": workers, "this_instance": srv.queue.instance_id, "now": datetime.now(UTC)}


async def workers_page(request: web.Request) -> web.Response:
    return _page(request, "workers.html", await _workers(request))


async def workers_live(request: web.Request) -> web.StreamResponse:
    async def frames() -> AsyncIterator[dict[str, Any]]:
        async for _ in _ticks(request, LIVE_SECONDS):
            yield {"html": _fragment(request, "workers_live.html", await _workers(request))}

    return await _stream(request, frames())


# -- signing in ------------------------------------------------------------------------------


async def login_page(request: web.Request) -> web.Response:
    if not request.app[SESSIONS].auth_enabled:
        raise web.HTTPSeeOther("/")
    return _page(request, "login.html", {"problem": ""})


async def login(request: web.Request) -> web.StreamResponse:
    sessions = request.app[SESSIONS]
    form = await request.post()
    role = sessions.role_of_token(str(form.get("token", "")).strip())
    if role not in ("client", "admin"):
        problem = "that token is not a client or admin token" if role else "unknown token"
        log.warning("web console sign-in refused", extra={"error": problem})
        request[SESSION_KEY] = None
        return _page(request, "login.html", {"problem": problem}, status=401)
    response = web.HTTPSeeOther("/")
    sessions.open(response, role)
    log.info("web console sign-in", extra={"role": role})
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/login" if request.app[SESSIONS].auth_enabled else "/")
    request.app[SESSIONS].close(request, response)
    raise response


# -- template filters --------------------------------------------------------------------------


def _ts(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _ago(value: datetime | None) -> str:
    if value is None:
        return "—"
    return _secs((datetime.now(UTC) - value).total_seconds()) + " ago"


def _secs(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
