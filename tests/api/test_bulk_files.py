"""StreamRealmFiles and WriteRealmFiles: files in bulk, in path order, bound to
the reader's lease; many writes in one transaction and one job; the path list
of a job bounded (DESIGN.md section 6)."""

from __future__ import annotations

import hashlib

import grpc
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import LiveServer
from tests.api.helpers import (
    RPC_TIMEOUT,
    entry_for,
    get_job,
    rpc_error,
    stored_jobs,
)
from tests.api.worker_stream import StreamClient


def _create(live: LiveServer, realm_id: str, files: dict[str, bytes]) -> spb.CreateRealmResponse:
    return live.stub.CreateRealm(
        spb.CreateRealmRequest(
            realm_id=realm_id,
            initial_files=[pb.FileContent(path=p, content=c) for p, c in files.items()],
        ),
        timeout=RPC_TIMEOUT,
    )


def _index_first(live: LiveServer, stream: StreamClient, job_id: str) -> None:
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == job_id
    assert stream.complete(a.lease_id).accepted


def _files(messages: list[spb.StreamRealmFilesResponse]) -> dict[str, tuple[pb.RealmFile, bytes]]:
    """Whole files from a stream's messages, checking chunk order on the way."""
    whole: dict[str, tuple[pb.RealmFile, bytes]] = {}
    parts: list[bytes] = []
    for message in messages:
        for chunk in message.chunks:
            assert chunk.offset == sum(len(p) for p in parts), chunk.file.path
            parts.append(chunk.content)
            if chunk.last:
                whole[chunk.file.path] = (chunk.file, b"".join(parts))
                parts = []
    assert parts == [], "a file's last chunk is missing"
    return whole


