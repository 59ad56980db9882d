"""Regenerate the `realm` package from protos/ with the pinned grpcio-tools and mypy-protobuf.

Usage: python scripts/gen_protos.py [OUT_DIR]

Writes OUT_DIR/realm/ (replacing it, and nothing else in OUT_DIR). OUT_DIR
defaults to client/src, the source root of the realm-client distribution,
which ships the stubs beside realm_client. The drift test calls this with a
temporary directory and compares the bytes with the committed tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SOURCE_ROOT = ROOT / "client" / "src"
DESCRIPTOR_SET = "v1/descriptors.binpb"  # in the realm package


def generate(out: Path) -> None:
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    sources = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    package = out / "realm"
    if package.exists():
        shutil.rmtree(package)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        # The descriptors with their comments, for server reflection
        # (`grpcurl describe` shows them); the modules above carry none.
        f"--descriptor_set_out={package / DESCRIPTOR_SET}",
        "--include_source_info",
        "--include_imports",
        *sources,
    ]
    (package / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, cwd=PROTOS)
    # Package markers so type checkers and importers see regular packages.
    for directory in [package, *[d for d in package.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").touch()
    (package / "py.typed").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE_ROOT)
