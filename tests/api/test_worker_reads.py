"""With auth on, a worker reads a realm only under the lease of its running job."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import start_live_server
from tests.api.worker_stream import StreamClient

TOKENS = {"c-token": "client", "w-token": "worker", "a-token": "admin"}


def test_worker_reads_only_realms_of_running_jobs(server_settings) -> None:  # type: ignore[no-untyped-def]
    live, stop = start_live_server(replace(server_settings, tokens=TOKENS))
    client = [("authorization", "Bearer c-token")]
    worker = [("authorization", "Bearer w-token")]
    try:
        stub = live.stub
        stub.CreateRealm(spb.CreateRealmRequest(realm_id="held"), metadata=client)
        stub.CreateRealm(spb.CreateRealmRequest(realm_id="other", priority=0), metadata=client)
        stream = StreamClient(stub, metadata=worker)
        stream.settings()
        stream.credit(1)
        (assignment,) = stream.assignments(1)
        assert assignment.job.realm_id == "held"  # priority 10 before 0

        lease = assignment.lease_id
        files = stub.ListRealmFiles(
            spb.ListRealmFilesRequest(realm_id="held", lease_id=lease), metadata=worker
        )
        assert {f.path for f in files.files} == {"index.json", "realm.json"}
        stub.ReadRealmFile(
            spb.ReadRealmFileRequest(realm_id="held", path="realm.json", lease_id=lease),
            metadata=worker,
        )
        for call in (
            lambda: stub.ListRealmFiles(
                spb.ListRealmFilesRequest(realm_id="other", lease_id=lease), metadata=worker
            ),
            lambda: stub.ReadRealmFile(
                spb.ReadRealmFileRequest(realm_id="other", path="realm.json", lease_id=lease),
                metadata=worker,
            ),
        ):
            with pytest.raises(grpc.RpcError) as denied:
                call()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "other" in (denied.value.details() or "")
        # Clients and admins read any realm.
        stub.ListRealmFiles(spb.ListRealmFilesRequest(realm_id="other"), metadata=client)
        stream.close()
        stream.wait_closed()
    finally:
        stop()


def test_a_small_incremental_job_comes_with_its_files(live) -> None:  # type: ignore[no-untyped-def]
    """The assignment of an incremental job of a few paths carries what the
    job reads (each path that exists, .gitignore), as they were at its claim;
    a from-scratch job's does not."""
    stub = live.stub
    stub.CreateRealm(spb.CreateRealmRequest(realm_id="inline"))
    stream = StreamClient(stub)
    stream.settings()
    stream.credit(1)
    (first,) = stream.assignments(1)
    assert first.job.kind == pb.JOB_KIND_FROM_SCRATCH_INDEX and not first.files_included
    assert not first.files
    for path, content in ((".gitignore", b"*.tmp\n"), ("a.json", b'{"a": 1}')):
        stub.WriteRealmFile(
            spb.WriteRealmFileRequest(realm_id="inline", path=path, content=content)
        )
    assert stream.complete(first.lease_id).accepted  # the realm's next job may run now
    stream.credit(1)
    (second,) = stream.assignments(1)
    assert second.job.kind == pb.JOB_KIND_INCREMENTAL_INDEX
    assert {c.path for c in second.job.path_changes} >= {"a.json"}
    if any(c.path == ".gitignore" for c in second.job.path_changes):
        # A changed .gitignore makes the worker decide every file: no files sent.
        assert not second.files_included and not second.files
    stream.complete(second.lease_id)
    stub.WriteRealmFile(spb.WriteRealmFileRequest(realm_id="inline", path="a.json", content=b"[]"))
    stub.WriteRealmFile(spb.WriteRealmFileRequest(realm_id="inline", path="c.json", content=b"{}"))
    stub.DeleteRealmFile(spb.DeleteRealmFileRequest(realm_id="inline", path="c.json"))
    stream.credit(1)
    (third,) = stream.assignments(1)
    assert {(c.path, c.deleted) for c in third.job.path_changes} == {
        ("a.json", False),
        ("c.json", True),
    }
    assert third.files_included  # c.json is gone: not among the files
    assert [(c.file.path, c.content, c.offset, c.last) for c in third.files] == [
        (".gitignore", b"*.tmp\n", 0, True),
        ("a.json", b"[]", 0, True),
    ]
    assert third.files[1].file.size == 2 and len(third.files[1].file.sha256) == 64
    stream.close()
    stream.wait_closed()
