"""Per-RPC counts and durations by method and status code, and with
tracing on, a server span per unary call continuing the caller's trace.

The outermost interceptor, so a call refused by auth or parsing is counted
with the code it got. A stream is measured until it ends.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from realm_common import tracing
from realm_service import metrics
from realm_service.api.parsing import Ctx, Handler

_MAKE = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _code(context: Ctx, error: BaseException | None) -> str:
    """The call's status code name: what the handler set or aborted with;
    CANCELLED when the caller went away; UNKNOWN for an escaped exception."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


def _traced(behavior: Any, method: str) -> Any:
    """A unary call inside a server span (current while it runs, so a job it
    queues stores this trace)."""

    async def unary(request: Any, context: Ctx) -> Any:
        with tracing.tracer().start_as_current_span(
            method,
            context=tracing.context_from_metadata(context.invocation_metadata()),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": method},
        ) as span:
            try:
                return await behavior(request, context)
            finally:
                span.set_attribute("rpc.grpc.status_code", _code(context, None))

    return unary


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED, unlabelled
        behavior: Any = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler
        method = details.method.lstrip("/")
        counter, latency = metrics.RPCS, metrics.RPC_LATENCY

        def record(context: Ctx, started: float, error: BaseException | None) -> None:
            code = _code(context, error)
            counter.labels(method, code).inc()
            latency.labels(method, code).observe(time.perf_counter() - started)

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
                started, error = time.perf_counter(), None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as e:
                    error = e
                    raise
                finally:
                    record(context, started, error)

            wrapped: Any = stream
        else:

            async def unary(request: Any, context: Ctx) -> Any:
                started, error = time.perf_counter(), None
                try:
                    return await behavior(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    record(context, started, error)

            wrapped = unary
            if tracing.enabled() and not handler.request_streaming:
                wrapped = _traced(unary, method)
        make = _MAKE[(handler.request_streaming, handler.response_streaming)]
        return make(wrapped, handler.request_deserializer, handler.response_serializer)
