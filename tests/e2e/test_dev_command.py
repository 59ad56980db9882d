"""`realm-service dev`: a server and two workers as child processes; a realm
created through it gets indexed; SIGINT (to the process, or to its whole
process group as Ctrl-C in a terminal does) stops every child."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb

from tests.e2e.conftest import System, program
from tests.e2e.helpers import PERSON, card, card_type, create_realm, poll, search_paths, wait_job

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    start_ticks: int
    cmdline: str


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return raw.rsplit(")", 1)[1].split()


def children_of(parent: int) -> list[ProcInfo]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or int(fields[1]) != parent:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.append(ProcInfo(int(entry.name), int(fields[19]), cmdline))
    return found


def still_running(info: ProcInfo) -> bool:
    """True while that very process (not a later one with its pid) exists."""
    fields = _stat_fields(info.pid)
    return fields is not None and int(fields[19]) == info.start_ticks and fields[0] != "Z"


@pytest.mark.parametrize("target", ["process", "group"])
def test_dev_indexes_a_realm_and_sigint_stops_every_child(
    system: System, tmp_path: Path, target: str
) -> None:
    store = f"sqlite:///{tmp_path / 'dev.db'}"
    dev = system.start(
        "dev",
        [*program("realm-service", "realm_service"), "dev", "--workers", "2",
         "--listen", "127.0.0.1:0", "--store", store],
    )  # fmt: skip
    address = dev.wait_for_stdout(r"server on (127\.0\.0\.1:(\d+))").group(1)
    assert not address.endswith(":0")

    children = poll(
        lambda: (found := children_of(dev.pid)) and len(found) >= 3 and found,
        what="the server and two workers",
    )
    assert len(children) == 3, children
    commands = sorted(" ".join(c.cmdline.split()[1:4]) for c in children)
    assert sum("index_worker" in c for c in commands) == 2, commands
    assert sum("realm_service serve" in c for c in commands) == 1, commands

    with grpc.insecure_channel(address) as channel:
        stub = sgrpc.RealmServiceStub(channel)
        files = {f"people/p{i}.json": card(PERSON, {"name": f"Dev person {i}"}) for i in range(6)}
        job = create_realm(stub, "dev-realm", files).job
        done = wait_job(stub, job.job_id)
        assert done.state == pb.Job.STATE_SUCCEEDED, done
        assert search_paths(stub, "dev-realm", card_type=card_type(PERSON)) == sorted(files)

    if target == "process":
        os.kill(dev.pid, signal.SIGINT)
    else:
        os.killpg(dev.pid, signal.SIGINT)
    assert dev.wait(timeout=60) == 0
    poll(
        lambda: not any(still_running(c) for c in children),
        timeout=10,
        what="every child of realm-service dev to be gone",
    )
    assert "Traceback" not in dev.stderr()