def test_stream_sends_every_file_in_path_order_in_bounded_messages(live: LiveServer) -> None:
    files = {f"cards/{i:04}.json": f'{{"n": {i}}}'.encode() * 20 for i in range(700)}
    files["big.bin"] = bytes(range(256)) * 200  # 51,200 bytes: chunked at 4 KiB
    files["caf\u00e9.txt"] = b"accent"
    _create(live, "bulk", files)
    budget = 4096

    messages = list(
        live.stub.StreamRealmFiles(
            spb.StreamRealmFilesRequest(realm_id="bulk", max_message_bytes=budget),
            timeout=RPC_TIMEOUT,
        )
    )
    whole = _files(messages)
    every = {**files, "realm.json": b"", "index.json": b""}
    assert list(whole) == sorted(every)  # path order, each file once
    assert messages[0].total_files == len(every)
    assert all(m.total_files == 0 for m in messages[1:])
    for path, content in files.items():
        meta, got = whole[path]
        assert got == content, path
        assert meta.size == len(content)
        assert meta.sha256 == hashlib.sha256(content).hexdigest()
    # Many files a message, none over the budget; the big file in chunks.
    assert len(messages) < len(every) / 3
    assert all(sum(len(c.content) for c in m.chunks) <= budget for m in messages)
    big = [c for m in messages for c in m.chunks if c.file.path == "big.bin"]
    assert len(big) == -(-len(files["big.bin"]) // budget)
    assert [c.last for c in big] == [False] * (len(big) - 1) + [True]


def test_stream_of_named_paths_skips_absent_ones_and_resumes_after_a_path(
    live: LiveServer,
) -> None:
    files = {f"f{i}.txt": f"content {i}".encode() for i in range(10)}
    _create(live, "named", files)
    request = spb.StreamRealmFilesRequest(
        realm_id="named",
        # Unordered, repeated, one missing, one in NFD: the NFC file.
        paths=["f7.txt", "f2.txt", "missing.txt", "f2.txt", "f9.txt"],
    )
    messages = list(live.stub.StreamRealmFiles(request, timeout=RPC_TIMEOUT))
    whole = _files(messages)
    assert list(whole) == ["f2.txt", "f7.txt", "f9.txt"]
    assert whole["f7.txt"][1] == b"content 7"
    assert messages[0].total_files == 4  # at most: the named paths, once each

    resumed = list(
        live.stub.StreamRealmFiles(
            spb.StreamRealmFilesRequest(realm_id="named", after_path="f5.txt"),
            timeout=RPC_TIMEOUT,
        )
    )
    assert list(_files(resumed)) == [
        "f6.txt",
        "f7.txt",
        "f8.txt",
        "f9.txt",
        "index.json",
        "realm.json",
    ]


def test_stream_ends_when_the_readers_lease_stops_being_current(live: LiveServer) -> None:
    files = {f"f{i:04}.txt": b"x" * 2048 for i in range(1000)}  # 2 MB, beyond flow control
    created = _create(live, "leased", files)
    stream = StreamClient(live.stub)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == created.job.job_id

    reading = live.stub.StreamRealmFiles(
        spb.StreamRealmFilesRequest(realm_id="leased", lease_id=a.lease_id, max_message_bytes=4096),
        timeout=RPC_TIMEOUT,
    )
    first = next(reading)
    assert first.total_files == 1002 and first.chunks
    assert stream.complete(a.lease_id).accepted  # the lease ends
    error = rpc_error(lambda: list(reading))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert a.lease_id in (error.details() or "")
    assert "no longer the current lease" in (error.details() or "")
    stream.close()
    stream.wait_closed()


def test_a_file_written_while_a_from_scratch_job_streams_is_indexed_by_a_job_after_it(
    live: LiveServer,
) -> None:
    files = {f"f{i:04}.txt": b"old" for i in range(600)}
    created = _create(live, "race", files)
    stream = StreamClient(live.stub)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == created.job.job_id

    reading = live.stub.StreamRealmFiles(
        spb.StreamRealmFilesRequest(realm_id="race", lease_id=a.lease_id), timeout=RPC_TIMEOUT
    )
    streamed: dict[str, tuple[pb.RealmFile, bytes]] = {}
    first = next(reading)
    streamed.update(_files([first]))
    assert "f0000.txt" in streamed
    # The reader has f0000 already; it changes now.
    wrote = live.stub.WriteRealmFile(
        spb.WriteRealmFileRequest(realm_id="race", path="f0000.txt", content=b"new"),
        timeout=RPC_TIMEOUT,
    )
    assert wrote.disposition == pb.DISPOSITION_INSERTED
    assert wrote.job.kind == pb.JOB_KIND_INCREMENTAL_INDEX
    streamed.update(_files(list(reading)))
    assert len(streamed) == 602 and streamed["f0000.txt"][1] == b"old"
    entries = [entry_for(meta, search_text=content.decode()) for meta, content in streamed.values()]
    assert stream.complete(a.lease_id, entries).accepted

    # The incremental job runs after the from-scratch one and reads the new content.
    stream.credit(1)
    (b,) = stream.assignments(1)
    assert b.job.job_id == wrote.job.job_id
    assert [(c.path, c.deleted) for c in b.job.path_changes] == [("f0000.txt", False)]
    reread = _files(
        list(
            live.stub.StreamRealmFiles(
                spb.StreamRealmFilesRequest(
                    realm_id="race", lease_id=b.lease_id, paths=["f0000.txt"]
                ),
                timeout=RPC_TIMEOUT,
            )
        )
    )
    meta, content = reread["f0000.txt"]
    assert content == b"new"
    assert stream.complete(b.lease_id, [entry_for(meta, search_text="new")]).accepted
    found = live.stub.SearchRealm(
        spb.SearchRealmRequest(realm_id="race", text="new"), timeout=RPC_TIMEOUT
    )
    assert [e.path for e in found.entries] == ["f0000.txt"]
    stream.close()
    stream.wait_closed()


def test_bulk_write_stores_everything_in_one_transaction_and_queues_one_job(
    live: LiveServer,
) -> None:
    created = _create(live, "bw", {"old.txt": b"old", "keep.txt": b"keep"})
    stream = StreamClient(live.stub)
    stream.settings()
    _index_first(live, stream, created.job.job_id)

    reply = live.stub.WriteRealmFiles(
        spb.WriteRealmFilesRequest(
            realm_id="bw",
            files=[
                pb.FileContent(path="b.txt", content=b"bee"),
                pb.FileContent(path="keep.txt", content=b"replaced"),
                pb.FileContent(path="cafe\u0301.txt", content=b"nfd"),
            ],
            deleted_paths=["old.txt"],
            priority=30,
        ),
        timeout=RPC_TIMEOUT,
    )
    assert [f.path for f in reply.files] == ["b.txt", "keep.txt", "caf\u00e9.txt"]
    assert reply.files[1].size == len(b"replaced")
    assert reply.deleted == 1
    assert reply.disposition == pb.DISPOSITION_INSERTED
    job = reply.job
    assert (job.kind, job.priority, job.state) == (
        pb.JOB_KIND_INCREMENTAL_INDEX,
        30,
        pb.Job.STATE_QUEUED,
    )
    assert {(c.path, c.deleted) for c in job.path_changes} == {
        ("b.txt", False),
        ("keep.txt", False),
        ("caf\u00e9.txt", False),
        ("old.txt", True),
    }
    assert job.path_change_count == 4
    realm = live.stub.GetRealm(spb.GetRealmRequest(realm_id="bw"), timeout=RPC_TIMEOUT).realm
    assert realm.stats.files == 5  # realm.json, index.json, keep, b, café
    listed = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="bw"))
    assert sorted(f.path for f in listed.files) == sorted(
        ["realm.json", "index.json", "keep.txt", "b.txt", "caf\u00e9.txt"]
    )
    read = live.stub.ReadRealmFile(spb.ReadRealmFileRequest(realm_id="bw", path="keep.txt"))
    assert read.content == b"replaced"

    # A second bulk write merges into the queued job.
    again = live.stub.WriteRealmFiles(
        spb.WriteRealmFilesRequest(realm_id="bw", files=[pb.FileContent(path="c.txt")]),
        timeout=RPC_TIMEOUT,
    )
    assert again.disposition == pb.DISPOSITION_MERGED
    assert again.job.job_id == job.job_id
    assert again.job.path_change_count == 5
    queued = [j for j in stored_jobs(live.srv.db, "bw") if j.state == "queued"]
    assert len(queued) == 1
    stream.close()
    stream.wait_closed()


