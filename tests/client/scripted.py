"""A grpc_testing channel under a RealmClient, with the test playing the server
call by call: the client runs in a thread; the test takes each RPC it makes
(metadata, request) and answers it or ends it with a status.

grpc_testing drops the timeout a call was given, so `RecordingChannel` sits
between the client and it and notes each call's timeout on the way through.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc_testing
from realm.v1 import realm_service_pb2 as rs
from realm_client import RealmClient

SERVICE = rs.DESCRIPTOR.services_by_name["RealmService"]
WAIT = 10.0

T = TypeVar("T")


@dataclass
class Call:
    """What one RPC carried."""

    method: str
    timeout: float | None


class _Recorded:
    def __init__(self, inner: Any, method: str, calls: list[Call]) -> None:
        self._inner = inner
        self._method = method.rsplit("/", 1)[-1]
        self._calls = calls

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: Any = None,
        compression: Any = None,
    ) -> Any:
        self._calls.append(Call(self._method, timeout))
        return self._inner(request, timeout=timeout, metadata=metadata, credentials=credentials)


class RecordingChannel(grpc.Channel):
    """Hands calls to a grpc_testing channel, noting each call's timeout."""

    def __init__(self, inner: grpc.Channel) -> None:
        self.inner = inner
        self.calls: list[Call] = []

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Recorded(self.inner.unary_unary(method, *args, **kwargs), method, self.calls)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Recorded(self.inner.unary_stream(method, *args, **kwargs), method, self.calls)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Recorded(self.inner.stream_unary(method, *args, **kwargs), method, self.calls)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Recorded(self.inner.stream_stream(method, *args, **kwargs), method, self.calls)

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        raise NotImplementedError

    def unsubscribe(self, callback: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> RecordingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def timeouts(self, method: str) -> list[float | None]:
        return [call.timeout for call in self.calls if call.method == method]


def within(take: Callable[[], T], what: str) -> T:
    """grpc_testing's take_* wait forever; a test waits WAIT seconds."""
    box: queue.Queue[T] = queue.Queue()
    threading.Thread(target=lambda: box.put(take()), daemon=True).start()
    try:
        return box.get(timeout=WAIT)
    except queue.Empty:
        raise AssertionError(f"the client made no {what} call within {WAIT} s") from None


@dataclass
class Scripted:
    """The client over a grpc_testing channel, and the test's side of it."""

    testing: grpc_testing.Channel
    channel: RecordingChannel
    client: RealmClient
    _pending: list[Future[Any]] = field(default_factory=list)

    def start(self, fn: Callable[[RealmClient], T]) -> Future[T]:
        """Runs `fn(client)` in a thread; its result or exception lands in the future."""
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn(self.client))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        self._pending.append(future)
        return future

    def unary(self, name: str) -> tuple[dict[str, str], Any, grpc_testing.UnaryUnaryChannelRpc]:
        """The next call of `name`: its metadata (as a dict), request and rpc to answer."""
        method = SERVICE.methods_by_name[name]
        metadata, request, rpc = within(lambda: self.testing.take_unary_unary(method), name)
        return _as_dict(metadata), request, rpc

    def stream(self, name: str) -> tuple[dict[str, str], Any, grpc_testing.UnaryStreamChannelRpc]:
        method = SERVICE.methods_by_name[name]
        metadata, request, rpc = within(lambda: self.testing.take_unary_stream(method), name)
        return _as_dict(metadata), request, rpc


def _as_dict(metadata: Sequence[tuple[str, str]]) -> dict[str, str]:
    return dict(metadata)


def answer(rpc: grpc_testing.UnaryUnaryChannelRpc, response: Any) -> None:
    rpc.terminate(response, (), grpc.StatusCode.OK, "")


def fail(rpc: Any, code: grpc.StatusCode, details: str) -> None:
    if isinstance(rpc, grpc_testing.UnaryUnaryChannelRpc):
        rpc.terminate(None, (), code, details)
    else:
        rpc.terminate((), code, details)


def scripted_client(**options: Any) -> Iterator[Scripted]:
    testing = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    channel = RecordingChannel(testing)
    with RealmClient(channel=channel, **options) as client:
        yield Scripted(testing, channel, client)
