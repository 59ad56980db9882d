"""Prebuilt statements run on the driver's cursor: those of the latency-bound
calls that run one statement alone (an enqueue into an idle realm, a
hand-off's claim, a create, a read of one job), a create's three on SQLite
(its files in one executemany: `many`), and those every batch of the drain
runs (a claim's read and writes, a completion's lease read, success and
generation switch).

SQLAlchemy's `Connection.execute` costs about 120 us of Python a statement
on a warm process and 230 us more on a cold one (an RPC after an idle
pause): the execution context, the result's metadata and the events around
each call. A statement of the one-statement paths is one round trip, so
that cost was a fifth of the call; in the drain it was most of the
SQLAlchemy share of the server's time. Here a statement is compiled once
per dialect, with what SQLAlchemy would do per execution taken from the
compiled form and kept: its SQL text, the bind processors of its types,
the values of its literal binds and the scalar defaults of columns it
inserts, and the result processors of its columns. A run then binds,
executes on the DBAPI cursor of the transaction's connection, and
processes the rows; errors go through
SQLAlchemy's own handling (wrapped the same way, and a lost connection
invalidates the pool's), so the store's error translation sees what it
always did. A statement whose SQL depends on its values (expanding
parameters) is left to SQLAlchemy (lists are bound as one value elsewhere:
`sets.py`).

`first_on_loop` runs a statement the same way on the event loop, over a
psycopg AsyncConnection (`Database.loop_statements`: a create's one
statement, an idle reindex's insert and its hand-off's claim), its errors
wrapped as SQLAlchemy wraps them (`driver_error`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql import ClauseElement

if TYPE_CHECKING:
    from realm_service.store.db import LoopTx


class _Prepared(NamedTuple):
    sql: str
    # Bound names in order (positional paramstyles), else None.
    positions: tuple[str, ...] | None
    # Every bound name with its value when the caller gives none (literal
    # binds, scalar column defaults); None marks a name the caller must give.
    defaults: dict[str, Any]
    # Names the caller must give (SQLAlchemy refuses a run without them).
    required: frozenset[str]
    binds: tuple[tuple[str, Callable[[Any], Any]], ...]
    row: Any  # a named tuple class for its rows, or None
    results: tuple[tuple[int, Callable[[Any], Any]], ...]


# Per statement and kind of dialect: every engine of a backend compiles a
# statement the same way (the tests open many).
# The key names the parameters of an INSERT or UPDATE: one without values
# of its own sets the columns its parameters name, as SQLAlchemy compiles it.
_Key = tuple[int, type[Dialect], str, tuple[str, ...]]
_PREPARED: dict[_Key, tuple[ClauseElement, _Prepared | None]] = {}
_PREPARING = threading.Lock()


def _prepared(
    statement: ClauseElement, dialect: Dialect, params: Mapping[str, Any]
) -> _Prepared | None:
    names = tuple(sorted(params)) if statement.is_dml else ()
    key = (id(statement), type(dialect), dialect.paramstyle, names)
    found = _PREPARED.get(key)
    if found is not None and found[0] is statement:
        return found[1]
    with _PREPARING:
        prepared = _prepare(statement, dialect, names)
        _PREPARED[key] = (statement, prepared)  # the statement kept: its id stays its own
    return prepared


def _prepare(
    statement: ClauseElement, dialect: Dialect, names: tuple[str, ...]
) -> _Prepared | None:
    """None for a statement only SQLAlchemy runs: one whose SQL depends on
    its values (expanding parameters), with escaped parameter names, or
    writing a column whose default SQLAlchemy computes per row."""
    compiled: Any = statement.compile(dialect=dialect, column_keys=list(names) or None)
    if compiled.literal_execute_params or compiled.post_compile_params:
        return None
    if compiled.escaped_bind_names or compiled.update_prefetch:
        return None
    defaults = dict(compiled.construct_params(_check=False))
    required = frozenset(
        name for bind, name in compiled.bind_names.items() if bind.required and name in defaults
    )
    for column in compiled.insert_prefetch:
        default = column.default
        if default is None or not default.is_scalar:
            return None
        defaults[column.key] = default.arg
    binds = tuple(
        (name, processor)
        for name, processor in compiled._bind_processors.items()
        if processor is not None
    )
    columns = compiled._result_columns
    row: type[tuple[Any, ...]] | None = None
    results: list[tuple[int, Callable[[Any], Any]]] = []
    if columns:
        row = collections.namedtuple("Row", [c.keyname for c in columns], rename=True)  # type: ignore[misc,no-redef]
        for i, c in enumerate(columns):
            processor = c.type._cached_result_processor(dialect, None)
            if processor is not None:
                results.append((i, processor))
    positions = tuple(compiled.positiontup) if compiled.positiontup else None
    return _Prepared(compiled.string, positions, defaults, required, binds, row, tuple(results))


def rows(conn: Connection, statement: ClauseElement, params: Mapping[str, Any]) -> list[Any]:
    """Run `statement` with `params` on the connection's DBAPI connection
    (in its transaction, or on its own in autocommit): its rows, as named
    tuples with SQLAlchemy's values (none for a statement returning nothing)."""
    prepared = _prepared(statement, conn.dialect, params)
    bound = None if prepared is None else _bound(prepared, params)
    if prepared is None or bound is None:
        # SQLAlchemy runs it, or refuses it with its own error.
        return list(conn.execute(statement, params))  # type: ignore[call-overload]
    return _processed(prepared, _run(conn, prepared, bound, many=False))