def test_a_refused_bulk_write_stores_nothing(live: LiveServer) -> None:
    created = _create(live, "atomic", {"a.txt": b"a"})
    error = rpc_error(
        lambda: live.stub.WriteRealmFiles(
            spb.WriteRealmFilesRequest(
                realm_id="atomic",
                files=[pb.FileContent(path="new.txt", content=b"n")],
                deleted_paths=["a.txt", "missing.txt"],
            ),
            timeout=RPC_TIMEOUT,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "missing.txt" in (error.details() or "")
    listed = live.stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="atomic"))
    assert sorted(f.path for f in listed.files) == ["a.txt", "index.json", "realm.json"]
    assert [j.job_id for j in stored_jobs(live.srv.db, "atomic")] == [int(created.job.job_id)]


def test_a_job_lists_at_most_1000_paths_then_becomes_a_from_scratch_job(
    live: LiveServer,
) -> None:
    created = _create(live, "bound", {})
    stream = StreamClient(live.stub)
    stream.settings()
    _index_first(live, stream, created.job.job_id)

    first = live.stub.WriteRealmFiles(
        spb.WriteRealmFilesRequest(
            realm_id="bound", files=[pb.FileContent(path=f"a{i:04}.txt") for i in range(900)]
        ),
        timeout=RPC_TIMEOUT,
    )
    inc = first.job
    assert inc.kind == pb.JOB_KIND_INCREMENTAL_INDEX
    assert inc.path_change_count == 900
    assert len(inc.path_changes) == 100  # answers never carry the whole list
    assert [c.path for c in inc.path_changes] == [f"a{i:04}.txt" for i in range(100)]

    # 900 + 200 paths: the realm is indexed from scratch instead.
    more = live.stub.WriteRealmFiles(
        spb.WriteRealmFilesRequest(
            realm_id="bound", files=[pb.FileContent(path=f"b{i:04}.txt") for i in range(200)]
        ),
        timeout=RPC_TIMEOUT,
    )
    scratch = more.job
    assert scratch.kind == pb.JOB_KIND_FROM_SCRATCH_INDEX
    assert more.disposition == pb.DISPOSITION_INSERTED
    assert scratch.path_change_count == 0
    # The incremental job folded into it: reads of it follow the new job.
    folded = get_job(live.stub, inc.job_id)
    assert folded.state == pb.Job.STATE_QUEUED
    queued = [j for j in stored_jobs(live.srv.db, "bound") if j.state == "queued"]
    assert [j.job_id for j in queued] == [int(scratch.job_id)]
    stream.credit(1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == scratch.job_id
    assert stream.complete(a.lease_id).accepted
    assert get_job(live.stub, inc.job_id).state == pb.Job.STATE_SUCCEEDED

    # One request alone past the bound: straight to a from-scratch job.
    big = live.stub.WriteRealmFiles(
        spb.WriteRealmFilesRequest(
            realm_id="bound", files=[pb.FileContent(path=f"c{i:04}.txt") for i in range(1001)]
        ),
        timeout=RPC_TIMEOUT,
    )
    assert big.job.kind == pb.JOB_KIND_FROM_SCRATCH_INDEX
    stream.close()
    stream.wait_closed()


def test_a_succeeded_job_reports_all_its_work_done(live: LiveServer) -> None:
    created = _create(live, "done", {f"f{i}.txt": b"x" for i in range(10)})
    stream = StreamClient(live.stub)
    stream.settings()
    stream.credit(1)
    (a,) = stream.assignments(1)
    stream.heartbeat({a.lease_id: (3, 12)})
    stream.acks()
    assert get_job(live.stub, created.job.job_id).progress.done == 3
    assert stream.complete(a.lease_id).accepted
    progress = get_job(live.stub, created.job.job_id).progress
    assert (progress.done, progress.total) == (12, 12)

    # A worker's result may carry the final progress: the job shows it whole.
    again = live.stub.ReindexRealm(spb.ReindexRealmRequest(realm_id="done"), timeout=RPC_TIMEOUT)
    stream.credit(1)
    (b,) = stream.assignments(1)
    assert b.job.job_id == again.job.job_id
    stream.send(
        spb.ClaimJobsRequest(
            results=spb.JobResults(
                results=[
                    spb.JobResult(
                        lease_id=b.lease_id,
                        outcome=spb.JobResult.OUTCOME_SUCCEEDED,
                        progress=pb.JobProgress(done=11, total=12),
                    )
                ]
            )
        )
    )
    (ack,) = stream.acks()
    assert ack.accepted
    progress = get_job(live.stub, again.job.job_id).progress
    assert (progress.done, progress.total) == (12, 12)
    stream.close()
    stream.wait_closed()


def test_bulk_rpcs_work_from_buf_curl_with_reflection(live: LiveServer) -> None:
    """As a person would debug them: JSON in, JSON out, no proto files."""
    import base64
    import json
    import subprocess

    from tests.api.test_reflection import _buf

    _create(live, "curl", {})
    base = [_buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    url = f"http://{live.address}/realm.v1.RealmService"
    body = {
        "realm_id": "curl",
        "files": [
            {"path": "a.txt", "content": base64.b64encode(b"alpha").decode()},
            {"path": "b.txt", "content": base64.b64encode(b"beta").decode()},
        ],
    }
    wrote = subprocess.run(
        [*base, "-d", json.dumps(body), f"{url}/WriteRealmFiles"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrote.returncode == 0, wrote.stderr
    answer = json.loads(wrote.stdout)
    assert [f["path"] for f in answer["files"]] == ["a.txt", "b.txt"]
    assert answer["disposition"] in ("DISPOSITION_INSERTED", "DISPOSITION_MERGED")

    streamed = subprocess.run(
        [*base, "-d", json.dumps({"realm_id": "curl", "paths": ["b.txt", "a.txt"]}),
         f"{url}/StreamRealmFiles"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    decoder, text, messages = json.JSONDecoder(), streamed.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    chunks = [c for m in messages for c in m.get("chunks", [])]
    assert [(c["file"]["path"], base64.b64decode(c["content"])) for c in chunks] == [
        ("a.txt", b"alpha"),
        ("b.txt", b"beta"),
    ]
    assert messages[0]["totalFiles"] == "2"
