"""The clients of a fault run: threads calling the real gRPC API while faults
happen, logging every attempt and its answer to the history.

Each client owns its realms, so the calls on one path come from one thread,
one at a time, and the checker can order them. An operation is retried with
the same request (and the same request id, for CreateRealm) when its attempt
gets no answer or UNAVAILABLE/DEADLINE_EXCEEDED/ABORTED, until it succeeds,
gets a definite refusal, or runs out of attempts or time; every attempt is in
the history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb

from tests.faults.history import Call, History, Outcome

SYSTEM, USER = 0, 10
# Codes that say the server did nothing (or refused to): a definite answer.
DEFINITE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        # A transaction that lost to a concurrent one was rolled back.
        grpc.StatusCode.ABORTED,
    }
)
# RESOURCE_EXHAUSTED is the server's word for a full disk: worth another try
# once it has room, like the others.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
KINDS = {
    pb.JOB_KIND_FROM_SCRATCH_INDEX: "from-scratch",
    pb.JOB_KIND_INCREMENTAL_INDEX: "incremental",
}
PERSON = ("https://example.com/person", "Person")


@dataclass(frozen=True)
class WorkloadConfig:
    target: str
    seconds: float
    clients: int = 3
    seed: int = 0
    realm_prefix: str = "r"
    # Bounds of one run: operations per client, attempts per operation, and
    # how long one operation may keep retrying.
    max_ops: int = 400
    max_attempts: int = 40
    op_seconds: float = 25.0
    call_timeout: float = 5.0
    realms_per_client: int = 3
    initial_files: tuple[int, int] = (20, 80)
    paths_per_realm: int = 8
    poison: bool = False


def card(attributes: dict[str, Any]) -> bytes:
    document = {
        "data": {
            "type": "card",
            "attributes": attributes,
            "relationships": {},
            "meta": {"adoptsFrom": {"module": PERSON[0], "name": PERSON[1]}},
        }
    }
    return json.dumps(document, indent=2).encode()


def poison_card() -> bytes:
    # json.dumps writes the NUL as the escape \u0000: valid JSON, and a card,
    # whose title no PostgreSQL text column can hold.
    return card({"title": "bad \u0000 title", "name": "poison"})


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclass
class _RealmState:
    realm_id: str
    # Paths this client believes exist (acknowledged, not deleted since).
    present: set[str] = field(default_factory=set)


class _Ops:
    """Numbers operations across clients."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


@dataclass
class Figures:
    ops: int = 0
    calls: int = 0
    acknowledged: int = 0
    ambiguous_ops: int = 0
    refused_ops: int = 0


