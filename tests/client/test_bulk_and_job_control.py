"""RealmClient's bulk-file and job-control methods over grpc_testing: the exact
request, metadata and deadline of each, and what it makes of the answer
(StreamRealmFiles' chunks put back into whole files)."""

from __future__ import annotations

import re
import threading

import grpc
import pytest
import realm_client
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realm_client import StreamedFile

from tests.client.scripted import Scripted, answer, fail

HEX32 = re.compile("[0-9a-f]{32}")


def meta(path: str, size: int) -> res.RealmFile:
    return res.RealmFile(path=path, size=size, sha256="ab" * 32)


def chunk(path: str, size: int, offset: int, content: bytes, last: bool) -> rs.FileChunk:
    return rs.FileChunk(file=meta(path, size), offset=offset, content=content, last=last)


# StreamRealmFiles.


def test_stream_realm_files_puts_chunked_files_back_together(scripted: Scripted) -> None:
    call = scripted.start(lambda c: list(c.stream_realm_files("demo", ["b.bin", "a.txt"], "L-1")))
    metadata, request, stream = scripted.stream("StreamRealmFiles")
    # Two whole files in one message, then one file split over three.
    stream.send_response(
        rs.StreamRealmFilesResponse(
            total_files=3,
            chunks=[chunk("a.txt", 2, 0, b"hi", True), chunk("b.bin", 7, 0, b"abc", False)],
        )
    )
    stream.send_response(rs.StreamRealmFilesResponse(chunks=[chunk("b.bin", 7, 3, b"de", False)]))
    stream.send_response(
        rs.StreamRealmFilesResponse(
            chunks=[chunk("b.bin", 7, 5, b"fg", True), chunk("c", 0, 0, b"", True)]
        )
    )
    stream.terminate((), grpc.StatusCode.OK, "")

    files = call.result(5)
    assert files == [
        StreamedFile("a.txt", meta("a.txt", 2), b"hi"),
        StreamedFile("b.bin", meta("b.bin", 7), b"abcdefg"),
        StreamedFile("c", meta("c", 0), b""),
    ]
    assert request == rs.StreamRealmFilesRequest(
        realm_id="demo", lease_id="L-1", paths=["b.bin", "a.txt"]
    )
    assert metadata["authorization"] == "Bearer s3cret"
    assert HEX32.fullmatch(metadata[realm_client.REQUEST_ID_KEY])
    assert scripted.channel.timeouts("StreamRealmFiles") == [7.5]


def test_stream_realm_files_defaults_and_options(scripted: Scripted) -> None:
    call = scripted.start(
        lambda c: list(
            c.stream_realm_files("demo", after_path="m", max_message_bytes=4096, timeout=None)
        )
    )
    _, request, stream = scripted.stream("StreamRealmFiles")
    stream.terminate((), grpc.StatusCode.OK, "")

    assert call.result(5) == []
    assert request == rs.StreamRealmFilesRequest(
        realm_id="demo", after_path="m", max_message_bytes=4096
    )
    assert scripted.channel.timeouts("StreamRealmFiles") == [None]


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([chunk("a", 4, 0, b"ab", False)], "ended inside 'a'"),
        ([chunk("a", 4, 0, b"ab", False), chunk("b", 1, 0, b"x", True)], "'b' before the last"),
        ([chunk("a", 4, 0, b"ab", False), chunk("a", 4, 3, b"d", True)], "offset 3, expected 2"),
        ([chunk("a", 4, 2, b"cd", True)], "offset 2, expected 0"),
    ],
    ids=["ends-inside", "interleaved", "gap", "starts-late"],
)
def test_a_stream_that_breaks_a_file_is_internal(
    scripted: Scripted, chunks: list[rs.FileChunk], message: str
) -> None:
    call = scripted.start(lambda c: list(c.stream_realm_files("demo")))
    _, _, stream = scripted.stream("StreamRealmFiles")
    stream.send_response(rs.StreamRealmFilesResponse(chunks=chunks))
    stream.terminate((), grpc.StatusCode.OK, "")

    with pytest.raises(realm_client.Internal, match=message):
        call.result(5)


