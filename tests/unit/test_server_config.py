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
    ("argv", "named"),
    [
        (("--sqlite-synchronous", "OFF"), "--sqlite-synchronous/REALM_SQLITE_SYNCHRONOUS"),
        (
            ("--request-id-retention-hours", "0"),
            "--request-id-retention-hours/REALM_REQUEST_ID_RETENTION_HOURS",
        ),
    ],
)
def test_bad_values_are_refused_by_name(
    argv: tuple[str, ...], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=named):
        settings(*argv, monkeypatch=monkeypatch)
