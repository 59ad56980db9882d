"""Requests, paging and the bookkeeping of a followed job: the parts of a call
that do not depend on how it is sent, shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, TypeVar

from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res

from realm_client.errors import Internal, RealmClientError, Unavailable

_Item = TypeVar("_Item")

MAX_PAGE_SIZE = 1000
TERMINAL_JOB_STATES = frozenset(
    {res.Job.STATE_SUCCEEDED, res.Job.STATE_FAILED, res.Job.STATE_CANCELLED}
)

# Files to create a realm with: {path: content} or FileContent messages.
InitialFiles = Mapping[str, bytes] | Iterable[res.FileContent]


def create_realm_request(
    realm_id: str,
    display_name: str,
    priority: int | None,
    initial_files: InitialFiles,
    request_id: str,
) -> rs.CreateRealmRequest:
    if isinstance(initial_files, Mapping):
        files = [res.FileContent(path=path, content=data) for path, data in initial_files.items()]
    else:
        files = list(initial_files)
    request = rs.CreateRealmRequest(
        realm_id=realm_id,
        display_name=display_name,
        request_id=request_id,
        initial_files=files,
    )
    if priority is not None:
        request.priority = priority
    return request


# Files to write: {path: content} or FileContent messages.
FilesToWrite = Mapping[str, bytes] | Iterable[res.FileContent]


def file_contents(files: FilesToWrite) -> list[res.FileContent]:
    if isinstance(files, Mapping):
        return [res.FileContent(path=path, content=data) for path, data in files.items()]
    return list(files)


def write_realm_files_request(
    realm_id: str, files: FilesToWrite, deleted_paths: Iterable[str], priority: int | None
) -> rs.WriteRealmFilesRequest:
    request = rs.WriteRealmFilesRequest(
        realm_id=realm_id, files=file_contents(files), deleted_paths=list(deleted_paths)
    )
    if priority is not None:
        request.priority = priority
    return request


def stream_realm_files_request(
    realm_id: str,
    paths: Iterable[str] | None,
    lease_id: str,
    after_path: str,
    max_message_bytes: int,
) -> rs.StreamRealmFilesRequest:
    return rs.StreamRealmFilesRequest(
        realm_id=realm_id,
        lease_id=lease_id,
        paths=list(paths or ()),
        after_path=after_path,
        max_message_bytes=max_message_bytes,
    )


class StreamedFile(NamedTuple):
    """One whole file of a StreamRealmFiles stream."""

    path: str
    file: res.RealmFile
    content: bytes


class FileAssembler:
    """Puts the chunks of a StreamRealmFiles stream back into whole files.

    Holds at most one file's bytes; a chunk that does not continue the file
    it should (another path before the last chunk, a gap or an overlap)
    raises `Internal`, as does a stream that ends inside a file (`finish`).
    """

    def __init__(self) -> None:
        self._file: res.RealmFile | None = None
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, chunk: rs.FileChunk) -> StreamedFile | None:
        """The file this chunk completes, if it does."""
        if self._file is not None and chunk.file.path != self._file.path:
            raise Internal(
                f"StreamRealmFiles sent {chunk.file.path!r} before the last chunk of "
                f"{self._file.path!r}"
            )
        if chunk.offset != self._size:
            raise Internal(
                f"StreamRealmFiles sent {chunk.file.path!r} from offset {chunk.offset}, "
                f"expected {self._size}"
            )
        if self._file is None:
            self._file = chunk.file
        self._parts.append(chunk.content)
        self._size += len(chunk.content)
        if not chunk.last:
            return None
        whole = StreamedFile(self._file.path, self._file, b"".join(self._parts))
        self._file, self._parts, self._size = None, [], 0
        return whole

    def finish(self) -> None:
        """The stream ended: it must not have ended inside a file."""
        if self._file is not None:
            raise Internal(f"StreamRealmFiles ended inside {self._file.path!r}")


class Pager:
    """Which page to ask for next, and what of it to hand on.

    With a limit, each page asks only for what is still missing (the server
    chooses the size otherwise); a page token seen twice would loop forever,
    so it ends the listing with `Internal`.
    """

    def __init__(self, limit: int | None, page_size: int) -> None:
        self.limit = limit
        self.page_size = page_size
        self.token = ""
        self.count = 0
        self.done = limit is not None and limit <= 0
        self._seen: set[str] = set()

    def next_size(self) -> int:
        if self.limit is None:
            return self.page_size
        wanted = min(self.limit - self.count, MAX_PAGE_SIZE)
        return min(wanted, self.page_size) if self.page_size else wanted

    def take(self, items: Sequence[_Item], next_token: str) -> Sequence[_Item]:
        """The items of a page to hand on; sets `done` after the last."""
        if self.limit is not None:
            items = items[: self.limit - self.count]
        self.count += len(items)
        if not next_token or (self.limit is not None and self.count >= self.limit):
            self.done = True
        elif next_token in self._seen:
            raise Internal(f"the server returned page token {next_token!r} twice")
        self._seen.add(next_token)
        self.token = next_token
        return items


def state_word(state: res.Job.State.ValueType) -> str:
    """`running` for STATE_RUNNING."""
    name: str = res.Job.State.Name(state)
    return name.removeprefix("STATE_").lower()


class Follow:
    """A job followed over WatchJob streams, across breaks.

    A stream that breaks (UNAVAILABLE, ABORTED) or ends before the job is
    terminal is opened again after a backoff. `max_breaks` breaks in a row
    with no new snapshot between them give up: the last error is raised, or
    `Unavailable` when the server kept ending the stream early.
    """

    RECONNECT_CODES = frozenset({"UNAVAILABLE", "ABORTED"})

    def __init__(
        self,
        job_id: str,
        max_breaks: int,
        initial_backoff: float = 0.1,
        max_backoff: float = 2.0,
    ) -> None:
        self.job_id = job_id
        self.max_breaks = max_breaks
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.last: res.Job | None = None
        self.breaks = 0

    def is_new(self, job: res.Job) -> bool:
        """Whether a snapshot says something the last did not (a repeat after a
        reconnect does not count as progress)."""
        if self.last is not None and job == self.last:
            return False
        self.last = job
        self.breaks = 0
        return True

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.state in TERMINAL_JOB_STATES

    def broke(self, error: RealmClientError | None) -> float:
        """Seconds to wait before reconnecting; raises when it is time to give up.

        `error` is what broke the stream, None when the server ended it early.
        """
        if error is not None and error.code.name not in self.RECONNECT_CODES:
            raise error
        self.breaks += 1
        if self.breaks > self.max_breaks:
            if error is not None:
                raise error
            state = state_word(self.last.state) if self.last is not None else "unknown"
            raise Unavailable(
                f"the server ended the watch of job {self.job_id} before the job finished "
                f"(last state: {state})",
                method="WatchJob",
            )
        backoff: float = min(self.initial_backoff * 2 ** (self.breaks - 1), self.max_backoff)
        return backoff
