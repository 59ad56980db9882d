"""SQLAlchemy tables of the store. Portable across SQLite and PostgreSQL.

Invariants the schema itself enforces (not only application code):
- at most one queued job per (realm, kind): coalescing has one row to merge into;
- at most one running job per realm: a realm's jobs never run at once, and two
  server instances racing cannot both start one;
- the claim path is a partial index on (priority DESC, seq, id) of queued jobs, so
  its cost does not grow with the backlog.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import operators
from sqlalchemy.sql.expression import literal_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BigId = BigInteger().with_variant(Integer, "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StateText(TypeDecorator[str]):
    """A state column. Compared with a constant (`==`, `!=`, `in_`), the
    constant is written into the statement's text (`state = 'queued'`), not
    bound: PostgreSQL plans a prepared statement, from its sixth execution on,
    without its parameters (a generic plan), and such a plan can read a
    partial index (`WHERE state = 'queued'`) only when the state is in the
    text. The states are the store's own constants, checked to be plain
    words."""

    impl = String(20)
    cache_ok = True

    class comparator_factory(TypeDecorator.Comparator[str]):
        def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
            if op in (operators.eq, operators.ne) and _constant(other):
                return op(self.expr, _written(other[0]))
            if op in (operators.in_op, operators.not_in_op) and _constants(other):
                return op(self.expr, [_written(value) for value in sorted(other[0])])
            return super().operate(op, *other, **kwargs)


def _constant(other: tuple[Any, ...]) -> bool:
    return len(other) == 1 and isinstance(other[0], str)


def _constants(other: tuple[Any, ...]) -> bool:
    return (
        len(other) == 1
        and isinstance(other[0], (list, tuple, set, frozenset))
        and bool(other[0])
        and all(isinstance(value, str) for value in other[0])
    )


def _written(value: str) -> Any:
    if not value.isalpha() or not value.islower():
        raise ValueError(f"not a state: {value!r}")
    return literal_column(f"'{value}'", String(20))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# Half of each page of `realms` and `job_attempts` is kept for updates, so
# that ending an attempt and switching a realm's generation (no indexed
# column set) write the new version beside the old one and touch no index
# (HOT updates; migration 0009).
ROOM_FOR_UPDATES = {"postgresql_with": {"fillfactor": 50}}


class RealmRow(Base):
    __tablename__ = "realms"
    __table_args__ = ROOM_FOR_UPDATES

    realm_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20))
    created_priority: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime())
    current_generation: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    files: Mapped[int] = mapped_column(BigInteger, default=0)
    cards: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    entries: Mapped[int] = mapped_column(BigInteger, default=0)
    last_index_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RealmFileRow(Base):
    __tablename__ = "realm_files"

    realm_id: Mapped[str] = mapped_column(
        String(63), ForeignKey("realms.realm_id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    mtime: Mapped[datetime] = mapped_column(UTCDateTime())
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    realm_id: Mapped[str] = mapped_column(
        String(63), ForeignKey("realms.realm_id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(20))
    priority: Mapped[int] = mapped_column(Integer)
    # queued | running | succeeded | failed | merged (folded into superseded_by)
    state: Mapped[str] = mapped_column(StateText())
    # Queue order among equal priorities: enqueue time in microseconds, kept on
    # requeue (a preempted job goes ahead of its priority's line); ties are
    # broken by id.
    seq: Mapped[int] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    counted_failures: Mapped[int] = mapped_column(Integer, default=0)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime())
    start_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finish_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error_message: Mapped[str] = mapped_column(Text, default="")
    progress_done: Mapped[int] = mapped_column(BigInteger, default=0)
    progress_total: Mapped[int] = mapped_column(BigInteger, default=0)
    # JSON list of [path, deleted] for incremental jobs.
    paths: Mapped[str] = mapped_column(Text, default="[]")
    lease_id: Mapped[str | None] = mapped_column(String(40), nullable=True, unique=True)
    lease_attempt_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lease_expire_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    worker: Mapped[str] = mapped_column(String(200), default="")
    superseded_by: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # W3C traceparent of the call that queued the job; "" when it was not traced.
    trace_parent: Mapped[str] = mapped_column(String(64), default="", server_default=text("''"))
    # Times the job was preempted: handed back, uncounted, for a waiting job
    # of a user (DESIGN.md section 4); capped by the server's settings.
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # A from-scratch job's checkpoint (DESIGN.md section 6): the generation its
    # first attempt staged into, kept across attempts, which stage into it
    # too; the entries of it kept for the current attempt (NULL until its
    # file stream opened); the .gitignore's sha256 when they were kept ("" for
    # none): a changed .gitignore drops them all.
    checkpoint: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    checkpoint_kept: Mapped[int | None] = mapped_column(Integer, nullable=True)
    checkpoint_gitignore: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        Index(
            "ix_jobs_claim",
            text("priority DESC"),
            "seq",
            "id",
            postgresql_where=text("state = 'queued'"),
            sqlite_where=text("state = 'queued'"),
        ),
        Index(
            "uq_jobs_one_queued_per_realm_kind",
            "realm_id",
            "kind",
            unique=True,
            postgresql_where=text("state = 'queued'"),
            sqlite_where=text("state = 'queued'"),
        ),
        Index(
            "uq_jobs_one_running_per_realm",
            "realm_id",
            unique=True,
            postgresql_where=text("state = 'running'"),
            sqlite_where=text("state = 'running'"),
        ),
        Index(
            "ix_jobs_lease_expiry",
            "lease_expire_time",
            postgresql_where=text("state = 'running'"),
            sqlite_where=text("state = 'running'"),
        ),
        Index("ix_jobs_realm", "realm_id", "id"),
        # The few jobs holding a checkpoint (sweeps of generations spare them).
        Index(
            "ix_jobs_checkpoint",
            "realm_id",
            postgresql_where=text("checkpoint IS NOT NULL"),
            sqlite_where=text("checkpoint IS NOT NULL"),
        ),
        # Ids are never reused (DeleteRealm deletes jobs; migration 0005).
        {"sqlite_autoincrement": True},
    )


class JobAttemptRow(Base):
    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("jobs.id", ondelete="CASCADE"))
    lease_id: Mapped[str] = mapped_column(String(40), unique=True)
    worker: Mapped[str] = mapped_column(String(200), default="")
    # The server instance whose ClaimJobs stream holds the lease: only it can
    # tell a silent worker from a stream it lost, so only it (or, once it is
    # gone, any instance) reaps the lease. Empty for attempts made before
    # instances were recorded.
    instance_id: Mapped[str] = mapped_column(String(40), default="")
    start_time: Mapped[datetime] = mapped_column(UTCDateTime())
    end_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # running | completed | failed | interrupted | expired
    outcome: Mapped[str] = mapped_column(String(20))
    error_message: Mapped[str] = mapped_column(Text, default="")
    # Set when the stream holding the attempt's lease ended uncleanly: the
    # secret a reconnecting worker quotes to re-attach the lease (DESIGN.md
    # section 5, resumable sessions).
    resume_token: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        Index("ix_job_attempts_job", "job_id"),
        {"sqlite_autoincrement": True, **ROOM_FOR_UPDATES},
    )


class IndexEntryRow(Base):
    """Index entries. `generation` is the attempt id that wrote them: a realm's
    current generation is visible to searches; others are staged or orphaned."""

    __tablename__ = "index_entries"

    realm_id: Mapped[str] = mapped_column(
        String(63), ForeignKey("realms.realm_id", ondelete="CASCADE"), primary_key=True
    )
    generation: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    mtime: Mapped[datetime] = mapped_column(UTCDateTime())
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(200))
    card_type: Mapped[str] = mapped_column(String(400), default="")
    title: Mapped[str] = mapped_column(Text, default="")
    search_text: Mapped[str] = mapped_column(Text, default="")
    links: Mapped[str] = mapped_column(Text, default="[]")
    error_message: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_index_entries_card_type", "realm_id", "generation", "card_type"),)


class IdempotencyKeyRow(Base):
    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(40), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    realm_id: Mapped[str] = mapped_column(String(63))
    job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_idempotency_keys_create_time", "create_time"),)


class ServerInstanceRow(Base):
    """A running server process. It refreshes `seen_time` while it can write
    to the store and deletes its row when it stops; a row whose `seen_time`
    has gone stale belongs to a server that died."""

    __tablename__ = "server_instances"

    instance_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    start_time: Mapped[datetime] = mapped_column(UTCDateTime())
    seen_time: Mapped[datetime] = mapped_column(UTCDateTime())


class WorkerPresenceRow(Base):
    """A connected ClaimJobs stream, as its instance last reported it (every
    few seconds, PostgreSQL only); rows go with their instance."""

    __tablename__ = "worker_presence"

    instance_id: Mapped[str] = mapped_column(
        String(40),
        ForeignKey("server_instances.instance_id", ondelete="CASCADE"),
        primary_key=True,
    )
    stream_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(200))
    incarnation_id: Mapped[str] = mapped_column(String(200))
    kinds: Mapped[str] = mapped_column(String(100))  # comma-separated JobKind values
    min_priority: Mapped[int] = mapped_column(Integer)
    credits: Mapped[int] = mapped_column(Integer)
    jobs_held: Mapped[int] = mapped_column(Integer)
    connect_time: Mapped[datetime] = mapped_column(UTCDateTime())
    last_message_time: Mapped[datetime] = mapped_column(UTCDateTime())
