"""The quick fault matrix: one short run per (fault, store), each a real
server, two workers and three clients on loopback, checked by the history
checker. A failure prints the run's figures and every violation, with the
paths of its history and logs. `scripts/fault_matrix.py` runs the long one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import disk
from tests.faults.driver import Fault, FaultRun, RunConfig
from tests.faults.pgcluster import PgCluster

pytestmark = pytest.mark.faults

# A run: 8 s of workload with the fault a third of the way in, then up to
# 30 s for the jobs to end.
SECONDS = 8.0
SETTLE_SECONDS = 30.0

QUICK = [
    (Fault.NONE, "sqlite"),
    (Fault.SERVER_KILL, "sqlite"),
    (Fault.SERVER_KILL, "postgresql"),
    (Fault.WORKER_KILL, "sqlite"),
    (Fault.PG_STOP, "postgresql"),
    (Fault.PROXY_CUT, "sqlite"),
    (Fault.PROXY_STALL, "sqlite"),
    (Fault.DISK_FULL, "sqlite"),
    (Fault.POISON, "sqlite"),
    (Fault.POISON, "postgresql"),
]


@pytest.mark.parametrize(("fault", "store"), QUICK, ids=[f"{f}-{s}" for f, s in QUICK])
def test_fault_run_keeps_the_invariants(
    fault: Fault, store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if fault is Fault.DISK_FULL and (reason := disk.probe()) is not None:
        pytest.skip(f"disk-full needs a tmpfs for the SQLite store: {reason}")
    pg: PgCluster | None = request.getfixturevalue("pg_cluster") if store == "postgresql" else None
    config = RunConfig(fault, store, seconds=SECONDS, settle_seconds=SETTLE_SECONDS)
    with FaultRun(config, tmp_path, pg) as run:
        result = run.execute()
    print(result.report(limit=1000))
    assert result.ok, result.report()
