"""Running one job: read the realm's files over RPC, index them, upload the entries.

Knows nothing of grpc: the realm's files come through `RealmFiles` and entries
leave through an `Upload` callable, both provided by the session. The outcome
is always returned, never raised, except for cancellation (the lease was lost
or released) and a closed stream, which end the attempt without a result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from index_worker import metrics
from index_worker.indexer import (
    GITIGNORE_PATH,
    IgnorePattern,
    IndexEntry,
    index_file,
    is_ignored,
    parse_gitignore,
)
from index_worker.model import (
    Assignment,
    FileAccessError,
    FileBatch,
    FileInfo,
    FilesUnavailableError,
    JobKind,
    JobOutcome,
    Outcome,
    Progress,
    RealmGoneError,
    StreamClosedError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Stays well below gRPC's default 4 MiB receive limit on the server.
MAX_BATCH_BYTES = 2 * 1024 * 1024
# Above this, hashing and parsing move to a thread so pings and heartbeats
# on the event loop are not held up by one big file.
THREAD_THRESHOLD_BYTES = 256 * 1024
# A job's last entries go with its result when they are this few bytes at
# most (a small job is one message each way; results are sent in batches).
RESULT_ENTRIES_BYTES = 64 * 1024
# Paths one StreamRealmFiles call may name; beyond, every file is streamed.
MAX_STREAM_PATHS = 10_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RealmFiles(Protocol):
    """Access to a realm's files; NOT_FOUND of the realm raises RealmGoneError."""

    async def list_files(self, realm_id: str) -> list[FileInfo]: ...

    async def read_file(self, realm_id: str, path: str) -> tuple[FileInfo, bytes] | None: ...

    def stream_files(
        self, realm_id: str, paths: Sequence[str] | None = None
    ) -> AsyncIterator[FileBatch]:
        """Files with content in path order: all, or those of `paths` that exist."""
        ...


class IncludedFiles:
    """A realm's files as far as a job's assignment brought them (each path of
    its list that exists, and .gitignore, as they were when it was claimed);
    anything else is read from `rest`."""

    def __init__(self, assignment: Assignment, rest: RealmFiles) -> None:
        self._realm_id = assignment.realm_id
        self._covered = {change.path for change in assignment.path_changes} | {GITIGNORE_PATH}
        self._files = {info.path: (info, content) for info, content in assignment.files or ()}
        self._rest = rest

    def _has(self, realm_id: str, paths: Iterable[str]) -> bool:
        return realm_id == self._realm_id and all(path in self._covered for path in paths)

    async def list_files(self, realm_id: str) -> list[FileInfo]:
        return await self._rest.list_files(realm_id)

    async def read_file(self, realm_id: str, path: str) -> tuple[FileInfo, bytes] | None:
        if self._has(realm_id, [path]):
            return self._files.get(path)
        return await self._rest.read_file(realm_id, path)

    async def stream_files(
        self, realm_id: str, paths: Sequence[str] | None = None
    ) -> AsyncIterator[FileBatch]:
        if paths is not None and self._has(realm_id, paths):
            found = [self._files[path] for path in sorted(set(paths)) if path in self._files]
            yield FileBatch(found, len(found))
            return
        async for batch in self._rest.stream_files(realm_id, paths):
            yield batch


class FileSource(Protocol):
    """Realm files as one job may read them: bound to the job's lease."""

    def for_lease(self, lease_id: str) -> RealmFiles: ...


Upload = Callable[[Sequence[IndexEntry], Sequence[str]], Awaitable[None]]


@dataclass(frozen=True)
class JobLimits:
    batch_size: int = 500
    batch_max_bytes: int = MAX_BATCH_BYTES
    # Most files a job reads per second; 0 is no limit.
    files_per_second: float = 0.0


