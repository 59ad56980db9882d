"""Bad configuration at start: one line naming the setting and the cause,
and a documented exit status (README.md, "Exit statuses"); never a traceback."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from realm_common.logs import parse_logfmt
from tests.e2e.conftest import clean_env, program

pytestmark = pytest.mark.e2e

SERVER = program("realm-service", "realm_service")
WORKER = program("index-worker", "index_worker")


def run(args: list[str], tmp_path: Path, **env: str) -> tuple[int, str]:
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**clean_env(), **env}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert "listening on" not in done.stdout
    return done.returncode, done.stderr


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ([], {"REALM_LEASE_SECONDS": "abc"}, "REALM_LEASE_SECONDS: expected a number (got 'abc')"),
        (["--store", "mysql://x"], {}, "--store: expected sqlite:///PATH or postgresql://"),
        (["--max-attempts", "0"], {}, "--max-attempts: must be >= 1"),
        ([], {"REALM_LOG_JSON": "perhaps"}, "REALM_LOG_JSON: expected true or false"),
    ],
)
def test_a_bad_server_setting_exits_2_with_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    code, err = run([*SERVER, "serve", "--listen", "127.0.0.1:0", *args], tmp_path, **env)
    assert code == 2
    assert named in one_line(err)


def test_an_unreachable_postgresql_exits_3_naming_the_store_and_the_cause(tmp_path: Path) -> None:
    url = "postgresql://realm:secret@127.0.0.1:1/realm"
    code, err = run([*SERVER, "serve", "--listen", "127.0.0.1:0", "--store", url], tmp_path)
    assert code == 3
    fields = parse_logfmt(one_line(err))
    assert fields["level"] == "error" and fields["msg"] == "cannot start"
    assert fields["setting"] == "--store/REALM_STORE_URL"
    assert "127.0.0.1" in fields["error"] and "refused" in fields["error"].lower()
    assert "secret" not in err


def test_a_taken_metrics_port_exits_4(tmp_path: Path, taken_port: int) -> None:
    store = f"sqlite:///{tmp_path / 'r.db'}"
    code, err = run(
        [*SERVER, "serve", "--listen", "127.0.0.1:0", "--store", store,
         "--metrics-listen", f"127.0.0.1:{taken_port}"],
        tmp_path,
    )  # fmt: skip
    assert code == 4
    fields = parse_logfmt(one_line(err))
    assert f"--metrics-listen 127.0.0.1:{taken_port}" in fields["error"]


def test_dev_flags_have_variables_and_help_shows_defaults(tmp_path: Path) -> None:
    done = subprocess.run([*SERVER, "dev", "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(done.stdout.split())
    assert "index worker processes (default 2; REALM_WORKERS)" in text
    assert "jobs per worker (default 2; REALM_WORKER_CONCURRENCY)" in text
    code, err = run([*SERVER, "dev", "--listen", "127.0.0.1:0"], tmp_path, REALM_WORKERS="many")
    assert code == 2
    assert "REALM_WORKERS: expected an integer (got 'many')" in one_line(err)


def test_worker_settings_fail_the_same_way(tmp_path: Path, taken_port: int) -> None:
    code, err = run([*WORKER, "--server", "127.0.0.1:1"], tmp_path, INDEX_WORKER_LOG_JSON="x")
    assert code == 2
    assert "INDEX_WORKER_LOG_JSON: expected true or false" in one_line(err)
    code, err = run(
        [*WORKER, "--server", "127.0.0.1:1", "--metrics-listen", f"127.0.0.1:{taken_port}"],
        tmp_path,
    )
    assert code == 4
    assert parse_logfmt(one_line(err))["msg"] == "cannot start"
