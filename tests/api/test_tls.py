"""TLS end to end: a server with a certificate, a real index-worker process
and realmctl trusting its CA, and a plaintext client refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import BASE, start_live_server


def make_cert(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


def test_worker_and_cli_over_tls(tmp_path: Path, sqlite_url: str) -> None:
    key, cert = make_cert(tmp_path)
    settings = replace(BASE, store_url=sqlite_url, tls_cert=str(cert), tls_key=str(key))
    live, stop = start_live_server(settings)
    worker = None
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        channel = grpc.secure_channel(live.address, creds)
        stub = sgrpc.RealmServiceStub(channel)
        plain = sgrpc.RealmServiceStub(grpc.insecure_channel(live.address))
        with pytest.raises(grpc.RpcError) as refused:
            plain.GetRealm(spb.GetRealmRequest(realm_id="x"), timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        worker = subprocess.Popen(
            [sys.executable, "-m", "index_worker", "--server", live.address,
             "--ca-cert", str(cert), "--worker-id", "tls-worker"],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        created = stub.CreateRealm(
            spb.CreateRealmRequest(realm_id="secure", wait_for_index=True), timeout=30
        )
        assert created.job.state == pb.Job.STATE_SUCCEEDED
        out = subprocess.run(
            [sys.executable, "-m", "realmctl", "--server", live.address, "--ca-cert", str(cert),
             "get", "secure"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "ready" in out.stdout
        channel.close()
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                assert worker.wait(timeout=20) == 0
            finally:
                if worker.poll() is None:
                    worker.kill()
        stop()
