"""Helpers of the end-to-end tests: bounded polling, realm content, RPC
shortcuts, and a read-only look at the store the server processes write to."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import realm_service_pb2_grpc as sgrpc
from realm.v1 import resources_pb2 as pb
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

T = TypeVar("T")

# Generous bounds: they only stop a hung test; nothing asserts speed.
WAIT = 60.0
RPC_TIMEOUT = 20.0

TERMINAL = (pb.Job.STATE_SUCCEEDED, pb.Job.STATE_FAILED)

PERSON = ("https://example.com/person", "Person")
PET = ("https://example.com/pet", "Pet")
INDEX_CARD_TYPE = "https://cardstack.com/base/cards-grid/CardsGrid"


def card_type(kind: tuple[str, str]) -> str:
    return f"{kind[0]}/{kind[1]}"


def poll(
    fn: Callable[[], T], *, timeout: float = WAIT, what: str = "a condition", interval: float = 0.1
) -> T:
    """Call fn until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = min(0.02, interval)
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(delay)
        delay = min(delay * 2, interval)


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


# -- realm content --------------------------------------------------------------


def card(
    kind: tuple[str, str],
    attributes: dict[str, Any],
    links: dict[str, str] | None = None,
) -> bytes:
    """A JSON card adopting from `kind` (module, name)."""
    relationships = {name: {"links": {"self": target}} for name, target in (links or {}).items()}
    document = {
        "data": {
            "type": "card",
            "attributes": attributes,
            "relationships": relationships,
            "meta": {"adoptsFrom": {"module": kind[0], "name": kind[1]}},
        }
    }
    return json.dumps(document, indent=2).encode()


def bulk_cards(count: int, *, prefix: str = "cards") -> dict[str, bytes]:
    """`count` small Person cards under `prefix/`, each with a unique title."""
    return {
        f"{prefix}/card-{i:05d}.json": card(PERSON, {"name": f"Bulk person {i:05d}", "n": str(i)})
        for i in range(count)
    }


def files_pb(files: dict[str, bytes]) -> list[pb.FileContent]:
    return [pb.FileContent(path=path, content=content) for path, content in files.items()]


# -- RPC shortcuts ----------------------------------------------------------------


def create_realm(
    stub: sgrpc.RealmServiceStub, realm_id: str, files: dict[str, bytes], **kwargs: Any
) -> spb.CreateRealmResponse:
    request = spb.CreateRealmRequest(realm_id=realm_id, initial_files=files_pb(files), **kwargs)
    return stub.CreateRealm(request, timeout=RPC_TIMEOUT)  # type: ignore[no-any-return]


def get_job(stub: sgrpc.RealmServiceStub, job_id: str) -> pb.Job:
    return stub.GetJob(spb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT).job  # type: ignore[no-any-return]


def get_realm(stub: sgrpc.RealmServiceStub, realm_id: str) -> pb.Realm:
    return stub.GetRealm(spb.GetRealmRequest(realm_id=realm_id), timeout=RPC_TIMEOUT).realm  # type: ignore[no-any-return]


def realm_jobs(stub: sgrpc.RealmServiceStub, realm_id: str) -> list[pb.Job]:
    request = spb.ListJobsRequest(realm_id=realm_id, page_size=1000)
    return list(stub.ListJobs(request, timeout=RPC_TIMEOUT).jobs)


def list_files(stub: sgrpc.RealmServiceStub, realm_id: str) -> list[pb.RealmFile]:
    request = spb.ListRealmFilesRequest(realm_id=realm_id)
    return list(stub.ListRealmFiles(request, timeout=RPC_TIMEOUT).files)