def test_a_stream_refused_midway_raises_after_the_files_before(scripted: Scripted) -> None:
    got: list[str] = []
    first = threading.Event()

    def read(c: realm_client.RealmClient) -> None:
        for streamed in c.stream_realm_files("demo", lease_id="L-1"):
            got.append(streamed.path)
            first.set()

    call = scripted.start(read)
    _, _, stream = scripted.stream("StreamRealmFiles")
    stream.send_response(rs.StreamRealmFilesResponse(chunks=[chunk("a", 1, 0, b"x", True)]))
    assert first.wait(5)  # a status ends the stream at once: let the file be read first
    fail(stream, grpc.StatusCode.FAILED_PRECONDITION, "lease L-1 was revoked")

    with pytest.raises(realm_client.FailedPrecondition) as raised:
        call.result(5)
    assert raised.value.method == "StreamRealmFiles"
    assert raised.value.message == "lease L-1 was revoked"
    assert got == ["a"]


# WriteRealmFiles.


def test_write_realm_files_sends_files_deletions_and_priority(scripted: Scripted) -> None:
    call = scripted.start(
        lambda c: c.write_realm_files(
            "demo", files={"a.txt": b"A", "b/c.json": b"{}"}, deleted_paths=["old"], priority=0
        )
    )
    metadata, request, rpc = scripted.unary("WriteRealmFiles")
    response = rs.WriteRealmFilesResponse(
        files=[meta("a.txt", 1), meta("b/c.json", 2)],
        deleted=1,
        job=res.Job(job_id="30"),
        disposition=res.DISPOSITION_MERGED,
    )
    answer(rpc, response)

    assert call.result(5) == response
    assert [(f.path, f.content) for f in request.files] == [("a.txt", b"A"), ("b/c.json", b"{}")]
    assert list(request.deleted_paths) == ["old"]
    assert request.HasField("priority") and request.priority == 0
    assert HEX32.fullmatch(metadata[realm_client.REQUEST_ID_KEY])
    assert scripted.channel.timeouts("WriteRealmFiles") == [7.5]


def test_write_realm_files_takes_messages_and_leaves_priority_out(scripted: Scripted) -> None:
    files = [res.FileContent(path="x", content=b"1")]
    call = scripted.start(lambda c: c.write_realm_files("demo", files=files, timeout=2))
    _, request, rpc = scripted.unary("WriteRealmFiles")
    fail(rpc, grpc.StatusCode.INVALID_ARGUMENT, "files[0].path: reserved")

    with pytest.raises(realm_client.InvalidArgument, match=r"files\[0\]"):
        call.result(5)
    assert request == rs.WriteRealmFilesRequest(realm_id="demo", files=files)
    assert not request.HasField("priority")
    assert scripted.channel.timeouts("WriteRealmFiles") == [2]


# DeleteRealm: its own request id, in the request and the metadata.


def test_delete_realm_makes_a_request_id_unless_given(scripted: Scripted) -> None:
    requests = []
    for given in (None, None, "del-1"):
        call = scripted.start(lambda c, given=given: c.delete_realm("demo", request_id=given))
        metadata, request, rpc = scripted.unary("DeleteRealm")
        answer(rpc, rs.DeleteRealmResponse(files_deleted=4, jobs_cancelled=1))
        assert call.result(5).files_deleted == 4
        assert metadata[realm_client.REQUEST_ID_KEY] == request.request_id
        requests.append(request)

    assert [r.realm_id for r in requests] == ["demo"] * 3
    assert HEX32.fullmatch(requests[0].request_id) and HEX32.fullmatch(requests[1].request_id)
    assert requests[0].request_id != requests[1].request_id
    assert requests[2].request_id == "del-1"


