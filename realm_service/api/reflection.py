"""Server reflection, v1 and v1alpha, with the protos' comments; and a
health service that answers `List`.

grpcio-reflection serves only `grpc.reflection.v1alpha`; tools that speak
only v1 (`buf curl --reflect-protocol grpc-v1`) need `grpc.reflection.v1`.
The two are the same on the wire (only the package name differs), so one
servicer answers both. Its descriptors are rebuilt by `CopyToProto`, which
drops comments: files of the realm contract are answered instead from the
descriptor set that `scripts/gen_protos.py` writes with their source info,
so `grpcurl describe` shows the comments.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def contract_files() -> dict[str, bytes]:
    """Each file of the descriptor set shipped with the generated code, by
    name, serialized with its source info (comments)."""
    data = resources.files("realm.v1").joinpath("descriptors.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {f.name: f.SerializeToString() for f in files}


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """reflection v1's descriptor: v1alpha's under the v1 package."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.options.Clear()
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(".grpc.reflection.v1alpha."):
                f.type_name = f.type_name.replace(".v1alpha.", ".v1.", 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.", 1)
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.", 1)
    return proto


def _pool(with_source: dict[str, bytes]) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for raw in with_source.values():  # a set with imports lists dependencies first
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        pool.Add(proto)
        added.add(proto.name)
    for descriptor in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        if proto.name not in added:
            pool.Add(proto)
    pool.Add(_v1_file())
    return pool


class _Reflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    def __init__(self, service_names: list[str], with_source: dict[str, bytes]) -> None:
        super().__init__(service_names, pool=_pool(with_source))
        self._with_source = with_source

    def _file_by_filename(self, request: Any, filename: str) -> Any:
        return self._commented(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request: Any, name: str) -> Any:
        return self._commented(super()._file_containing_symbol(request, name))

    def _commented(self, response: Any) -> Any:
        if response.HasField("file_descriptor_response"):
            files = response.file_descriptor_response.file_descriptor_proto
            for i, raw in enumerate(files):
                name = descriptor_pb2.FileDescriptorProto.FromString(raw).name
                files[i] = self._with_source.get(name, raw)
        return response


def add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Serve reflection v1 and v1alpha for `service_names` (and themselves)."""
    servicer = _Reflection([*service_names, V1, V1ALPHA], contract_files())
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in (V1, V1ALPHA):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer, with `List`: every service this
    server reports on, and its status."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )
