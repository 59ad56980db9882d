"""--web-listen: off unless set in `serve`, refused beyond loopback without
tokens (the gRPC API's rule), on in `dev` with its address in the banner."""

from __future__ import annotations

import argparse
import signal
import urllib.request

import pytest

from realm_service.__main__ import _dev_web_listen
from realm_service.config import ConfigError, Settings, add_server_arguments, settings_from_args
from tests.e2e.conftest import System, program


def settings(*argv: str, **env: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)), environ=env)


def test_the_console_is_off_unless_asked_for() -> None:
    assert settings().web_listen == ""
    assert settings("--web-listen", "127.0.0.1:8080").web_listen == "127.0.0.1:8080"
    assert settings(REALM_WEB_LISTEN="[::1]:9000").web_listen == "[::1]:9000"


def test_beyond_loopback_it_needs_tokens_or_insecure() -> None:
    with pytest.raises(ConfigError, match=r"web console on 0\.0\.0\.0:8080 without auth"):
        settings("--web-listen", "0.0.0.0:8080")
    assert settings("--web-listen", "0.0.0.0:8080", "--insecure").web_listen == "0.0.0.0:8080"
    s = settings("--web-listen", "0.0.0.0:8080", "--tokens", "admin:secret-admin")
    assert s.web_listen == "0.0.0.0:8080"
    with pytest.raises(ConfigError, match="REALM_WEB_LISTEN: must be host:port"):
        settings(REALM_WEB_LISTEN="8080")


def test_dev_puts_the_console_beside_the_grpc_port() -> None:
    assert _dev_web_listen("127.0.0.1:50051") == "127.0.0.1:8080"
    assert _dev_web_listen("127.0.0.1:0") == "127.0.0.1:0"


def test_dev_prints_the_console_in_its_banner_and_serves_it(system: System, store_url: str) -> None:
    dev = system.start(
        "dev",
        [*program("realm-service", "realm_service"), "dev", "--workers", "1",
         "--listen", "127.0.0.1:0", "--store", store_url],
    )  # fmt: skip
    url = dev.wait_for_stdout(r"dev: web console on (http://127\.0\.0\.1:\d+/)").group(1)
    assert not url.endswith(":0/")
    with urllib.request.urlopen(url + "workers", timeout=20) as answer:
        body = answer.read().decode()
    assert answer.status == 200
    assert "<h1>Workers</h1>" in body
    assert dev.stop(signal.SIGINT) == 0
