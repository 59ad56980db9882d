"""Realm use cases: create (mount, then exactly one first index), the
per-process registry of mounted realms, files, search.

A realm's first index job comes from CreateRealm, for the realm it has just
inserted (`JobQueue.first_index_of_new_realm`), or from a mount of a realm
that has none (`JobQueue.ensure_first_index`, which never adds one when one
is queued, running or done). CreateRealm mounts the realm
in this process before its transaction commits, and the realm's row, files
and job commit together: once a worker can claim the job, every instance
sharing the store can serve the realm (a lazy mount reads it from the store
and never waits on its index).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from realm_service.clock import Clock, utcnow
from realm_service.domain import (
    INDEX_JSON,
    REALM_JSON,
    USER,
    EnqueueResult,
    IndexEntry,
    Job,
    JobKind,
    PathChange,
    Realm,
    RealmFile,
    check_client_delete,
    check_client_write,
    check_initial_file,
    validate_content,
    validate_display_name,
    validate_path,
    validate_priority,
    validate_realm_id,
    validate_request_id,
)
from realm_service.errors import Conflict, InvalidArgument, PermissionDenied, RealmAlreadyExists
from realm_service.queue import JobQueue
from realm_service.store import index_sql, jobs_sql, keys_sql, leases_sql, realms_sql
from realm_service.store.db import Database, Tx

log = logging.getLogger(__name__)

MAX_INITIAL_FILES = 10_000


@dataclass(frozen=True)
class CreateResult:
    realm: Realm
    job: Job
    replayed: bool  # an idempotent retry returned the first result


class MountRegistry:
    """Realms this process can serve. Mounting never waits on indexing."""

    def __init__(self) -> None:
        self._mounted: set[str] = set()
        self._lock = threading.Lock()

    def mount(self, realm_id: str) -> bool:
        with self._lock:
            if realm_id in self._mounted:
                return False
            self._mounted.add(realm_id)
            return True

    def unmount(self, realm_id: str) -> None:
        with self._lock:
            self._mounted.discard(realm_id)

    def __contains__(self, realm_id: object) -> bool:
        return realm_id in self._mounted

    def __len__(self) -> int:
        return len(self._mounted)


def realm_json(realm_id: str, display_name: str) -> bytes:
    return json.dumps({"id": realm_id, "name": display_name}, indent=2).encode()


def index_card(display_name: str) -> bytes:
    card = {
        "data": {
            "type": "card",
            "attributes": {"title": display_name, "description": f"Index of {display_name}"},
            "relationships": {},
            "meta": {
                "adoptsFrom": {
                    "module": "https://cardstack.com/base/cards-grid",
                    "name": "CardsGrid",
                }
            },
        }
    }
    return json.dumps(card, indent=2).encode()


class Realms:
    def __init__(
        self, db: Database, queue: JobQueue, *, max_file_size: int, clock: Clock = utcnow
    ) -> None:
        self.db = db
        self.queue = queue
        self.max_file_size = max_file_size
        self.clock = clock
        self.registry = MountRegistry()

    # -- create -----------------------------------------------------------

    def create(
        self,
        *,
        realm_id: str,
        priority: int | None,
        display_name: str,
        request_id: str,
        files: Sequence[tuple[str, bytes]],
    ) -> CreateResult:
        validate_realm_id(realm_id)
        prio = validate_priority(priority, USER)
        name = validate_display_name(display_name, realm_id)
        validate_request_id(request_id)
        if len(files) > MAX_INITIAL_FILES:
            raise InvalidArgument(
                f"initial_files has {len(files)} files; the limit is {MAX_INITIAL_FILES}"
            )
        checked: dict[str, bytes] = {}
        for i, (raw_path, content) in enumerate(files):
            path = validate_path(raw_path, f"initial_files[{i}].path")
            validate_content(content, self.max_file_size, f"initial_files[{i}].content")
            check_initial_file(path, f"initial_files[{i}].path")
            if path in checked:  # also two spellings (NFC, NFD) of one name
                raise InvalidArgument(f"initial_files[{i}].path {path!r} appears twice")
            checked[path] = content

        for attempt in range(3):
            try:
                return self._create_once(realm_id, prio, name, request_id, list(checked.items()))
            except Conflict:
                # Another instance won a race on the realm or the request id;
                # the next pass sees its committed result.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _create_once(
        self,
        realm_id: str,
        priority: int,
        name: str,
        request_id: str,
        files: Sequence[tuple[str, bytes]],
    ) -> CreateResult:
        now = self.clock()
        mounted_here = False
        try:
            with self.db.transaction() as s:
                # The realm first, its request id second: the two commit
                # together, so when another instance's create has just
                # committed, the second read sees its key if the first saw
                # its realm (PostgreSQL reads each statement's latest commits),
                # and a retry gets the first result rather than ALREADY_EXISTS.
                exists = realms_sql.realm_exists(s, realm_id)
                if request_id:
                    found = keys_sql.find_key(s, "create-realm", request_id)
                    if found is not None:
                        if found[0] != realm_id:
                            raise InvalidArgument(
                                f"request_id {request_id!r} was already used to create "
                                f"realm {found[0]!r}"
                            )
                        realm = realms_sql.get_realm(s, realm_id)
                        assert found[1] is not None
                        return CreateResult(realm, jobs_sql.get_job(s, found[1]), replayed=True)
                if exists:
                    raise RealmAlreadyExists(f"realm {realm_id!r} already exists")
                # Another instance's create committing since `exists` was read
                # makes this insert fail (a Conflict): the next pass reads its
                # realm and request id.
                realm = realms_sql.insert_new_realm(
                    s,
                    realm_id=realm_id,
                    display_name=name,
                    priority=priority,
                    now=now,
                    files=[
                        (REALM_JSON, realm_json(realm_id, name)),
                        (INDEX_JSON, index_card(name)),
                        *files,
                    ],
                )
                # Mount first: from here this process serves the realm; the job
                # becomes visible to workers only when this transaction commits.
                mounted_here = self.registry.mount(realm_id)
                job = self.queue.first_index_of_new_realm(s, realm_id, priority)
                if request_id:
                    keys_sql.put_key(
                        s,
                        scope="create-realm",
                        key=request_id,
                        realm_id=realm_id,
                        job_id=job.job_id,
                        now=now,
                    )
        except BaseException:
            if mounted_here:
                self.registry.unmount(realm_id)
            raise
        log.info("realm created realm=%s job=%s priority=%s", realm_id, job.job_id, priority)
        return CreateResult(realm, job, replayed=False)

    # -- mount ------------------------------------------------------------

    def ensure_mounted(self, realm_id: str) -> None:
        """Lazy mount of a realm created elsewhere (another instance). Never
        waits on the realm's index; adds a first index job only when the realm
        has none queued, running or completed."""
        if realm_id in self.registry:
            return
        validate_realm_id(realm_id)

        def work(s: Tx) -> Job | None:
            realm = realms_sql.get_realm(s, realm_id)
            if realm.current_generation is not None:
                return None
            return self.queue.ensure_first_index(s, realm_id, realm.created_priority)

        self.db.retrying(work)
        self.registry.mount(realm_id)

    def boot_mount(self, *, batch: int = 500, limit: int = 100_000) -> int:
        """At start, mount the realms that have no index yet, so one whose first
        job is missing (e.g. it failed) gets one at its creation's priority.
        Indexed realms mount lazily on first use. Returns the realms mounted."""
        mounted = 0
        after: str | None = None
        while mounted < limit:
            with self.db.read_transaction() as s:
                ids = realms_sql.realm_ids_page(s, after=after, limit=batch, unindexed_only=True)
            for realm_id in ids:
                self.ensure_mounted(realm_id)
            mounted += len(ids)
            if len(ids) < batch:
                break
            after = ids[-1]
        return mounted

    def check_worker_access(self, realm_id: str, lease_id: str) -> None:
        """Workers read a realm only under the lease of its running job: the
        lease id is a secret handed out on the worker's own ClaimJobs stream,
        so quoting it binds the read to the job the caller holds."""
        validate_realm_id(realm_id)
        if not lease_id:
            raise PermissionDenied(
                "workers must quote lease_id, the lease of their running job of the realm"
            )
        with self.db.read_transaction() as s:
            if not leases_sql.lease_runs_realm(s, lease_id[:64], realm_id):
                raise PermissionDenied(
                    f"lease_id is not the current lease of a running job of realm {realm_id!r}"
                )

    def sweep_request_ids(self, retention: timedelta, *, batch: int = 1000) -> int:
        """Forget request ids older than `retention`; a retry after that is a
        new request. Swept in bounded batches; returns how many went."""
        before = self.clock() - retention
        swept = 0
        while True:
            n = self.db.retrying(functools.partial(keys_sql.sweep_keys, before=before, limit=batch))
            swept += n
            if n < batch:
                return swept

    # -- reads ----------------------------------------------------------------

    def get(self, realm_id: str) -> Realm:
        validate_realm_id(realm_id)
        with self.db.read_transaction() as s:
            return realms_sql.get_realm(s, realm_id)

    def list_realms(self, *, after: str | None, limit: int) -> list[Realm]:
        with self.db.read_transaction() as s:
            return realms_sql.list_realms(s, after=after, limit=limit)

    def list_files(self, realm_id: str) -> list[RealmFile]:
        self.ensure_mounted(realm_id)
        with self.db.read_transaction() as s:
            return realms_sql.list_files(s, realm_id)

    def read_file(self, realm_id: str, path: str) -> tuple[RealmFile, bytes]:
        path = validate_path(path)
        self.ensure_mounted(realm_id)
        with self.db.read_transaction() as s:
            return realms_sql.read_file(s, realm_id=realm_id, path=path)

    def search(
        self, realm_id: str, *, card_type: str, text: str, after_path: str | None, limit: int
    ) -> list[IndexEntry]:
        validate_realm_id(realm_id)
        if len(card_type) > 400 or len(text) > 400:
            raise InvalidArgument("card_type and text are limited to 400 characters")
        with self.db.read_transaction() as s:
            realm = realms_sql.get_realm(s, realm_id)
            return index_sql.search(
                s,
                realm_id=realm_id,
                generation=realm.current_generation,
                card_type=card_type,
                text=text,
                after_path=after_path,
                limit=limit,
            )

    # -- writes -----------------------------------------------------------------

    def write_file(
        self, realm_id: str, path: str, content: bytes, priority: int | None
    ) -> tuple[RealmFile, EnqueueResult]:
        validate_realm_id(realm_id)
        path = validate_path(path)
        check_client_write(path)
        validate_content(content, self.max_file_size)
        prio = validate_priority(priority, USER)

        def work(s: Tx) -> tuple[RealmFile, EnqueueResult]:
            realms_sql.get_realm(s, realm_id, lock=True)
            stored = realms_sql.put_file(
                s, realm_id=realm_id, path=path, content=content, now=self.clock()
            )
            return stored, self.queue.enqueue_in(
                s,
                realm_id,
                JobKind.INCREMENTAL,
                prio,
                paths=[PathChange(path, False)],
                content_changed=True,
            )

        return self.db.retrying(work)

    def delete_file(self, realm_id: str, path: str, priority: int | None) -> EnqueueResult:
        validate_realm_id(realm_id)
        path = validate_path(path)
        check_client_delete(path)
        prio = validate_priority(priority, USER)

        def work(s: Tx) -> EnqueueResult:
            realms_sql.get_realm(s, realm_id, lock=True)
            realms_sql.delete_file(s, realm_id=realm_id, path=path)
            return self.queue.enqueue_in(
                s,
                realm_id,
                JobKind.INCREMENTAL,
                prio,
                paths=[PathChange(path, True)],
                content_changed=True,
            )

        return self.db.retrying(work)

    def reindex(self, realm_id: str, priority: int | None, content_changed: bool) -> EnqueueResult:
        validate_realm_id(realm_id)
        prio = validate_priority(priority, USER)
        return self.queue.enqueue(
            realm_id, JobKind.FROM_SCRATCH, prio, content_changed=content_changed
        )
