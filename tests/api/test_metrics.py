"""Prometheus metrics: served over HTTP by `realm-service serve`, and they move
with the work."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request

from realm.v1 import realm_service_pb2 as spb

from realm_service import metrics
from tests.api.conftest import LiveServer
from tests.api.worker_stream import StreamClient


def _value(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing"
    return float(match.group(1))


def test_assignments_and_streams_are_counted(live: LiveServer) -> None:
    from prometheus_client import generate_latest

    before = _value(generate_latest(metrics.REGISTRY).decode(), "realm_jobs_assigned_total")
    live.stub.CreateRealm(spb.CreateRealmRequest(realm_id="m1"))
    stream = StreamClient(live.stub)
    stream.settings()
    stream.credit(1)
    stream.assignments(1)
    after = _value(generate_latest(metrics.REGISTRY).decode(), "realm_jobs_assigned_total")
    assert after == before + 1
    stream.close()
    stream.wait_closed()


def test_metrics_endpoint_of_a_served_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen(
        [sys.executable, "-m", "realm_service", "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path / 'm.db'}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = ""
        for _ in range(5):
            line = proc.stdout.readline()
            if "metrics on" in line:
                url = line.split()[-1]
            if "listening on" in line:
                break
        assert url.startswith("http://127.0.0.1:")
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "realm_streams_connected" in body
        assert "realm_dispatch_latency_seconds_bucket" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_rpcs_are_counted_by_status_code(live: LiveServer) -> None:
    import grpc
    import pytest
    from prometheus_client import generate_latest

    def count(code: str) -> float:
        text = generate_latest(metrics.REGISTRY).decode()
        match = re.search(
            rf'^realm_rpcs_total\{{code="{code}",method="realm.v1.RealmService/GetRealm"\}} (\S+)$',
            text,
            re.M,
        )
        return float(match.group(1)) if match else 0.0

    before_missing, before_ok = count("NOT_FOUND"), count("OK")
    with pytest.raises(grpc.RpcError) as refused:
        live.stub.GetRealm(spb.GetRealmRequest(realm_id="nowhere"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    live.stub.CreateRealm(spb.CreateRealmRequest(realm_id="somewhere"), timeout=10)
    live.stub.GetRealm(spb.GetRealmRequest(realm_id="somewhere"), timeout=10)
    assert count("NOT_FOUND") == before_missing + 1
    assert count("OK") == before_ok + 1
