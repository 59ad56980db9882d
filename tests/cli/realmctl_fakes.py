"""A fake RealmService for realmctl's tests, and builders of the resources it answers with.

The fake records every call (method, request, metadata) and answers with the
responses a test queued for the method (the last one repeats), an empty
response when none was queued, or the error the test set.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import realm_service_pb2_grpc
from realm.v1 import resources_pb2 as res

_Response = TypeVar("_Response", bound=Message)

T0 = 1_700_000_000
T0_ISO = "2023-11-14T22:13:20Z"


@dataclass
class RecordedCall:
    method: str
    request: Any
    metadata: dict[str, str]


@dataclass
class FakeRealmService(realm_service_pb2_grpc.RealmServiceServicer):
    calls: list[RecordedCall] = field(default_factory=list)
    replies: dict[str, list[Message]] = field(default_factory=dict)
    # method -> (code, details, number of calls answered before the failures start)
    errors: dict[str, tuple[grpc.StatusCode, str, int]] = field(default_factory=dict)
    # Seconds to sit on every unary call before answering.
    delay: float = 0.0
    # WatchJob sends these snapshots, then ends (or fails with watch_error).
    watch_snapshots: list[res.Job] = field(default_factory=list)
    watch_error: tuple[grpc.StatusCode, str] | None = None

    def reply(self, method: str, *responses: Message) -> None:
        self.replies.setdefault(method, []).extend(responses)

    def fail(self, method: str, code: grpc.StatusCode, details: str, *, after: int = 0) -> None:
        self.errors[method] = (code, details, after)

    def requests(self, method: str) -> list[Any]:
        return [call.request for call in self.calls if call.method == method]

    def methods(self) -> list[str]:
        return [call.method for call in self.calls]

    def _answer(
        self, method: str, request: Message, context: grpc.ServicerContext, empty: _Response
    ) -> _Response:
        earlier = len(self.requests(method))
        metadata = {
            key: value for key, value in context.invocation_metadata() if isinstance(value, str)
        }
        self.calls.append(RecordedCall(method, request, metadata))
        if self.delay:
            time.sleep(self.delay)
        if method in self.errors:
            code, details, after = self.errors[method]
            if earlier >= after:
                context.abort(code, details)
        queued = self.replies.get(method)
        if not queued:
            return empty
        return cast(_Response, queued.pop(0) if len(queued) > 1 else queued[0])

    def CreateRealm(
        self, request: rs.CreateRealmRequest, context: grpc.ServicerContext
    ) -> rs.CreateRealmResponse:
        return self._answer("CreateRealm", request, context, rs.CreateRealmResponse())

    def GetRealm(
        self, request: rs.GetRealmRequest, context: grpc.ServicerContext
    ) -> rs.GetRealmResponse:
        return self._answer("GetRealm", request, context, rs.GetRealmResponse())

    def ListRealms(
        self, request: rs.ListRealmsRequest, context: grpc.ServicerContext
    ) -> rs.ListRealmsResponse:
        return self._answer("ListRealms", request, context, rs.ListRealmsResponse())

    def ReindexRealm(
        self, request: rs.ReindexRealmRequest, context: grpc.ServicerContext
    ) -> rs.ReindexRealmResponse:
        return self._answer("ReindexRealm", request, context, rs.ReindexRealmResponse())

    def ReindexAllRealms(
        self, request: rs.ReindexAllRealmsRequest, context: grpc.ServicerContext
    ) -> rs.ReindexAllRealmsResponse:
        return self._answer("ReindexAllRealms", request, context, rs.ReindexAllRealmsResponse())

    def WriteRealmFile(
        self, request: rs.WriteRealmFileRequest, context: grpc.ServicerContext
    ) -> rs.WriteRealmFileResponse:
        return self._answer("WriteRealmFile", request, context, rs.WriteRealmFileResponse())

    def DeleteRealmFile(
        self, request: rs.DeleteRealmFileRequest, context: grpc.ServicerContext
    ) -> rs.DeleteRealmFileResponse:
        return self._answer("DeleteRealmFile", request, context, rs.DeleteRealmFileResponse())

    def ListRealmFiles(
        self, request: rs.ListRealmFilesRequest, context: grpc.ServicerContext
    ) -> rs.ListRealmFilesResponse:
        return self._answer("ListRealmFiles", request, context, rs.ListRealmFilesResponse())

    def ReadRealmFile(
        self, request: rs.ReadRealmFileRequest, context: grpc.ServicerContext
    ) -> rs.ReadRealmFileResponse:
        return self._answer("ReadRealmFile", request, context, rs.ReadRealmFileResponse())

    def SearchRealm(
        self, request: rs.SearchRealmRequest, context: grpc.ServicerContext
    ) -> rs.SearchRealmResponse:
        return self._answer("SearchRealm", request, context, rs.SearchRealmResponse())

    def GetJob(self, request: rs.GetJobRequest, context: grpc.ServicerContext) -> rs.GetJobResponse:
        return self._answer("GetJob", request, context, rs.GetJobResponse())

    def ListJobs(
        self, request: rs.ListJobsRequest, context: grpc.ServicerContext
    ) -> rs.ListJobsResponse:
        return self._answer("ListJobs", request, context, rs.ListJobsResponse())

    def WatchJob(
        self, request: rs.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[rs.WatchJobResponse]:
        self._answer("WatchJob", request, context, rs.WatchJobResponse())
        for job in self.watch_snapshots:
            yield rs.WatchJobResponse(job=job)
        if self.watch_error is not None:
            context.abort(*self.watch_error)

    def ClaimJobs(
        self, request_iterator: Iterator[rs.ClaimJobsRequest], context: grpc.ServicerContext
    ) -> Iterator[rs.ClaimJobsResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "realmctl never calls ClaimJobs")


@dataclass
class Server:
    fake: FakeRealmService
    address: str


@dataclass
class Result:
    """What a realmctl run ended with."""

    code: int
    out: str
    err: str


Run = Callable[..., Result]


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
