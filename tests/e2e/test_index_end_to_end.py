"""A realm's life through real processes: create it with cards of two types,
non-card files, a broken card and .gitignored files; the first index; searches;
then one file's change re-indexes that path alone, a new .gitignore decides
every file again, and a deleted card leaves the index. Writes made while the
first index runs end up in the index too."""

from __future__ import annotations

import pytest
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.e2e.conftest import System
from tests.e2e.helpers import (
    INDEX_CARD_TYPE,
    PERSON,
    PET,
    RPC_TIMEOUT,
    assert_index_whole,
    bulk_cards,
    card,
    card_type,
    create_realm,
    entry_key,
    get_job,
    get_realm,
    list_files,
    poll,
    realm_jobs,
    search_all,
    search_paths,
    sha256,
    wait_job,
    watch_job,
)

pytestmark = pytest.mark.e2e

PEOPLE = [
    ("Ada Lovelace", "London"),
    ("Alan Turing", "London"),
    ("Grace Hopper", "New York"),
    ("Edsger Dijkstra", "Austin"),
    ("Barbara Liskov", "Boston"),
    ("Donald Knuth", "Stanford"),
    ("Frances Allen", "New York"),
    ("John Backus", "Portland"),
    ("Margaret Hamilton", "Boston"),
    ("Ken Thompson", "Berkeley"),
    ("Radia Perlman", "Seattle"),
    ("Tony Hoare", "Oxford"),
    ("Niklaus Wirth", "Zurich"),
    ("Leslie Lamport", "Palo Alto"),
]
PETS = [
    ("Rex", "dog"),
    ("Whiskers", "cat"),
    ("Fido", "dog"),
    ("Tom", "cat"),
    ("Bubbles", "goldfish"),
    ("Shadow", "cat"),
    ("Biscuit", "dog"),
    ("Pepper", "parrot"),
    ("Mittens", "cat"),
    ("Nibbles", "hamster"),
    ("Oreo", "rabbit"),
    ("Ziggy", "iguana"),
]


def person_path(i: int) -> str:
    return f"people/person-{i:02d}.json"


def pet_path(i: int) -> str:
    return f"pets/pet-{i:02d}.json"


def realm_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i, (name, city) in enumerate(PEOPLE):
        files[person_path(i)] = card(PERSON, {"name": name, "city": city})
    for i, (name, species) in enumerate(PETS):
        owner = person_path(i % len(PEOPLE)).removesuffix(".json")
        files[pet_path(i)] = card(
            PET, {"title": name, "species": species}, links={"owner": f"../{owner}"}
        )
    files["notes/readme.md"] = b"# Notes\n\nPlans for the zeppelin museum.\n"
    files["data/settings.json"] = b'{"theme": "dark", "zoom": 2}'
    files["assets/logo.bin"] = bytes(range(256)) * 4
    # Cut off in the middle: invalid JSON, so an error entry.
    files["people/broken.json"] = card(PERSON, {"name": "Broken Bob"})[:40]
    files[".gitignore"] = b"# build output\n*.log\nscratch/\n"
    files["debug.log"] = b"a log line that mentions zeppelin too\n"
    files["scratch/draft.json"] = card(PERSON, {"name": "Ignored Ivan", "city": "London"})
    return files


IGNORED = {".gitignore", "debug.log", "scratch/draft.json"}


