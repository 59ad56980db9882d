"""The worker as a process: command line, signals, log lines, import boundaries."""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from fake_realm_server import WAIT, FakeRealmService, assignment, start_server

from index_worker.__main__ import main

pytestmark = pytest.mark.timeout(20)

PACKAGE = Path(__file__).resolve().parents[2] / "index_worker"
# Only these modules may know grpc and the generated messages (STYLE.md).
WIRE_MODULES = {"client.py", "convert.py"}


def test_bad_setting_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", "127.0.0.1:1", "--concurrency", "zero"]) == 2
    assert "--concurrency" in capsys.readouterr().err


def test_sigterm_drains_and_exits_zero_with_key_value_job_logs() -> None:
    async def scenario() -> tuple[int, str]:
        service = FakeRealmService(realms={"pets": {"a.txt": b"hello"}})
        server, port = await start_server(service)
        env = {**os.environ, "INDEX_WORKER_TOKEN": "t0k"}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "index_worker",
            "--server",
            f"127.0.0.1:{port}",
            "--worker-id",
            "sub-1",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stream = await service.next_stream(0, timeout=10)
            assert stream.metadata["authorization"] == "Bearer t0k"
            await stream.next("credit")
            job = assignment("pets", job_id="77")
            await stream.assign(job)
            await stream.next("results")
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT):
                _, stderr = await process.communicate()
            assert stream.half_closed.is_set()
            return process.returncode or 0, stderr.decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await server.stop(None)

    code, log = asyncio.run(scenario())
    assert code == 0, log
    finished = [line for line in log.splitlines() if 'msg="job finished"' in line]
    assert len(finished) == 1, log
    for field in ("job=77", "realm=pets", "lease=lease-", "worker=sub-1", "outcome=succeeded"):
        assert field in finished[0]
    assert 'msg="worker stopped"' in log
    assert "t0k" not in log


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py")))
def test_import_boundaries(module: str) -> None:
    imports = _imports(PACKAGE / module)
    assert not any(name.split(".")[0] == "realm_service" for name in imports)
    if module not in WIRE_MODULES:
        wire = {n for n in imports if n.split(".")[0] in ("grpc", "realm", "google")}
        assert not wire, f"{module} imports {wire}; only {WIRE_MODULES} may"
    if module in ("indexer.py", "gitignore.py", "model.py"):
        assert all(
            not n.startswith("index_worker.")
            or n
            in {
                "index_worker.gitignore",
                "index_worker.model",
            }
            for n in imports
        )
