"""Fixtures of realm_client's tests: a client over grpc_testing, scripted by the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.scripted import Scripted, scripted_client


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    """A RealmClient with token "s3cret" and a 7.5 s deadline over grpc_testing."""
    yield from scripted_client(token="s3cret", timeout=7.5)
