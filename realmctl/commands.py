"""One function per realmctl command: build the request, call, show the answer.

Each takes the parsed arguments, a connected client and the console, and
returns the exit status; failures are raised as `CliError`s.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
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


def push(args: argparse.Namespace, client: RealmClient, console: out.Console) -> int:
    files = tree_files(Path(args.dir))
    skipped = [path for path, _ in files if path in SERVER_OWNED]
    files = [(path, local) for path, local in files if path not in SERVER_OWNED]
    for path in skipped:
        console.note(f"skipped {path}: the server owns it (it holds the realm's display name)")
    results: list[rs.WriteRealmFileResponse] = []
    for path, local in files:
        try:
            content = read_local(local)
            results.append(
                client.write_realm_file(args.realm_id, path, content, priority=args.priority)
            )
        except (CliError, RealmClientError) as exc:
            if not results:
                raise
            pushed = f"after pushing {len(results)} of {len(files)} files"
            if isinstance(exc, RealmClientError):
                raise CliError(f"{describe_error(exc, client)} ({pushed})") from None
            raise type(exc)(f"{exc.message} ({pushed})") from None
    # The latest snapshot of each distinct job, in the order the jobs first appeared.
    jobs: dict[str, res.Job] = {}
    for result in results:
        jobs[result.job.job_id] = result.job
    if console.as_json:
        console.print_json(
            {
                "realm_id": args.realm_id,
                "count": len(results),
                "results": [out.message_dict(result) for result in results],
                "jobs": [out.message_dict(job) for job in jobs.values()],
            }
        )
        return EXIT_OK
    if results:
        rows = [
            [
                r.file.path,
                r.file.size,
                r.job.job_id,
                out.word(out.DISPOSITION_WORDS, r.disposition),
            ]
            for r in results
        ]
        console.print(out.table(["PATH", "SIZE", "JOB_ID", "DISPOSITION"], rows))
    summary = f"pushed {len(results)} files to realm {args.realm_id}"
    if jobs:
        summary += "; index jobs: " + ", ".join(out.job_summary(job) for job in jobs.values())
    console.print(summary)
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
    job = follow_job(client, console, args.job_id)
    if console.as_json:
        console.print_json(out.message_dict(job))
    else:
        console.print(out.fields(out.job_fields(job)))
    raise_if_failed(job)
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
