"""Requests whose bytes do not parse as the method's request message.

Left to grpc.aio, such a request ends UNKNOWN and logs an ERROR with a
traceback, each time, before any interceptor's handler runs: anyone who can
open a connection, without a token, could fill the log. This interceptor
answers INVALID_ARGUMENT naming the method instead, and logs at most one
WARNING per method every `log_interval` seconds, with the count of the ones
left out.

gRPC parses a unary request before it calls the handler, so the wrapped
deserializer cannot refuse it there: it returns a marker that the wrapped
handler refuses. Auth (`auth.py`) keeps this deserializer in the handler it
substitutes, so auth must come before this interceptor in the server's
list: a caller without a valid token then gets UNAUTHENTICATED, and no log
line. A streamed request is parsed when the handler reads it, so there the
deserializer raises `UnparsableRequest`, an InvalidArgument: ClaimJobs ends
its stream with it as with any protocol violation, and the wrapped handler
refuses it when it escapes a servicer.

Every service is covered, health and reflection too: they are open without
a token, so garbage sent to them could flood the log just the same.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import Error as ProtobufError

from realm_service.errors import InvalidArgument

log = logging.getLogger(__name__)

LOG_INTERVAL_SECONDS = 10.0

Ctx = grpc.aio.ServicerContext[Any, Any]
# A string: grpc.RpcMethodHandler is generic only in the type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# What parsing raises: DecodeError (a protobuf Error) from every protobuf
# backend; UnicodeDecodeError (a ValueError) from the pure-Python one on a
# string field that is not UTF-8.
_PARSE_ERRORS = (ProtobufError, ValueError)


class UnparsableRequest(InvalidArgument):
    """The request could not be parsed as the method's request message."""


class _Unparsed:
    """Stands for a unary request that did not parse, until the handler runs."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _RateLimitedLog:
    """One WARNING per method per interval; the next line counts the rest.

    Only the event loop's thread calls it (grpc.aio parses there), so the
    counters need no lock; there is one entry per existing method at most.
    """

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, method: str, type_name: str, reason: str) -> None:
        now = self.clock()
        last = self._last.get(method)
        if last is not None and now - last < self.interval:
            self._suppressed[method] = self._suppressed.get(method, 0) + 1
            return
        self._last[method] = now
        log.warning(
            "unparsable request",
            extra={
                "method": method,
                "type": type_name,
                "reason": reason,
                "suppressed": self._suppressed.pop(method, 0),
            },
        )


class ParsingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        log_interval: float = LOG_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = _RateLimitedLog(log_interval, clock)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._wrap(handler, details.method)

    def _wrap(self, handler: Handler, method: str) -> Handler:
        behavior: Any = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a synchronous handler: not one this server has
        parse = handler.request_deserializer
        assert parse is not None
        type_name = _type_name(parse)
        message = f"the request to {method} could not be parsed as {type_name}"

        def refuse(reason: str) -> UnparsableRequest:
            # protobuf's text repeats the type name before ": <what was wrong>".
            self._log(method, type_name, reason.rsplit(": ", 1)[-1][:200])
            return UnparsableRequest(message)

        if handler.request_streaming:

            def deserialize(data: bytes) -> Any:
                try:
                    return parse(data)
                except _PARSE_ERRORS as e:
                    raise refuse(str(e)) from None

            wrapped = _refusing_escapes(behavior)
        else:

            def deserialize(data: bytes) -> Any:
                try:
                    return parse(data)
                except _PARSE_ERRORS as e:
                    # Not logged yet: when auth refuses the call, nothing is.
                    return _Unparsed(str(e))

            wrapped = _refusing_unparsed(behavior, refuse)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(wrapped, deserialize, handler.response_serializer)


def _type_name(parse: Callable[[bytes], Any]) -> str:
    """The full name of the message type a generated `FromString` parses."""
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    full_name = getattr(descriptor, "full_name", None)
    return full_name if isinstance(full_name, str) else "its request message"


def _refusing_unparsed(behavior: Any, refuse: Callable[[str], UnparsableRequest]) -> Any:
    """`behavior` of the same kind (gRPC calls a coroutine function and
    iterates an async generator function), refusing an unparsed request."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
            if isinstance(request, _Unparsed):
                error = refuse(request.reason)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
            async for response in behavior(request, context):
                yield response

        return stream

    async def unary(request: Any, context: Ctx) -> Any:
        if isinstance(request, _Unparsed):
            error = refuse(request.reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
        return await behavior(request, context)

    return unary


def _refusing_escapes(behavior: Any) -> Any:
    """`behavior` of the same kind, answering INVALID_ARGUMENT when a request
    that did not parse ends it (a servicer may also handle it itself)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: Any, context: Ctx) -> AsyncIterator[Any]:
            try:
                async for response in behavior(requests, context):
                    yield response
            except UnparsableRequest as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)

        return stream

    async def unary(requests: Any, context: Ctx) -> Any:
        try:
            return await behavior(requests, context)
        except UnparsableRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)

    return unary
