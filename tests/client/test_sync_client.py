"""RealmClient over grpc_testing: the exact request, metadata and deadline of
each call, the answers and statuses the test chooses, and WatchJob cut
mid-stream and resumed."""

from __future__ import annotations

import re
import threading

import grpc
import grpc_testing
import pytest
import realm_client
from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realm_client import RealmClient, RealmClientError

from tests.client.scripted import (
    SERVICE,
    RecordingChannel,
    Scripted,
    answer,
    fail,
    scripted_client,
)

HEX32 = re.compile("[0-9a-f]{32}")
RUNNING = res.Job.STATE_RUNNING


def job(state: res.Job.State.ValueType, done: int = 0, total: int = 0) -> res.Job:
    return res.Job(
        job_id="17",
        realm_id="demo",
        kind=res.JOB_KIND_FROM_SCRATCH_INDEX,
        priority=10,
        state=state,
        progress=res.JobProgress(done=done, total=total),
    )


def realm(state: res.Realm.State.ValueType = res.Realm.STATE_INDEXING) -> res.Realm:
    return res.Realm(realm_id="demo", display_name="Demo", state=state)


def test_get_realm_sends_token_request_id_and_the_default_deadline(scripted: Scripted) -> None:
    call = scripted.start(lambda c: c.get_realm("demo"))

    metadata, request, rpc = scripted.unary("GetRealm")
    answer(rpc, rs.GetRealmResponse(realm=realm()))

    assert call.result(5) == realm()
    assert request == rs.GetRealmRequest(realm_id="demo")
    assert metadata["authorization"] == "Bearer s3cret"
    assert HEX32.fullmatch(metadata[realm_client.REQUEST_ID_KEY])
    assert scripted.channel.timeouts("GetRealm") == [7.5]


def test_a_call_may_change_its_deadline_or_have_none(scripted: Scripted) -> None:
    shorter = scripted.start(lambda c: c.get_job("1", timeout=0.25))
    answer(scripted.unary("GetJob")[2], rs.GetJobResponse(job=job(RUNNING)))
    shorter.result(5)
    unbounded = scripted.start(lambda c: c.get_job("2", timeout=None))
    answer(scripted.unary("GetJob")[2], rs.GetJobResponse(job=job(RUNNING)))
    unbounded.result(5)

    assert scripted.channel.timeouts("GetJob") == [0.25, None]


def test_no_token_no_authorization_metadata() -> None:
    for scripted in scripted_client():
        call = scripted.start(lambda c: c.get_job("1"))
        metadata, _, rpc = scripted.unary("GetJob")
        answer(rpc, rs.GetJobResponse())
        call.result(5)

        assert "authorization" not in metadata
        assert scripted.channel.timeouts("GetJob") == [realm_client.DEFAULT_TIMEOUT]


def test_create_realm_request_carries_everything_and_its_request_id(scripted: Scripted) -> None:
    call = scripted.start(
        lambda c: c.create_realm(
            "demo",
            display_name="Demo",
            priority=0,
            initial_files={"cards/a.json": b"{}", "b.txt": b"\x00"},
        )
    )

    metadata, request, rpc = scripted.unary("CreateRealm")
    answer(rpc, rs.CreateRealmResponse(realm=realm(), job=job(res.Job.STATE_QUEUED)))

    assert call.result(5).job.job_id == "17"
    assert request.realm_id == "demo"
    assert request.display_name == "Demo"
    assert request.HasField("priority") and request.priority == 0
    assert not request.wait_for_index
    assert [(f.path, f.content) for f in request.initial_files] == [
        ("cards/a.json", b"{}"),
        ("b.txt", b"\x00"),
    ]
    # One id for the logical call: the idempotency key and the metadata agree.
    assert HEX32.fullmatch(request.request_id)
    assert metadata[realm_client.REQUEST_ID_KEY] == request.request_id


def test_each_create_gets_its_own_request_id_unless_given(scripted: Scripted) -> None:
    ids = []
    for given in (None, None, "mine-1"):
        call = scripted.start(lambda c, given=given: c.create_realm("demo", request_id=given))
        _, request, rpc = scripted.unary("CreateRealm")
        answer(rpc, rs.CreateRealmResponse())
        call.result(5)
        ids.append(request.request_id)

    assert ids[0] != ids[1]
    assert ids[2] == "mine-1"


