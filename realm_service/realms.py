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

import asyncio
import contextlib
import functools
import json
import logging
import threading
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from realm_service import metrics
from realm_service.clock import Clock, utcnow
from realm_service.domain import (
    INDEX_JSON,
    REALM_JSON,
    USER,
    EnqueueResult,
    HandOff,
    IndexEntry,
    Job,
    JobKind,
    PathChange,
    Realm,
    RealmDeletion,
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
from realm_service.errors import (
    Conflict,
    FileNotFound,
    InvalidArgument,
    PermissionDenied,
    RealmAlreadyExists,
    RealmError,
    StaleLease,
)
from realm_service.queue import JobQueue
from realm_service.store import index_sql, jobs_sql, keys_sql, leases_sql, realms_sql
from realm_service.store.db import Database, Tx

log = logging.getLogger(__name__)

MAX_INITIAL_FILES = 10_000
# StreamRealmFiles: paths a request may name, files a page reads at most.
MAX_STREAM_PATHS = 10_000
STREAM_PAGE_FILES = 256
# So many named files or fewer are read with their content in one query.
FEW_PATHS = 4
# WriteRealmFiles: files and deletions one request may carry.
MAX_WRITE_FILES = 10_000


@dataclass(frozen=True)
class FilePage:
    """One page of a realm's files with their content, in path order."""

    files: list[tuple[RealmFile, bytes]]
    # Where the next page starts (exclusive); None after the last page.
    next_after: str | None
    # On the first page: how many files the stream will send at most.
    total: int | None = None


@dataclass(frozen=True)
class BulkWrite:
    """What WriteRealmFiles stored and the job that will index it."""

    files: list[RealmFile]
    deleted: int
    result: EnqueueResult


@dataclass(frozen=True)
class CreateResult:
    realm: Realm
    job: Job
    replayed: bool  # an idempotent retry returned the first result


class MountRegistry:
    """Realms this process can serve. Mounting never waits on indexing."""

    def __init__(self) -> None:
        self._mounted: set[str] = set()
        # Creates under way, by realm: each serves its realm until it ends.
        self._creating: Counter[str] = Counter()
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

    @contextlib.contextmanager
    def mounting(self, realm_id: str) -> Iterator[None]:
        """The realm mounted while the block runs (a create whose job may
        become visible in it), and after it when the block ends normally.
        A block that fails takes back only its own part: the realm stays
        mounted if it was before, or if another block of it (a create that
        won the race this one lost) kept it or still runs."""
        with self._lock:
            self._creating[realm_id] += 1
        kept = False
        try:
            yield
            kept = True
        finally:
            with self._lock:
                if kept:
                    self._mounted.add(realm_id)
                self._creating[realm_id] -= 1
                if not self._creating[realm_id]:
                    del self._creating[realm_id]

    def __contains__(self, realm_id: object) -> bool:
        return realm_id in self._mounted or realm_id in self._creating

    def __len__(self) -> int:
        with self._lock:
            return len(self._mounted | set(self._creating))


def realm_json(realm_id: str, display_name: str) -> bytes:
    return json.dumps({"id": realm_id, "name": display_name}, indent=2).encode()


def _index_card_value(display_name: str) -> dict[str, object]:
    return {
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


# `json.dumps(_index_card_value(name), indent=2)` with the name put in place:
# with `indent` the json module encodes in Python, not C, and that was a
# tenth of CreateRealm's own time (tests/unit/test_index_card.py keeps the
# two equal). The template is split around the encoded title and description.
def _index_card_parts() -> tuple[str, str, str]:
    text = json.dumps(_index_card_value("\0"), indent=2)
    head, rest = text.split(json.dumps("\0"), 1)
    middle, tail = rest.split(json.dumps("Index of \0"), 1)
    return head, middle, tail


_INDEX_CARD = _index_card_parts()


def index_card(display_name: str) -> bytes:
    head, middle, tail = _INDEX_CARD
    title, description = json.dumps(display_name), json.dumps(f"Index of {display_name}")
    return f"{head}{title}{middle}{description}{tail}".encode()


# A create on PostgreSQL without a request id runs on the event loop when
# its initial files are at most this many bytes in all (`create_async`): their
# checks and hashes then take the loop a few tens of microseconds at most.
LOOP_CREATE_BYTES = 64 * 1024
# ... and at most this many of them (each path is checked character by
# character).
LOOP_CREATE_FILES = 16


def _checked_create(
    realm_id: str,
    priority: int | None,
    display_name: str,
    request_id: str,
    files: Sequence[tuple[str, bytes]],
    max_file_size: int,
) -> tuple[int, str, list[tuple[str, bytes]]]:
    """A create's arguments checked: its priority, display name and files."""
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
        validate_content(content, max_file_size, f"initial_files[{i}].content")
        check_initial_file(path, f"initial_files[{i}].path")
        if path in checked:  # also two spellings (NFC, NFD) of one name
            raise InvalidArgument(f"initial_files[{i}].path {path!r} appears twice")
        checked[path] = content
    return prio, name, list(checked.items())


def _files_of_new_realm(
    realm_id: str, name: str, files: Sequence[tuple[str, bytes]]
) -> list[tuple[str, bytes]]:
    return [(REALM_JSON, realm_json(realm_id, name)), (INDEX_JSON, index_card(name)), *files]


def _created_result(created: tuple[Realm, Job], priority: int) -> CreateResult:
    realm, job = created
    log.info(
        "realm created",
        extra={"realm": realm.realm_id, "job": job.job_id, "priority": priority},
    )
    return CreateResult(realm, job, replayed=False)


class Realms:
    def __init__(
        self, db: Database, queue: JobQueue, *, max_file_size: int, clock: Clock = utcnow
    ) -> None:
        self.db = db
        self.queue = queue
        self.max_file_size = max_file_size
        self.clock = clock
        self.registry = MountRegistry()
        # Store threads finishing creates whose callers went away (the loop
        # keeps only weak references to its tasks).
        self._left_behind: set[asyncio.Future[None]] = set()
        # Deleted here or on another instance: unmount.
        db.on_realm_deleted(self.registry.unmount)

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
        prio, name, checked = _checked_create(
            realm_id, priority, display_name, request_id, files, self.max_file_size
        )
        return self._create_checked(realm_id, prio, name, request_id, checked)

    def _create_checked(
        self,
        realm_id: str,
        priority: int,
        name: str,
        request_id: str,
        files: Sequence[tuple[str, bytes]],
    ) -> CreateResult:
        for attempt in range(3):
            try:
                return self._create_once(realm_id, priority, name, request_id, files)
            except Conflict:
                # Another instance won a race on the realm or the request id;
                # the next pass sees its committed result.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def create_async(
        self,
        *,
        realm_id: str,
        priority: int | None,
        display_name: str,
        request_id: str,
        files: Sequence[tuple[str, bytes]],
    ) -> CreateResult:
        """`create` for a caller on the event loop. On PostgreSQL a create
        without a request id, and with initial files of at most
        `LOOP_CREATE_FILES` files and `LOOP_CREATE_BYTES` (paths and
        contents) in all, runs there: its one statement
        (`Database.loop_statements`), without the two hops to a store thread
        and back. Any other create runs `create` in a store thread. Either
        runs to its end when its caller goes away meanwhile: the realm is
        then mounted and its job stands, as the answer would have said (on
        the loop, a store thread finishes what the cancelled statement left,
        `_finish_left_behind`)."""
        if (
            request_id
            or not self.db.runs_on_loop
            or len(files) > LOOP_CREATE_FILES
            or sum(len(path) + len(content) for path, content in files) > LOOP_CREATE_BYTES
        ):
            return await asyncio.to_thread(
                functools.partial(
                    self.create,
                    realm_id=realm_id,
                    priority=priority,
                    display_name=display_name,
                    request_id=request_id,
                    files=files,
                )
            )
        prio, name, checked = _checked_create(
            realm_id, priority, display_name, request_id, files, self.max_file_size
        )
        try:
            return await self._create_on_loop(realm_id, prio, name, checked)
        except asyncio.CancelledError:
            # Not a task shielded from the cancel: that cost a tenth of the
            # create's time in loop passes (bench/README.md).
            finish = asyncio.ensure_future(
                asyncio.to_thread(self._finish_left_behind, realm_id, prio, name, checked)
            )
            self._left_behind.add(finish)
            finish.add_done_callback(self._left_behind_done)
            raise

    def _left_behind_done(self, finish: asyncio.Future[None]) -> None:
        self._left_behind.discard(finish)
        if not finish.cancelled() and finish.exception() is not None:
            log.error(
                "create left by its caller failed",
                exc_info=finish.exception(),
            )

    async def wait_left_behind(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) for creates left by their callers
        to be finished: before the store closes at a stop."""
        if self._left_behind:
            await asyncio.wait(list(self._left_behind), timeout=timeout)

    def _finish_left_behind(
        self, realm_id: str, priority: int, name: str, files: Sequence[tuple[str, bytes]]
    ) -> None:
        """A create on the loop whose caller went away. psycopg cancelled its
        statement in the server and waited for its end, so the statement
        either committed (the realm exists, maybe not mounted: the cancel
        may have come after the commit, at an effect's await) or left
        nothing. Either way the create ends as one in a store thread would
        have: the realm created now, or mounted (and given a first job if
        it has none, `ensure_mounted`). A statement that committed before
        the cancel fired none of its effects: the work is announced again
        (a wake-up too many, for a realm that was there before, is no
        harm)."""
        try:
            self._create_checked(realm_id, priority, name, "", files)
        except RealmAlreadyExists:
            self.ensure_mounted(realm_id)
            self.queue.announce_work()
        except RealmError as e:  # the store failed it: as the caller would have heard
            log.warning(
                "create left by its caller not finished",
                extra={"realm": realm_id, "error": str(e)},
            )

    async def _create_on_loop(
        self, realm_id: str, priority: int, name: str, files: Sequence[tuple[str, bytes]]
    ) -> CreateResult:
        for attempt in range(3):
            try:
                return await self._create_new_on_loop(realm_id, priority, name, files)
            except Conflict:  # as in `create`
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _create_new_on_loop(
        self, realm_id: str, priority: int, name: str, files: Sequence[tuple[str, bytes]]
    ) -> CreateResult:
        """`_create_new` on the event loop."""
        now = self.clock()
        with self.registry.mounting(realm_id):
            async with self.db.loop_statements() as s:
                created = await self.queue.new_realm_on_loop(
                    s,
                    realm_id=realm_id,
                    display_name=name,
                    priority=priority,
                    now=now,
                    files=_files_of_new_realm(realm_id, name, files),
                )
            if created is None:
                raise RealmAlreadyExists(f"realm {realm_id!r} already exists")
        return _created_result(created, priority)

    def _create_once(
        self,
        realm_id: str,
        priority: int,
        name: str,
        request_id: str,
        files: Sequence[tuple[str, bytes]],
    ) -> CreateResult:
        now = self.clock()
        if not request_id:
            return self._create_new(realm_id, priority, name, files, now)
        mounted_here = False
        try:
            with self.db.transaction() as s:
                # The realm first, its request id second: the two commit
                # together, so when another instance's create has just
                # committed, the second read sees its key if the first saw
                # its realm (PostgreSQL reads each statement's latest commits),
                # and a retry gets the first result rather than ALREADY_EXISTS.
                # Without a request id, the insert itself finds out.
                exists = bool(request_id) and realms_sql.realm_exists(s, realm_id)
                if request_id:
                    found = keys_sql.find_key(s, "create-realm", request_id)
                    if found is not None:
                        if found[0] != realm_id:
                            raise InvalidArgument(
                                f"request_id {request_id!r} was already used to create "
                                f"realm {found[0]!r}"
                            )
                        assert found[1] is not None
                        return CreateResult(
                            realms_sql.get_realm(s, realm_id),
                            jobs_sql.get_job(s, found[1]),
                            replayed=True,
                        )
                if exists:
                    raise RealmAlreadyExists(f"realm {realm_id!r} already exists")
                # Another instance's create committing since `exists` was read
                # makes this insert fail (a Conflict): the next pass reads its
                # realm and request id. Without a request id there is nothing
                # to replay: the insert finds the realm there or puts it.
                created = realms_sql.insert_new_realm(
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
                    if_absent=not request_id,
                )
                if created is None:
                    raise RealmAlreadyExists(f"realm {realm_id!r} already exists")
                realm = created
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
        log.info(
            "realm created", extra={"realm": realm_id, "job": job.job_id, "priority": priority}
        )
        return CreateResult(realm, job, replayed=False)

    def _create_new(
        self,
        realm_id: str,
        priority: int,
        name: str,
        files: Sequence[tuple[str, bytes]],
        now: datetime,
    ) -> CreateResult:
        """A create without a request id: nothing to replay, so nothing to
        read first. The realm, its files and its first job are written
        together (`JobQueue.new_realm`; one statement that commits alone on
        PostgreSQL), or nothing is when the realm exists. The realm is
        mounted first: its job appears only with it."""
        with self.registry.mounting(realm_id):
            with self.db.statements() as s:
                created = self.queue.new_realm(
                    s,
                    realm_id=realm_id,
                    display_name=name,
                    priority=priority,
                    now=now,
                    files=_files_of_new_realm(realm_id, name, files),
                )
            if created is None:
                raise RealmAlreadyExists(f"realm {realm_id!r} already exists")
        return _created_result(created, priority)

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

    def start_file_stream(
        self, realm_id: str, paths: Sequence[str], after: str
    ) -> tuple[list[str] | None, str | None]:
        """Check a StreamRealmFiles request: returns the named paths (NFC,
        sorted, deduplicated; None for every file) and where to start."""
        validate_realm_id(realm_id)
        if len(paths) > MAX_STREAM_PATHS:
            raise InvalidArgument(
                f"paths has {len(paths)} entries; the limit is {MAX_STREAM_PATHS}"
            )
        named = (
            sorted({validate_path(p, f"paths[{i}]") for i, p in enumerate(paths)})
            if paths
            else None
        )
        start = validate_path(after, "after_path") if after else None
        self.ensure_mounted(realm_id)
        return named, start

    def read_file_page(
        self,
        realm_id: str,
        *,
        lease_id: str,
        after: str | None,
        paths: Sequence[str] | None,
        max_bytes: int,
        first: bool = False,
    ) -> FilePage:
        """The next files after `after` with their content: at most
        STREAM_PAGE_FILES, and no more than `max_bytes` of content unless one
        file alone is larger. A quoted lease must still be current. The
        `first` page also checks that the realm exists and counts the files
        the stream will send at most (`total`)."""
        total: int | None = None
        if first and lease_id and paths is None:
            self._open_checkpoint(realm_id, lease_id[:64])
        with self.db.read_transaction() as s:
            skip: int | None = None
            kept = 0
            if lease_id:
                held = leases_sql.running_lease(s, lease_id[:64], realm_id)
                if held is None:
                    raise StaleLease(
                        f"lease {lease_id[:64]!r} is no longer the current lease of a running "
                        f"job of realm {realm_id!r}: it was released, expired or revoked"
                    )
                if paths is None and held.checkpoint is not None and held.kept is not None:
                    skip, kept = held.checkpoint, held.kept  # their files are indexed
            if first:
                realm = realms_sql.get_realm(s, realm_id)
                if paths is None:
                    total = max(0, realm.files - kept)
                else:
                    total = len(paths) - (bisect_right(paths, after) if after is not None else 0)
            if paths is not None:
                at = bisect_right(paths, after) if after is not None else 0
                candidates = paths[at : at + STREAM_PAGE_FILES]
                if len(paths) - at <= FEW_PATHS:
                    # The last few named files (an incremental job's usual
                    # read): their content at once, no listing first.
                    return FilePage(
                        realms_sql.files_with_content(s, realm_id, candidates), None, total
                    )
                listed = realms_sql.file_page(
                    s, realm_id, after=None, paths=candidates, limit=STREAM_PAGE_FILES
                )
                more = candidates and at + STREAM_PAGE_FILES < len(paths)
                more_after = candidates[-1] if more else None
            else:
                listed = realms_sql.file_page(
                    s,
                    realm_id,
                    after=after,
                    paths=None,
                    limit=STREAM_PAGE_FILES,
                    skip_generation=skip,
                )
                more_after = listed[-1].path if len(listed) == STREAM_PAGE_FILES else None
            taken: list[str] = []
            size = 0
            for info in listed:
                if taken and size + info.size > max_bytes:
                    more_after = taken[-1]
                    break
                taken.append(info.path)
                size += info.size
            files = realms_sql.files_with_content(s, realm_id, taken, contiguous=paths is None)
        return FilePage(files, more_after, total)

    def _open_checkpoint(self, realm_id: str, lease_id: str) -> None:
        """A from-scratch job's attempt that continues from a checkpoint opens
        it when its worker starts reading the realm (DESIGN.md section 6):
        what changed since goes, the rest is kept and not read again."""
        with self.db.read_transaction() as s:
            held = leases_sql.running_lease(s, lease_id, realm_id)
        if held is None or held.checkpoint is None or held.kept is not None:
            return

        def work(tx: Tx) -> None:
            try:
                held = leases_sql.current(tx, lease_id)
            except StaleLease:
                return  # refused by the read that follows
            if held.checkpoint is None or held.kept is not None:
                return
            gitignore = leases_sql.checkpoint_gitignore(tx, held.job_id) or ""
            kept = index_sql.open_checkpoint(tx, held.job_id, realm_id, held.checkpoint, gitignore)
            metrics.CHECKPOINT_ENTRIES.inc(kept)
            log.info(
                "checkpoint opened",
                extra={"job": held.job_id, "realm": realm_id, "kept": kept},
            )

        self.db.retrying(work)

    def search(
        self, realm_id: str, *, card_type: str, text: str, after_path: str | None, limit: int
    ) -> list[IndexEntry]:
        validate_realm_id(realm_id)
        if len(card_type) > 400 or len(text) > 400:
            raise InvalidArgument("card_type and text are limited to 400 characters")
        # A block: the search may set its plan mode for the rest of it.
        with self.db.read_transaction(block=True) as s:
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

    def write_files(
        self,
        realm_id: str,
        files: Sequence[tuple[str, bytes]],
        deleted_paths: Sequence[str],
        priority: int | None,
    ) -> BulkWrite:
        """Write and delete many files in one transaction; one index request
        for all of them (an incremental job, or a from-scratch one when they
        are more paths than a job may list)."""
        validate_realm_id(realm_id)
        prio = validate_priority(priority, USER)
        count = len(files) + len(deleted_paths)
        if count == 0:
            raise InvalidArgument("nothing to write: files and deleted_paths are both empty")
        if count > MAX_WRITE_FILES:
            raise InvalidArgument(
                f"files and deleted_paths hold {count} entries; the limit is {MAX_WRITE_FILES}"
            )
        written: dict[str, bytes] = {}
        for i, (raw_path, content) in enumerate(files):
            path = validate_path(raw_path, f"files[{i}].path")
            check_client_write(path, f"files[{i}].path")
            validate_content(content, self.max_file_size, f"files[{i}].content")
            if path in written:  # also two spellings (NFC, NFD) of one name
                raise InvalidArgument(f"files[{i}].path {path!r} appears twice")
            written[path] = content
        deleted: list[str] = []
        for i, raw_path in enumerate(deleted_paths):
            path = validate_path(raw_path, f"deleted_paths[{i}]")
            check_client_delete(path, f"deleted_paths[{i}]")
            if path in written or path in deleted:
                raise InvalidArgument(f"deleted_paths[{i}] {path!r} is named twice")
            deleted.append(path)
        changes = [PathChange(p, False) for p in written] + [PathChange(p, True) for p in deleted]

        def work(s: Tx) -> BulkWrite:
            realms_sql.get_realm(s, realm_id, lock=True)
            existing = realms_sql.existing_paths(s, realm_id, [*written, *deleted])
            missing = [p for p in deleted if p not in existing]
            if missing:
                raise FileNotFound(
                    f"deleted_paths: file {missing[0][:200]!r} does not exist in realm "
                    f"{realm_id!r}" + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            stored = realms_sql.put_files(
                s,
                realm_id=realm_id,
                files=list(written.items()),
                existing=existing,
                now=self.clock(),
            )
            gone = realms_sql.delete_files(s, realm_id=realm_id, paths=deleted)
            result = self.queue.enqueue_in(
                s, realm_id, JobKind.INCREMENTAL, prio, paths=changes, content_changed=True
            )
            return BulkWrite(stored, gone, result)

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

    def delete(self, realm_id: str, request_id: str) -> RealmDeletion:
        """Delete a realm with its files, index, idempotency keys and jobs;
        running jobs' leases are revoked at commit, and every instance
        unmounts it. Idempotent by request id."""
        validate_realm_id(realm_id)
        validate_request_id(request_id)
        now = self.clock()

        def work(s: Tx) -> RealmDeletion:
            if request_id:
                found = keys_sql.find_key(s, "delete-realm", request_id)
                if found is not None:
                    if found[0] != realm_id:
                        raise InvalidArgument(
                            f"request_id {request_id!r} was already used to delete realm "
                            f"{found[0]!r}"
                        )
                    return RealmDeletion(0, 0, (), replayed=True)
            realms_sql.get_realm(s, realm_id, lock=True)
            active, files = realms_sql.delete_realm(s, realm_id)
            keys_sql.delete_keys_of(s, realm_id)
            if request_id:
                keys_sql.put_key(
                    s, scope="delete-realm", key=request_id, realm_id=realm_id, job_id=None, now=now
                )
            leases = tuple(lease for _, lease in active if lease)
            s.revoke(leases, f"realm {realm_id} was deleted")
            s.realm_deleted(realm_id)
            s.job_changed([job_id for job_id, _ in active])
            return RealmDeletion(len(active), files, leases)

        deletion = self.db.retrying(work)
        if not deletion.replayed:
            log.info(
                "realm deleted",
                extra={
                    "realm": realm_id,
                    "jobs": deletion.jobs_cancelled,
                    "files": deletion.files_deleted,
                },
            )
        return deletion

    def reindex(
        self,
        realm_id: str,
        priority: int | None,
        content_changed: bool,
        hand_off: HandOff | None = None,
    ) -> EnqueueResult:
        validate_realm_id(realm_id)
        prio = validate_priority(priority, USER)
        return self.queue.enqueue(
            realm_id,
            JobKind.FROM_SCRATCH,
            prio,
            content_changed=content_changed,
            hand_off=hand_off,
        )

    async def reindex_on_loop(
        self,
        realm_id: str,
        priority: int | None,
        content_changed: bool,
        hand_off: HandOff | None = None,
    ) -> EnqueueResult:
        """`reindex` for a caller on the event loop (`JobQueue.enqueue_on_loop`)."""
        validate_realm_id(realm_id)
        prio = validate_priority(priority, USER)
        return await self.queue.enqueue_on_loop(
            realm_id,
            JobKind.FROM_SCRATCH,
            prio,
            content_changed=content_changed,
            hand_off=hand_off,
        )