def test_repeatable_rpcs_name_the_idempotent_job_control() -> None:
    repeatable = set(realm_client.REPEATABLE_RPCS)
    assert {"DeleteRealm", "CancelJob", "WriteRealmFiles", "StreamRealmFiles"} <= repeatable
    assert {"ExplainJob", "ListWorkers", "GetQueueStats"} <= repeatable
    assert "RetryJob" not in repeatable


# Job control and the system's state.


def test_cancel_job(scripted: Scripted) -> None:
    cancelled = res.Job(job_id="17", state=res.Job.STATE_CANCELLED, error_message="stop")
    call = scripted.start(lambda c: c.cancel_job("17", reason="stop"))
    metadata, request, rpc = scripted.unary("CancelJob")
    answer(rpc, rs.CancelJobResponse(job=cancelled))

    assert call.result(5) == cancelled
    assert request == rs.CancelJobRequest(job_id="17", reason="stop")
    assert metadata["authorization"] == "Bearer s3cret"
    assert scripted.channel.timeouts("CancelJob") == [7.5]


def test_cancel_of_a_finished_job_is_a_failed_precondition(scripted: Scripted) -> None:
    call = scripted.start(lambda c: c.cancel_job("17"))
    _, request, rpc = scripted.unary("CancelJob")
    fail(rpc, grpc.StatusCode.FAILED_PRECONDITION, "job 17 already succeeded")

    with pytest.raises(realm_client.FailedPrecondition, match="already succeeded"):
        call.result(5)
    assert request.reason == ""


def test_retry_job(scripted: Scripted) -> None:
    call = scripted.start(lambda c: c.retry_job("17"))
    _, request, rpc = scripted.unary("RetryJob")
    response = rs.RetryJobResponse(job=res.Job(job_id="21"), disposition=res.DISPOSITION_INSERTED)
    answer(rpc, response)

    assert call.result(5) == response
    assert request == rs.RetryJobRequest(job_id="17")


def test_explain_job(scripted: Scripted) -> None:
    call = scripted.start(lambda c: c.explain_job("17", timeout=1.5))
    _, request, rpc = scripted.unary("ExplainJob")
    response = rs.ExplainJobResponse(
        job=res.Job(job_id="17", state=res.Job.STATE_QUEUED),
        summary="Job 17 waits: no worker is connected.",
        reasons=[rs.WaitReason(code=rs.WaitReason.CODE_NO_WORKERS, message="no workers")],
    )
    answer(rpc, response)

    assert call.result(5) == response
    assert request == rs.ExplainJobRequest(job_id="17")
    assert scripted.channel.timeouts("ExplainJob") == [1.5]


def test_list_workers_and_queue_stats(scripted: Scripted) -> None:
    workers = scripted.start(lambda c: c.list_workers())
    _, request, rpc = scripted.unary("ListWorkers")
    answer(rpc, rs.ListWorkersResponse(workers=[rs.Worker(worker_id="w1", credits=2)]))
    stats = scripted.start(lambda c: c.get_queue_stats())
    _, stats_request, rpc = scripted.unary("GetQueueStats")
    counted = rs.GetQueueStatsResponse(counts=[rs.JobCount(state=res.Job.STATE_QUEUED, count=3)])
    answer(rpc, counted)

    assert workers.result(5) == [rs.Worker(worker_id="w1", credits=2)]
    assert request == rs.ListWorkersRequest()
    assert stats.result(5) == counted
    assert stats_request == rs.GetQueueStatsRequest()


def test_a_cancelled_job_ends_the_wait(scripted: Scripted) -> None:
    call = scripted.start(lambda c: c.wait_for_job("17"))
    _, _, stream = scripted.stream("WatchJob")
    stream.send_response(rs.WatchJobResponse(job=res.Job(job_id="17", state=res.Job.STATE_RUNNING)))
    cancelled = res.Job(job_id="17", state=res.Job.STATE_CANCELLED)
    stream.send_response(rs.WatchJobResponse(job=cancelled))
    stream.terminate((), grpc.StatusCode.OK, "")

    assert call.result(5) == cancelled
    assert scripted.channel.timeouts("WatchJob") == [None]  # not reopened
