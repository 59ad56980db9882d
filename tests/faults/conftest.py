"""Fixtures of the fault matrix: a private PostgreSQL cluster per test
process (each test gets its own database in it), and the run itself.

The cluster is the test's own, created with initdb, because the pg-stop fault
stops it; a missing PostgreSQL skips the PostgreSQL runs locally and fails
them when CI=true, like the shared store fixtures do.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import IN_CI
from tests.faults.pgcluster import PgCluster, find_pg_bin


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        message = "PostgreSQL binaries (initdb, pg_ctl) not found on PATH or /usr/lib/postgresql"
        if IN_CI:
            pytest.fail(f"the fault matrix needs a private PostgreSQL cluster in CI: {message}")
        pytest.skip(message)
    cluster = PgCluster(bin_dir)
    try:
        cluster.init().start()
        yield cluster
    finally:
        cluster.destroy()
