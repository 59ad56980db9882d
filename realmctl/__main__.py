"""Entry point of realmctl: parse, connect, run the command, report errors in one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from realm_client import RealmClientError

from realmctl.connection import DEFAULT_SERVER, ConnectionSettings, describe_error, open_client
from realmctl.errors import EXIT_ERROR, EXIT_INTERRUPTED, CliError
from realmctl.output import Console
from realmctl.parser import build_parser


def connection_settings(args: argparse.Namespace, env: Mapping[str, str]) -> ConnectionSettings:
    """Flags first, then REALMCTL_* variables, then the defaults."""
    timeout: float = args.timeout
    ca_cert: str | None = args.ca_cert
    return ConnectionSettings(
        target=args.server or env.get("REALMCTL_SERVER") or DEFAULT_SERVER,
        token=args.token or env.get("REALMCTL_TOKEN") or None,
        timeout=timeout or None,
        tls=bool(args.tls),
        ca_cert=Path(ca_cert) if ca_cert else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    console = Console(sys.stdout, sys.stderr, as_json=bool(args.json))
    try:
        with open_client(connection_settings(args, os.environ)) as client:
            try:
                status: int = args.handler(args, client, console)
            except RealmClientError as exc:
                raise CliError(describe_error(exc, client)) from None
            return status
    except CliError as exc:
        console.error(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `realmctl ls | head`): nothing left to say,
        # and nothing for the interpreter to fail flushing at exit either.
        _discard_stdout()
        return EXIT_ERROR


def _discard_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