def test_create_index_search_then_incremental_changes(store_url: str, system: System) -> None:
    server = system.start_server(store_url)
    system.start_worker(server, "e2e-worker", "--concurrency", "2")
    stub = server.stub()
    files = realm_files()

    created = create_realm(stub, "museum", files, display_name="Museum")
    assert created.job.kind == pb.JOB_KIND_FROM_SCRATCH_INDEX
    snapshots = watch_job(stub, created.job.job_id)
    assert snapshots, "WatchJob sent nothing"
    states = [s.state for s in snapshots]
    assert states[-1] == pb.Job.STATE_SUCCEEDED, snapshots[-1]
    assert all(s in (pb.Job.STATE_QUEUED, pb.Job.STATE_RUNNING) for s in states[:-1]), states
    first_job = snapshots[-1]
    assert first_job.job_id == created.job.job_id
    assert first_job.attempt == 1

    # Every file is stored, ignored ones too; realm.json and index.json come with the realm.
    stored = {f.path: f for f in list_files(stub, "museum")}
    assert set(stored) == {*files, "realm.json", "index.json"}
    indexable = sorted(set(stored) - IGNORED)

    realm = get_realm(stub, "museum")
    assert realm.state == pb.Realm.STATE_READY
    assert realm.display_name == "Museum"
    assert realm.stats.files == len(stored)
    assert realm.stats.entries == len(indexable)
    assert realm.stats.errors == 1
    # People and pets, plus the realm's own index.json card; not the broken one.
    assert realm.stats.cards == len(PEOPLE) + len(PETS) + 1
    assert realm.stats.HasField("last_index_time")

    # A walk in small pages sees every indexable file once, and no ignored one.
    entries = search_all(stub, "museum", page_size=7)
    by_path = {e.path: e for e in entries}
    assert [e.path for e in entries] == indexable
    assert not IGNORED & set(by_path)
    for path, entry in by_path.items():
        assert (entry.sha256, entry.size) == (stored[path].sha256, stored[path].size), path
        assert entry.mtime.ToNanoseconds() == stored[path].mtime.ToNanoseconds(), path
        if path in files:
            assert entry.sha256 == sha256(files[path]), path

    errors = [e for e in entries if e.error_message]
    assert [e.path for e in errors] == ["people/broken.json"]
    assert "invalid JSON" in errors[0].error_message
    assert errors[0].card_type == ""
    assert by_path["index.json"].card_type == INDEX_CARD_TYPE
    assert by_path["notes/readme.md"].card_type == ""
    assert by_path["notes/readme.md"].media_type == "text/markdown"
    assert by_path["data/settings.json"].media_type == "application/json"
    assert by_path["data/settings.json"].card_type == ""
    assert by_path["assets/logo.bin"].media_type == "application/octet-stream"
    assert by_path[person_path(1)].title == "Alan Turing"
    assert by_path[pet_path(0)].links == ["../people/person-00"]

    # By card type.
    people = search_paths(stub, "museum", card_type=card_type(PERSON))
    assert people == [person_path(i) for i in range(len(PEOPLE))]
    pets = search_paths(stub, "museum", card_type=card_type(PET), page_size=5)
    assert pets == [pet_path(i) for i in range(len(PETS))]
    assert search_paths(stub, "museum", card_type="https://example.com/person/Nobody") == []

    # By text, in any case, in titles and in other attributes; ignored files never match.
    assert search_paths(stub, "museum", text="TURING") == [person_path(1)]
    london = [person_path(i) for i, (_, city) in enumerate(PEOPLE) if city == "London"]
    assert search_paths(stub, "museum", text="london") == london
    cats = [pet_path(i) for i, (_, species) in enumerate(PETS) if species == "cat"]
    assert search_paths(stub, "museum", card_type=card_type(PET), text="Cat") == cats
    assert search_paths(stub, "museum", text="zeppelin") == ["notes/readme.md"]
    assert search_paths(stub, "museum", text="Ivan") == []

    # One card changes: an incremental job for exactly that path.
    changed = person_path(3)
    new_content = card(PERSON, {"name": "Edsger W. Dijkstra", "city": "Nuenen"})
    before = {e.path: entry_key(e) for e in entries}
    written = stub.WriteRealmFile(
        spb.WriteRealmFileRequest(realm_id="museum", path=changed, content=new_content),
        timeout=RPC_TIMEOUT,
    )
    assert written.file.sha256 == sha256(new_content)
    job = written.job
    assert job.kind == pb.JOB_KIND_INCREMENTAL_INDEX
    assert job.job_id != first_job.job_id
    assert [(c.path, c.deleted) for c in job.path_changes] == [(changed, False)]

    done = wait_job(stub, job.job_id)
    assert done.state == pb.Job.STATE_SUCCEEDED, done
    assert [(c.path, c.deleted) for c in done.path_changes] == [(changed, False)]

    assert search_paths(stub, "museum", text="nuenen") == [changed]
    assert search_paths(stub, "museum", text="london") == london
    after_entries = search_all(stub, "museum")
    after = {e.path: entry_key(e) for e in after_entries}
    assert sorted(after) == indexable
    assert {p: k for p, k in after.items() if p != changed} == {
        p: k for p, k in before.items() if p != changed
    }
    new_entry = next(e for e in after_entries if e.path == changed)
    assert new_entry.sha256 == sha256(new_content)
    assert new_entry.title == "Edsger W. Dijkstra"
    assert new_entry.mtime.ToNanoseconds() == written.file.mtime.ToNanoseconds()
    assert before[changed] != after[changed]

    realm_after = get_realm(stub, "museum")
    assert realm_after.stats.entries == realm.stats.entries
    assert realm_after.stats.cards == realm.stats.cards
    assert realm_after.stats.errors == 1
    assert realm_after.stats.last_index_time.ToNanoseconds() >= (
        realm.stats.last_index_time.ToNanoseconds()
    )

    # The realm had exactly two jobs: its first index and this one.
    jobs = realm_jobs(stub, "museum")
    assert sorted((j.job_id, j.kind, j.state) for j in jobs) == sorted(
        [
            (first_job.job_id, pb.JOB_KIND_FROM_SCRATCH_INDEX, pb.Job.STATE_SUCCEEDED),
            (job.job_id, pb.JOB_KIND_INCREMENTAL_INDEX, pb.Job.STATE_SUCCEEDED),
        ]
    )

    # A new .gitignore decides every file again: what it no longer ignores is
    # indexed, what it now ignores leaves the index.
    written = stub.WriteRealmFile(
        spb.WriteRealmFileRequest(realm_id="museum", path=".gitignore", content=b"notes/\n"),
        timeout=RPC_TIMEOUT,
    )
    assert wait_job(stub, written.job.job_id).state == pb.Job.STATE_SUCCEEDED
    now_indexed = sorted({*indexable, "debug.log", "scratch/draft.json"} - {"notes/readme.md"})
    assert search_paths(stub, "museum") == now_indexed
    assert search_paths(stub, "museum", text="Ivan") == ["scratch/draft.json"]
    assert search_paths(stub, "museum", text="zeppelin") == ["debug.log"]

    # A deleted card leaves the index.
    deleted = stub.DeleteRealmFile(
        spb.DeleteRealmFileRequest(realm_id="museum", path=pet_path(0)), timeout=RPC_TIMEOUT
    )
    assert [(c.path, c.deleted) for c in deleted.job.path_changes] == [(pet_path(0), True)]
    assert wait_job(stub, deleted.job.job_id).state == pb.Job.STATE_SUCCEEDED
    assert pet_path(0) not in search_paths(stub, "museum", card_type=card_type(PET))
    final = get_realm(stub, "museum")
    assert final.stats.entries == len(now_indexed) - 1
    assert final.stats.cards == realm.stats.cards + 1 - 1  # Ivan in, Rex out
    assert final.stats.files == len(stored) - 1
    assert final.stats.errors == 1


