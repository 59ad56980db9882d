"""What realmctl's tests share: realmctl run in this process over a grpc_testing
channel with the test playing the server call by call (`Cli`), builders of the
resources the test answers with, and a small real server on loopback for the
few tests that need a socket (a deadline, TLS, a `python -m realmctl` process).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc_testing
from google.protobuf.message import Message
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import realm_service_pb2_grpc
from realm.v1 import resources_pb2 as res
from realm_client import RealmClient

from realmctl import __main__ as realmctl_main
from realmctl.connection import ConnectionSettings, open_client
from tests.client.scripted import SERVICE, RecordingChannel, within

T0 = 1_700_000_000
T0_ISO = "2023-11-14T22:13:20Z"


@dataclass
class Result:
    """What a realmctl run ended with."""

    code: int
    out: str
    err: str


@dataclass
class Taken:
    """One call realmctl made: its request and metadata."""

    request: Any
    metadata: dict[str, str]


class Running:
    """realmctl running in a thread; `result()` waits for its end."""

    def __init__(self, future: Future[int], capsys: Any) -> None:
        self._future = future
        self._capsys = capsys

    def result(self, timeout: float = 10.0) -> Result:
        code = self._future.result(timeout)
        captured = self._capsys.readouterr()
        return Result(code, captured.out, captured.err)


@dataclass
class Cli:
    """realmctl over a grpc_testing channel; the test answers each call it makes."""

    capsys: Any
    testing: Any = field(
        default_factory=lambda: grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    )
    channel: RecordingChannel = field(init=False)
    settings: list[ConnectionSettings] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.channel = RecordingChannel(self.testing)

    def open_client(self, settings: ConnectionSettings) -> RealmClient:
        self.settings.append(settings)
        client = open_client(settings, channel=self.channel)
        client.watch_breaks = 2  # the budget itself is tested in tests/client
        return client

    def start(self, *args: str) -> Running:
        """Runs `realmctl --timeout 5 ARGS...` in a thread."""
        future: Future[int] = Future()

        def run() -> None:
            try:
                future.set_result(realmctl_main.main(["--timeout", "5", *args]))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        return Running(future, self.capsys)

    def run(self, *args: str) -> Result:
        """Runs realmctl for a command that makes no call, or whose calls fail fast."""
        return self.start(*args).result()

    def methods(self) -> list[str]:
        return [call.method for call in self.channel.calls]

    # The server's side.

    def _unary(self, method: str) -> tuple[Taken, Any]:
        descriptor = SERVICE.methods_by_name[method]
        metadata, request, rpc = within(lambda: self.testing.take_unary_unary(descriptor), method)
        return Taken(request, dict(metadata)), rpc

    def answer(self, method: str, response: Message) -> Taken:
        """Takes realmctl's next call of `method` and answers it."""
        taken, rpc = self._unary(method)
        rpc.terminate(response, (), grpc.StatusCode.OK, "")
        return taken

    def taken_request(self, method: str) -> tuple[Any, Any]:
        """Takes realmctl's next call of `method`: its request, and a function
        that answers it with a response (for answers built from the request)."""
        taken, rpc = self._unary(method)

        def reply(response: Message) -> None:
            rpc.terminate(response, (), grpc.StatusCode.OK, "")

        return taken.request, reply

    def fail(self, method: str, code: grpc.StatusCode, details: str) -> Taken:
        """Takes realmctl's next call of `method` and ends it with a status."""
        taken, rpc = self._unary(method)
        rpc.terminate(None, (), code, details)
        return taken

    def watch(
        self,
        snapshots: Sequence[res.Job],
        code: grpc.StatusCode = grpc.StatusCode.OK,
        details: str = "",
    ) -> Taken:
        """Takes the next WatchJob call, sends the snapshots and ends the stream."""
        descriptor = SERVICE.methods_by_name["WatchJob"]
        metadata, request, rpc = within(
            lambda: self.testing.take_unary_stream(descriptor), "WatchJob"
        )
        for job in snapshots:
            rpc.send_response(rs.WatchJobResponse(job=job))
        if snapshots and code is not grpc.StatusCode.OK:
            # A status ends the stream at once: let the snapshots be read first.
            _wait_until_read(rpc)
        rpc.terminate((), code, details)
        return Taken(request, dict(metadata))


