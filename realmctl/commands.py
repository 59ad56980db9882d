"""One function per realmctl command: build the request, call, show the answer.

Each takes the parsed arguments, a connected client and the console, and
returns the exit status; failures are raised as `CliError`s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from realm.v1 import realm_service_pb2 as rs
from realm.v1 import resources_pb2 as res
from realm_client import RealmClient, RealmClientError

from realmctl import output as out
from realmctl.connection import describe_error
from realmctl.errors import EXIT_OK, CliError, JobFailedError, UsageError
from realmctl.localfiles import parse_file_spec, read_local, tree_files

Handler = Callable[[argparse.Namespace, RealmClient, out.Console], int]

JOB_KINDS = {name: value for value, name in out.JOB_KIND_WORDS.items()}
JOB_STATES = {name: value for value, name in out.JOB_STATE_WORDS.items()}


def _limit(value: int | None) -> int | None:
    """--limit 0 means no limit."""
    return value or None


def follow_job(client: RealmClient, console: out.Console, job_id: str) -> res.Job:
    """Waits for the job's end, drawing the progress bar on stderr."""
    bar = console.progress_bar()
    try:
        return client.wait_for_job(job_id, on_progress=bar.update)
    finally:
        bar.close()


def raise_if_failed(job: res.Job) -> None:
    if job.state == res.Job.STATE_FAILED:
        reason = job.error_message or "no reason given"
        raise JobFailedError(f"job {job.job_id} failed: {reason}")
    if job.state == res.Job.STATE_CANCELLED:
        reason = job.error_message or "no reason given"
        raise JobFailedError(f"job {job.job_id} was cancelled: {reason}")


def initial_files(from_dir: str | None, specs: Iterable[str]) -> dict[str, bytes]:
    """Files of --from-dir, then --file pairs (which replace a same-path file of the dir)."""
    chosen: dict[str, Path] = {}
    if from_dir is not None:
        chosen.update(tree_files(Path(from_dir)))
    given: set[str] = set()
    for spec in specs:
        realm_path, local = parse_file_spec(spec)
        if realm_path in given:
            raise UsageError(f"--file {realm_path} is given twice")
        given.add(realm_path)
        chosen[realm_path] = local
    return {path: read_local(local) for path, local in chosen.items()}


# Realms.


