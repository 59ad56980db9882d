"""client/src/realm/ must be exactly what scripts/gen_protos.py produces from protos/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tree(directory: Path) -> set[str]:
    return {
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    out = tmp_path / "src"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(out)],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in out.iterdir()) == ["realm"], "gen_protos writes only realm/"
    out = out / "realm"
    committed = ROOT / "client" / "src" / "realm"
    assert _tree(out) == _tree(committed), "files added or missing: run scripts/gen_protos.py"
    differing = [
        name
        for name in sorted(_tree(out))
        if not filecmp.cmp(out / name, committed / name, shallow=False)
    ]
    assert not differing, f"realm/ drifted from protos/: {differing}; run scripts/gen_protos.py"


def test_service_descriptor_lists_every_rpc() -> None:
    from realm.v1 import realm_service_pb2, realm_service_pb2_grpc

    service = realm_service_pb2.DESCRIPTOR.services_by_name["RealmService"]
    assert service.full_name == "realm.v1.RealmService"
    assert {m.name for m in service.methods} == {
        "CreateRealm",
        "GetRealm",
        "ListRealms",
        "ReindexRealm",
        "ReindexAllRealms",
        "WriteRealmFile",
        "DeleteRealmFile",
        "ListRealmFiles",
        "ReadRealmFile",
        "StreamRealmFiles",
        "WriteRealmFiles",
        "SearchRealm",
        "GetJob",
        "ListJobs",
        "WatchJob",
        "CancelJob",
        "RetryJob",
        "DeleteRealm",
        "ExplainJob",
        "ListWorkers",
        "GetQueueStats",
        "ClaimJobs",
    }
    claim = service.methods_by_name["ClaimJobs"]
    assert claim.client_streaming and claim.server_streaming
    watch = service.methods_by_name["WatchJob"]
    assert watch.server_streaming and not watch.client_streaming
    assert hasattr(realm_service_pb2_grpc, "RealmServiceStub")