def _processed(prepared: _Prepared, fetched: Sequence[Any]) -> list[Any]:
    """The driver's rows as named tuples with SQLAlchemy's values."""
    if not fetched:
        return []
    if prepared.row is None:  # rows of a statement SQLAlchemy saw no columns in
        return [tuple(r) for r in fetched]
    make = prepared.row._make
    if not prepared.results:
        return [make(r) for r in fetched]
    out = []
    for r in fetched:
        values_ = list(r)
        for i, processor in prepared.results:
            values_[i] = processor(values_[i])
        out.append(make(values_))
    return out


def many(conn: Connection, statement: ClauseElement, params: Sequence[Mapping[str, Any]]) -> None:
    """Run `statement`, which returns nothing, once for each of `params`
    (each naming the same values) in one call of the driver's executemany,
    as `rows` runs it once."""
    if not params:
        return
    prepared = _prepared(statement, conn.dialect, params[0])
    names = params[0].keys()
    # The driver runs it only when each run's values bind (and name the same
    # values); otherwise SQLAlchemy runs it, or refuses it with its error.
    bound = (
        [_bound(prepared, each) if each.keys() == names else None for each in params]
        if prepared is not None and prepared.row is None
        else None
    )
    if bound is None or any(each is None for each in bound):
        conn.execute(statement, list(params))  # type: ignore[call-overload]
        return
    assert prepared is not None
    _run(conn, prepared, bound, many=True)


def _bound(prepared: _Prepared, params: Mapping[str, Any]) -> Any | None:
    """The values of one run as the driver takes them; None when SQLAlchemy
    must run it: a value its type refuses (SQLAlchemy raises its error for
    it, a StatementError, which the store's edge translates), or a required
    value missing."""
    bound = _bound_or_refusal(prepared, params)
    return None if isinstance(bound, exc.StatementError) else bound


def _bound_or_refusal(prepared: _Prepared, params: Mapping[str, Any]) -> Any:
    """`_bound`'s values, or why there are none: a value its type's
    processor refused (the processor's error, as SQLAlchemy raises it), or
    one missing."""
    missing = prepared.required - params.keys()
    if missing:
        return exc.StatementError(
            f"a value is required for {', '.join(sorted(missing))}", prepared.sql, None, None
        )
    values = dict(prepared.defaults)
    values.update(params)
    try:
        for name, processor in prepared.binds:
            values[name] = processor(values[name])
    except Exception as e:
        return exc.StatementError(str(e), prepared.sql, None, e)
    return values if prepared.positions is None else tuple(values[n] for n in prepared.positions)


