"""Fixtures of realmctl's tests: realmctl over grpc_testing (`cli`), and a real
server on loopback (`server`) for the tests that need a socket."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from realm.v1 import realm_service_pb2_grpc
from realmctl_fakes import Cli, LoopbackService, Server

from realmctl import __main__ as realmctl_main


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    harness = Cli(capsys)
    monkeypatch.setattr(realmctl_main, "open_client", harness.open_client)
    return harness


@pytest.fixture
def server() -> Iterator[Server]:
    service = LoopbackService()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    realm_service_pb2_grpc.add_RealmServiceServicer_to_server(service, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield Server(service, f"127.0.0.1:{port}")
    finally:
        grpc_server.stop(grace=None)


@pytest.fixture(autouse=True)
def _no_realmctl_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REALMCTL_TOKEN", raising=False)
    monkeypatch.delenv("REALMCTL_SERVER", raising=False)