async def execute_job(
    assignment: Assignment,
    files: RealmFiles,
    upload: Upload,
    progress: Progress,
    limits: JobLimits,
    *,
    result_entries: bool = False,
) -> JobOutcome:
    """Run the job and say how it ended. With `result_entries` (the server
    takes them) a job's last few entries go with its result instead of an
    upload of their own."""
    lease_id = assignment.lease_id
    if assignment.files is not None:
        files = IncludedFiles(assignment, files)
    try:
        batcher = _Batcher(upload, limits)
        if assignment.kind is JobKind.FROM_SCRATCH:
            await _from_scratch(assignment.realm_id, files, batcher, progress, limits)
        elif assignment.kind is JobKind.INCREMENTAL:
            await _incremental(assignment, files, batcher, progress, limits)
        else:
            return JobOutcome(lease_id, Outcome.FAILED, "unsupported job kind")
        entries, deleted = batcher.last() if result_entries else ((), ())
        await batcher.flush()
        return JobOutcome(
            lease_id,
            Outcome.SUCCEEDED,
            entries_uploaded=batcher.entries_uploaded + len(entries),
            files_done=progress.done,
            entries=entries,
            deleted=deleted,
        )
    except StreamClosedError:
        raise
    except RealmGoneError as exc:
        return JobOutcome(lease_id, Outcome.FAILED_PERMANENTLY, str(exc))
    except FilesUnavailableError as exc:
        return JobOutcome(lease_id, Outcome.INTERRUPTED, str(exc))
    except FileAccessError as exc:
        return JobOutcome(lease_id, Outcome.FAILED, str(exc))
    except Exception as exc:
        logger.exception(
            "job failed unexpectedly", extra={"job": assignment.job_id, "lease": lease_id}
        )
        return JobOutcome(lease_id, Outcome.FAILED, f"internal error: {type(exc).__name__}: {exc}")


async def _from_scratch(
    realm_id: str, files: RealmFiles, batcher: _Batcher, progress: Progress, limits: JobLimits
) -> None:
    patterns = await _load_gitignore(files, realm_id)
    pace = _Pace(limits.files_per_second)
    # Every file streamed in path order; a file written meanwhile comes in
    # either version, and its write queues an incremental job after this one.
    async for batch in files.stream_files(realm_id):
        if batch.total is not None:
            progress.total = batch.total
        for part in pace.parts(batch.files):
            wanted = [
                (info, content)
                for info, content in part
                if info.path != GITIGNORE_PATH and not is_ignored(info.path, patterns)
            ]
            for entry in await _index_batch(wanted):
                await batcher.add_entry(entry)
            progress.done += len(part)
            progress.total = max(progress.total, progress.done)
            await pace.took(len(part))


async def _incremental(
    assignment: Assignment,
    files: RealmFiles,
    batcher: _Batcher,
    progress: Progress,
    limits: JobLimits,
) -> None:
    realm_id = assignment.realm_id
    deleted_by_path: dict[str, bool] = {}
    for change in assignment.path_changes:
        # As in the server's merge rule, a delete wins over an update.
        deleted_by_path[change.path] = deleted_by_path.get(change.path, False) or change.deleted
    # A changed .gitignore can hide or reveal any file: every file is decided
    # again. Otherwise only the changed paths are streamed, and the realm's
    # .gitignore with them when it sorts first (no changed path sorts before
    # it), which saves a round trip.
    every_file = GITIGNORE_PATH in deleted_by_path or len(deleted_by_path) > MAX_STREAM_PATHS
    changed = sorted(p for p in deleted_by_path if p != GITIGNORE_PATH)
    if every_file or (changed and changed[0] < GITIGNORE_PATH):
        patterns = await _load_gitignore(files, realm_id)
        settled = True
        wanted: list[str] | None = None if every_file else changed
    else:
        patterns = ()
        settled = False
        wanted = [GITIGNORE_PATH, *changed]
    decide_all = GITIGNORE_PATH in deleted_by_path
    progress.total = len(deleted_by_path)
    progress.done += 1 if GITIGNORE_PATH in deleted_by_path else 0

    # "Delete wins" when changes are merged, but a path deleted and then
    # written again exists: the realm's files are the truth, so every path
    # is read, and one the stream does not return is gone.
    found: set[str] = set()
    pace = _Pace(limits.files_per_second)
    async for batch in files.stream_files(realm_id, wanted):
        to_index: list[tuple[FileInfo, bytes]] = []
        for info, content in batch.files:
            if info.path == GITIGNORE_PATH:
                if not settled:
                    patterns = parse_gitignore(content.decode("utf-8", errors="replace"))
                continue
            settled = True
            if not decide_all and info.path not in deleted_by_path:
                continue
            found.add(info.path)
            progress.done += 1
            if is_ignored(info.path, patterns):
                await batcher.add_deleted(info.path)
            else:
                to_index.append((info, content))
        for entry in await _index_batch(to_index):
            await batcher.add_entry(entry)
        await pace.took(len(batch.files))
    for path in changed:
        if path not in found:
            await batcher.add_deleted(path)
            progress.done += 1
    progress.total = max(progress.total, progress.done)


