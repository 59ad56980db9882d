"""Fixtures of the end-to-end tests: real server, worker and realmctl
processes on loopback.

Every process is started in its own session (so its whole process group can
be killed), with stdout and stderr going to files under the test's tmp_path.
At teardown every group still alive is SIGKILLed, and when the test failed
the tail of each process's log is printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from realm.v1 import realm_service_pb2_grpc as sgrpc

BIN = Path(sys.executable).parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0


def program(script: str, module: str) -> list[str]:
    """The installed console script, or `python -m module` without it."""
    path = BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def clean_env() -> dict[str, str]:
    """The test's environment without the programs' own settings variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REALM_", "INDEX_WORKER_", "REALMCTL_", "OTEL_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


_FAILED = pytest.StashKey[bool]()


@dataclass
class Proc:
    """One started process and its log files."""

    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for_stdout(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first match of `pattern` in the process's stdout, waiting for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.stdout())
            if match:
                return match
            if not self.alive():
                match = regex.search(self.stdout())
                if match:
                    return match
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode} before printing "
                    f"{pattern!r}; stderr:\n{self.stderr()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not print {pattern!r} in {timeout}s")
            time.sleep(0.05)

    def send(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            message = f"{self.name} (pid {self.pid}) still runs after {timeout}s"
            raise AssertionError(message) from None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` and return the exit status."""
        if self.alive():
            self.send(sig)
        return self.wait(timeout)

    def kill_group(self) -> None:
        # The process leads its own group; the group outlives the leader only
        # while some member (e.g. a child it left behind) is still alive.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


@dataclass
class Server:
    proc: Proc
    address: str
    store_url: str
    port: int
    _channels: list[grpc.Channel] = field(default_factory=list)

    def stub(self) -> sgrpc.RealmServiceStub:
        """A stub on a fresh channel (closed at teardown)."""
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return sgrpc.RealmServiceStub(channel)

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()


class System:
    """Starts the programs under test and cleans up after them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.servers: list[Server] = []

    def start(self, name: str, args: Sequence[str]) -> Proc:
        stem = f"{len(self.procs):02d}-{name}"
        stdout_path = self.log_dir / f"{stem}.out"
        stderr_path = self.log_dir / f"{stem}.err"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=clean_env(),
                cwd=self.log_dir,
                start_new_session=True,
            )
        proc = Proc(name, list(args), popen, stdout_path, stderr_path)
        self.procs.append(proc)
        return proc

    def start_server(
        self, store_url: str, *flags: str, port: int = 0, name: str = "server"
    ) -> Server:
        """`realm-service serve` on 127.0.0.1:`port`, once it says it listens."""
        args = [
            *program("realm-service", "realm_service"),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            store_url,
            "--heartbeat-seconds",
            "0.5",
            *flags,
        ]
        proc = self.start(name, args)
        match = proc.wait_for_stdout(r"realm-service listening on (\S+:(\d+))\n")
        server = Server(proc, match.group(1), store_url, int(match.group(2)))
        self.servers.append(server)
        return server

    def start_worker(self, server: Server | str, worker_id: str, *flags: str) -> Proc:
        """`index-worker` connected to `server`, reconnecting within a second."""
        address = server.address if isinstance(server, Server) else server
        args = [
            *program("index-worker", "index_worker"),
            "--server",
            address,
            "--worker-id",
            worker_id,
            "--reconnect-backoff-max",
            "1",
            *flags,
        ]
        return self.start(worker_id, args)

    def realmctl(
        self, *args: str, server: Server | str | None = None, timeout: float = 90.0
    ) -> subprocess.CompletedProcess[str]:
        """Run realmctl to the end; stdout and stderr are captured."""
        address = server.address if isinstance(server, Server) else server
        prefix = ["--server", address] if address else []
        return subprocess.run(
            [*program("realmctl", "realmctl"), *prefix, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=clean_env(),
            cwd=self.log_dir,
            timeout=timeout,
            check=False,
        )

    def cleanup(self, failed: bool) -> None:
        for server in self.servers:
            server.close_channels()
        for proc in reversed(self.procs):
            proc.kill_group()
        if failed:
            for proc in self.procs:
                print(f"==== {proc.name} (pid {proc.pid}, exit {proc.popen.returncode})")
                print(f"---- stdout\n{proc.stdout()[-2000:]}")
                print(f"---- stderr\n{proc.stderr()[-6000:]}")


@pytest.fixture
def system(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[System]:
    """Request it after `store_url`, so that processes stop before their store goes."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    system = System(log_dir)
    try:
        yield system
    finally:
        system.cleanup(failed=request.node.stash.get(_FAILED, False))