def search_all(
    stub: sgrpc.RealmServiceStub,
    realm_id: str,
    *,
    card_type: str = "",
    text: str = "",
    page_size: int = 1000,
) -> list[pb.IndexEntry]:
    """Every matching entry, page by page (bounded: a repeated token fails)."""
    entries: list[pb.IndexEntry] = []
    token = ""
    seen: set[str] = set()
    for _ in range(10_000):
        page = stub.SearchRealm(
            spb.SearchRealmRequest(
                realm_id=realm_id,
                card_type=card_type,
                text=text,
                page_size=page_size,
                page_token=token,
            ),
            timeout=RPC_TIMEOUT,
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries
        assert token not in seen, f"page token {token!r} came twice"
        seen.add(token)
    raise AssertionError("search did not end after 10,000 pages")


def search_paths(stub: sgrpc.RealmServiceStub, realm_id: str, **kwargs: Any) -> list[str]:
    return [e.path for e in search_all(stub, realm_id, **kwargs)]


def watch_job(stub: sgrpc.RealmServiceStub, job_id: str, timeout: float = WAIT) -> list[pb.Job]:
    """Every WatchJob snapshot until the stream ends (it ends when the job is terminal)."""
    call = stub.WatchJob(spb.WatchJobRequest(job_id=job_id), timeout=timeout)
    return [message.job for message in call]


def wait_job(
    stub: sgrpc.RealmServiceStub,
    job_id: str,
    *,
    timeout: float = WAIT,
    tolerate_unavailable: bool = False,
) -> pb.Job:
    """Poll GetJob until the job is terminal; with `tolerate_unavailable`, a
    server that is down or restarting only delays the answer."""

    def terminal() -> pb.Job | None:
        try:
            job = get_job(stub, job_id)
        except grpc.RpcError as e:
            if tolerate_unavailable and e.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                return None
            raise
        return job if job.state in TERMINAL else None

    return poll(terminal, timeout=timeout, what=f"job {job_id} to end", interval=0.2)


def entry_key(entry: pb.IndexEntry) -> tuple[Any, ...]:
    """What an unchanged entry keeps across jobs."""
    return (
        entry.path,
        entry.sha256,
        entry.mtime.ToNanoseconds(),
        entry.size,
        entry.media_type,
        entry.card_type,
        entry.title,
        entry.search_text,
        tuple(entry.links),
        entry.error_message,
    )


def assert_index_whole(
    stub: sgrpc.RealmServiceStub, realm_id: str, expected: Sequence[str]
) -> None:
    """The realm's index holds exactly one entry per expected path, each
    matching its stored file, and the realm's stats agree with a search walk."""
    entries = search_all(stub, realm_id, page_size=500)
    paths = [e.path for e in entries]
    assert len(paths) == len(set(paths)), "duplicate entries in the index"
    assert sorted(paths) == sorted(expected)
    stored = {f.path: f for f in list_files(stub, realm_id)}
    for entry in entries:
        f = stored[entry.path]
        assert (entry.sha256, entry.size) == (f.sha256, f.size), entry.path
        assert entry.mtime.ToNanoseconds() == f.mtime.ToNanoseconds(), entry.path
    realm = get_realm(stub, realm_id)
    assert realm.state == pb.Realm.STATE_READY
    assert realm.stats.entries == len(entries)
    assert realm.stats.files == len(stored)
    assert realm.stats.cards == sum(1 for e in entries if e.card_type and not e.error_message)
    assert realm.stats.errors == sum(1 for e in entries if e.error_message)


# -- the store, read directly ---------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    outcome: str  # running | completed | failed | interrupted | expired
    worker: str


@contextmanager
def _engine(store_url: str) -> Iterator[Engine]:
    engine = create_engine(store_url, poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def job_attempts(store_url: str, job_id: str) -> list[Attempt]:
    """The recorded attempts of a job, oldest first."""
    with _engine(store_url) as engine, engine.connect() as conn:
        rows = conn.execute(
            text("SELECT outcome, worker FROM job_attempts WHERE job_id = :id ORDER BY id"),
            {"id": int(job_id)},
        )
        return [Attempt(outcome, worker) for outcome, worker in rows]


def counted_failures(store_url: str, job_id: str) -> int:
    """Attempts of the job that count toward its attempts cap."""
    with _engine(store_url) as engine, engine.connect() as conn:
        value = conn.execute(
            text("SELECT counted_failures FROM jobs WHERE id = :id"), {"id": int(job_id)}
        ).scalar_one()
        return int(value)


def stored_job_states(store_url: str, job_ids: Sequence[str]) -> dict[str, str]:
    """The stored state of each job (queued, running, succeeded, failed, merged)."""
    with _engine(store_url) as engine, engine.connect() as conn:
        rows = conn.execute(text("SELECT id, state FROM jobs"))
        states = {str(job_id): state for job_id, state in rows}
    return {job_id: states[job_id] for job_id in job_ids}


def stored_entry_rows(store_url: str, realm_id: str) -> int:
    """Index entry rows kept for a realm, in every generation (staged ones too)."""
    with _engine(store_url) as engine, engine.connect() as conn:
        value = conn.execute(
            text("SELECT count(*) FROM index_entries WHERE realm_id = :realm"),
            {"realm": realm_id},
        ).scalar_one()
        return int(value)
