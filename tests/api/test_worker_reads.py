"""With auth on, a worker reads a realm only under the lease of its running job."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb

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
