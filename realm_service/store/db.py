"""Engine, transactions, migrations, error translation and wake-ups.

SQLite runs in WAL mode with a busy timeout, and every transaction that may
write starts with BEGIN IMMEDIATE: the claim's select-then-update is then
atomic, which the stdlib driver's deferred transactions would not guarantee.
Transactions that only read (`read_transaction`) start with a plain BEGIN: in
WAL mode they read a snapshot without the write lock, so they neither wait for
writers nor hold them up. PostgreSQL goes through psycopg 3; reads there run
each statement on its own (autocommit) unless they ask for a block; new work
is announced with NOTIFY on a channel derived from the schema so tests in
separate schemas do not wake each other.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from realm_service.domain import Job
from realm_service.errors import Conflict, InvalidArgument, StoreFull, StoreUnavailable
from realm_service.store.direct import driver_error, first_on_loop

if TYPE_CHECKING:
    from realm_service.store.loop_pool import LoopConnections

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK_KEY = 0x7265616C6D  # pg_advisory_lock key shared by all servers
_READ_ONLY = "realm_read_only"  # execution option: this transaction only reads
_SQLITE_BUSY_MS = 30_000  # how long a SQLite transaction waits for another process's lock


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and pick the psycopg 3 driver for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


_RETRYABLE_SQLSTATES = ("40P01", "40001")  # deadlock_detected, serialization_failure
T = TypeVar("T")


_DISK_FULL_SQLSTATE = "53100"  # PostgreSQL's disk_full
_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"


def _disk_full(e: exc.DBAPIError) -> bool:
    orig = e.orig
    return (
        getattr(orig, "sqlstate", None) == _DISK_FULL_SQLSTATE
        or getattr(orig, "sqlite_errorcode", None) == _SQLITE_FULL
        or "database or disk is full" in str(orig)
    )


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Storage errors become domain errors at the store's edge."""
    try:
        yield
    except exc.IntegrityError as e:
        raise Conflict(f"a concurrent change conflicted: {e.orig.__class__.__name__}") from e
    except exc.DataError as e:
        # A value that passed validation but that the store cannot hold (a
        # NUL in PostgreSQL text, a number out of the column's range): the
        # request's fault, not the store's, and retrying cannot cure it.
        raise InvalidArgument(f"the store refused a value: {_first_line(e.orig)}") from e
    except (exc.OperationalError, exc.InterfaceError) as e:
        if _disk_full(e):
            raise StoreFull("the store's disk is full (disk full): writes cannot commit") from e
        if "database is locked" in str(e):
            raise Conflict("the store is busy; retry") from e
        if getattr(e.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
            # PostgreSQL resolved a deadlock or a serialization failure
            # against this transaction: the work is sound, its timing was not.
            raise Conflict(f"a concurrent change conflicted: {e.orig.__class__.__name__}") from e
        raise StoreUnavailable(f"the store is unreachable: {e.orig.__class__.__name__}") from e
    except exc.DBAPIError as e:
        if getattr(e, "connection_invalidated", False):
            raise StoreUnavailable("the store connection was lost") from e
        if _disk_full(e):
            raise StoreFull("the store's disk is full (disk full): writes cannot commit") from e
        raise
    except exc.PendingRollbackError as e:
        # The connection died under an earlier statement whose error the
        # caller went past: the transaction is lost with it.
        raise StoreUnavailable("the store connection was lost") from e
    except exc.StatementError as e:
        # Raised while binding parameters, before the store saw anything.
        if isinstance(e.orig, ValueError | OverflowError):
            raise InvalidArgument(f"the store refused a value: {_first_line(e.orig)}") from e
        raise
    except OverflowError as e:  # sqlite3 binding an integer beyond 64 bits
        raise InvalidArgument(f"the store refused a value: {e}") from e


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else "invalid value"


class WouldWait(Exception):
    """A unit run on the event loop (`Database.on_loop`) met the database's
    lock held by another process, or found itself bigger than the loop
    should carry: it waited for nothing and its transaction rolled back;
    its caller runs it again in a store thread."""


class Effects:
    """What a unit of work will have done once committed. Store functions
    record effects here, not fire them: no caller has to remember a second
    step after the commit. `Tx` runs its statements in a store thread,
    `LoopTx` on the event loop."""

    __slots__ = (
        "_db",
        "_notified",
        "changed_jobs",
        "committed",
        "deleted_realms",
        "each_statement_commits",
        "job_values",
        "new_work",
        "revoked",
        "stale_statistics",
    )

    def __init__(self, db: Database, *, each_statement_commits: bool = False) -> None:
        # Each statement commits on its own (`Database.statements`).
        self.each_statement_commits = each_statement_commits
        self.changed_jobs: list[int] = []
        # Changed jobs whose values this transaction knows, as it left them.
        self.job_values: dict[int, Job] = {}
        self.new_work = False
        # Called once the transaction has committed (log lines that must not
        # report a change that rolled back).
        self.committed: list[Callable[[], None]] = []
        # Tables whose planner statistics the commit makes stale (PostgreSQL).
        self.stale_statistics: set[str] = set()
        # Leases taken from their holders (lease id, reason), realms deleted.
        self.revoked: list[tuple[str, str]] = []
        self.deleted_realms: list[str] = []
        self._db = db
        self._notified = False

    @property
    def backend(self) -> str:
        return self._db.backend

    def announce_new_work(self, *, here: bool = True) -> None:
        """New or requeued work becomes claimable at commit: this process's
        dispatcher is woken then (unless `here` is False: it knows already),
        and other instances through NOTIFY, which PostgreSQL delivers at
        commit too."""
        self.new_work = self.new_work or here
        if not self._db.others_alive:
            # NOTIFY is a word for other instances, and none is alive (as of
            # this instance's last refresh; one that starts meanwhile polls).
            return
        if not self._notified:  # one word a transaction (`_tell_others` knows the backend)
            self._notified = True
            self._tell_others(self._db.origin)

    def new_work_taken(self) -> None:
        """The work this transaction announced was claimed in it too: this
        process's dispatcher is not woken for it at commit (other instances
        were told already, and find nothing)."""
        self.new_work = False

    def introduce(self) -> None:
        """At commit, other instances learn that this one is alive (they
        send it their words from then on) and look for work once."""
        self._tell_others(self._db.origin)

    def job_changed(self, job_ids: Iterable[int]) -> None:
        self.changed_jobs.extend(job_ids)

    def job_finished(self, jobs: Iterable[Job]) -> None:
        """These jobs reached a terminal state: changed, and their values are
        final (nothing changes a finished job), so listeners get them with
        the change and need not read them again."""
        self.job_values_known(jobs)

    def job_values_known(self, jobs: Iterable[Job]) -> None:
        """These jobs changed, and this transaction knows their values as it
        leaves them (a claim's started jobs, finished ones): listeners get
        them with the change."""
        for job in jobs:
            self.job_values[job.job_id] = job
            self.changed_jobs.append(job.job_id)

    def on_commit(self, callback: Callable[[], None]) -> None:
        self.committed.append(callback)

    def revoke(self, lease_ids: Iterable[str], reason: str) -> None:
        """The leases end without a result (their jobs were cancelled or
        deleted): at commit, the streams holding them, on any instance, drop
        them and tell their workers to stop."""
        for lease_id in lease_ids:
            self.revoked.append((lease_id, reason))
            self._tell_others(f"{_REVOKE}{lease_id}:{reason[:500]}")

    def realm_deleted(self, realm_id: str) -> None:
        """At commit, every instance unmounts the realm."""
        self.deleted_realms.append(realm_id)
        self._tell_others(f"{_UNMOUNT}{realm_id}")

    def _tell_others(self, payload: str) -> None:
        raise NotImplementedError

    def statistics_changed(self, table: str) -> None:
        """The transaction changes so many rows of `table` that PostgreSQL's
        planner would misjudge it until autovacuum gets to it: it is analyzed
        right after the commit."""
        if self._db.backend == "postgresql":
            self.stale_statistics.add(table)


class Tx(Effects):
    """A unit of work run in a store thread: one transaction of the store (or
    statements that each commit, `Database.statements`), and its effects.
    Store functions take it; use cases only hand it on."""

    __slots__ = ("conn",)

    def __init__(
        self, conn: Connection, db: Database, *, each_statement_commits: bool = False
    ) -> None:
        super().__init__(db, each_statement_commits=each_statement_commits)
        # A Core connection, not an ORM session: the store reads and writes
        # with prebuilt statements and hands out values, so the session's
        # unit of work and identity map were only overhead (about a fifth
        # of the Python time of a one-statement transaction).
        self.conn = conn

    def _tell_others(self, payload: str) -> None:
        if self._db.backend != "postgresql":
            return
        try:
            self.conn.execute(_NOTIFY_PAYLOAD, {"c": self._db.channel, "p": payload})
        except exc.DBAPIError as e:
            if not self.each_statement_commits:
                raise  # in a transaction the word is part of it: it fails with it
            _word_not_sent(payload, e.orig)


class LoopTx(Effects):
    """Statements that each commit on their own, run on the event loop over
    a connection of `Database.loop_statements` (PostgreSQL). Words to other
    instances are sent once the statements are done, each on its own as
    `Tx` sends them in autocommit."""

    __slots__ = ("driver", "words")

    def __init__(self, driver: Any, db: Database) -> None:
        super().__init__(db, each_statement_commits=True)
        self.driver = driver  # a psycopg AsyncConnection in autocommit
        self.words: list[str] = []

    @property
    def dialect(self) -> Dialect:
        return self._db.engine.dialect

    def _tell_others(self, payload: str) -> None:
        self.words.append(payload)


def _word_not_sent(payload: str, error: BaseException | None) -> None:
    # Statements that each commit: the change the word is about has
    # committed already, so a word that cannot be sent (the connection was
    # lost meanwhile) must not turn it into an error. Other instances learn
    # of it from their next poll, within a second.
    log.warning(
        "word to other instances not sent; they find the change at their next poll",
        extra={"word": payload.split(":", 1)[0], "error": _first_line(error)},
    )


_NOTIFY_PAYLOAD = text("SELECT pg_notify(:c, :p)")
# Payloads on the wake-up channel besides new work (the announcing process's
# origin, or '' from older servers).
_REVOKE = "revoke:"
_UNMOUNT = "unmount:"


# A pooled PostgreSQL connection idle for longer than this is pinged before
# it is handed out (a server restart or an idle-session timeout may have
# closed it meanwhile). One used more recently is handed out as it is: a
# ping before every transaction was a round trip more on each of them (about
# a fifth of a millisecond), and a connection that failed a moment after its
# last use fails its transaction as the store being unavailable, which also
# drops every pooled connection older than it.
PING_AFTER_IDLE_S = 1.0
_IDLE_SINCE = "realm_idle_since"


def _ping_when_idle(engine: Engine) -> None:
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop(_IDLE_SINCE, None)
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as e:
            if dialect.is_disconnect(e, dbapi_conn, None):
                # The server went away: every connection made before now is
                # as stale as this one; the pool makes a new one.
                raise exc.InvalidatePoolError(str(e)) from e
            raise


class Database:
    """One store: an engine, its transactions and a wake-up channel."""

    def __init__(self, url: str, *, pool_size: int = 10, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.synchronous = synchronous
        self.url = normalize_url(url)
        self.backend = "postgresql" if self.url.startswith("postgresql") else "sqlite"
        self._new_work_listeners: list[Callable[[], None]] = []
        self._job_change_listeners: list[Callable[[int, Job | None], None]] = []
        self._revoke_listeners: list[Callable[[str, str], None]] = []
        self._unmount_listeners: list[Callable[[str], None]] = []
        self._listen_thread: threading.Thread | None = None
        self._listening_listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        # SQLite has one writer at a time. Threads of this process take turns
        # on this lock, handed over at once, instead of meeting the database's
        # busy handler, which sleeps 1 to 100 ms between retries; other
        # processes on the same file still wait through busy_timeout.
        self._turn = threading.RLock()
        self._write_turn: contextlib.AbstractContextManager[Any] = (
            self._turn if self.backend == "sqlite" else contextlib.nullcontext()
        )
        # Connections of `loop_statements` (PostgreSQL).
        self.loop_connections: LoopConnections | None = None
        # SQLite: the one connection of the units `on_loop` runs, and the
        # thread that runs one now (it holds the write turn meanwhile).
        self._on_loop_engine: Engine | None = None
        self._on_loop_thread: int | None = None
        if self.backend == "sqlite":
            self.engine = self._sqlite_engine()
        else:
            self.engine = create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=pool_size,
                # The connection returned last is handed out first: the busy
                # ones stay within a second of their last use (no ping), the
                # spare ones idle and are pinged when they are needed again.
                pool_use_lifo=True,
                connect_args={"connect_timeout": 5},
            )
            _ping_when_idle(self.engine)
            from realm_service.store.loop_pool import LoopConnections

            self.loop_connections = LoopConnections(
                self._conninfo(), size=pool_size, ping_after_s=PING_AFTER_IDLE_S
            )

        self.channel = "realm_new_work"
        # Names this process's new-work NOTIFYs: its own come back to its
        # listener, and its dispatcher already knows (Tx effects wake it at
        # commit), so they are not a reason to claim again.
        self.origin = f"work:{secrets.token_hex(8)}"
        # Whether other live instances share the store (learned at each
        # instance refresh, and from any word of another instance; assumed
        # until the first refresh): words of new work are not sent when
        # nobody else would hear them.
        self.others_alive = True
        # Words of other instances heard (and listener reconnects).
        self.words_heard = 0

    def _sqlite_engine(self, *, busy_ms: int = _SQLITE_BUSY_MS, **options: Any) -> Engine:
        path = self.url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            self.url,
            connect_args={"timeout": busy_ms / 1000, "check_same_thread": False},
            **options,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL syncs the WAL at every commit, so an acknowledged write
            # survives a power loss; NORMAL (opt-in) may lose the last ones.
            cur.execute(f"PRAGMA synchronous={self.synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            read_only = conn.get_execution_options().get(_READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine

    # -- transactions -----------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One write transaction, with storage errors translated. Its effects
        (new work, changed jobs) reach the listeners once it has committed,
        never before and never for a transaction that rolled back."""
        engine = self.engine
        if self._on_loop_thread == threading.get_ident():
            engine = self._loop_engine()
        with self._write_turn, translate_errors(), engine.connect() as conn, conn.begin():
            tx = Tx(conn, self)
            yield tx
        self._fire(tx)

    def retrying(self, work: Callable[[Tx], T], *, attempts: int = 5) -> T:
        """`work` in a transaction, run again (up to `attempts` times in all)
        when it conflicts with a concurrent change: a unique index, a deadlock
        or serialization failure PostgreSQL resolved against it, a busy
        SQLite. Effects of a rolled-back run are dropped with it."""
        for attempt in range(attempts):
            try:
                with self.transaction() as tx:
                    return work(tx)
            except Conflict as e:
                if self._on_loop_thread == threading.get_ident():
                    raise WouldWait() from e
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def runs_units_on_loop(self) -> bool:
        """Whether `on_loop` may run units here: a SQLite file this process
        has to itself (no other live instance, as of the last refresh)."""
        return (
            self.backend == "sqlite"
            and self.engine.url.database not in (None, "", ":memory:")
            and not self.others_alive
        )

    @contextlib.contextmanager
    def on_loop(self, *, sync_commits: bool = True) -> Iterator[bool]:
        """SQLite: this process's write turn for a small unit of work that the
        caller runs right here, on its event loop, instead of in a store
        thread (True), or nothing (False: not SQLite, not alone on the file,
        or the turn is taken; the caller goes to a thread).

        Here the drain's claims and completions are bound by the one
        interpreter: run in threads, each transaction gave up the GIL at
        every statement and commit and waited for the loop's thread to give
        it back, and the turn was held for those waits too. On the loop
        nothing waits for the GIL; what the loop cannot do meanwhile is what
        the GIL would not have let it do anyway, except during the commit's
        sync.

        The loop never waits here: the turn is taken only if free, and the
        unit's transactions use a connection of their own that does not
        wait for another process's lock (busy timeout 0). A unit that meets
        one raises `WouldWait` from `retrying`, having written nothing. Only
        the thread that entered runs its transactions on that connection;
        the effects of its transactions fire on it, as `loop_statements`'
        do.

        Without `sync_commits`, the unit's commits do not wait for the
        disk (synchronous=NORMAL for them): for work that a crash may undo
        without harm (a claim, whose jobs are then queued again; on
        PostgreSQL a claim of one statement does not wait for the flush
        either). The next commit that syncs makes them durable too: the WAL
        is one file, synced whole."""
        if not self.runs_units_on_loop() or not self._turn.acquire(blocking=False):
            yield False
            return
        relaxed = not sync_commits and self.synchronous != "NORMAL"
        try:
            relaxed = relaxed and self._on_loop_pragma("synchronous=NORMAL")
            self._on_loop_thread = threading.get_ident()
            yield True
        finally:
            self._on_loop_thread = None
            try:
                if relaxed:
                    self._on_loop_pragma(f"synchronous={self.synchronous}")
            finally:
                self._turn.release()

    def run_on_loop(self, work: Callable[[Tx], T], *, sync_commits: bool = True) -> T | None:
        """`retrying(work)` right here, on the caller's event loop
        (`on_loop`), or None when it did not run there: not a SQLite file
        this process has to itself, the turn taken, or the unit would have
        waited for another process's lock or grew too big for the loop
        (`WouldWait`: it rolled back). The caller then runs it in a store
        thread."""
        try:
            with self.on_loop(sync_commits=sync_commits) as here:
                if here:
                    return self.retrying(work)
        except WouldWait:
            pass
        return None

    def _on_loop_pragma(self, setting: str) -> bool:
        """A PRAGMA on the connection of `on_loop`, between its transactions.
        One that fails drops the connection, so that none goes on with a
        setting half made (the next unit opens another)."""
        try:
            raw = self._loop_engine().raw_connection()
            try:
                cursor = raw.cursor()
                cursor.execute(f"PRAGMA {setting}")
                cursor.close()
            finally:
                raw.close()
            return True
        except Exception as e:
            log.warning("SQLite setting failed", extra={"setting": setting, "error": str(e)})
            if self._on_loop_engine is not None:
                self._on_loop_engine.dispose()
                self._on_loop_engine = None
            return False

    def _loop_engine(self) -> Engine:
        """The engine of `on_loop`'s units: one connection, no busy wait."""
        if self._on_loop_engine is None:
            self._on_loop_engine = self._sqlite_engine(busy_ms=0, poolclass=StaticPool)
        return self._on_loop_engine

    @contextlib.contextmanager
    def statements(self) -> Iterator[Tx]:
        """A unit of work whose statements each commit on their own, for work
        of one statement or of statements each whole by itself: on PostgreSQL
        they run in autocommit, with no BEGIN and COMMIT (two round trips of
        the three a one-statement transaction makes). On SQLite it is a
        `transaction`, which is no weaker. Its effects fire once it ends,
        also when a later statement failed (the earlier ones committed).
        A store function whose statements are only whole together must not
        run in it (the claim checks, `Tx.each_statement_commits`)."""
        if self.backend != "postgresql":
            with self.transaction() as tx:
                yield tx
            return
        done: Tx | None = None
        try:
            with (
                translate_errors(),
                self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn,
                conn.begin() as block,
            ):
                done = Tx(conn, self, each_statement_commits=True)
                yield done
                if conn.invalidated:
                    # A statement met a lost connection and its caller went
                    # on: the statements before it committed on their own,
                    # and there is nothing left to commit.
                    block.rollback()
        finally:
            if done is not None:
                self._fire(done)

    @contextlib.asynccontextmanager
    async def loop_statements(self) -> AsyncIterator[LoopTx]:
        """`statements` on the event loop, for PostgreSQL only (see
        `runs_on_loop`): a latency-bound call of one statement runs there
        without two hops to a store thread and back. Its statements run
        with `direct.first_on_loop`; each commits on its own. Errors are
        translated as in `statements`, and its effects fire once it ends,
        on the loop (the listeners take calls from any thread)."""
        pool = self.loop_connections
        if pool is None:
            raise RuntimeError("statements on the event loop need PostgreSQL")
        import psycopg

        with translate_errors():
            try:
                driver = await pool.acquire()
            except psycopg.Error as e:
                raise driver_error(e, "connect", None, None) from e
            tx = LoopTx(driver, self)
            try:
                yield tx
            finally:
                try:
                    for word in tx.words:
                        try:
                            await first_on_loop(tx, _NOTIFY_PAYLOAD, {"c": self.channel, "p": word})
                        except exc.DBAPIError as e:
                            _word_not_sent(word, e.orig)
                finally:
                    try:
                        await pool.release(driver)
                    finally:
                        self._fire(tx)

    @property
    def runs_on_loop(self) -> bool:
        """Whether `loop_statements` may be used: PostgreSQL's store."""
        return self.loop_connections is not None

    def close_loop_connections(self) -> None:
        """Close the connections of `loop_statements`: the idle ones now, the
        others as they come back (a server's stop, on the loop that used
        them, before `close`)."""
        if self.loop_connections is not None:
            self.loop_connections.close()

    @contextlib.contextmanager
    def read_transaction(self, *, block: bool = False) -> Iterator[Tx]:
        """Like `transaction`, for work that only reads (on SQLite it does not
        take the write lock; a write in it may fail as a Conflict).

        On PostgreSQL its statements run each on its own (autocommit) unless
        `block`: at READ COMMITTED a transaction block gives reads nothing
        more (each statement reads the latest commits either way), and its
        BEGIN and COMMIT are two round trips of the three a one-read call
        made. `block` keeps one, for reads whose settings must hold to the
        end (SET LOCAL). Nothing here may write: on PostgreSQL each write
        would commit on its own."""
        options: dict[str, Any] = {_READ_ONLY: True}
        if self.backend == "postgresql" and not block:
            options["isolation_level"] = "AUTOCOMMIT"
        with (
            translate_errors(),
            self.engine.connect().execution_options(**options) as conn,
            conn.begin(),
        ):
            yield Tx(conn, self)

    @contextlib.contextmanager
    def session_for_tests(self) -> Iterator[Session]:
        """A plain session in one write transaction, for tests and benchmarks
        that arrange or inspect rows directly; the server never uses it."""
        with (
            self._write_turn,
            translate_errors(),
            Session(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    def _fire(self, tx: Effects) -> None:
        for callback in tx.committed:
            callback()
        if tx.changed_jobs:
            values = tx.job_values
            for job_change in list(self._job_change_listeners):
                for job_id in tx.changed_jobs:
                    job_change(job_id, values.get(job_id))
        if tx.new_work:
            self.new_work_committed()
        for lease_id, reason in tx.revoked:
            self._lease_revoked(lease_id, reason)
        for realm_id in tx.deleted_realms:
            self._realm_deleted(realm_id)
        for table in sorted(tx.stale_statistics):
            self.analyze(table)

    def analyze(self, table: str) -> None:
        """ANALYZE one of our tables; best effort (autovacuum does it later)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(text(f'ANALYZE "{table}"'))
        except Exception as e:
            log.warning("could not analyze table", extra={"table": table, "error": str(e)})

    def ping(self) -> bool:
        """Whether the store answers. The read commits: after a ROLLBACK,
        psycopg deallocates every statement it prepared on the connection
        (it cannot tell which ones the rollback undid), and the pool hands
        out the connection used last, the busiest one."""
        try:
            with self.engine.connect().execution_options(**{_READ_ONLY: True}) as conn:
                conn.execute(text("SELECT 1"))
                conn.commit()
            return True
        except Exception:
            return False

    # -- schema ---------------------------------------------------------

    def migrate(self) -> None:
        """Upgrade the schema to head; concurrent starts serialize on a lock."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with translate_errors(), self.engine.connect() as conn:
            if self.backend == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            finally:
                if self.backend == "postgresql":
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                    conn.commit()
        self.bind_channel()

    def bind_channel(self) -> None:
        """Name the wake-up channel after the schema, so that every instance on
        this schema shares it and stores in other schemas do not wake it."""
        if self.backend == "postgresql":
            with translate_errors(), self.engine.connect() as conn:
                schema = conn.execute(text("SELECT current_schema()")).scalar_one()
            self.channel = f"realm_new_work_{schema}"[:63]

    # -- wake-ups -------------------------------------------------------

    def on_new_work(self, callback: Callable[[], None]) -> None:
        """Call back (from any thread) when new or requeued work may be claimable."""
        self._new_work_listeners.append(callback)
        if self.backend == "postgresql" and self._listen_thread is None:
            self._listen_thread = threading.Thread(
                target=self._listen, name="pg-listen", daemon=True
            )
            self._listen_thread.start()

    def on_job_change(self, callback: Callable[[int, Job | None], None]) -> None:
        """Call back with a job id when this process changed that job, and
        the job as the change left it when the change knew it (a claim, an
        ending; else None). Callbacks run on the committing thread, in commit
        order per thread only: a value may be overtaken by a later change's."""
        self._job_change_listeners.append(callback)

    def on_listening(self, callback: Callable[[], None]) -> None:
        """Call back (on the listener's thread) each time the listener has
        (re)connected and LISTENs: from then on every word is heard, so a
        refresh of `others_alive` begun now is final until a word says
        otherwise. A failing callback is logged; the listener goes on."""
        self._listening_listeners.append(callback)

    def set_others_alive(self, alive: bool, *, heard_before: int | None = None) -> None:
        """What a refresh learned; a word of another instance heard since
        `heard_before` (the count when the refresh began) wins over its
        "alone": that instance started meanwhile."""
        if alive or heard_before is None or heard_before == self.words_heard:
            self.others_alive = alive

    def new_work_committed(self) -> None:
        for callback in list(self._new_work_listeners):
            callback()

    def on_lease_revoked(self, callback: Callable[[str, str], None]) -> None:
        """Call back (from any thread) with (lease id, reason) when a lease is
        revoked, by this process or, on PostgreSQL, another instance."""
        self._revoke_listeners.append(callback)

    def on_realm_deleted(self, callback: Callable[[str], None]) -> None:
        """Call back (from any thread) with a realm id when a realm is deleted."""
        self._unmount_listeners.append(callback)

    def _lease_revoked(self, lease_id: str, reason: str) -> None:
        for callback in list(self._revoke_listeners):
            callback(lease_id, reason)

    def _realm_deleted(self, realm_id: str) -> None:
        for callback in list(self._unmount_listeners):
            callback(realm_id)

    def _notified(self, payload: str) -> None:
        if payload.startswith(_REVOKE):
            lease_id, _, reason = payload[len(_REVOKE) :].partition(":")
            self._lease_revoked(lease_id, reason)
        elif payload.startswith(_UNMOUNT):
            self._realm_deleted(payload[len(_UNMOUNT) :])
        elif payload != self.origin:
            # Another instance's word: it is alive (one that just started
            # says so at once, before this instance's next refresh sees it).
            self.words_heard += 1
            self.others_alive = True
            self.new_work_committed()

    def _conninfo(self) -> str:
        """The store's URL as libpq takes it (psycopg's own connections)."""
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def _listen(self) -> None:
        import psycopg

        conninfo = self._conninfo()
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    log.info("listening", extra={"channel": self.channel})
                    # A (re)connect may have missed notifications (new work,
                    # an instance introducing itself): wake everyone once, and
                    # talk to the others until the next refresh says who is there.
                    self.words_heard += 1
                    self.others_alive = True
                    self.new_work_committed()
                    for callback in list(self._listening_listeners):
                        try:
                            callback()
                        except Exception as e:
                            log.warning("listening callback failed", extra={"error": str(e)})
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=1.0, stop_after=1):
                            self._notified(notify.payload)
            except Exception as e:  # reconnect: the polling fallback covers the gap
                if self._stop.is_set():
                    return
                log.warning("listen connection lost; retrying", extra={"error": str(e)})
                time.sleep(1.0)

    def close(self) -> None:
        self._stop.set()
        self.close_loop_connections()
        if self._on_loop_engine is not None:
            self._on_loop_engine.dispose()
        self.engine.dispose()


def open_database(
    url: str, *, migrate: bool = True, pool_size: int = 10, synchronous: str = "FULL"
) -> Database:
    db = Database(url, pool_size=pool_size, synchronous=synchronous)
    if migrate:
        db.migrate()
    else:
        db.bind_channel()
    return db