class Workload:
    """`clients` threads running operations for `seconds`."""

    def __init__(self, config: WorkloadConfig, history: History, clock: Callable[[], float]):
        self.config = config
        self.history = history
        self.clock = clock
        self._ops = _Ops()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._figures: list[Figures] = []
        self.errors: list[BaseException] = []

    def start(self) -> None:
        for i in range(self.config.clients):
            figures = Figures()
            self._figures.append(figures)
            thread = threading.Thread(
                target=self._run_client, args=(i, figures), name=f"client-{i}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """True when every client ended within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def figures(self) -> Figures:
        total = Figures()
        for f in self._figures:
            total.ops += f.ops
            total.calls += f.calls
            total.acknowledged += f.acknowledged
            total.ambiguous_ops += f.ambiguous_ops
            total.refused_ops += f.refused_ops
        return total

    def _run_client(self, index: int, figures: Figures) -> None:
        try:
            _Client(self, index, figures).run()
        except BaseException as exc:  # reported by the driver as a harness error
            self.errors.append(exc)


class _Client:
    def __init__(self, workload: Workload, index: int, figures: Figures) -> None:
        self.w = workload
        self.config = workload.config
        self.index = index
        self.figures = figures
        self.rng = random.Random(f"{self.config.seed}-{index}")
        self.realms: list[_RealmState] = []
        self.created = 0
        self.poison_pending = self.config.poison and index == 0

    def run(self) -> None:
        config = self.config
        deadline = self.w.clock() + config.seconds
        channel = grpc.insecure_channel(config.target)
        try:
            stub = sgrpc.RealmServiceStub(channel)
            for _ in range(config.max_ops):
                if self.w._stop.is_set() or self.w.clock() >= deadline:
                    return
                self.step(stub)
                time.sleep(self.rng.uniform(0.005, 0.03))
        finally:
            channel.close()

    def step(self, stub: sgrpc.RealmServiceStub) -> None:
        if len(self.realms) < 1 or (
            len(self.realms) < self.config.realms_per_client and self.rng.random() < 0.1
        ):
            self.create(stub)
            return
        realm = self.rng.choice(self.realms)
        if self.poison_pending:
            self.poison_pending = False
            self.write(stub, realm, "poison/nul.json", poison_card(), poison=True)
            return
        roll = self.rng.random()
        if roll < 0.5:
            path = f"cards/c-{self.rng.randrange(self.config.paths_per_realm)}.json"
            if realm.present and self.rng.random() < 0.2:
                path = self.rng.choice(sorted(realm.present))
            content = card({"title": f"{realm.realm_id} {path} {uuid.uuid4().hex[:8]}"})
            self.write(stub, realm, path, content)
        elif roll < 0.65 and realm.present:
            self.delete(stub, realm, self.rng.choice(sorted(realm.present)))
        elif roll < 0.85:
            self.reindex(stub, realm)
        elif realm.present:
            self.read(stub, realm, self.rng.choice(sorted(realm.present)))

    # -- operations -------------------------------------------------------

    def create(self, stub: sgrpc.RealmServiceStub) -> None:
        realm_id = f"{self.config.realm_prefix}-c{self.index}-{self.created}"
        self.created += 1
        low, high = self.config.initial_files
        files = {
            f"seed/s-{i:04d}.json": card({"title": f"{realm_id} seed {i}", "n": str(i)})
            for i in range(self.rng.randint(low, high))
        }
        priority = self.rng.choice([SYSTEM, USER, USER, 50])
        request_id = uuid.uuid4().hex
        request = spb.CreateRealmRequest(
            realm_id=realm_id,
            priority=priority,
            request_id=request_id,
            initial_files=[pb.FileContent(path=p, content=c) for p, c in files.items()],
        )
        base = Call(
            op=0,
            attempt=0,
            client=self.index,
            method="CreateRealm",
            realm=realm_id,
            t0=0,
            t1=0,
            outcome=Outcome.OK,
            priority=priority,
            request_id=request_id,
            files={p: sha256(c) for p, c in files.items()},
        )
        answer = self.call(base, lambda t: stub.CreateRealm(request, timeout=t))
        if isinstance(answer, spb.CreateRealmResponse):
            self.realms.append(_RealmState(realm_id, set(files)))

    def write(
        self,
        stub: sgrpc.RealmServiceStub,
        realm: _RealmState,
        path: str,
        content: bytes,
        *,
        poison: bool = False,
    ) -> None:
        priority = self.rng.choice([None, SYSTEM, USER, 30])
        request = spb.WriteRealmFileRequest(
            realm_id=realm.realm_id, path=path, content=content, priority=priority
        )
        base = self.base("WriteRealmFile", realm, priority, path=path, sha=sha256(content))
        base = _replace(base, poison=poison)
        answer = self.call(base, lambda t: stub.WriteRealmFile(request, timeout=t))
        # The poison card stays for the whole run: overwriting or deleting it
        # would end the fault early.
        if isinstance(answer, spb.WriteRealmFileResponse) and not poison:
            realm.present.add(path)

    def delete(self, stub: sgrpc.RealmServiceStub, realm: _RealmState, path: str) -> None:
        priority = self.rng.choice([None, SYSTEM, USER])
        request = spb.DeleteRealmFileRequest(realm_id=realm.realm_id, path=path, priority=priority)
        base = self.base("DeleteRealmFile", realm, priority, path=path)
        self.call(base, lambda t: stub.DeleteRealmFile(request, timeout=t))
        realm.present.discard(path)

    def reindex(self, stub: sgrpc.RealmServiceStub, realm: _RealmState) -> None:
        priority = self.rng.choice([SYSTEM, SYSTEM, USER, 60])
        changed = self.rng.random() < 0.3
        request = spb.ReindexRealmRequest(
            realm_id=realm.realm_id, priority=priority, content_changed=changed
        )
        base = _replace(self.base("ReindexRealm", realm, priority), content_changed=changed)
        self.call(base, lambda t: stub.ReindexRealm(request, timeout=t))

    def read(self, stub: sgrpc.RealmServiceStub, realm: _RealmState, path: str) -> None:
        request = spb.ReadRealmFileRequest(realm_id=realm.realm_id, path=path)
        base = self.base("ReadRealmFile", realm, None, path=path)
        self.call(base, lambda t: stub.ReadRealmFile(request, timeout=t))

    def base(
        self,
        method: str,
        realm: _RealmState,
        priority: int | None,
        *,
        path: str = "",
        sha: str = "",
    ) -> Call:
        effective = None if method == "ReadRealmFile" else (USER if priority is None else priority)
        return Call(
            op=0,
            attempt=0,
            client=self.index,
            method=method,
            realm=realm.realm_id,
            t0=0,
            t1=0,
            outcome=Outcome.OK,
            priority=effective,
            path=path,
            sha256=sha,
        )

    # -- one operation, with its retries ----------------------------------

    def call(self, base: Call, send: Callable[[float], Any]) -> Any:
        """Run the operation until answered; the answer, or None."""
        config = self.config
        op = self.w._ops.next()
        self.figures.ops += 1
        started = self.w.clock()
        delay = 0.05
        outcome = Outcome.FAILED
        for attempt in range(1, config.max_attempts + 1):
            t0 = self.w.clock()
            try:
                answer = send(config.call_timeout)
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                t1 = self.w.clock()
                outcome = Outcome.FAILED if code in DEFINITE else Outcome.AMBIGUOUS
                self.record(base, op, attempt, t0, t1, outcome, code.name, exc.details() or "")
                self.figures.calls += 1
                if code not in RETRYABLE or self.w.clock() - started > config.op_seconds:
                    break
                time.sleep(delay * self.rng.uniform(0.5, 1.0))
                delay = min(delay * 2, 1.0)
                continue
            t1 = self.w.clock()
            self.figures.calls += 1
            self.figures.acknowledged += 1
            self.record(base, op, attempt, t0, t1, Outcome.OK, "", "", answer)
            return answer
        if outcome is Outcome.AMBIGUOUS:
            self.figures.ambiguous_ops += 1
        else:
            self.figures.refused_ops += 1
        return None

    def record(
        self,
        base: Call,
        op: int,
        attempt: int,
        t0: float,
        t1: float,
        outcome: Outcome,
        code: str,
        detail: str,
        answer: Any = None,
    ) -> None:
        fields: dict[str, Any] = {}
        job: pb.Job | None = getattr(answer, "job", None) if answer is not None else None
        if job is not None and job.job_id:
            fields.update(
                job_id=int(job.job_id),
                job_kind=KINDS.get(job.kind, str(job.kind)),
                job_priority=job.priority,
            )
        disposition: pb.Disposition.ValueType = getattr(
            answer, "disposition", pb.DISPOSITION_UNSPECIFIED
        )
        if disposition:
            name = pb.Disposition.Name(disposition).removeprefix("DISPOSITION_")
            fields["disposition"] = name.lower().replace("_", "-")
        elif base.method == "CreateRealm" and outcome is Outcome.OK:
            fields["disposition"] = "inserted"
        if base.method == "ReadRealmFile" and isinstance(answer, spb.ReadRealmFileResponse):
            fields["sha256"] = sha256(answer.content)
        self.w.history.add(
            _replace(
                base,
                op=op,
                attempt=attempt,
                t0=round(t0, 4),
                t1=round(t1, 4),
                outcome=outcome,
                code=code,
                detail=detail[:300],
                **fields,
            )
        )


def _replace(call: Call, **changes: Any) -> Call:
    return dataclasses.replace(call, **changes)
