"""The command line: global options, commands, their flags and help."""

from __future__ import annotations

import argparse
from typing import Any

from realmctl import commands
from realmctl.connection import DEFAULT_SERVER, DEFAULT_TIMEOUT

DESCRIPTION = """\
Command-line client of the realm service (realm.v1.RealmService).

Results go to stdout as aligned tables (times in ISO-8601 UTC), or as JSON
with --json (proto3 JSON mapping with the proto's field names: enums as their
full names, e.g. "STATE_QUEUED", 64-bit integers as strings, bytes as base64).
Progress and errors go to stderr."""

EPILOG = """\
exit status:
  0  success
  1  the server refused the call or could not be reached
  2  bad usage (arguments, unreadable local files)
  3  a watched job failed or was cancelled (create --wait, push --wait, watch)

environment:
  REALMCTL_SERVER  default for --server
  REALMCTL_TOKEN   default for --token"""


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"priority must be 0-100 (SYSTEM=0, USER=10), got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _add_global_options(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """The connection and output options.

    They are accepted before and after the command; after it they default to
    SUPPRESS so they never overwrite a value given before it.
    """

    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=default(None),
        help=f"server address (default: $REALMCTL_SERVER or {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--token",
        metavar="T",
        default=default(None),
        help="bearer token sent as 'authorization: Bearer T' (default: $REALMCTL_TOKEN)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON instead of tables",
    )
    group.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        default=default(DEFAULT_TIMEOUT),
        help=(
            f"deadline of each call in seconds, 0 for none (default: {DEFAULT_TIMEOUT:g}); "
            "watching a job has no deadline, and reconnects for about 15 s after the "
            "server goes away"
        ),
    )
    group.add_argument(
        "--tls", action="store_true", default=default(False), help="connect with TLS"
    )
    group.add_argument(
        "--ca-cert",
        metavar="FILE",
        default=default(None),
        help="PEM root certificates to verify the server with (implies --tls)",
    )


def _command(
    subparsers: Any,
    name: str,
    handler: commands.Handler,
    summary: str,
    json_shape: str,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\n--json: {json_shape}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="realmctl",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: commands.Handler, summary: str, json_shape: str) -> Any:
        sub = _command(subparsers, name, handler, summary, json_shape)
        _add_global_options(sub, top_level=False)
        return sub

    p = command(
        "create",
        commands.create,
        "Create a realm; with --wait, follow its first index job to the end.",
        '{"realm": Realm, "job": Job} (with --wait: the realm and job once the job ended)',
    )
    p.add_argument("realm_id", metavar="REALM_ID")
    p.add_argument("--name", help="display name (default: the realm id)")
    p.add_argument(
        "--priority", type=_priority, help="priority of the index job, 0-100 (default: 10, USER)"
    )
    p.add_argument(
        "--request-id",
        metavar="ID",
        help="idempotency key: a retry with the same ID returns the first result",
    )
    p.add_argument(
        "--file",
        action="append",
        metavar="PATH=LOCALFILE",
        help="store LOCALFILE at PATH in the realm (repeatable; wins over --from-dir)",
    )
    p.add_argument("--from-dir", metavar="DIR", help="store every file under DIR (skipping .git/)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="show the index job's progress on stderr until it ends; exit 3 if it failed",
    )

    p = command("get", commands.get, "Show a realm with its state and stats.", "Realm")
    p.add_argument("realm_id", metavar="REALM_ID")

    p = command("ls", commands.list_realms, "List realms (every page).", "[Realm, ...]")
    p.add_argument(
        "--limit", type=_count, default=0, metavar="N", help="at most N realms (default: all)"
    )

    p = command(
        "push",
        commands.push,
        "Write every file under DIR into a realm (relative POSIX paths, skipping .git/ and\n"
        "the root realm.json), in WriteRealmFiles batches of at most "
        f"{commands.PUSH_BATCH_FILES:,} files\nand {commands.PUSH_BATCH_BYTES >> 20} MiB, "
        "each stored all or nothing with one index job.",
        '{"realm_id": str, "count": int, "files": [RealmFile, ...],\n'
        ' "batches": [{"files": int, "bytes": int, "job_id": str, "disposition": str}, ...],\n'
        ' "jobs": [Job, ...] (with --wait: as they ended)}',
    )
    p.add_argument("realm_id", metavar="REALM_ID")
    p.add_argument("dir", metavar="DIR")
    p.add_argument(
        "--priority", type=_priority, help="priority of the index job, 0-100 (default: 10)"
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="show the index jobs' progress on stderr until they end; exit 3 if one failed",
    )

    p = command(
        "rm-realm",
        commands.remove_realm,
        "Delete a realm with its files, index and jobs (admin only). Asks for confirmation\n"
        "on a terminal; without one, --yes is required.",
        "DeleteRealmResponse",
    )
    p.add_argument("realm_id", metavar="REALM_ID")
    p.add_argument("--yes", action="store_true", help="delete without asking")
    p.add_argument(
        "--request-id",
        metavar="ID",
        help="idempotency key: a repeat with the same ID succeeds instead of NOT_FOUND",
    )

    p = command(
        "cat",
        commands.cat,
        "Print a file's raw bytes.",
        "ReadRealmFileResponse (content as base64)",
    )
    p.add_argument("realm_id", metavar="REALM_ID")
    p.add_argument("path", metavar="PATH")

    p = command("rm", commands.remove, "Delete a file from a realm.", "DeleteRealmFileResponse")
    p.add_argument("realm_id", metavar="REALM_ID")
    p.add_argument("path", metavar="PATH")
    p.add_argument(
        "--priority", type=_priority, help="priority of the index job, 0-100 (default: 10)"
    )

    p = command("files", commands.list_files, "List a realm's files.", "[RealmFile, ...]")
    p.add_argument("realm_id", metavar="REALM_ID")

    p = command(
        "reindex",
        commands.reindex,
        "Rebuild a realm's index from scratch, or every realm's with --all.",
        "ReindexRealmResponse, or ReindexAllRealmsResponse with --all",
    )
    p.add_argument("realm_id", metavar="REALM_ID", nargs="?")
    p.add_argument("--all", action="store_true", help="reindex every realm (admin only)")
    p.add_argument(
        "--priority",
        type=_priority,
        help="priority 0-100 (default: 10, USER; with --all: 0, SYSTEM)",
    )
    p.add_argument(
        "--content-changed",
        action="store_true",
        help="the content changed since a running job started: schedule a follow-up job",
    )

    p = command("jobs", commands.list_jobs, "List jobs, newest first.", "[Job, ...]")
    p.add_argument("--realm", metavar="R", help="only jobs of realm R")
    p.add_argument("--kind", choices=sorted(commands.JOB_KINDS), help="only jobs of this kind")
    p.add_argument("--state", choices=list(commands.JOB_STATES), help="only jobs in this state")
    p.add_argument(
        "--limit",
        type=_count,
        default=100,
        metavar="N",
        help="at most N jobs, 0 for all (default: 100)",
    )

    p = command("job", commands.get_job, "Show a job.", "Job")
    p.add_argument("job_id", metavar="JOB_ID")

    p = command(
        "watch",
        commands.watch,
        "Follow a job with a progress bar on stderr until it ends; exit 3 if it failed.",
        "Job (the final snapshot)",
    )
    p.add_argument("job_id", metavar="JOB_ID")

    p = command(
        "cancel",
        commands.cancel,
        "Cancel a queued or running job (admin only).",
        "Job (CANCELLED)",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--reason", help="why (kept as the job's error message, at most 500 chars)")

    p = command(
        "retry",
        commands.retry,
        "Queue a failed or cancelled job's work again (admin only).",
        "RetryJobResponse",
    )
    p.add_argument("job_id", metavar="JOB_ID")

    p = command(
        "explain",
        commands.explain,
        "Say why a job is where it is: why it waits, where it runs, or its attempts.",
        "ExplainJobResponse",
    )
    p.add_argument("job_id", metavar="JOB_ID")

    command("workers", commands.workers, "List the connected workers.", "[Worker, ...]")
    command(
        "stats",
        commands.stats,
        "Count jobs by state, kind and priority; the oldest queued; recent outcomes.",
        "GetQueueStatsResponse",
    )

    p = command(
        "search",
        commands.search,
        "Search a realm's index by card type and/or text (every page).",
        "[IndexEntry, ...]",
    )
    p.add_argument("realm_id", metavar="REALM_ID")
    p.add_argument(
        "--type", metavar="CARD_TYPE", help='only cards of this type ("<module>/<name>")'
    )
    p.add_argument("--text", help="only entries whose text or title contains TEXT (any case)")
    p.add_argument(
        "--limit", type=_count, default=0, metavar="N", help="at most N entries (default: all)"
    )
    return parser
