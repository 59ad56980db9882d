"""Reflection v1 and v1alpha (the same servicer), descriptors with the protos'
comments, Health/List; and `buf curl` over v1 with the pinned buf."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from tests.api.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def _ask(
    live: LiveServer, service: str, request: rpb.ServerReflectionRequest
) -> rpb.ServerReflectionResponse:
    """One request on `service`'s ServerReflectionInfo (v1 and v1alpha share the wire format)."""
    call = live.channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=rpb.ServerReflectionRequest.SerializeToString,
        response_deserializer=rpb.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([request]), timeout=10))
    return response


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_both_reflection_versions_list_and_describe_with_comments(
    live: LiveServer, version: str
) -> None:
    service = f"grpc.reflection.{version}.ServerReflection"
    listed = _ask(live, service, rpb.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "realm.v1.RealmService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    found = _ask(
        live, service, rpb.ServerReflectionRequest(file_containing_symbol="realm.v1.RealmService")
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in found.file_descriptor_response.file_descriptor_proto
    ]
    contract = next(f for f in files if f.name == "realm/v1/realm_service.proto")
    comments = " ".join(
        loc.leading_comments for loc in contract.source_code_info.location if loc.leading_comments
    )
    # The comment on JobAssignment.trace_parent, as written in the proto.
    assert "W3C trace context" in comments
    # v1 describes itself too (grpcurl describe grpc.reflection.v1.ServerReflection).
    v1 = _ask(
        live,
        service,
        rpb.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    )
    assert v1.HasField("file_descriptor_response")


def test_health_list_answers_every_service(live: LiveServer) -> None:
    stub = health_pb2_grpc.HealthStub(live.channel)
    listed = stub.List(health_pb2.HealthListRequest(), timeout=10)
    assert listed.statuses["realm.v1.RealmService"].status == health_pb2.HealthCheckResponse.SERVING
    assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING


def _buf() -> str:
    if BUF.exists():
        return str(BUF)
    if os.environ.get("CI") == "true":
        pytest.fail(f"the pinned buf is missing at {BUF}: run (cd .tools && npm ci)")
    found = shutil.which("buf")
    if found is None:
        pytest.skip("buf is not installed: (cd .tools && npm ci)")
    return found


def test_buf_curl_over_reflection_v1(live: LiveServer) -> None:
    base = [_buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge",
            "--reflect-protocol", "grpc-v1"]  # fmt: skip
    url = f"http://{live.address}"
    listed = subprocess.run(
        [*base, "--list-services", url], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "realm.v1.RealmService" in listed.stdout.split()
    health = subprocess.run(
        [*base, "-d", "{}", f"{url}/grpc.health.v1.Health/List"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert health.returncode == 0, health.stderr
    assert '"realm.v1.RealmService"' in health.stdout and "SERVING" in health.stdout
