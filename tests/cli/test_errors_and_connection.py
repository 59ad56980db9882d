"""Errors, usage, connection settings and the token; the few runs that need a
socket (no server, a slow one, TLS, `python -m realmctl`) use a real one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from realm.v1 import realm_service_pb2 as rs
from realmctl_fakes import Cli, Server, make_realm

from realmctl.__main__ import main


def closed_port() -> int:
    """A loopback port nobody listens on (just released by the OS)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_not_found_is_one_line_and_exit_1(cli: Cli) -> None:
    running = cli.start("get", "nope")
    cli.fail("GetRealm", grpc.StatusCode.NOT_FOUND, "realm nope not found")
    result = running.result()

    assert result.code == 1
    assert result.err == "realmctl: error: NOT_FOUND: realm nope not found\n"
    assert result.out == ""


def test_invalid_argument_details_are_kept_on_one_line(cli: Cli) -> None:
    running = cli.start("create", "Bad_Id")
    cli.fail(
        "CreateRealm",
        grpc.StatusCode.INVALID_ARGUMENT,
        "realm_id: must match [a-z0-9-]\n  got 'Bad_Id'",
    )
    result = running.result()

    assert result.code == 1
    assert result.err == (
        "realmctl: error: INVALID_ARGUMENT: realm_id: must match [a-z0-9-] got 'Bad_Id'\n"
    )


def test_server_that_answers_unavailable_is_not_called_unreachable(cli: Cli) -> None:
    running = cli.start("ls")
    cli.fail("ListRealms", grpc.StatusCode.UNAVAILABLE, "server draining")

    assert running.result().err == "realmctl: error: UNAVAILABLE: server draining\n"


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{closed_port()}"

    code = main(["--server", address, "get", "demo"])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"realmctl: error: UNAVAILABLE: cannot reach server at {address} (")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_deadline_exceeded(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    server.service.delay = 0.5

    code = main(["--server", server.address, "--timeout", "0.1", "get", "demo"])

    assert code == 1
    assert capsys.readouterr().err.startswith(
        f"realmctl: error: DEADLINE_EXCEEDED: no answer from server at {server.address} "
        "within 0.1 s"
    )


def test_tls_to_a_plaintext_server_fails_cleanly(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--server", server.address, "--timeout", "5", "--tls", "get", "demo"])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("realmctl: error: UNAVAILABLE: ")
    assert err.count("\n") == 1
    assert server.service.metadata == []


def test_missing_ca_certificate_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    result = cli.run("--ca-cert", str(tmp_path / "ca.pem"), "get", "demo")

    assert result.code == 2
    assert result.err.startswith(f"realmctl: error: cannot read CA certificate {tmp_path}")
    assert cli.methods() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["get"], "the following arguments are required: REALM_ID"),
        (["create", "demo", "--priority", "101"], "priority must be 0-100"),
        (["create", "demo", "--priority", "high"], "not an integer: 'high'"),
        (["jobs", "--kind", "partial"], "invalid choice: 'partial'"),
        (["ls", "--limit", "-1"], "must be 0 or more"),
        (["--timeout", "soon", "ls"], "not a number of seconds"),
    ],
)
def test_bad_usage_exits_2_without_calling(cli: Cli, args: list[str], message: str) -> None:
    result = cli.run(*args)

    assert result.code == 2
    assert message in result.err
    assert result.err.splitlines()[-1].startswith("realmctl")
    assert cli.methods() == []


def test_bad_file_arguments_exit_2_without_calling(cli: Cli, tmp_path: Path) -> None:
    no_equals = cli.run("create", "demo", "--file", "a.json")
    missing = cli.run("create", "demo", "--file", f"a.json={tmp_path / 'missing.json'}")
    local = tmp_path / "a.json"
    local.write_text("{}")
    twice = cli.run("create", "demo", "--file", f"a.json={local}", "--file", f"a.json={local}")

    assert (no_equals.code, missing.code, twice.code) == (2, 2, 2)
    assert no_equals.err == "realmctl: error: --file expects PATH=LOCALFILE, got 'a.json'\n"
    assert missing.err.startswith(f"realmctl: error: cannot read {tmp_path / 'missing.json'}: ")
    assert twice.err == "realmctl: error: --file a.json is given twice\n"
    assert cli.methods() == []


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--help"])

    out = capsys.readouterr().out
    assert code == 0
    assert "exit status" in out and "REALMCTL_TOKEN" in out
    for command in ["create", "get", "ls", "push", "cat", "rm", "files", "reindex", "jobs"]:
        assert f"    {command} " in out


def test_token_is_sent_as_bearer_metadata(cli: Cli) -> None:
    metadata = []
    for args in (
        ("--token", "s3cret", "get", "demo"),
        ("get", "demo", "--token", "after-the-command"),
        ("get", "demo"),
    ):
        running = cli.start(*args)
        metadata.append(cli.answer("GetRealm", rs.GetRealmResponse(realm=make_realm())).metadata)
        assert running.result().code == 0

    assert metadata[0]["authorization"] == "Bearer s3cret"
    assert metadata[1]["authorization"] == "Bearer after-the-command"
    assert "authorization" not in metadata[2]


def test_environment_gives_server_and_token(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALMCTL_SERVER", "realm.example:6000")
    monkeypatch.setenv("REALMCTL_TOKEN", "from-env")

    running = cli.start("get", "demo", "--json")
    taken = cli.answer("GetRealm", rs.GetRealmResponse(realm=make_realm()))
    result = running.result()

    assert result.code == 0, result.err
    assert json.loads(result.out)["realm_id"] == "demo"
    assert taken.metadata["authorization"] == "Bearer from-env"
    assert [s.target for s in cli.settings] == ["realm.example:6000"]


def test_options_before_the_command_are_kept(cli: Cli) -> None:
    running = cli.start("--json", "--token", "t", "get", "demo")
    taken = cli.answer("GetRealm", rs.GetRealmResponse(realm=make_realm()))

    assert json.loads(running.result().out)["realm_id"] == "demo"
    assert taken.metadata["authorization"] == "Bearer t"


def test_python_m_realmctl_in_a_subprocess(server: Server) -> None:
    server.service.realms["alpha"] = make_realm("alpha")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALMCTL_")}
    env["REALMCTL_TOKEN"] = "sub"

    def realmctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "realmctl", "--server", server.address, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=20,
        )

    listed = realmctl("--json", "ls")
    missing = realmctl("get", "nope")

    assert listed.returncode == 0, listed.stderr
    assert [realm["realm_id"] for realm in json.loads(listed.stdout)] == ["alpha"]
    assert missing.returncode == 1
    assert missing.stderr == "realmctl: error: NOT_FOUND: realm nope not found\n"
    assert missing.stdout == ""
    assert server.service.metadata[0]["authorization"] == "Bearer sub"
