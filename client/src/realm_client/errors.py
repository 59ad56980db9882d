"""The errors the client raises: one class per status code the service uses.

RealmClientError                the base: `code`, `message` (the server's, verbatim), `method`
├── InvalidArgument             INVALID_ARGUMENT: the message names the field
├── NotFound                    NOT_FOUND
├── AlreadyExists               ALREADY_EXISTS: e.g. a realm created under another request id
├── FailedPrecondition          FAILED_PRECONDITION
├── Unauthenticated             UNAUTHENTICATED: missing or bad bearer token
├── PermissionDenied            PERMISSION_DENIED: the token's role may not call the RPC
├── ResourceExhausted           RESOURCE_EXHAUSTED: e.g. the server's disk is full
├── Aborted                     ABORTED: a concurrent writer won (retried where safe)
├── Unavailable                 UNAVAILABLE: unreachable, draining, store down (after retries)
├── DeadlineExceeded            DEADLINE_EXCEEDED: no answer within the call's deadline
├── Cancelled                   CANCELLED
├── Unimplemented               UNIMPLEMENTED: the server predates the RPC
└── Internal                    INTERNAL, and answers the client cannot make sense of

Codes without a class of their own (UNKNOWN, OUT_OF_RANGE, DATA_LOSS) raise
`RealmClientError` itself.
"""

from __future__ import annotations

import grpc


class RealmClientError(Exception):
    """The call failed."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str = "", *, method: str = "", code: grpc.StatusCode | None = None):
        self.message = message or self.__doc__ or ""
        self.method = method
        if code is not None:
            self.code = code
        super().__init__(f"{self.code.name}: {self.message}")


class InvalidArgument(RealmClientError):
    """The request is not valid."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RealmClientError):
    """The realm, job or file does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RealmClientError):
    """The realm already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RealmClientError):
    """The system is not in a state the call needs."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(RealmClientError):
    """The call carried no valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RealmClientError):
    """The token's role may not make this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(RealmClientError):
    """The server is out of a resource."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(RealmClientError):
    """A concurrent change won; the call may be repeated."""

    code = grpc.StatusCode.ABORTED


class Unavailable(RealmClientError):
    """The server could not be reached or could not serve the call."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RealmClientError):
    """No answer within the deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(RealmClientError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Unimplemented(RealmClientError):
    """The server does not know this call."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(RealmClientError):
    """The server failed, or answered what the client cannot make sense of."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[RealmClientError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Aborted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
    )
}


def error_for(code: grpc.StatusCode | None, message: str, method: str = "") -> RealmClientError:
    """The exception for a status code, keeping the server's message."""
    code = code if code is not None else grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code)
    if cls is None:
        return RealmClientError(message, method=method, code=code)
    return cls(message, method=method)


def from_rpc_error(error: grpc.RpcError, method: str = "") -> RealmClientError:
    """Translates what grpc raised (sync `grpc.Call` or `grpc.aio.AioRpcError`)."""
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    status = code() if callable(code) else None
    message = details() if callable(details) else None
    return error_for(status, message or "", method)
