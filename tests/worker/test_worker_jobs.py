"""Index jobs: what a from-scratch or incremental job reads, uploads and reports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

import pytest
from fake_realm_server import WAIT, FakeRealmService, FakeStream, assignment, running
from realm.v1 import realm_service_pb2 as pb
from realm.v1 import resources_pb2 as res

from index_worker.indexer import IndexEntry
from index_worker.jobs import JobLimits, execute_job
from index_worker.model import (
    Assignment,
    FileBatch,
    FileInfo,
    JobKind,
    JobOutcome,
    Outcome,
    PathChange,
    Progress,
)

pytestmark = pytest.mark.timeout(15)


def card_json(title: str, module: str = "./pet", name: str = "Pet") -> bytes:
    return json.dumps(
        {
            "data": {
                "type": "card",
                "attributes": {"title": title},
                "relationships": {"owner": {"links": {"self": "../Person/1"}}},
                "meta": {"adoptsFrom": {"module": module, "name": name}},
            }
        }
    ).encode()


REALM = {
    ".gitignore": b"*.log\nprivate/\n!keep.log\n",
    "realm.json": b'{"name": "Pets"}',
    "index.json": card_json("Home", "https://x/base/cards-grid", "CardsGrid"),
    "Pet/mango.json": card_json("Mango"),
    "Pet/ringo.json": card_json("Ringo"),
    "Pet/broken.json": b'{"data": {"type": "card", "attributes": {}}}',
    "notes.txt": b"feeding schedule",
    "debug.log": b"noise",
    "keep.log": b"kept on purpose",
    "private/secret.json": b"{}",
    "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00",
}
INDEXED = sorted(set(REALM) - {".gitignore", "debug.log", "private/secret.json"})


async def collect(
    stream: FakeStream, lease_id: str
) -> tuple[list[pb.IndexEntryBatch], pb.JobResult]:
    """Every entry batch of the lease, and its result."""
    async with asyncio.timeout(WAIT):
        while True:
            message = await stream.next("results")
            found = [r for r in message.results.results if r.lease_id == lease_id]
            if found:
                break
    batches = [r.entries for r in stream.of_kind("entries") if r.entries.lease_id == lease_id]
    return batches, found[0]


def run(coroutine_factory: object) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(10):
            await coroutine_factory()  # type: ignore[operator]

    asyncio.run(bounded())


def test_from_scratch_uploads_every_unignored_file_in_bounded_batches() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"pets": dict(REALM)})
        async with running(service, batch_size=3):
            stream = await service.next_stream(0)
            await stream.next("credit")
            job = assignment("pets")
            await stream.assign(job)
            batches, result = await collect(stream, job.lease_id)

            assert result.outcome == pb.JobResult.OUTCOME_SUCCEEDED
            assert all(0 < len(b.entries) <= 3 for b in batches)
            assert len(batches) == -(-len(INDEXED) // 3)
            entries = {e.path: e for b in batches for e in b.entries}
            assert [e.path for b in batches for e in b.entries] == INDEXED  # path order
            assert result.entries_uploaded == len(INDEXED)
            # Every file visited (ignored ones too): the job's final progress.
            assert (result.progress.done, result.progress.total) == (len(REALM), len(REALM))
            # The result comes after the last batch, on the same stream.
            kinds = stream.kinds()
            assert kinds.index("results") > max(i for i, k in enumerate(kinds) if k == "entries")

            mango = entries["Pet/mango.json"]
            assert (mango.card_type, mango.title) == ("./pet/Pet", "Mango")
            assert list(mango.links) == ["../Person/1"]
            assert mango.media_type == "application/vnd.card+json"
            assert mango.mtime.seconds > 0
            assert entries["index.json"].card_type == "https://x/base/cards-grid/CardsGrid"
            assert entries["realm.json"].media_type == "application/json"
            assert "adoptsFrom" in entries["Pet/broken.json"].error_message
            assert entries["notes.txt"].search_text == "feeding schedule"
            assert entries["logo.png"].search_text == ""
            # The file RPCs carry the worker's token too.
            assert service.file_metadata
            assert all(m["authorization"] == "Bearer worker-token" for m in service.file_metadata)
            # .gitignore first, then every file in one stream, in path order.
            read = [path for rpc, _, path in service.file_calls if rpc == "ReadRealmFile"]
            assert read == [".gitignore"]
            streams = [c for c in service.file_calls if c[0] == "StreamRealmFiles"]
            assert len(streams) == 1
            streamed = [path for rpc, _, path in service.file_calls if rpc == "StreamedFile"]
            assert streamed == sorted(REALM)

    run(scenario)


def test_incremental_sends_deleted_paths_and_reindexes_changed_files() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"pets": dict(REALM)})
        changes = (
            ("Pet/gone.json", True),
            ("Pet/mango.json", False),
            ("Pet/vanished.json", False),  # changed, but deleted again before the read
            ("debug.log", False),  # now ignored
        )
        async with running(service):
            stream = await service.next_stream(0)
            await stream.next("credit")
            job = assignment("pets", kind=res.JOB_KIND_INCREMENTAL_INDEX, changes=changes)
            await stream.assign(job)
            batches, result = await collect(stream, job.lease_id)

            assert result.outcome == pb.JobResult.OUTCOME_SUCCEEDED
            assert result.entries_uploaded == 1
            deleted = sorted(p for b in batches for p in b.deleted_paths)
            assert deleted == ["Pet/gone.json", "Pet/vanished.json", "debug.log"]
            assert [e.path for b in batches for e in b.entries] == ["Pet/mango.json"]
            # One call: a stream of .gitignore (it sorts first) and the changed
            # paths tells which still exist (a missing realm is NOT_FOUND).
            assert [c[0] for c in service.file_calls if c[0] != "StreamedFile"] == [
                "StreamRealmFiles"
            ]
            streamed = [path for rpc, _, path in service.file_calls if rpc == "StreamedFile"]
            assert streamed == [".gitignore", "Pet/mango.json", "debug.log"]
            assert (result.progress.done, result.progress.total) == (4, 4)

    run(scenario)


def test_a_path_deleted_then_written_again_is_indexed_not_deleted() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"pets": dict(REALM)})
        # Merged changes say "deleted" (a delete wins), but the file exists now.
        changes = (("Pet/mango.json", True), ("Pet/gone.json", True))
        async with running(service):
            stream = await service.next_stream(0)
            await stream.next("credit")
            job = assignment("pets", kind=res.JOB_KIND_INCREMENTAL_INDEX, changes=changes)
            await stream.assign(job)
            batches, result = await collect(stream, job.lease_id)

            assert result.outcome == pb.JobResult.OUTCOME_SUCCEEDED
            assert [e.path for b in batches for e in b.entries] == ["Pet/mango.json"]
            assert sorted(p for b in batches for p in b.deleted_paths) == ["Pet/gone.json"]

    run(scenario)


def test_incremental_with_a_new_gitignore_decides_every_file_again() -> None:
    async def scenario() -> None:
        realm = {".gitignore": b"Pet/\n", "Pet/a.json": card_json("A"), "notes.txt": b"n"}
        service = FakeRealmService(realms={"r": realm})
        async with running(service):
            stream = await service.next_stream(0)
            await stream.next("credit")
            job = assignment(
                "r", kind=res.JOB_KIND_INCREMENTAL_INDEX, changes=((".gitignore", False),)
            )
            await stream.assign(job)
            batches, result = await collect(stream, job.lease_id)
            assert [p for b in batches for p in b.deleted_paths] == ["Pet/a.json"]
            assert [e.path for b in batches for e in b.entries] == ["notes.txt"]
            assert result.entries_uploaded == 1

    run(scenario)


def test_job_for_a_realm_that_is_gone_fails_permanently() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={})
        async with running(service):
            stream = await service.next_stream(0)
            await stream.next("credit")
            job = assignment("deleted-realm")
            await stream.assign(job)
            _, result = await collect(stream, job.lease_id)
            assert result.outcome == pb.JobResult.OUTCOME_FAILED_PERMANENTLY
            assert "deleted-realm" in result.error_message
            assert (await stream.next("credit")).credit.credits == 1

    run(scenario)


def test_noop_mode_succeeds_without_reading_anything() -> None:
    async def scenario() -> None:
        service = FakeRealmService(realms={"pets": dict(REALM)})
        async with running(service, noop_for_benchmarks=True):
            stream = await service.next_stream(0)
            await stream.next("credit")
            jobs = [assignment("pets"), assignment("pets")]
            await stream.assign(*jobs)
            message = await stream.next("results")
            # Jobs finishing together share one JobResults and one CreditGrant.
            results = message.results.results
            assert [r.lease_id for r in results] == [j.lease_id for j in jobs]
            assert all(r.outcome == pb.JobResult.OUTCOME_SUCCEEDED for r in results)
            assert all(r.entries_uploaded == 0 for r in results)
            assert (await stream.next("credit")).credit.credits == 2
            assert service.file_calls == []
            assert stream.of_kind("entries") == []

    run(scenario)


class MemoryFiles:
    """RealmFiles over a dict, for job logic without a server."""

    def __init__(self, files: dict[str, bytes], fail_reads: bool = False) -> None:
        self.files = files
        self.fail_reads = fail_reads

    async def list_files(self, realm_id: str) -> list[FileInfo]:
        return [FileInfo(p, None, len(c), "") for p, c in sorted(self.files.items())]

    async def read_file(self, realm_id: str, path: str) -> tuple[FileInfo, bytes] | None:
        if self.fail_reads:
            from index_worker.model import FileAccessError

            raise FileAccessError(f"ReadRealmFile({realm_id}, {path}): UNAVAILABLE: down")
        content = self.files.get(path)
        return None if content is None else (FileInfo(path, None, len(content), ""), content)

    async def stream_files(
        self, realm_id: str, paths: Sequence[str] | None = None
    ) -> AsyncIterator[FileBatch]:
        if self.fail_reads:
            from index_worker.model import FileAccessError

            raise FileAccessError(f"StreamRealmFiles({realm_id}): PERMISSION_DENIED: no")
        names = sorted(self.files if paths is None else set(paths) & set(self.files))
        yield FileBatch([], total=len(names))
        for start in range(0, len(names), 3):  # three files a message
            yield FileBatch(
                [
                    (FileInfo(p, None, len(self.files[p]), ""), self.files[p])
                    for p in names[start : start + 3]
                ]
            )


def test_batches_are_also_bounded_in_bytes() -> None:
    files = {f"{i:03}.txt": b"x" * 1000 for i in range(20)}
    uploads: list[Sequence[IndexEntry]] = []

    async def upload(entries: Sequence[IndexEntry], deleted: Sequence[str]) -> None:
        uploads.append(list(entries))

    job = Assignment("lease", "1", "r", JobKind.FROM_SCRATCH, 10)
    limits = JobLimits(batch_size=500, batch_max_bytes=4000)
    progress = Progress()
    outcome = asyncio.run(execute_job(job, MemoryFiles(files), upload, progress, limits))
    assert outcome.outcome is Outcome.SUCCEEDED
    assert outcome.entries_uploaded == 20
    assert all(1 <= len(batch) <= 3 for batch in uploads)
    assert [e.path for batch in uploads for e in batch] == sorted(files)
    assert (progress.done, progress.total) == (20, 20)


def test_failing_reads_fail_the_attempt_retryably() -> None:
    async def upload(entries: Sequence[IndexEntry], deleted: Sequence[str]) -> None:
        raise AssertionError("nothing to upload")

    job = Assignment("lease", "1", "r", JobKind.FROM_SCRATCH, 10)
    files = MemoryFiles({"a.txt": b"a"}, fail_reads=True)
    outcome = asyncio.run(execute_job(job, files, upload, Progress(), JobLimits()))
    assert outcome.outcome is Outcome.FAILED
    assert "UNAVAILABLE" in outcome.error_message


def test_unknown_job_kind_fails_without_touching_files() -> None:
    async def upload(entries: Sequence[IndexEntry], deleted: Sequence[str]) -> None:
        raise AssertionError("nothing to upload")

    job = Assignment("lease", "1", "r", None, 10)
    outcome = asyncio.run(execute_job(job, MemoryFiles({}), upload, Progress(), JobLimits()))
    assert outcome.outcome is Outcome.FAILED
    assert "kind" in outcome.error_message


def _run_incremental(
    files: dict[str, bytes], changes: list[tuple[str, bool]]
) -> tuple[JobOutcome, list[str], list[str]]:
    entries: list[str] = []
    deleted: list[str] = []

    async def upload(batch: Sequence[IndexEntry], gone: Sequence[str]) -> None:
        entries.extend(e.path for e in batch)
        deleted.extend(gone)

    job = Assignment(
        "lease",
        "1",
        "r",
        JobKind.INCREMENTAL,
        10,
        path_changes=tuple(PathChange(p, d) for p, d in changes),
    )
    outcome = asyncio.run(execute_job(job, MemoryFiles(files), upload, Progress(), JobLimits()))
    return outcome, sorted(entries), sorted(deleted)


def test_incremental_with_a_path_sorting_before_gitignore_still_applies_it() -> None:
    files = {".gitignore": b"-*\n", "-early.txt": b"x", "b.txt": b"b"}
    outcome, entries, deleted = _run_incremental(files, [("-early.txt", False), ("b.txt", False)])
    assert outcome.outcome is Outcome.SUCCEEDED
    assert entries == ["b.txt"]
    assert deleted == ["-early.txt"]  # ignored: its entry goes


def test_a_changed_gitignore_decides_every_file_again() -> None:
    files = {".gitignore": b"*.log\n", "a.txt": b"a", "x.log": b"x", "sub/y.log": b"y"}
    outcome, entries, deleted = _run_incremental(files, [(".gitignore", False)])
    assert outcome.outcome is Outcome.SUCCEEDED
    assert entries == ["a.txt"]
    assert deleted == ["sub/y.log", "x.log"]
    assert outcome.files_done == 4


@pytest.mark.parametrize(
    "changes",
    [
        [("-early.txt", False), ("b.txt", False)],  # reads .gitignore first
        [("b.txt", False), ("gone.txt", True), ("c.txt", False)],  # streams the list
    ],
)
def test_an_incremental_job_with_its_files_reads_nothing_else(
    changes: list[tuple[str, bool]],
) -> None:
    """With the files in the assignment, the job needs no read; it ends as the
    same job reading them does."""
    files = {".gitignore": b"-*\n", "-early.txt": b"x", "b.txt": b"b", "c.txt": b"c"}
    paths = {p for p, _ in changes} | {".gitignore"}
    included = tuple(
        (FileInfo(p, None, len(c), ""), c) for p, c in sorted(files.items()) if p in paths
    )
    uploads: list[tuple[list[str], list[str]]] = []

    async def upload(batch: Sequence[IndexEntry], gone: Sequence[str]) -> None:
        uploads.append((sorted(e.path for e in batch), sorted(gone)))

    job = Assignment(
        "lease",
        "1",
        "r",
        JobKind.INCREMENTAL,
        10,
        path_changes=tuple(PathChange(p, d) for p, d in changes),
        files=included,
    )
    unread = MemoryFiles(files, fail_reads=True)  # any read fails the job
    outcome = asyncio.run(execute_job(job, unread, upload, Progress(), JobLimits()))
    assert outcome.outcome is Outcome.SUCCEEDED, outcome.error_message
    reading, entries, deleted = _run_incremental(files, changes)
    assert outcome.entries_uploaded == reading.entries_uploaded
    assert sorted(p for batch, _ in uploads for p in batch) == entries
    assert sorted(p for _, gone in uploads for p in gone) == deleted
    assert outcome.files_done == reading.files_done


def test_files_an_assignment_did_not_bring_are_read() -> None:
    files = {".gitignore": b"", "a.txt": b"a", "b.txt": b"b"}
    job = Assignment(
        "lease",
        "1",
        "r",
        JobKind.INCREMENTAL,
        10,
        path_changes=(PathChange(".gitignore", False),),  # decides every file
        files=((FileInfo(".gitignore", None, 0, ""), b""),),
    )
    entries: list[str] = []

    async def upload(batch: Sequence[IndexEntry], gone: Sequence[str]) -> None:
        entries.extend(e.path for e in batch)

    outcome = asyncio.run(execute_job(job, MemoryFiles(files), upload, Progress(), JobLimits()))
    assert outcome.outcome is Outcome.SUCCEEDED
    assert sorted(entries) == ["a.txt", "b.txt"]


def test_files_sent_with_a_job_are_used_only_when_all_whole() -> None:
    from realm.v1 import resources_pb2 as res_pb

    from index_worker.convert import assignment_from_proto

    def chunk(path: str, content: bytes, offset: int = 0, last: bool = True) -> pb.FileChunk:
        return pb.FileChunk(
            file=res_pb.RealmFile(path=path, size=len(content)),
            offset=offset,
            content=content,
            last=last,
        )

    job = res_pb.Job(job_id="7", realm_id="r", kind=res_pb.JOB_KIND_INCREMENTAL_INDEX)
    whole = pb.JobAssignment(job=job, lease_id="l", files_included=True, files=[chunk("a", b"A")])
    assert [(f.path, c) for f, c in assignment_from_proto(whole).files or ()] == [("a", b"A")]
    none = pb.JobAssignment(job=job, lease_id="l", files_included=True)
    assert assignment_from_proto(none).files == ()  # nothing of its list exists
    part = pb.JobAssignment(
        job=job, lease_id="l", files_included=True, files=[chunk("a", b"A", last=False)]
    )
    assert assignment_from_proto(part).files is None  # read, not taken for deleted
    assert assignment_from_proto(pb.JobAssignment(job=job, lease_id="l")).files is None


def test_a_jobs_last_few_entries_go_with_its_result_when_the_server_takes_them() -> None:
    uploads: list[tuple[list[str], list[str]]] = []

    async def upload(entries: Sequence[IndexEntry], deleted: Sequence[str]) -> None:
        uploads.append(([e.path for e in entries], list(deleted)))

    job = Assignment(
        "lease",
        "1",
        "r",
        JobKind.INCREMENTAL,
        10,
        path_changes=(PathChange("a.txt", False), PathChange("gone.txt", True)),
    )
    files = MemoryFiles({"a.txt": b"a"})
    taken = asyncio.run(
        execute_job(job, files, upload, Progress(), JobLimits(), result_entries=True)
    )
    assert taken.outcome is Outcome.SUCCEEDED and uploads == []
    assert [e.path for e in taken.entries] == ["a.txt"] and taken.deleted == ("gone.txt",)
    assert taken.entries_uploaded == 1
    # A server that does not take them: an upload, as before.
    sent = asyncio.run(execute_job(job, files, upload, Progress(), JobLimits()))
    assert uploads == [(["a.txt"], ["gone.txt"])]
    assert (sent.entries, sent.deleted, sent.entries_uploaded) == ((), (), 1)


def test_many_last_entries_are_uploaded_not_sent_with_the_result() -> None:
    files = {f"{i:03}.txt": b"x" * 900 for i in range(120)}  # > 64 KiB of entries
    uploaded: list[int] = []

    async def upload(entries: Sequence[IndexEntry], deleted: Sequence[str]) -> None:
        uploaded.append(len(entries))

    job = Assignment("lease", "1", "r", JobKind.FROM_SCRATCH, 10)
    limits = JobLimits(batch_size=500, batch_max_bytes=1 << 20)
    outcome = asyncio.run(
        execute_job(job, MemoryFiles(files), upload, Progress(), limits, result_entries=True)
    )
    assert outcome.outcome is Outcome.SUCCEEDED
    assert outcome.entries == () and sum(uploaded) == 120 == outcome.entries_uploaded