def test_writes_during_a_from_scratch_job_converge(store_url: str, system: System) -> None:
    """Files written and deleted while the first index runs (some already read
    by it, some not yet): once every job ended, the index is exactly the files."""
    server = system.start_server(store_url, "--heartbeat-seconds", "0.2")
    stub = server.stub()
    files = bulk_cards(400)
    first = create_realm(stub, "busy", files).job.job_id
    system.start_worker(server, "w", "--concurrency", "2", "--files-per-second", "300")
    poll(
        lambda: (
            (job := get_job(stub, first)).state == pb.Job.STATE_RUNNING
            and 0 < job.progress.done < job.progress.total
        ),
        what="the first index mid-way",
    )

    paths = sorted(files)
    writes = {
        paths[0]: card(PERSON, {"name": "Rewritten early"}),  # read before the write
        paths[-1]: card(PERSON, {"name": "Rewritten late"}),  # read after it
        "new/added.json": card(PET, {"title": "Newcomer"}),
    }
    deletes = [paths[1], paths[-2]]
    jobs = []
    for path, content in writes.items():
        request = spb.WriteRealmFileRequest(realm_id="busy", path=path, content=content)
        jobs.append(stub.WriteRealmFile(request, timeout=RPC_TIMEOUT).job)
    for path in deletes:
        request = spb.DeleteRealmFileRequest(realm_id="busy", path=path)
        jobs.append(stub.DeleteRealmFile(request, timeout=RPC_TIMEOUT).job)
    assert {j.kind for j in jobs} == {pb.JOB_KIND_INCREMENTAL_INDEX}

    for job_id in [first, *{j.job_id for j in jobs}]:
        assert wait_job(stub, job_id).state == pb.Job.STATE_SUCCEEDED
    # The first index ran once, undisturbed.
    assert get_job(stub, first).attempt == 1
    changes = {
        (c.path, c.deleted)
        for job in realm_jobs(stub, "busy")
        if job.kind == pb.JOB_KIND_INCREMENTAL_INDEX
        for c in job.path_changes
    }
    assert changes == {(p, False) for p in writes} | {(p, True) for p in deletes}

    stored = [f.path for f in list_files(stub, "busy")]
    assert sorted(stored) == sorted({*files, *writes, "realm.json", "index.json"} - set(deletes))
    assert_index_whole(stub, "busy", stored)
    assert search_paths(stub, "busy", text="rewritten early") == [paths[0]]
    assert search_paths(stub, "busy", text="rewritten late") == [paths[-1]]
    assert search_paths(stub, "busy", card_type=card_type(PET)) == ["new/added.json"]
