"""The history of a fault run: every client call with its answer, every
injected fault, and what became of every process, as JSON lines.

Times are seconds on the driver's monotonic clock since the run began, the
same clock for the clients and the fault injector, so the checker can tell
which faults a call overlapped. The file is written as the run goes (a run
that hangs still leaves its history) and read back whole by the checker.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO


class Outcome(StrEnum):
    OK = "ok"
    # The server answered with a status that says nothing was done.
    FAILED = "failed"
    # No answer, or one that does not say whether the call took effect
    # (UNAVAILABLE, DEADLINE_EXCEEDED, a broken connection, INTERNAL...).
    AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class RunInfo:
    fault: str
    store: str
    seconds: float
    seed: int


@dataclass(frozen=True)
class Call:
    """One attempt of one client operation; retries share `op`."""

    op: int
    attempt: int
    client: int
    method: str
    realm: str
    t0: float
    t1: float
    outcome: Outcome
    code: str = ""
    detail: str = ""
    # What was asked: the effective priority (an unset one is USER, 10).
    priority: int | None = None
    path: str = ""
    # Write: the content's sha256. Read: what came back ("" when absent).
    sha256: str = ""
    request_id: str = ""
    content_changed: bool = False
    poison: bool = False
    # CreateRealm: the initial files, path -> sha256.
    files: dict[str, str] = field(default_factory=dict)
    # What the answer said of the job that answers the request.
    job_id: int | None = None
    job_kind: str = ""
    job_priority: int | None = None
    disposition: str = ""


@dataclass(frozen=True)
class FaultEvent:
    fault: str
    # inject | heal
    action: str
    t: float
    detail: str = ""


@dataclass(frozen=True)
class ProcessEnd:
    """A process's state when the faults had stopped and the jobs settled."""

    name: str
    role: str
    pid: int
    # The harness SIGKILLed it on purpose.
    killed: bool
    # None while it still runs.
    returncode: int | None
    stderr_tail: str = ""


@dataclass(frozen=True)
class ProcessStop:
    """How a process answered the final SIGTERM."""

    name: str
    role: str
    pid: int
    returncode: int | None
    stderr_tail: str = ""


@dataclass(frozen=True)
class LogTraceback:
    process: str
    role: str
    text: str


@dataclass(frozen=True)
class Settled:
    """The wait, after the faults, for every job to end."""

    all_terminal: bool
    seconds: float
    pending: int


Entry = RunInfo | Call | FaultEvent | ProcessEnd | ProcessStop | LogTraceback | Settled

_TYPES: dict[str, type[Entry]] = {
    "run": RunInfo,
    "call": Call,
    "fault": FaultEvent,
    "process-end": ProcessEnd,
    "process-stop": ProcessStop,
    "traceback": LogTraceback,
    "settled": Settled,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def to_json(entry: Entry) -> str:
    return json.dumps({"type": _NAMES[type(entry)], **dataclasses.asdict(entry)}, sort_keys=True)


def from_json(line: str) -> Entry:
    raw: dict[str, Any] = json.loads(line)
    cls = _TYPES[raw.pop("type")]
    if cls is Call:
        raw["outcome"] = Outcome(raw["outcome"])
    return cls(**raw)


class History:
    """Appends entries to a JSON-lines file, from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: TextIO = path.open("a", encoding="utf-8")
        self.entries: list[Entry] = []

    def add(self, entry: Entry) -> None:
        line = to_json(entry)
        with self._lock:
            self.entries.append(entry)
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_history(path: Path) -> list[Entry]:
    with path.open(encoding="utf-8") as f:
        return [from_json(line) for line in f if line.strip()]
