"""Running one job: read the realm's files over RPC, index them, upload the entries.

Knows nothing of grpc: the realm's files come through `RealmFiles` and entries
leave through an `Upload` callable, both provided by the session. The outcome
is always returned, never raised, except for cancellation (the lease was lost
or released) and a closed stream, which end the attempt without a result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RealmFiles(Protocol):
    """Access to a realm's files; NOT_FOUND of the realm raises RealmGoneError."""

    async def list_files(self, realm_id: str) -> list[FileInfo]: ...

    async def read_file(self, realm_id: str, path: str) -> tuple[FileInfo, bytes] | None: ...


class FileSource(Protocol):
    """Realm files as one job may read them: bound to the job's lease."""

    def for_lease(self, lease_id: str) -> RealmFiles: ...


Upload = Callable[[Sequence[IndexEntry], Sequence[str]], Awaitable[None]]


@dataclass(frozen=True)
class JobLimits:
    batch_size: int = 500
    batch_max_bytes: int = MAX_BATCH_BYTES
    read_concurrency: int = 8


async def execute_job(
    assignment: Assignment,
    files: RealmFiles,
    upload: Upload,
    progress: Progress,
    limits: JobLimits,
) -> JobOutcome:
    """Run the job and say how it ended."""
    lease_id = assignment.lease_id
    try:
        batcher = _Batcher(upload, limits)
        if assignment.kind is JobKind.FROM_SCRATCH:
            await _from_scratch(assignment.realm_id, files, batcher, progress, limits)
        elif assignment.kind is JobKind.INCREMENTAL:
            await _incremental(assignment, files, batcher, progress, limits)
        else:
            return JobOutcome(lease_id, Outcome.FAILED, "unsupported job kind")
        await batcher.flush()
        return JobOutcome(lease_id, Outcome.SUCCEEDED, entries_uploaded=batcher.entries_uploaded)
    except StreamClosedError:
        raise
    except RealmGoneError as exc:
        return JobOutcome(lease_id, Outcome.FAILED_PERMANENTLY, str(exc))
    except FilesUnavailableError as exc:
        return JobOutcome(lease_id, Outcome.INTERRUPTED, str(exc))
    except FileAccessError as exc:
        return JobOutcome(lease_id, Outcome.FAILED, str(exc))
    except Exception as exc:
        logger.exception("job failed unexpectedly job=%s lease=%s", assignment.job_id, lease_id)
        return JobOutcome(lease_id, Outcome.FAILED, f"internal error: {type(exc).__name__}: {exc}")


async def _from_scratch(
    realm_id: str, files: RealmFiles, batcher: _Batcher, progress: Progress, limits: JobLimits
) -> None:
    listing = await files.list_files(realm_id)
    paths = sorted(info.path for info in listing)
    listed_mtimes = {info.path: info.mtime for info in listing}
    patterns = await _load_gitignore(files, realm_id) if GITIGNORE_PATH in listed_mtimes else ()
    todo = [p for p in paths if p != GITIGNORE_PATH and not is_ignored(p, patterns)]
    progress.total = len(todo)
    # A file deleted since the listing is simply absent from the new generation.
    await _index_paths(realm_id, todo, listed_mtimes, files, batcher, progress, limits)


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
    if GITIGNORE_PATH in deleted_by_path:
        # A new .gitignore can hide or reveal any file: decide every file again.
        for info in await files.list_files(realm_id):
            deleted_by_path.setdefault(info.path, False)
    if any(deleted_by_path.values()):
        # "Delete wins" when changes are merged, but a path deleted and then
        # written again exists: the realm's files are the truth.
        present = {info.path for info in await files.list_files(realm_id)}
        for path, deleted in list(deleted_by_path.items()):
            if deleted and path in present:
                deleted_by_path[path] = False
    patterns = await _load_gitignore(files, realm_id)
    progress.total = len(deleted_by_path)

    to_read: list[str] = []
    for path in sorted(deleted_by_path):
        if path == GITIGNORE_PATH:
            progress.done += 1
        elif deleted_by_path[path] or is_ignored(path, patterns):
            await batcher.add_deleted(path)
            progress.done += 1
        else:
            to_read.append(path)
    missing = await _index_paths(realm_id, to_read, {}, files, batcher, progress, limits)
    for path in missing:
        await batcher.add_deleted(path)


async def _index_paths(
    realm_id: str,
    paths: Sequence[str],
    fallback_mtimes: dict[str, datetime | None],
    files: RealmFiles,
    batcher: _Batcher,
    progress: Progress,
    limits: JobLimits,
) -> list[str]:
    """Read and index `paths` in order; returns the paths that were not found."""

    async def read_and_index(path: str) -> IndexEntry | None:
        found = await files.read_file(realm_id, path)
        progress.done += 1
        if found is None:
            return None
        info, content = found
        mtime = info.mtime or fallback_mtimes.get(path) or _EPOCH
        if len(content) > THREAD_THRESHOLD_BYTES:
            return await asyncio.to_thread(index_file, path, content, mtime)
        return index_file(path, content, mtime)

    missing: list[str] = []
    # Chunks keep the entries in path order and bound what is held in memory.
    for start in range(0, len(paths), limits.batch_size):
        chunk = paths[start : start + limits.batch_size]
        entries = await _map_bounded(read_and_index, chunk, limits.read_concurrency)
        for path, entry in zip(chunk, entries, strict=True):
            if entry is None:
                missing.append(path)
            else:
                await batcher.add_entry(entry)
    if missing:
        # ReadRealmFile's NOT_FOUND means "file or realm": listing tells them
        # apart, and raises RealmGoneError when the realm itself is gone.
        await files.list_files(realm_id)
    return missing


async def _load_gitignore(files: RealmFiles, realm_id: str) -> tuple[IgnorePattern, ...]:
    found = await files.read_file(realm_id, GITIGNORE_PATH)
    if found is None:
        return ()
    return parse_gitignore(found[1].decode("utf-8", errors="replace"))


async def _map_bounded(
    func: Callable[[T], Awaitable[R]], items: Sequence[T], limit: int
) -> list[R]:
    """`func` over `items` with at most `limit` in flight; results in input order.

    The first failure cancels the rest, and no call outlives this function.
    """
    semaphore = asyncio.Semaphore(limit)

    async def one(item: T) -> R:
        async with semaphore:
            return await func(item)

    tasks = [asyncio.create_task(one(item)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
