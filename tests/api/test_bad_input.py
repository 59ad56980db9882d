"""Bad input (DESIGN.md section 8): every RPC answers its documented status
with a message naming the field, and the store is exactly as before. One
server per backend serves the whole table; each case checks the store itself,
and the server must keep serving after each."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import LiveServer
from tests.api.helpers import RPC_TIMEOUT, hello, rpc_error, store_snapshot
from tests.api.worker_stream import StreamClient

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
MAX_FILE_SIZE = 64 * 1024  # BASE settings of tests/api/conftest.py

SEEDED = "seeded"  # exists, with docs/a.txt, created with request_id SEED_KEY
SEED_KEY = "seed-key"
UNKNOWN = "no-such-realm"
LEASE_UNKNOWN = "fedcba9876543210fedcba9876543210"  # never given to anyone


def token(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@dataclass(frozen=True)
class Case:
    rpc: str
    request: Message
    code: grpc.StatusCode
    names: str  # what the message must mention (the field, or the missing thing)
    id: str


CASES: list[Case] = []


def case(rpc: str, request: Message, code: grpc.StatusCode, names: str, id: str) -> None:
    CASES.append(Case(rpc, request, code, names, f"{rpc}-{id}"))


BAD_REALM_IDS = {
    "empty": "",
    "uppercase": "Realm",
    "64-chars": "a" * 64,
    "leading-dash": "-realm",
    "trailing-dash": "realm-",
    "underscore": "my_realm",
    "space": "my realm",
    # `$` matches before a final newline: with re.match these passed, and the
    # 64 characters of the second overflowed PostgreSQL's column (INTERNAL).
    "trailing-newline": "abc\n",
    "63-chars-and-newline": "b" * 63 + "\n",
}
BAD_PATHS = {
    "empty": "",
    "dotdot": "../escape.txt",
    "inner-dotdot": "a/../../b.txt",
    "leading-slash": "/etc/passwd",
    "nul": "a\x00b.txt",
    "control": "a\x01b.txt",
    "newline": "a\nb.txt",
    "empty-segment": "a//b.txt",
    "trailing-slash": "a/",
    "dot": "./a.txt",
    "backslash": "a\\b.txt",
    "too-long": "a/" * 600 + "b",
    "long-segment": "x" * 256,
}
# Code points a path may not hold, each reported as U+XXXX (DESIGN.md section 3).
REFUSED_CODE_POINTS = {
    "c0-escape": 0x1B,
    "del": 0x7F,
    "c1-nel": 0x85,
    "c1-csi": 0x9B,
    "line-separator": 0x2028,
    "paragraph-separator": 0x2029,
    "arabic-letter-mark": 0x061C,
    "lrm": 0x200E,
    "rlm": 0x200F,
    "lre": 0x202A,
    "rlo": 0x202E,
    "lri": 0x2066,
    "pdi": 0x2069,
    "bom": 0xFEFF,
    "noncharacter-fdd0": 0xFDD0,
    "noncharacter-fffe": 0xFFFE,
    "noncharacter-ffff": 0xFFFF,
    "noncharacter-10ffff": 0x10FFFF,
}
BAD_PRIORITIES = {"negative": -1, "over-100": 101}
BAD_PAGE_SIZES = {"negative": -1, "over-1000": 1001}
BAD_TOKENS = {
    "garbage": "%%%not a token%%%",
    "not-utf8": base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    "no-kind": token("just-a-value"),
}

for name, rid in BAD_REALM_IDS.items():
    case("CreateRealm", spb.CreateRealmRequest(realm_id=rid), INVALID, "realm_id", name)
    case("GetRealm", spb.GetRealmRequest(realm_id=rid), INVALID, "realm_id", name)
    case("ReindexRealm", spb.ReindexRealmRequest(realm_id=rid), INVALID, "realm_id", name)
    case(
        "WriteRealmFile",
        spb.WriteRealmFileRequest(realm_id=rid, path="a.txt", content=b"x"),
        INVALID,
        "realm_id",
        name,
    )
    case(
        "DeleteRealmFile",
        spb.DeleteRealmFileRequest(realm_id=rid, path="docs/a.txt"),
        INVALID,
        "realm_id",
        name,
    )
    case("ListRealmFiles", spb.ListRealmFilesRequest(realm_id=rid), INVALID, "realm_id", name)
    case(
        "ReadRealmFile",
        spb.ReadRealmFileRequest(realm_id=rid, path="realm.json"),
        INVALID,
        "realm_id",
        name,
    )
    case("SearchRealm", spb.SearchRealmRequest(realm_id=rid), INVALID, "realm_id", name)
    case("StreamRealmFiles", spb.StreamRealmFilesRequest(realm_id=rid), INVALID, "realm_id", name)
    case(
        "WriteRealmFiles",
        spb.WriteRealmFilesRequest(realm_id=rid, files=[pb.FileContent(path="a.txt")]),
        INVALID,
        "realm_id",
        name,
    )
    if rid:  # an empty realm_id means "all realms" in ListJobs
        case("ListJobs", spb.ListJobsRequest(realm_id=rid), INVALID, "realm_id", name)

for name, path in BAD_PATHS.items():
    case(
        "CreateRealm",
        spb.CreateRealmRequest(
            realm_id="fresh",
            initial_files=[pb.FileContent(path="ok.txt"), pb.FileContent(path=path)],
        ),
        INVALID,
        "initial_files[1].path",
        name,
    )
    case(
        "WriteRealmFile",
        spb.WriteRealmFileRequest(realm_id=SEEDED, path=path, content=b"x"),
        INVALID,
        "path",
        name,
    )
    case(
        "DeleteRealmFile",
        spb.DeleteRealmFileRequest(realm_id=SEEDED, path=path),
        INVALID,
        "path",
        name,
    )
    case(
        "ReadRealmFile",
        spb.ReadRealmFileRequest(realm_id=SEEDED, path=path),
        INVALID,
        "path",
        name,
    )
    case(
        "StreamRealmFiles",
        spb.StreamRealmFilesRequest(realm_id=SEEDED, paths=["docs/a.txt", path]),
        INVALID,
        "paths[1]",
        name,
    )
    if path:  # an empty after_path starts at the first file
        case(
            "StreamRealmFiles",
            spb.StreamRealmFilesRequest(realm_id=SEEDED, after_path=path),
            INVALID,
            "after_path",
            name,
        )
    case(
        "WriteRealmFiles",
        spb.WriteRealmFilesRequest(
            realm_id=SEEDED,
            files=[pb.FileContent(path="ok.txt"), pb.FileContent(path=path, content=b"x")],
        ),
        INVALID,
        "files[1].path",
        name,
    )
    case(
        "WriteRealmFiles",
        spb.WriteRealmFilesRequest(realm_id=SEEDED, deleted_paths=[path]),
        INVALID,
        "deleted_paths[0]",
        name,
    )

for name, cp in REFUSED_CODE_POINTS.items():
    bad = f"docs/a{chr(cp)}b.txt"
    shown = f"contains U+{cp:04X}"
    case(
        "CreateRealm",
        spb.CreateRealmRequest(
            realm_id="fresh",
            initial_files=[pb.FileContent(path="ok.txt"), pb.FileContent(path=bad)],
        ),
        INVALID,
        f"initial_files[1].path {shown}",
        f"refused-{name}",
    )
    for rpc, request in {
        "WriteRealmFile": spb.WriteRealmFileRequest(realm_id=SEEDED, path=bad, content=b"x"),
        "DeleteRealmFile": spb.DeleteRealmFileRequest(realm_id=SEEDED, path=bad),
        "ReadRealmFile": spb.ReadRealmFileRequest(realm_id=SEEDED, path=bad),
    }.items():
        case(rpc, request, INVALID, f"path {shown}", f"refused-{name}")

# Files the server owns: realm.json is never a client's to write or delete;
# index.json, the root card, may be replaced but not deleted.
REALM_JSON_RESERVED = "path: realm.json is reserved"
case(
    "WriteRealmFile",
    spb.WriteRealmFileRequest(realm_id=SEEDED, path="realm.json", content=b"{}"),
    INVALID,
    REALM_JSON_RESERVED,
    "reserved-realm.json",
)
case(
    "DeleteRealmFile",
    spb.DeleteRealmFileRequest(realm_id=SEEDED, path="realm.json"),
    INVALID,
    REALM_JSON_RESERVED,
    "reserved-realm.json",
)
case(
    "DeleteRealmFile",
    spb.DeleteRealmFileRequest(realm_id=SEEDED, path="index.json"),
    INVALID,
    "path: index.json is reserved",
    "reserved-index.json",
)

for name, p in BAD_PRIORITIES.items():
    case(
        "CreateRealm",
        spb.CreateRealmRequest(realm_id="fresh", priority=p),
        INVALID,
        "priority",
        name,
    )
    case(
        "ReindexRealm",
        spb.ReindexRealmRequest(realm_id=SEEDED, priority=p),
        INVALID,
        "priority",
        name,
    )
    case("ReindexAllRealms", spb.ReindexAllRealmsRequest(priority=p), INVALID, "priority", name)
    case(
        "WriteRealmFile",
        spb.WriteRealmFileRequest(realm_id=SEEDED, path="a.txt", priority=p),
        INVALID,
        "priority",
        name,
    )
    case(
        "DeleteRealmFile",
        spb.DeleteRealmFileRequest(realm_id=SEEDED, path="docs/a.txt", priority=p),
        INVALID,
        "priority",
        name,
    )

for name, size in BAD_PAGE_SIZES.items():
    case("ListRealms", spb.ListRealmsRequest(page_size=size), INVALID, "page_size", name)
    case("ListJobs", spb.ListJobsRequest(page_size=size), INVALID, "page_size", name)
    case(
        "SearchRealm",
        spb.SearchRealmRequest(realm_id=SEEDED, page_size=size),
        INVALID,
        "page_size",
        name,
    )

for name, t in {**BAD_TOKENS, "other-listing": token("jobs:5")}.items():
    case("ListRealms", spb.ListRealmsRequest(page_token=t), INVALID, "page_token", name)
    case(
        "SearchRealm",
        spb.SearchRealmRequest(realm_id=SEEDED, page_token=t),
        INVALID,
        "page_token",
        name,
    )
for name, t in {
    **BAD_TOKENS,
    "other-listing": token(f"realms:{SEEDED}"),
    "not-an-id": token("jobs:abc"),
    "unicode-digit": token("jobs:\u00b2"),
}.items():
    case("ListJobs", spb.ListJobsRequest(page_token=t), INVALID, "page_token", name)

# Unknown realms, files and jobs.
for rpc, request in {
    "GetRealm": spb.GetRealmRequest(realm_id=UNKNOWN),
    "ReindexRealm": spb.ReindexRealmRequest(realm_id=UNKNOWN),
    "WriteRealmFile": spb.WriteRealmFileRequest(realm_id=UNKNOWN, path="a.txt", content=b"x"),
    "DeleteRealmFile": spb.DeleteRealmFileRequest(realm_id=UNKNOWN, path="a.txt"),
    "ListRealmFiles": spb.ListRealmFilesRequest(realm_id=UNKNOWN),
    "ReadRealmFile": spb.ReadRealmFileRequest(realm_id=UNKNOWN, path="realm.json"),
    "SearchRealm": spb.SearchRealmRequest(realm_id=UNKNOWN),
    "StreamRealmFiles": spb.StreamRealmFilesRequest(realm_id=UNKNOWN),
    "WriteRealmFiles": spb.WriteRealmFilesRequest(
        realm_id=UNKNOWN, files=[pb.FileContent(path="a.txt", content=b"x")]
    ),
}.items():
    case(rpc, request, NOT_FOUND, UNKNOWN, "unknown-realm")
case(
    "ReadRealmFile",
    spb.ReadRealmFileRequest(realm_id=SEEDED, path="docs/missing.txt"),
    NOT_FOUND,
    "docs/missing.txt",
    "unknown-file",
)
case(
    "DeleteRealmFile",
    spb.DeleteRealmFileRequest(realm_id=SEEDED, path="docs/missing.txt"),
    NOT_FOUND,
    "docs/missing.txt",
    "unknown-file",
)
case(
    "WriteRealmFiles",
    spb.WriteRealmFilesRequest(
        realm_id=SEEDED,
        files=[pb.FileContent(path="docs/new.txt", content=b"x")],
        deleted_paths=["docs/a.txt", "docs/missing.txt"],
    ),
    NOT_FOUND,
    "docs/missing.txt",
    "unknown-file",
)
# StreamRealmFiles and WriteRealmFiles: bounds and shapes.
for name, size in {"negative": -1, "under-4k": 4095, "over-4m": (4 << 20) + 1}.items():
    case(
        "StreamRealmFiles",
        spb.StreamRealmFilesRequest(realm_id=SEEDED, max_message_bytes=size),
        INVALID,
        "max_message_bytes",
        name,
    )
case(
    "StreamRealmFiles",
    spb.StreamRealmFilesRequest(realm_id=SEEDED, paths=[f"p{i}" for i in range(10_001)]),
    INVALID,
    "paths has 10001 entries",
    "too-many-paths",
)
case(
    "StreamRealmFiles",
    spb.StreamRealmFilesRequest(realm_id=SEEDED, lease_id=LEASE_UNKNOWN),
    grpc.StatusCode.FAILED_PRECONDITION,
    "no longer the current lease",
    "lease-not-current",
)
case(
    "WriteRealmFiles",
    spb.WriteRealmFilesRequest(realm_id=SEEDED),
    INVALID,
    "nothing to write",
    "empty",
)
case(
    "WriteRealmFiles",
    spb.WriteRealmFilesRequest(
        realm_id=SEEDED, files=[pb.FileContent(path=f"f{i}") for i in range(10_001)]
    ),
    INVALID,
    "the limit is 10000",
    "too-many-files",
)
case(
    "WriteRealmFiles",
    spb.WriteRealmFilesRequest(
        realm_id=SEEDED,
        files=[pb.FileContent(path="caf\u00e9.json"), pb.FileContent(path="cafe\u0301.json")],
    ),
    INVALID,
    "files[1].path 'caf\u00e9.json' appears twice",
    "duplicate-file-nfc-and-nfd",
)
case(
    "WriteRealmFiles",
    spb.WriteRealmFilesRequest(
        realm_id=SEEDED,
        files=[pb.FileContent(path="docs/a.txt", content=b"new")],
        deleted_paths=["docs/a.txt"],
    ),
    INVALID,
    "deleted_paths[0] 'docs/a.txt' is named twice",
    "written-and-deleted",
)
case(
    "WriteRealmFiles",
    spb.WriteRealmFilesRequest(
        realm_id=SEEDED,
        files=[
            pb.FileContent(path="ok.txt"),
            pb.FileContent(path="big.bin", content=b"x" * (64 * 1024 + 1)),
        ],
    ),
    INVALID,
    "files[1].content",
    "oversized-file",
)
case(
    "WriteRealmFiles",
    spb.WriteRealmFilesRequest(realm_id=SEEDED, files=[pb.FileContent(path="realm.json")]),
    INVALID,
    "files[0].path: realm.json is reserved",
    "reserved-realm-json",
)
case(
    "WriteRealmFiles",
    spb.WriteRealmFilesRequest(realm_id=SEEDED, deleted_paths=["index.json"]),
    INVALID,
    "deleted_paths[0]",
    "delete-index-json",
)
case(
    "WriteRealmFiles",
    spb.WriteRealmFilesRequest(realm_id=SEEDED, files=[pb.FileContent(path="a.txt")], priority=101),
    INVALID,
    "priority",
    "priority-over-100",
)
# Job control.
case("DeleteRealm", spb.DeleteRealmRequest(realm_id=UNKNOWN), NOT_FOUND, UNKNOWN, "unknown-realm")
case("DeleteRealm", spb.DeleteRealmRequest(realm_id="Bad_Id"), INVALID, "realm_id", "bad-id")
case(
    "DeleteRealm",
    spb.DeleteRealmRequest(realm_id=SEEDED, request_id="k" * 129),
    INVALID,
    "request_id",
    "request-id-too-long",
)
case(
    "CancelJob",
    spb.CancelJobRequest(job_id="1", reason="r" * 501),
    INVALID,
    "reason",
    "reason-too-long",
)
case(
    "CancelJob",
    spb.CancelJobRequest(job_id="1", reason="a\nb"),
    INVALID,
    "reason",
    "reason-control",
)
case(
    "CancelJob",
    spb.CancelJobRequest(job_id="1"),
    grpc.StatusCode.FAILED_PRECONDITION,
    "succeeded",
    "finished-job",
)
case(
    "RetryJob",
    spb.RetryJobRequest(job_id="1"),
    grpc.StatusCode.FAILED_PRECONDITION,
    "succeeded",
    "finished-job",
)
for rpc, make in {
    "GetJob": spb.GetJobRequest,
    "WatchJob": spb.WatchJobRequest,
    "CancelJob": spb.CancelJobRequest,
    "RetryJob": spb.RetryJobRequest,
    "ExplainJob": spb.ExplainJobRequest,
}.items():
    case(rpc, make(job_id="987654321"), NOT_FOUND, "987654321", "unknown-job")
    for name, jid in {
        "empty": "",
        "letters": "abc",
        "negative": "-1",
        "space": " 1",
        "too-long": "1" * 19,
        "unicode-digit": "\u00b2",
        "arabic-digit": "\u0663",
    }.items():
        case(rpc, make(job_id=jid), INVALID, "job_id", name)

# Sizes, names and keys.
too_big = b"x" * (MAX_FILE_SIZE + 1)
case(
    "CreateRealm",
    spb.CreateRealmRequest(
        realm_id="fresh", initial_files=[pb.FileContent(path="a", content=too_big)]
    ),
    INVALID,
    "initial_files[0].content",
    "oversized-file",
)
case(
    "WriteRealmFile",
    spb.WriteRealmFileRequest(realm_id=SEEDED, path="big.bin", content=too_big),
    INVALID,
    "content",
    "oversized-file",
)
case(
    "CreateRealm",
    spb.CreateRealmRequest(
        realm_id="fresh",
        initial_files=[pb.FileContent(path="a.txt"), pb.FileContent(path="a.txt", content=b"2")],
    ),
    INVALID,
    "initial_files[1].path",
    "duplicate-file",
)
case(
    "CreateRealm",
    spb.CreateRealmRequest(
        realm_id="fresh",
        initial_files=[
            pb.FileContent(path="caf\u00e9.json"),
            pb.FileContent(path="cafe\u0301.json", content=b"2"),
        ],
    ),
    INVALID,
    "initial_files[1].path 'caf\u00e9.json' appears twice",
    "duplicate-file-nfc-and-nfd",
)
for reserved in ("realm.json", "index.json"):
    case(
        "CreateRealm",
        spb.CreateRealmRequest(realm_id="fresh", initial_files=[pb.FileContent(path=reserved)]),
        INVALID,
        f"initial_files[0].path: {reserved} is reserved",
        f"reserved-{reserved}",
    )
case(
    "CreateRealm",
    spb.CreateRealmRequest(realm_id="fresh", request_id=SEED_KEY),
    INVALID,
    "request_id",
    "request-id-of-another-realm",
)
case(
    "CreateRealm",
    spb.CreateRealmRequest(realm_id="fresh", request_id="k" * 129),
    INVALID,
    "request_id",
    "request-id-too-long",
)
case(
    "CreateRealm",
    spb.CreateRealmRequest(realm_id="fresh", display_name="x" * 201),
    INVALID,
    "display_name",
    "display-name-too-long",
)
case(
    "CreateRealm",
    spb.CreateRealmRequest(realm_id="fresh", display_name="a\x07b"),
    INVALID,
    "display_name",
    "display-name-control",
)
case(
    "SearchRealm",
    spb.SearchRealmRequest(realm_id=SEEDED, text="t" * 401),
    INVALID,
    "text",
    "text-too-long",
)
case("ListJobs", spb.ListJobsRequest(kind=99), INVALID, "kind", "unknown-kind")  # type: ignore[arg-type]
case("ListJobs", spb.ListJobsRequest(state=99), INVALID, "state", "unknown-state")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def seeded(module_live: LiveServer) -> LiveServer:
    """The module's server with one indexed realm and no queued work, so that
    streams granting credits receive nothing and change nothing."""
    created = module_live.stub.CreateRealm(
        spb.CreateRealmRequest(
            realm_id=SEEDED,
            request_id=SEED_KEY,
            initial_files=[pb.FileContent(path="docs/a.txt", content=b"hello")],
        ),
        timeout=RPC_TIMEOUT,
    )
    stream = StreamClient(module_live.stub, hello=hello("seeder"))
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == created.job.job_id
    assert stream.complete(a.lease_id).accepted
    stream.close()
    assert stream.wait_closed() is None
    return module_live


def invoke(live: LiveServer, rpc: str, request: Message) -> Any:
    method: Callable[..., Any] = getattr(live.stub, rpc)
    if rpc in ("WatchJob", "StreamRealmFiles"):
        return list(method(request, timeout=RPC_TIMEOUT))
    return method(request, timeout=RPC_TIMEOUT)


def assert_serving(live: LiveServer) -> None:
    health = health_pb2_grpc.HealthStub(live.channel)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id=SEEDED), timeout=RPC_TIMEOUT).realm
    assert realm.realm_id == SEEDED


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_refused_and_changes_nothing(seeded: LiveServer, c: Case) -> None:
    before = store_snapshot(seeded.srv.db)
    error = rpc_error(lambda: invoke(seeded, c.rpc, c.request))
    assert error.code() == c.code, error.details()
    assert c.names in (error.details() or ""), error.details()
    assert store_snapshot(seeded.srv.db) == before
    assert_serving(seeded)


# -- the ClaimJobs stream ---------------------------------------------------------------


def _request(**kwargs: Any) -> spb.ClaimJobsRequest:
    return spb.ClaimJobsRequest(**kwargs)


def _credit(n: int) -> spb.ClaimJobsRequest:
    return _request(credit=spb.CreditGrant(credits=n))


def _hello(**kwargs: Any) -> spb.ClaimJobsRequest:
    return _request(hello=spb.WorkerHello(**{"worker_id": "w", "incarnation_id": "i", **kwargs}))


# (id, messages sent after the stream opens, whether a hello goes first, what the error names)
VIOLATIONS: list[tuple[str, list[spb.ClaimJobsRequest], bool, str]] = [
    ("no-hello", [_credit(1)], False, "hello"),
    ("empty-first-message", [_request()], False, "hello"),
    ("hello-twice", [_hello()], True, "hello"),
    ("credit-zero", [_credit(0)], True, "credit"),
    ("credit-negative", [_credit(-3)], True, "credit"),
    ("credit-over-10000", [_credit(10_001)], True, "credit"),
    ("credits-summing-over-10000", [_credit(6000), _credit(6000)], True, "credits"),
    ("empty-message", [_request()], True, "message"),
    ("min-priority-negative", [_hello(min_priority=-1)], False, "min_priority"),
    ("min-priority-over-100", [_hello(min_priority=101)], False, "min_priority"),
    ("no-worker-id", [_hello(worker_id="")], False, "worker_id"),
    ("worker-id-too-long", [_hello(worker_id="w" * 201)], False, "worker_id"),
    ("unknown-kind", [_hello(kinds=[7])], False, "kinds"),
]


@pytest.mark.parametrize(
    ("messages", "with_hello", "names"),
    [v[1:] for v in VIOLATIONS],
    ids=[v[0] for v in VIOLATIONS],
)
def test_stream_protocol_violation_aborts_the_stream(
    seeded: LiveServer, messages: list[spb.ClaimJobsRequest], with_hello: bool, names: str
) -> None:
    before = store_snapshot(seeded.srv.db)
    stream = StreamClient(seeded.stub, send_hello=False)
    if with_hello:
        stream.send(_hello())
    for m in messages:
        stream.send(m)
    error = stream.wait_closed(timeout=RPC_TIMEOUT)
    assert error is not None, "the stream ended without an error"
    assert error.code() == INVALID, error.details()
    assert names in (error.details() or ""), error.details()
    assert store_snapshot(seeded.srv.db) == before
    assert_serving(seeded)


LEASE = "0123456789abcdef0123456789abcdef"  # never given to anyone


@pytest.mark.parametrize(
    "message",
    [
        _request(
            results=spb.JobResults(
                results=[spb.JobResult(lease_id=LEASE, outcome=spb.JobResult.OUTCOME_SUCCEEDED)]
            )
        ),
        _request(
            results=spb.JobResults(
                results=[spb.JobResult(lease_id=LEASE, outcome=spb.JobResult.OUTCOME_FAILED)]
            )
        ),
        _request(heartbeat=spb.Heartbeat(leases=[spb.LeaseProgress(lease_id=LEASE)])),
        _request(
            entries=spb.IndexEntryBatch(
                lease_id=LEASE, entries=[pb.IndexEntry(path="docs/a.txt", size=5)]
            )
        ),
        _request(release=spb.ReleaseLeases(lease_ids=[LEASE])),
    ],
    ids=["result", "failure", "heartbeat", "entries", "release"],
)
def test_messages_about_leases_never_given_are_refused(
    seeded: LiveServer, message: spb.ClaimJobsRequest
) -> None:
    before = store_snapshot(seeded.srv.db)
    # No credits: the seeded realm's queued job must stay where it is.
    stream = StreamClient(seeded.stub, hello=hello("w"), answer_pings=True)
    stream.settings()
    stream.send(message)
    (ack,) = stream.acks()
    assert (ack.lease_id, ack.accepted) == (LEASE, False)
    assert ack.reason
    # The stream stays usable: a ping is answered.
    stream.send(_request(ping=spb.Ping(nonce=42)))
    reply = stream.next(skip_pings=False)
    assert reply.ping.nonce == 42 and reply.ping.reply
    stream.close()
    assert stream.wait_closed() is None
    assert store_snapshot(seeded.srv.db) == before
    assert_serving(seeded)


def test_a_good_stream_still_works_after_all_of_the_above(seeded: LiveServer) -> None:
    reindex = seeded.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id=SEEDED))
    assert reindex.disposition == pb.DISPOSITION_INSERTED
    stream = StreamClient(seeded.stub, hello=hello("good"), answer_pings=True)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == reindex.job.job_id
    assert stream.complete(a.lease_id).accepted
    stream.close()
