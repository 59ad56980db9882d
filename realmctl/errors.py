"""Errors realmctl reports, each with the exit status it ends the process with.

CliError            exit 1: the server refused a call, or it could not be reached
├── UsageError      exit 2: bad arguments found after parsing (e.g. a missing local file)
└── JobFailedError  exit 3: a watched job ended FAILED
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_JOB_FAILED = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """The command could not be carried out."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__ or "")

    @property
    def message(self) -> str:
        # One line, whatever the server or the OS put in the text.
        return " ".join(str(self).split())


class UsageError(CliError):
    """The arguments cannot be used."""

    exit_code = EXIT_USAGE


class JobFailedError(CliError):
    """The job failed."""

    exit_code = EXIT_JOB_FAILED