async def _index_batch(files: Sequence[tuple[FileInfo, bytes]]) -> list[IndexEntry]:
    """Index files in order; a batch with much content is indexed in a thread
    so pings and heartbeats on the event loop are not held up."""

    def index_all() -> list[IndexEntry]:
        return [index_file(info.path, content, info.mtime or _EPOCH) for info, content in files]

    size = sum(len(content) for _, content in files)
    metrics.FILES_INDEXED.inc(len(files))
    metrics.BYTES_READ.inc(size)

    if size > THREAD_THRESHOLD_BYTES:
        return await asyncio.to_thread(index_all)
    return index_all()


async def _load_gitignore(files: RealmFiles, realm_id: str) -> tuple[IgnorePattern, ...]:
    found = await files.read_file(realm_id, GITIGNORE_PATH)
    if found is None:
        return ()
    return parse_gitignore(found[1].decode("utf-8", errors="replace"))


class _Pace:
    """Holds a job to `per_second` files on average (0: no limit), in parts
    small enough that progress moves smoothly."""

    PART = 10

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self._start: float | None = None
        self._count = 0

    def parts(self, files: list[T]) -> list[list[T]]:
        if self.per_second <= 0 or len(files) <= self.PART:
            return [files]
        return [files[i : i + self.PART] for i in range(0, len(files), self.PART)]

    async def took(self, n: int) -> None:
        if self.per_second <= 0:
            return
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        self._count += n
        wait = self._start + self._count / self.per_second - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)


class _Batcher:
    """Groups entries and deletions into uploads bounded in count and bytes."""

    def __init__(self, upload: Upload, limits: JobLimits) -> None:
        self._upload = upload
        self._limits = limits
        self._entries: list[IndexEntry] = []
        self._deleted: list[str] = []
        self._bytes = 0
        self.entries_uploaded = 0

    async def add_entry(self, entry: IndexEntry) -> None:
        await self._make_room(_estimated_bytes(entry))
        self._entries.append(entry)

    async def add_deleted(self, path: str) -> None:
        await self._make_room(len(path.encode()) + 8)
        self._deleted.append(path)

    def last(self) -> tuple[tuple[IndexEntry, ...], tuple[str, ...]]:
        """The pending entries and deletions, taken to go with the result,
        when they are few (RESULT_ENTRIES_BYTES); else nothing is taken."""
        if self._bytes > RESULT_ENTRIES_BYTES:
            return (), ()
        entries, deleted = tuple(self._entries), tuple(self._deleted)
        self._entries, self._deleted, self._bytes = [], [], 0
        return entries, deleted

    async def flush(self) -> None:
        if not self._entries and not self._deleted:
            return
        entries, deleted = self._entries, self._deleted
        self._entries, self._deleted, self._bytes = [], [], 0
        await self._upload(entries, deleted)
        self.entries_uploaded += len(entries)

    async def _make_room(self, size: int) -> None:
        count = len(self._entries) + len(self._deleted)
        if count and (
            count + 1 > self._limits.batch_size or self._bytes + size > self._limits.batch_max_bytes
        ):
            await self.flush()
        self._bytes += size


def _estimated_bytes(entry: IndexEntry) -> int:
    """An upper-bound-ish wire size: string bytes plus per-field overhead."""
    strings = (entry.path, entry.sha256, entry.media_type, entry.card_type, entry.title)
    text = sum(len(s.encode()) for s in strings)
    text += len(entry.search_text.encode()) + len(entry.error_message.encode())
    text += sum(len(link.encode()) + 4 for link in entry.links)
    return text + 64