def test_priority_left_out_is_not_sent(scripted: Scripted) -> None:
    call = scripted.start(lambda c: c.write_realm_file("demo", "a.txt", b"hi"))
    _, request, rpc = scripted.unary("WriteRealmFile")
    answer(rpc, rs.WriteRealmFileResponse())
    call.result(5)

    assert request == rs.WriteRealmFileRequest(realm_id="demo", path="a.txt", content=b"hi")
    assert not request.HasField("priority")


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, realm_client.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, realm_client.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, realm_client.AlreadyExists),
        (grpc.StatusCode.PERMISSION_DENIED, realm_client.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, realm_client.Unauthenticated),
        (grpc.StatusCode.FAILED_PRECONDITION, realm_client.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, realm_client.ResourceExhausted),
        (grpc.StatusCode.ABORTED, realm_client.Aborted),
        (grpc.StatusCode.UNAVAILABLE, realm_client.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, realm_client.DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, realm_client.Internal),
        (grpc.StatusCode.DATA_LOSS, RealmClientError),
    ],
)
def test_status_codes_become_exceptions_that_keep_the_message(
    scripted: Scripted, code: grpc.StatusCode, error: type[RealmClientError]
) -> None:
    call = scripted.start(lambda c: c.reindex_realm("demo", priority=50))
    _, request, rpc = scripted.unary("ReindexRealm")
    fail(rpc, code, "realm_id: must match [a-z0-9-]\n  got 'X'")

    with pytest.raises(RealmClientError) as raised:
        call.result(5)

    assert type(raised.value) is error
    assert raised.value.code is code
    assert raised.value.message == "realm_id: must match [a-z0-9-]\n  got 'X'"
    assert raised.value.method == "ReindexRealm"
    assert str(raised.value).startswith(f"{code.name}: realm_id")
    assert request.priority == 50


def test_list_realms_walks_every_page_under_one_request_id(scripted: Scripted) -> None:
    call = scripted.start(lambda c: [r.realm_id for r in c.list_realms()])
    pages = [("", ["a", "b"], "t1"), ("t1", ["c"], "t2"), ("t2", ["d"], "")]
    seen_ids = set()
    for token, ids, next_token in pages:
        metadata, request, rpc = scripted.unary("ListRealms")
        assert (request.page_token, request.page_size) == (token, 0)
        seen_ids.add(metadata[realm_client.REQUEST_ID_KEY])
        answer(rpc, rs.ListRealmsResponse(realms=[res.Realm(realm_id=i) for i in ids],
                                          next_page_token=next_token))  # fmt: skip

    assert call.result(5) == ["a", "b", "c", "d"]
    assert len(seen_ids) == 1


def test_a_limit_asks_only_for_what_is_missing(scripted: Scripted) -> None:
    call = scripted.start(lambda c: [j.job_id for j in c.list_jobs(realm_id="demo", limit=3)])
    sizes = []
    for ids, token in ((["9", "8"], "p2"), (["7", "6"], "p3")):
        _, request, rpc = scripted.unary("ListJobs")
        sizes.append(request.page_size)
        assert request.realm_id == "demo"
        answer(
            rpc, rs.ListJobsResponse(jobs=[res.Job(job_id=i) for i in ids], next_page_token=token)
        )

    assert call.result(5) == ["9", "8", "7"]
    assert sizes == [3, 1]


def test_a_page_token_seen_twice_ends_the_listing(scripted: Scripted) -> None:
    call = scripted.start(lambda c: list(c.search_realm("demo", text="ada")))
    for _ in range(2):
        _, request, rpc = scripted.unary("SearchRealm")
        answer(rpc, rs.SearchRealmResponse(entries=[res.IndexEntry(path="a")],
                                           next_page_token="same"))  # fmt: skip

    with pytest.raises(realm_client.Internal, match="page token 'same' twice"):
        call.result(5)
    assert request.text == "ada"


