"""Shared fixtures: a fresh store per test, on SQLite and on PostgreSQL.

`store_url` is parametrized over both backends. SQLite gets a new file in the
test's tmp_path; PostgreSQL gets a new schema in the `test` database (selected
through the connection's search_path) that is dropped afterwards. When
PostgreSQL is unreachable the PostgreSQL cases are skipped locally, but with
CI=true they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest

if TYPE_CHECKING:
    from tests.faults.proxy import Proxy

PG_URL = os.environ.get("REALM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_pg_checked: bool | None = None
_pg_error = ""


def _pg_available() -> bool:
    global _pg_checked, _pg_error
    if _pg_checked is None:
        try:
            import psycopg

            conninfo = PG_URL.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(conninfo, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _pg_checked = True
        except Exception as exc:  # any failure means "not reachable"
            _pg_checked = False
            _pg_error = f"{type(exc).__name__}: {exc}"
    return _pg_checked


def pg_schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema."""
    if not _pg_available():
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI and unreachable at {PG_URL}: {_pg_error}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {_pg_error}")
    import psycopg

    conninfo = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield pg_schema_url(schema)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_behind_proxy() -> Iterator[tuple[str, Proxy]]:
    """A fresh schema on the test PostgreSQL, reached through a loopback proxy."""
    if not _pg_available():
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI: {_pg_error}")
        pytest.skip(f"PostgreSQL unreachable: {_pg_error}")
    import psycopg
    from sqlalchemy.engine import make_url

    from tests.faults.proxy import Proxy

    url = make_url(PG_URL)
    conninfo = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432).start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    sep = "&" if "?" in proxied else "?"
    try:
        yield f"{proxied}{sep}options={quote(f'-csearch_path={schema}')}", proxy
    finally:
        proxy.close()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'realm.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A URL of a fresh, empty store; every store test runs on both backends."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))