def create(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    files = initial_files(args.from_dir, args.file or [])
    bar = console.progress_bar()
    try:
        response = client.create_realm(
            args.realm_id,
            display_name=args.name or "",
            priority=args.priority,
            initial_files=files,
            request_id=args.request_id or None,
            wait=args.wait,
            on_progress=bar.update,
        )
    finally:
        bar.close()
    realm, job = response.realm, response.job
    if console.as_json:
        console.print_json({"realm": out.message_dict(realm), "job": out.message_dict(job)})
    else:
        console.print(out.fields([*out.realm_fields(realm), ("job", out.job_summary(job))]))
    if args.wait:
        raise_if_failed(job)
    return EXIT_OK


def get(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    realm = client.get_realm(args.realm_id)
    if console.as_json:
        console.print_json(out.message_dict(realm))
    else:
        console.print(out.fields(out.realm_fields(realm)))
    return EXIT_OK


def list_realms(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    realms = list(client.list_realms(limit=_limit(args.limit)))
    if console.as_json:
        console.print_json([out.message_dict(realm) for realm in realms])
    else:
        console.print(out.realms_table(realms))
    return EXIT_OK


# Files.


# Written by the server when the realm is created; it refuses writes to it.
SERVER_OWNED = frozenset({"realm.json"})


# Bounds of one WriteRealmFiles request: the server takes at most 10,000 files
# and (by default) 64 MiB messages; smaller batches keep each transaction short
# and the client's memory at one batch.
PUSH_BATCH_FILES = 1_000
PUSH_BATCH_BYTES = 16 * 1024 * 1024


@dataclass
class Batch:
    """One WriteRealmFiles request of a push and its answer."""

    number: int
    files: int
    size: int
    response: rs.WriteRealmFilesResponse


def push_batches(
    files: list[tuple[str, Path]],
    max_files: int = PUSH_BATCH_FILES,
    max_bytes: int = PUSH_BATCH_BYTES,
) -> Iterator[dict[str, bytes]]:
    """The files read in batches of at most `max_files` files and `max_bytes`
    of content (a larger file travels alone), one batch in memory at a time."""
    batch: dict[str, bytes] = {}
    size = 0
    for path, local in files:
        content = read_local(local)
        if batch and (len(batch) >= max_files or size + len(content) > max_bytes):
            yield batch
            batch, size = {}, 0
        batch[path] = content
        size += len(content)
    if batch:
        yield batch


def _batches(count: int) -> str:
    return f"{count} batch" if count == 1 else f"{count} batches"


def push(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    files = tree_files(Path(args.dir))
    skipped = [path for path, _ in files if path in SERVER_OWNED]
    files = [(path, local) for path, local in files if path not in SERVER_OWNED]
    for path in skipped:
        console.note(f"skipped {path}: the server owns it (it holds the realm's display name)")
    batches: list[Batch] = []
    pushed = 0
    try:
        for contents in push_batches(files, PUSH_BATCH_FILES, PUSH_BATCH_BYTES):
            response = client.write_realm_files(
                args.realm_id, files=contents, priority=args.priority
            )
            size = sum(len(content) for content in contents.values())
            batches.append(Batch(len(batches) + 1, len(contents), size, response))
            pushed += len(contents)
    except (CliError, RealmClientError) as exc:
        if not batches:
            raise
        done = f"after pushing {pushed} of {len(files)} files in {_batches(len(batches))}"
        if isinstance(exc, RealmClientError):
            raise CliError(f"{describe_error(exc, client)} ({done})") from None
        raise type(exc)(f"{exc.message} ({done})") from None
    # The latest snapshot of each distinct job, in the order the jobs first appeared.
    jobs: dict[str, res.Job] = {}
    for batch in batches:
        jobs[batch.response.job.job_id] = batch.response.job
    if args.wait:
        for job_id in jobs:
            jobs[job_id] = follow_job(client, console, job_id)
    if console.as_json:
        console.print_json(
            {
                "realm_id": args.realm_id,
                "count": pushed,
                "files": [out.message_dict(f) for batch in batches for f in batch.response.files],
                "batches": [
                    {
                        "files": batch.files,
                        "bytes": batch.size,
                        "job_id": batch.response.job.job_id,
                        "disposition": res.Disposition.Name(batch.response.disposition),
                    }
                    for batch in batches
                ],
                "jobs": [out.message_dict(job) for job in jobs.values()],
            }
        )
    else:
        if batches:
            rows = [
                [
                    b.number,
                    b.files,
                    b.size,
                    b.response.job.job_id,
                    out.word(out.DISPOSITION_WORDS, b.response.disposition),
                ]
                for b in batches
            ]
            console.print(out.table(["BATCH", "FILES", "BYTES", "JOB_ID", "DISPOSITION"], rows))
        summary = f"pushed {pushed} files to realm {args.realm_id}"
        if batches:
            summary += f" in {_batches(len(batches))}"
        if jobs:
            label = "index job" if len(jobs) == 1 else "index jobs"
            summary += f"; {label}: " + ", ".join(out.job_summary(j) for j in jobs.values())
        console.print(summary)
    if args.wait:
        for job in jobs.values():
            raise_if_failed(job)
    return EXIT_OK


def cat(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    response = client.read_realm_file(args.realm_id, args.path)
    if console.as_json:
        console.print_json(out.message_dict(response))
    else:
        console.write_bytes(response.content)
    return EXIT_OK


def remove(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    response = client.delete_realm_file(args.realm_id, args.path, priority=args.priority)
    if console.as_json:
        console.print_json(out.message_dict(response))
    else:
        disposition = out.word(out.DISPOSITION_WORDS, response.disposition)
        console.print(f"deleted {args.path} from realm {args.realm_id}")
        console.print(f"index job {out.job_summary(response.job)}: {disposition}")
    return EXIT_OK


def list_files(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    files = client.list_realm_files(args.realm_id)
    if console.as_json:
        console.print_json([out.message_dict(f) for f in files])
    else:
        console.print(out.files_table(files))
    return EXIT_OK


# Jobs.


def reindex(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    if args.all:
        if args.realm_id is not None:
            raise UsageError("reindex: give either REALM_ID or --all, not both")
        if args.content_changed:
            raise UsageError("reindex: --content-changed applies to one realm, not --all")
        return _reindex_all(args, client, console)
    if args.realm_id is None:
        raise UsageError("reindex: give REALM_ID or --all")
    response = client.reindex_realm(
        args.realm_id, priority=args.priority, content_changed=args.content_changed
    )
    if console.as_json:
        console.print_json(out.message_dict(response))
    else:
        disposition = out.word(out.DISPOSITION_WORDS, response.disposition)
        console.print(f"reindex of realm {args.realm_id}: {disposition}")
        console.print(f"job {out.job_summary(response.job)}")
    return EXIT_OK


def _reindex_all(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    response = client.reindex_all_realms(priority=args.priority)
    if console.as_json:
        console.print_json(out.message_dict(response))
    else:
        console.print(
            f"visited {response.realms} realms; queued {response.jobs_enqueued} new jobs "
            "(the others merged into or attached to existing ones)"
        )
    return EXIT_OK


def list_jobs(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    kind = JOB_KINDS[args.kind] if args.kind else res.JOB_KIND_UNSPECIFIED
    state = JOB_STATES[args.state] if args.state else res.Job.STATE_UNSPECIFIED

    listed = client.list_jobs(
        realm_id=args.realm or "", kind=kind, state=state, limit=_limit(args.limit)
    )
    jobs = list(listed)
    if args.realm and not jobs:
        # ListJobs filters, it does not look the realm up: an unknown realm
        # would list nothing. A realm with jobs exists, so only an empty
        # answer costs the GetRealm that makes it NOT_FOUND.
        client.get_realm(args.realm)
    if console.as_json:
        console.print_json([out.message_dict(job) for job in jobs])
    else:
        console.print(out.jobs_table(jobs))
    return EXIT_OK


def get_job(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    job = client.get_job(args.job_id)
    if console.as_json:
        console.print_json(out.message_dict(job))
    else:
        console.print(out.fields(out.job_fields(job)))
    return EXIT_OK


def watch(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    # GetJob first: an unknown job or an unreachable server is one quick
    # answer, where the watch keeps reconnecting (for a server that restarts).
    job = client.get_job(args.job_id)
    if job.state not in out.TERMINAL_JOB_STATES:
        job = follow_job(client, console, args.job_id)
    if console.as_json:
        console.print_json(out.message_dict(job))
    else:
        console.print(out.fields(out.job_fields(job)))
    raise_if_failed(job)
    return EXIT_OK


def cancel(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    job = client.cancel_job(args.job_id, reason=args.reason or "")
    if console.as_json:
        console.print_json(out.message_dict(job))
    else:
        console.print(f"cancelled job {out.job_summary(job)}")
    return EXIT_OK


def retry(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    response = client.retry_job(args.job_id)
    if console.as_json:
        console.print_json(out.message_dict(response))
    else:
        disposition = out.word(out.DISPOSITION_WORDS, response.disposition)
        console.print(f"retry of job {args.job_id}: {disposition}")
        console.print(f"job {out.job_summary(response.job)}")
    return EXIT_OK


def explain(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    answer = client.explain_job(args.job_id)
    if console.as_json:
        console.print_json(out.message_dict(answer))
    else:
        console.print(out.explain_text(answer))
    return EXIT_OK


def workers(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    found = client.list_workers()
    if console.as_json:
        console.print_json([out.message_dict(worker) for worker in found])
    else:
        console.print(out.workers_table(found))
    return EXIT_OK


def stats(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    answer = client.get_queue_stats()
    if console.as_json:
        console.print_json(out.message_dict(answer))
    else:
        console.print(out.queue_stats_text(answer))
    return EXIT_OK


# Realms, again: the one that destroys.


def confirm(question: str) -> bool:
    """Asks on the terminal; only `y` or `yes` agrees. The caller checked stdin is one."""
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in {"y", "yes"}


def remove_realm(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    if not args.yes:
        isatty = getattr(sys.stdin, "isatty", None)
        if not (isatty and isatty()):
            raise UsageError(
                f"rm-realm: stdin is not a terminal to confirm on; "
                f"give --yes to delete realm {args.realm_id}"
            )
        question = f"delete realm {args.realm_id} with all its files, index and jobs?"
        if not confirm(question):
            raise CliError(f"realm {args.realm_id} not deleted")
    response = client.delete_realm(args.realm_id, request_id=args.request_id or None)
    if console.as_json:
        console.print_json(out.message_dict(response))
    elif response.replayed:
        console.print(f"realm {args.realm_id} was deleted already (by this request id)")
    else:
        console.print(
            f"deleted realm {args.realm_id}: {response.files_deleted} files, "
            f"{response.jobs_cancelled} queued or running jobs cancelled"
        )
    return EXIT_OK


# Search.


def search(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    entries = list(
        client.search_realm(
            args.realm_id, card_type=args.type or "", text=args.text or "", limit=_limit(args.limit)
        )
    )
    if console.as_json:
        console.print_json([out.message_dict(entry) for entry in entries])
    else:
        console.print(out.entries_table(entries))
    return EXIT_OK