def test_create_wait_follows_the_job_and_resumes_a_cut_watch(scripted: Scripted) -> None:
    progress: list[res.Job] = []
    seen_running = threading.Event()

    def on_progress(snapshot: res.Job) -> None:
        progress.append(snapshot)
        if snapshot.state == RUNNING:
            seen_running.set()

    call = scripted.start(lambda c: c.create_realm("demo", wait=True, on_progress=on_progress))
    create_md, create_request, rpc = scripted.unary("CreateRealm")
    answer(rpc, rs.CreateRealmResponse(realm=realm(), job=job(res.Job.STATE_QUEUED)))

    first_md, first, stream = scripted.stream("WatchJob")
    stream.send_response(rs.WatchJobResponse(job=job(RUNNING, 1, 3)))
    assert seen_running.wait(5)
    fail(stream, grpc.StatusCode.UNAVAILABLE, "Socket closed")  # the cut

    again_md, again, stream = scripted.stream("WatchJob")
    stream.send_response(rs.WatchJobResponse(job=job(RUNNING, 1, 3)))  # the same, again
    stream.send_response(rs.WatchJobResponse(job=job(RUNNING, 2, 3)))
    stream.send_response(rs.WatchJobResponse(job=job(res.Job.STATE_SUCCEEDED, 3, 3)))
    stream.terminate((), grpc.StatusCode.OK, "")

    get_md, get, rpc = scripted.unary("GetRealm")
    answer(rpc, rs.GetRealmResponse(realm=realm(res.Realm.STATE_READY)))

    created = call.result(5)
    assert created.job.state == res.Job.STATE_SUCCEEDED
    assert created.realm.state == res.Realm.STATE_READY
    assert first == again == rs.WatchJobRequest(job_id="17")
    assert get == rs.GetRealmRequest(realm_id="demo")
    assert [(p.state, p.progress.done) for p in progress] == [
        (res.Job.STATE_QUEUED, 0),
        (RUNNING, 1),
        (RUNNING, 2),
        (res.Job.STATE_SUCCEEDED, 3),
    ]
    # Every RPC of the logical call carries its request id and the token.
    request_id = create_request.request_id
    for md in (create_md, first_md, again_md, get_md):
        assert md[realm_client.REQUEST_ID_KEY] == request_id
        assert md["authorization"] == "Bearer s3cret"
    # Waiting has no deadline of its own; the unary calls keep the client's.
    assert scripted.channel.timeouts("WatchJob") == [None, None]
    assert scripted.channel.timeouts("GetRealm") == [7.5]


def test_a_job_already_terminal_is_not_watched(scripted: Scripted) -> None:
    call = scripted.start(lambda c: c.create_realm("demo", wait=True))
    answer(scripted.unary("CreateRealm")[2],
           rs.CreateRealmResponse(realm=realm(), job=job(res.Job.STATE_FAILED)))  # fmt: skip
    answer(scripted.unary("GetRealm")[2], rs.GetRealmResponse(realm=realm()))

    assert call.result(5).job.state == res.Job.STATE_FAILED
    assert scripted.channel.timeouts("WatchJob") == []


def test_a_watch_that_keeps_ending_early_gives_up() -> None:
    for scripted in scripted_client(watch_breaks=2):
        call = scripted.start(lambda c: c.wait_for_job("17"))
        for _ in range(3):
            _, _, stream = scripted.stream("WatchJob")
            stream.send_response(rs.WatchJobResponse(job=job(RUNNING, 1, 3)))
            stream.terminate((), grpc.StatusCode.OK, "")

        with pytest.raises(realm_client.Unavailable) as raised:
            call.result(5)
        assert raised.value.message == (
            "the server ended the watch of job 17 before the job finished (last state: running)"
        )


def test_a_watch_that_keeps_breaking_raises_the_servers_last_error() -> None:
    for scripted in scripted_client(watch_breaks=1):
        call = scripted.start(lambda c: list(c.watch_job("17")))
        for _ in range(2):
            fail(scripted.stream("WatchJob")[2], grpc.StatusCode.UNAVAILABLE, "server draining")

        with pytest.raises(realm_client.Unavailable, match="server draining"):
            call.result(5)


def test_a_watch_of_an_unknown_job_is_not_resumed(scripted: Scripted) -> None:
    call = scripted.start(lambda c: list(c.watch_job("99")))
    fail(scripted.stream("WatchJob")[2], grpc.StatusCode.NOT_FOUND, "job 99 not found")

    with pytest.raises(realm_client.NotFound, match="job 99 not found"):
        call.result(5)
    assert scripted.channel.timeouts("WatchJob") == [None]


def test_wait_timeout_bounds_the_wait(scripted: Scripted) -> None:
    call = scripted.start(lambda c: c.wait_for_job("17", timeout=30))
    _, _, stream = scripted.stream("WatchJob")
    fail(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    with pytest.raises(realm_client.DeadlineExceeded):
        call.result(5)
    (timeout,) = scripted.channel.timeouts("WatchJob")
    assert timeout is not None and 0 < timeout <= 30


def test_watch_job_yields_each_change_once(scripted: Scripted) -> None:
    call = scripted.start(lambda c: [(j.state, j.progress.done) for j in c.watch_job("17")])
    _, _, stream = scripted.stream("WatchJob")
    for snapshot in (job(RUNNING, 0, 2), job(RUNNING, 0, 2), job(res.Job.STATE_FAILED, 1, 2)):
        stream.send_response(rs.WatchJobResponse(job=snapshot))

    assert call.result(5) == [(RUNNING, 0), (res.Job.STATE_FAILED, 1)]


def test_a_channel_of_the_callers_is_left_open() -> None:
    closed = []

    class Channel(RecordingChannel):
        def close(self) -> None:
            closed.append(True)

    testing = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    with RealmClient(channel=Channel(testing)):
        pass

    assert closed == []
