"""Path rules over the wire (DESIGN.md section 3, "Files"), on both stores:
a path is NFC-normalized before anything else, so the NFC and NFD spellings
of a name are one file; index.json may be replaced but never deleted; and a
worker's index entries obey the same rules as a client's files. The table of
refused code points is in test_bad_input.py."""

from __future__ import annotations

import unicodedata

import grpc
import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.api.conftest import LiveServer
from tests.api.helpers import (
    RPC_TIMEOUT,
    create_realm,
    entry_for,
    open_stream,
    rpc_error,
    store_snapshot,
)

NFC = "cards/caf\u00e9.json"
NFD = "cards/cafe\u0301.json"


def test_the_two_spellings_differ() -> None:
    assert NFC != NFD
    assert unicodedata.normalize("NFC", NFD) == NFC


def paths(live: LiveServer, realm_id: str) -> list[str]:
    files = live.stub.ListRealmFiles(
        spb.ListRealmFilesRequest(realm_id=realm_id), timeout=RPC_TIMEOUT
    ).files
    return [f.path for f in files]


def read(live: LiveServer, realm_id: str, path: str) -> spb.ReadRealmFileResponse:
    return live.stub.ReadRealmFile(
        spb.ReadRealmFileRequest(realm_id=realm_id, path=path), timeout=RPC_TIMEOUT
    )


def write(live: LiveServer, realm_id: str, path: str, content: bytes) -> spb.WriteRealmFileResponse:
    return live.stub.WriteRealmFile(
        spb.WriteRealmFileRequest(realm_id=realm_id, path=path, content=content),
        timeout=RPC_TIMEOUT,
    )


def test_nfc_and_nfd_name_one_file(live: LiveServer) -> None:
    created = create_realm(live.stub, "cafe")
    # Indexed first, so each write gets an incremental job listing its path.
    stream = open_stream(live.stub, "w", credits=1)
    (a,) = stream.assignments(1)
    assert a.job.job_id == created.job.job_id
    assert stream.complete(a.lease_id).accepted
    stream.close()
    first = write(live, "cafe", NFC, b"1")
    assert first.file.path == NFC
    second = write(live, "cafe", NFD, b"22")
    # The NFD write replaced the NFC file, and answers with the stored name.
    assert second.file.path == NFC
    assert [c.path for c in second.job.path_changes] == [NFC]
    assert paths(live, "cafe") == [NFC, "index.json", "realm.json"]
    for spelling in (NFC, NFD):
        found = read(live, "cafe", spelling)
        assert (found.file.path, found.content) == (NFC, b"22")

    live.stub.DeleteRealmFile(
        spb.DeleteRealmFileRequest(realm_id="cafe", path=NFD), timeout=RPC_TIMEOUT
    )
    assert paths(live, "cafe") == ["index.json", "realm.json"]
    assert rpc_error(lambda: read(live, "cafe", NFC)).code() == grpc.StatusCode.NOT_FOUND


def test_an_initial_file_in_nfd_is_stored_in_nfc(live: LiveServer) -> None:
    create_realm(live.stub, "cafe", initial_files=[pb.FileContent(path=NFD, content=b"x")])
    assert paths(live, "cafe") == [NFC, "index.json", "realm.json"]
    assert read(live, "cafe", NFD).content == b"x"


def test_index_json_may_be_replaced_but_not_deleted(live: LiveServer) -> None:
    create_realm(live.stub, "home")
    replaced = write(live, "home", "index.json", b'{"data": {}}')
    assert replaced.file.path == "index.json"
    assert read(live, "home", "index.json").content == b'{"data": {}}'
    before = store_snapshot(live.srv.db)
    error = rpc_error(
        lambda: live.stub.DeleteRealmFile(
            spb.DeleteRealmFileRequest(realm_id="home", path="index.json"), timeout=RPC_TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "index.json is reserved" in (error.details() or "")
    assert store_snapshot(live.srv.db) == before
    # realm.json is still the server's, holding the display name it was given.
    assert b'"id": "home"' in read(live, "home", "realm.json").content


@pytest.mark.parametrize("where", ["entries", "deleted_paths"])
@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        ("cards/a\x1bb.json", "U+001B"),
        ("cards/a\x9bb.json", "U+009B"),
        ("cards/\u202egnp.json", "U+202E"),
        ("cards/a\u2028b.json", "U+2028"),
    ],
    ids=["c0", "c1", "rlo", "line-separator"],
)
def test_index_entries_with_a_refused_path_are_refused_and_nothing_is_stored(
    live: LiveServer, bad: str, shown: str, where: str
) -> None:
    created = create_realm(live.stub, "entries")
    stream = open_stream(live.stub, "w", credits=1)
    try:
        (a,) = stream.assignments(1)
        assert a.job.job_id == created.job.job_id
        files = live.stub.ListRealmFiles(
            spb.ListRealmFilesRequest(realm_id="entries"), timeout=RPC_TIMEOUT
        ).files
        good = [entry_for(f) for f in files]
        before = store_snapshot(live.srv.db)
        if where == "entries":
            stream.send_entries(a.lease_id, [*good, pb.IndexEntry(path=bad, size=1)])
            names = f"entries[{len(good)}].path contains {shown}"
        else:
            stream.send_entries(a.lease_id, good, deleted_paths=[bad])
            names = f"deleted_paths contains {shown}"
        (ack,) = stream.acks()
        assert (ack.lease_id, ack.accepted) == (a.lease_id, False)
        assert names in ack.reason, ack.reason
        # Not one entry of the batch was stored, the good ones included (the
        # refusal may count as a failed attempt of the job: that is not data).
        after = store_snapshot(live.srv.db)
        assert (after["entries"], after["files"]) == (before["entries"], before["files"])
    finally:
        stream.close()


def test_an_index_entry_in_nfd_is_stored_in_nfc(live: LiveServer) -> None:
    created = create_realm(live.stub, "cafe", initial_files=[pb.FileContent(path=NFC)])
    stream = open_stream(live.stub, "w", credits=1)
    try:
        (a,) = stream.assignments(1)
        assert a.job.job_id == created.job.job_id
        entry = pb.IndexEntry(path=NFD, media_type="application/json", card_type="m/Cafe")
        assert stream.complete(a.lease_id, [entry]).accepted
    finally:
        stream.close()
    found = live.stub.SearchRealm(
        spb.SearchRealmRequest(realm_id="cafe", card_type="m/Cafe"), timeout=RPC_TIMEOUT
    ).entries
    assert [e.path for e in found] == [NFC]