def _run(conn: Connection, prepared: _Prepared, bound: Any, *, many: bool) -> Sequence[Any]:
    """Execute on a cursor of the connection's DBAPI connection: the rows
    fetched (none for executemany)."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    # Listeners of the engine's cursor events (tests, tracing) see these
    # statements as they see SQLAlchemy's (what a listener returns is not
    # used: none of the store's rewrites a statement).
    events = conn._has_events or conn.engine._has_events
    try:
        if events:
            for listen in conn.dispatch.before_cursor_execute:
                listen(conn, cursor, prepared.sql, bound, None, many)
        if many:
            cursor.executemany(prepared.sql, bound)
            fetched: Sequence[Any] = ()
        else:
            cursor.execute(prepared.sql, bound)
            # A statement with result columns returns rows (maybe none): only
            # one without asks the cursor, whose description psycopg builds
            # anew on each call (44 us for 25 columns).
            if prepared.row is not None or cursor.description is not None:
                fetched = cursor.fetchall()
            else:
                fetched = []
        if events:
            for listen in conn.dispatch.after_cursor_execute:
                listen(conn, cursor, prepared.sql, bound, None, many)
    except BaseException as e:
        # Wrapped and, for a lost connection or an interrupt, the
        # connection invalidated, as SQLAlchemy does for its own.
        conn._handle_dbapi_exception(e, prepared.sql, bound, cursor, None)
        raise
    finally:
        # Safely: a connection invalidated above is closed already (SQLite's
        # cursor then raises on close, hiding the error being raised).
        conn._safe_close_cursor(cursor)
    return fetched


def first(conn: Connection, statement: ClauseElement, params: Mapping[str, Any]) -> Any | None:
    """The first row of `rows`, or None."""
    found = rows(conn, statement, params)
    return found[0] if found else None


async def first_on_loop(
    tx: LoopTx, statement: ClauseElement, params: Mapping[str, Any]
) -> Any | None:
    """`first` on the event loop, over the psycopg AsyncConnection of a
    `Database.loop_statements` unit (PostgreSQL). Only a statement that runs
    on the driver may run here (there is no SQLAlchemy to hand it to); a
    value its type refuses fails as SQLAlchemy fails it (a StatementError),
    and the driver's errors are wrapped as SQLAlchemy wraps them
    (`driver_error`), so the store's edge translates both as it always did."""
    import psycopg

    prepared = _prepared(statement, tx.dialect, params)
    if prepared is None:
        raise TypeError("this statement's SQL depends on its values: it cannot run on the loop")
    bound = _bound_or_refusal(prepared, params)
    if isinstance(bound, exc.StatementError):
        raise bound
    try:
        async with tx.driver.cursor() as cursor:
            await cursor.execute(prepared.sql, bound)
            fetched = await cursor.fetchall() if prepared.row is not None else []
    except psycopg.Error as e:
        raise driver_error(e, prepared.sql, bound, tx.driver) from e
    except Exception as e:
        # Raised while psycopg adapted a value (a JSON dump): SQLAlchemy
        # wraps it so too.
        raise exc.StatementError(str(e), prepared.sql, bound, e) from e
    found = _processed(prepared, fetched)
    return found[0] if found else None


def driver_error(error: Exception, sql: str, params: Any, driver: Any | None) -> exc.StatementError:
    """A psycopg error met on the loop, wrapped as SQLAlchemy wraps those of
    the store threads (the PEP 249 class kept: IntegrityError, DataError,
    OperationalError ...), with the connection marked lost when it broke or
    was never made (`driver` None)."""
    import psycopg

    lost = driver is None or driver.broken or driver.closed
    return exc.DBAPIError.instance(sql, params, error, psycopg.Error, connection_invalidated=lost)
