"""Bearer-token authentication and role checks, as a server interceptor."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

SERVICE = "/realm.v1.RealmService/"

# Which roles may call which method. Admins may call everything.
CLIENT_METHODS = {
    "CreateRealm",
    "GetRealm",
    "ListRealms",
    "ReindexRealm",
    "WriteRealmFile",
    "DeleteRealmFile",
    "ListRealmFiles",
    "ReadRealmFile",
    "StreamRealmFiles",
    "WriteRealmFiles",
    "SearchRealm",
    "GetJob",
    "ListJobs",
    "WatchJob",
    "ExplainJob",
    "ListWorkers",
    "GetQueueStats",
}
WORKER_METHODS = {"ClaimJobs", "ListRealmFiles", "ReadRealmFile", "StreamRealmFiles", "GetJob"}
ADMIN_ONLY = {"ReindexAllRealms", "CancelJob", "RetryJob", "DeleteRealm"}
# Health and reflection stay open so probes and grpcurl work without tokens.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

ROLE_KEY = "realm-role"


def allowed(role: str, method: str) -> bool:
    if role == "admin":
        return True
    if role == "client":
        return method in CLIENT_METHODS
    if role == "worker":
        return method in WORKER_METHODS
    return False


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens

    def role_of(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer" or not token:
                    return None
                for known, role in self.tokens.items():
                    if hmac.compare_digest(known.encode(), token.strip().encode()):
                        return role
                return None
        return None

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method_path: str = details.method
        if method_path.startswith(OPEN_PREFIXES) or not method_path.startswith(SERVICE):
            return await continuation(details)
        method = method_path[len(SERVICE) :]
        role = self.role_of(tuple(details.invocation_metadata or ()))
        if role is None:
            return _abort_handler(
                await continuation(details),
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid bearer token is required (metadata authorization: Bearer <token>)",
            )
        if not allowed(role, method):
            return _abort_handler(
                await continuation(details),
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {role!r} may not call {method}",
            )
        return await continuation(details)


def _abort_handler(
    handler: grpc.RpcMethodHandler[Any, Any] | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any] | None:
    """A handler of the same shape as `handler` that aborts with code."""
    if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
        return None

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, deserializer, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(streaming, deserializer, serializer)
