"""Fixtures of realmctl's tests: the fake server on loopback and an in-process runner."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from realm.v1 import realm_service_pb2_grpc
from realmctl_fakes import FakeRealmService, Result, Run, Server

from realmctl.__main__ import main


@pytest.fixture
def server() -> Iterator[Server]:
    fake = FakeRealmService()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    realm_service_pb2_grpc.add_RealmServiceServicer_to_server(fake, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield Server(fake, f"127.0.0.1:{port}")
    finally:
        grpc_server.stop(grace=None)


@pytest.fixture
def fake(server: Server) -> FakeRealmService:
    return server.fake


@pytest.fixture(autouse=True)
def _no_realmctl_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REALMCTL_TOKEN", raising=False)
    monkeypatch.delenv("REALMCTL_SERVER", raising=False)


@pytest.fixture
def run(server: Server, capsys: pytest.CaptureFixture[str]) -> Run:
    """Runs realmctl in this process against the fake server: exit code, stdout, stderr."""

    def run_realmctl(*args: str) -> Result:
        code = main(["--server", server.address, "--timeout", "5", *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run_realmctl
