"""The error hierarchy of realm_service.

    RealmError                      base; the docstring is the default message
    ├── InvalidArgument             bad input from a client or worker
    ├── NotFound
    │   ├── RealmNotFound
    │   ├── FileNotFound
    │   └── JobNotFound
    ├── AlreadyExists
    │   └── RealmAlreadyExists
    ├── StaleLease                  the lease is not the job's current one
    ├── FailedPrecondition          the thing is not in a state that allows it
    ├── PermissionDenied
    ├── Unauthenticated
    ├── Unavailable                 draining, or the store is unreachable
    │   └── StoreUnavailable
    │       └── StoreFull           the store's disk is full: writes cannot commit
    └── Conflict                    a concurrent writer won; retry

Domain and store code raise these; `realm_service.api` maps each to one gRPC
status in a single table. Anything else becomes INTERNAL with no details.
"""

from __future__ import annotations


class RealmError(Exception):
    """The realm service failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(RealmError):
    """The request is invalid."""


class NotFound(RealmError):
    """Not found."""


class RealmNotFound(NotFound):
    """The realm does not exist."""


class FileNotFound(NotFound):
    """The file does not exist."""


class JobNotFound(NotFound):
    """The job does not exist."""


class AlreadyExists(RealmError):
    """Already exists."""


class RealmAlreadyExists(AlreadyExists):
    """The realm already exists."""


class StaleLease(RealmError):
    """The lease is not current: the job was released, expired, finished or re-leased."""


class FailedPrecondition(RealmError):
    """The request does not apply to the resource in its current state."""


class PermissionDenied(RealmError):
    """The caller's role may not do this."""


class Unauthenticated(RealmError):
    """A valid bearer token is required."""


class Unavailable(RealmError):
    """The service is unavailable; retry later."""


class StoreUnavailable(Unavailable):
    """The store is unreachable."""


class StoreFull(StoreUnavailable):
    """The store's disk is full: writes cannot commit until space is freed."""


class Conflict(RealmError):
    """A concurrent change won; retry."""
