"""Server settings for durability and request-id retention: safe defaults,
clear refusals naming the flag and its variable."""

from __future__ import annotations

import argparse

import pytest

from realm_service.config import (
    ConfigError,
    Settings,
    add_server_arguments,
    settings_from_args,
)


def settings(*argv: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in ("REALM_SQLITE_SYNCHRONOUS", "REALM_REQUEST_ID_RETENTION_HOURS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


def test_defaults_are_durable_and_keep_request_ids_a_day(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch=monkeypatch)
    assert s.sqlite_synchronous == "FULL"
    assert s.request_id_retention_hours == 24.0


def test_normal_sync_is_an_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        settings("--sqlite-synchronous", "normal", monkeypatch=monkeypatch).sqlite_synchronous
        == "NORMAL"
    )
    s = settings(monkeypatch=monkeypatch, REALM_SQLITE_SYNCHRONOUS="NORMAL")
    assert s.sqlite_synchronous == "NORMAL"


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (("--sqlite-synchronous", "OFF"), {}, "^--sqlite-synchronous: "),
        (("--request-id-retention-hours", "0"), {}, "^--request-id-retention-hours: "),
        ((), {"REALM_LEASE_SECONDS": "abc"}, "^REALM_LEASE_SECONDS: expected a number"),
        ((), {"REALM_MAX_ATTEMPTS": "0"}, "^REALM_MAX_ATTEMPTS: must be >= 1"),
        ((), {"REALM_LOG_JSON": "maybe"}, "^REALM_LOG_JSON: expected true or false"),
        (("--store", "mysql://x"), {}, "^--store: expected sqlite:///PATH or postgresql://"),
        ((), {"REALM_LISTEN": "nowhere"}, "^--listen/REALM_LISTEN: must be host:port"),
    ],
)
def test_bad_values_are_refused_by_name(
    argv: tuple[str, ...], env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message starts with the flag or variable the value came from."""
    for name in ("REALM_LEASE_SECONDS", "REALM_MAX_ATTEMPTS", "REALM_LOG_JSON", "REALM_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=named):
        settings(*argv, monkeypatch=monkeypatch, **env)


def test_help_shows_each_default_and_variable() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "lease duration without heartbeat (default 30.0; REALM_LEASE_SECONDS)" in text
    assert "(default FULL; REALM_SQLITE_SYNCHRONOUS)" in text
    for action in parser._actions[1:]:
        assert "REALM_" in (action.help or ""), action.option_strings
