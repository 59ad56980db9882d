"""A private PostgreSQL cluster, created with initdb in a temporary directory
and listening on a free loopback port, that a test may stop and start at will.

The shared server at 127.0.0.1:5432 serves every other test at once, so it
cannot be stopped; a cluster of our own can. PostgreSQL refuses to run as
root, so under root the cluster's files and processes belong to the
`postgres` user (or `nobody`), and its directory is made outside pytest's
tmp_path, whose parents are private to root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

START_TIMEOUT = 60.0
# What pg_ctl sends the postmaster for each shutdown mode.
_SHUTDOWN_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl, newest version first."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for found in (shutil.which("pg_ctl"), *candidates):
        if found is None:
            continue
        directory = Path(found) if Path(found).is_dir() else Path(found).parent
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int
    name: str


def _run_as() -> _RunAs | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _RunAs(entry.pw_uid, entry.pw_gid, name)
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists")


class PgCluster:
    """initdb + pg_ctl on 127.0.0.1:`port`; `stop()` and `start()` are the fault."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="realm-faults-pg-"))
        self.data_dir = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self.port = free_port()
        self.stops = 0
        self._run_as = _run_as()
        if self._run_as is not None:
            os.chown(self.root, self._run_as.uid, self._run_as.gid)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> PgCluster:
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.data_dir),
                "-U", "postgres",
                "-A", "trust",
                "-E", "UTF8",
                "--no-sync",
                "--no-instructions",
            ]
        )  # fmt: skip
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as f:
            # Only loopback TCP: no socket files in shared directories. fsync
            # and full-page writes guard against an OS crash, which never
            # happens here; synchronous_commit stays on, since without it a
            # stop in immediate mode loses commits already acknowledged.
            f.write(
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                "unix_socket_directories = ''\n"
                "fsync = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
                "shared_buffers = 32MB\n"
            )
        return self

    def start(self) -> None:
        result = self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D", str(self.data_dir),
                "-l", str(self.log_file),
                "-w", "-t", str(int(START_TIMEOUT)),
                "start",
            ],
            check=False,
        )  # fmt: skip
        if result.returncode != 0 and not self.running():
            raise RuntimeError(
                f"pg_ctl start exited with {result.returncode}: {result.stderr[-2000:]}\n"
                f"{self.log_tail()}"
            )
        self._wait_ready()

    def stop(self, mode: str = "immediate") -> None:
        """Stop the cluster; `immediate` is a crash as far as clients can tell."""
        self.stops += 1
        result = self._run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
            check=False,
        )
        if result.returncode == 0 or not self.running():
            return
        # pg_ctl itself has been seen dying (SIGSEGV) while it waited: send
        # the postmaster the signal pg_ctl would have sent, and wait here.
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, _SHUTDOWN_SIGNALS[mode])
        deadline = time.monotonic() + START_TIMEOUT
        while self.running():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL (pid {pid}) still runs {START_TIMEOUT:.0f}s after stop; "
                    f"pg_ctl exited with {result.returncode}: {result.stderr[-2000:]}"
                )
            time.sleep(0.1)

    def running(self) -> bool:
        pid = self._postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (FileNotFoundError, ValueError):
            return None

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            if self.data_dir.exists() and self.running():
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def _conninfo(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database} connect_timeout=5"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with psycopg.connect(self._conninfo("postgres")) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _run(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        user = self._run_as
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 30,
            check=False,
            cwd=self.root,
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
        return result
