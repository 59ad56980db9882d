"""The client distribution stands apart: its wheel holds the stubs and
realm_client and needs only grpcio and protobuf; realm_client imports nothing
of the server's; realmctl calls no stub itself."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "client"


def test_the_client_wheel_needs_only_grpcio_and_protobuf(tmp_path: Path) -> None:
    source = tmp_path / "client"
    shutil.copytree(
        CLIENT, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=240,
    )  # fmt: skip

    (wheel,) = (tmp_path / "dist").glob("realm_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())

    requires = sorted(metadata.get_all("Requires-Dist") or [])
    assert [r.split("<")[0].split(">")[0].split("=")[0].strip() for r in requires] == [
        "grpcio",
        "protobuf",
    ], requires
    assert metadata["Name"] == "realm-client"
    for expected in (
        "realm/v1/realm_service_pb2.py",
        "realm/v1/realm_service_pb2.pyi",
        "realm/v1/realm_service_pb2_grpc.py",
        "realm/v1/resources_pb2.py",
        "realm/py.typed",
        "realm_client/__init__.py",
        "realm_client/client.py",
        "realm_client/aio.py",
        "realm_client/errors.py",
        "realm_client/py.typed",
    ):
        assert expected in names, expected
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"realm", "realm_client"}


def test_the_server_depends_on_the_client_distribution() -> None:
    import tomllib

    server = tomllib.loads((ROOT / "pyproject.toml").read_text())
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())
    pin = f"{client['project']['name']}=={client['project']['version']}"
    assert pin in server["project"]["dependencies"]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_realm_client_imports_grpc_protobuf_stubs_and_the_standard_library_only() -> None:
    allowed = {"grpc", "google", "realm", "realm_client"} | set(sys.stdlib_module_names)
    for path in sorted((CLIENT / "src" / "realm_client").rglob("*.py")):
        bad = {name for name in _imports(path) if name.split(".")[0] not in allowed}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_realmctl_makes_no_call_of_its_own() -> None:
    """Every RPC of realmctl goes through realm_client: no stub, no channel of its own."""
    for path in sorted((ROOT / "realmctl").rglob("*.py")):
        text = path.read_text()
        assert "realm.v1.realm_service_pb2_grpc" not in _imports(path), path.relative_to(ROOT)
        for word in ("Stub(", "insecure_channel", "secure_channel", ".with_call("):
            assert word not in text, f"{path.relative_to(ROOT)} has {word}"