def _wait_until_read(rpc: Any, timeout: float = 5.0) -> None:
    """Until realmctl has read what was sent (grpc_testing has no public way to
    tell, so this looks at the list it keeps the unread responses in)."""
    deadline = time.monotonic() + timeout
    state = rpc._rpc_state
    while state._responses and time.monotonic() < deadline:
        time.sleep(0.005)


# A real server on loopback, for what needs a socket.


@dataclass
class LoopbackService(realm_service_pb2_grpc.RealmServiceServicer):
    """Answers GetRealm and ListRealms with realms of its own, after `delay`
    seconds; any other realm is NOT_FOUND. Notes each call's metadata."""

    realms: dict[str, res.Realm] = field(default_factory=dict)
    delay: float = 0.0
    metadata: list[dict[str, str]] = field(default_factory=list)

    def _note(self, context: grpc.ServicerContext) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        time.sleep(self.delay)

    def GetRealm(
        self, request: rs.GetRealmRequest, context: grpc.ServicerContext
    ) -> rs.GetRealmResponse:
        self._note(context)
        if request.realm_id not in self.realms:
            context.abort(grpc.StatusCode.NOT_FOUND, f"realm {request.realm_id} not found")
        return rs.GetRealmResponse(realm=self.realms[request.realm_id])

    def ListRealms(
        self, request: rs.ListRealmsRequest, context: grpc.ServicerContext
    ) -> rs.ListRealmsResponse:
        self._note(context)
        return rs.ListRealmsResponse(realms=list(self.realms.values()))


@dataclass
class Server:
    service: LoopbackService
    address: str


def make_job(
    job_id: str = "17",
    *,
    realm_id: str = "demo",
    state: res.Job.State.ValueType = res.Job.STATE_QUEUED,
    kind: res.JobKind.ValueType = res.JOB_KIND_FROM_SCRATCH_INDEX,
    priority: int = 10,
    done: int = 0,
    total: int = 0,
    error: str = "",
) -> res.Job:
    job = res.Job(
        job_id=job_id,
        realm_id=realm_id,
        kind=kind,
        priority=priority,
        state=state,
        error_message=error,
        progress=res.JobProgress(done=done, total=total),
    )
    job.create_time.seconds = T0
    return job


def make_realm(
    realm_id: str = "demo",
    *,
    name: str = "Demo",
    state: res.Realm.State.ValueType = res.Realm.STATE_INDEXING,
    files: int = 2,
    cards: int = 1,
    errors: int = 0,
) -> res.Realm:
    realm = res.Realm(
        realm_id=realm_id,
        display_name=name,
        state=state,
        stats=res.RealmStats(files=files, cards=cards, errors=errors, entries=files),
    )
    realm.create_time.seconds = T0
    return realm


def make_file(path: str, size: int = 3) -> res.RealmFile:
    realm_file = res.RealmFile(path=path, size=size, sha256="ab" * 32)
    realm_file.mtime.seconds = T0
    return realm_file


def assert_table_aligned(text: str) -> None:
    """Every row has a cell starting (left-aligned) or ending (right-aligned) under each header."""
    header, *rows = text.splitlines()
    columns = [(m.start(), m.end()) for m in re.finditer(r"\S+", header)]
    for row in rows:
        cells = [(m.start(), m.end()) for m in re.finditer(r"\S+", row)]
        for start, end in columns:
            assert any(s == start or e == end for s, e in cells), (row, header)


def assert_values_aligned(text: str) -> None:
    """In a `key: value` block, every value starts at the same column."""
    starts = {m.end() for line in text.splitlines() if (m := re.match(r"[^:]+:\s+", line))}
    assert len(starts) == 1, text
