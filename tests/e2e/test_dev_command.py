"""`realm-service dev`: a server and two workers as child processes; a realm
created through it gets indexed; SIGINT (to the process, or to its whole
process group as Ctrl-C in a terminal does) stops every child. Server flags
given to dev reach its server."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb

from tests.api.worker_stream import StreamClient
from tests.e2e.conftest import System, program
from tests.e2e.helpers import (
    PERSON,
    RPC_TIMEOUT,
    WAIT,
    card,
    card_type,
    create_realm,
    poll,
    search_paths,
    wait_job,
)

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    start_ticks: int
    cmdline: str


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return raw.rsplit(")", 1)[1].split()


def children_of(parent: int) -> list[ProcInfo]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or int(fields[1]) != parent:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.append(ProcInfo(int(entry.name), int(fields[19]), cmdline))
    return found


def still_running(info: ProcInfo) -> bool:
    """True while that very process (not a later one with its pid) exists."""
    fields = _stat_fields(info.pid)
    return fields is not None and int(fields[19]) == info.start_ticks and fields[0] != "Z"


@pytest.mark.parametrize("target", ["process", "group"])
def test_dev_indexes_a_realm_and_sigint_stops_every_child(
    system: System, tmp_path: Path, target: str
) -> None:
    store = f"sqlite:///{tmp_path / 'dev.db'}"
    dev = system.start(
        "dev",
        [*program("realm-service", "realm_service"), "dev", "--workers", "2",
         "--listen", "127.0.0.1:0", "--store", store],
    )  # fmt: skip
    address = dev.wait_for_stdout(r"server on (127\.0\.0\.1:(\d+))").group(1)
    assert not address.endswith(":0")

    children = poll(
        lambda: (found := children_of(dev.pid)) and len(found) >= 3 and found,
        what="the server and two workers",
    )
    assert len(children) == 3, children
    commands = sorted(" ".join(c.cmdline.split()[1:4]) for c in children)
    assert sum("index_worker" in c for c in commands) == 2, commands
    assert sum("realm_service serve" in c for c in commands) == 1, commands

    with grpc.insecure_channel(address) as channel:
        stub = sgrpc.RealmServiceStub(channel)
        files = {f"people/p{i}.json": card(PERSON, {"name": f"Dev person {i}"}) for i in range(6)}
        job = create_realm(stub, "dev-realm", files).job
        done = wait_job(stub, job.job_id)
        assert done.state == pb.Job.STATE_SUCCEEDED, done
        assert search_paths(stub, "dev-realm", card_type=card_type(PERSON)) == sorted(files)

    if target == "process":
        os.kill(dev.pid, signal.SIGINT)
    else:
        os.killpg(dev.pid, signal.SIGINT)
    assert dev.wait(timeout=60) == 0
    poll(
        lambda: not any(still_running(c) for c in children),
        timeout=10,
        what="every child of realm-service dev to be gone",
    )
    assert "Traceback" not in dev.stderr()


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


def test_dev_passes_server_flags_on(system: System, tmp_path: Path) -> None:
    """Server flags given to dev reach its server, and its workers get what
    they need to talk to it (a worker token, the certificate to trust)."""
    key, cert = make_cert(tmp_path)
    dev = system.start(
        "dev",
        [*program("realm-service", "realm_service"), "dev", "--workers", "1",
         "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path / 'dev.db'}",
         "--tokens", "client:client-secret,worker:worker-secret",
         "--tls-cert", str(cert), "--tls-key", str(key),
         "--lease-seconds", "7", "--heartbeat-seconds", "0.7"],
    )  # fmt: skip
    address = dev.wait_for_stdout(r"server on (127\.0\.0\.1:\d+)").group(1)
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(address, creds) as channel:
        stub = sgrpc.RealmServiceStub(channel)
        client = [("authorization", "Bearer client-secret")]
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetRealm(spb.GetRealmRequest(realm_id="x"), timeout=RPC_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        job = stub.CreateRealm(
            spb.CreateRealmRequest(realm_id="secured", wait_for_index=True),
            metadata=client,
            timeout=WAIT,
        ).job
        assert job.state == pb.Job.STATE_SUCCEEDED, job

        stream = StreamClient(
            stub,
            hello=spb.WorkerHello(worker_id="probe", incarnation_id="probe-1"),
            metadata=[("authorization", "Bearer worker-secret")],
        )
        try:
            settings = stream.settings()
        finally:
            stream.cancel()
        assert settings.lease_duration.ToMilliseconds() == 7000
        assert settings.heartbeat_interval.ToMilliseconds() == 700

    os.kill(dev.pid, signal.SIGINT)
    assert dev.wait(timeout=60) == 0


def test_dev_stops_everything_when_a_child_dies(system: System, tmp_path: Path) -> None:
    dev = system.start(
        "dev",
        [*program("realm-service", "realm_service"), "dev", "--workers", "2",
         "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path / 'dev.db'}"],
    )  # fmt: skip
    dev.wait_for_stdout(r"server on 127\.0\.0\.1:\d+")
    children = poll(
        lambda: (found := children_of(dev.pid)) and len(found) >= 3 and found,
        what="the server and two workers",
    )
    worker = next(c for c in children if "index_worker" in c.cmdline)
    os.kill(worker.pid, signal.SIGKILL)
    # A half system is no use: dev stops the others and reports the failure.
    assert dev.wait(timeout=60) == 1
    poll(
        lambda: not any(still_running(c) for c in children),
        timeout=10,
        what="every child of realm-service dev to be gone",
    )
