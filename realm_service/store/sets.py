"""Lists and rows of values bound as one parameter, so that a set-based
statement has one SQL text whatever its size.

SQLAlchemy's expanding `IN` renders one placeholder per element: each call
builds new SQL text (rendered and type-processed element by element), and on
PostgreSQL every distinct text is parsed again by psycopg and misses its
prepared statements. `executemany` processes every row's parameters in Python.
On the claim and completion path those per-element costs were most of the
store's time per job.

Here a list is one value: a PostgreSQL array (`col = ANY(:ids)`, `unnest`), a
JSON array on SQLite (`col IN (SELECT value FROM json_each(:ids))`, a
`json_each` subquery for rows). SQLite plans `IN (subquery)` as a probe of
the column's index, PostgreSQL `= ANY(array)` likewise.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    String,
    Table,
    bindparam,
    column,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.expression import FromClause
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator, TypeEngine, UserDefinedType

_SQL_TYPES: dict[type, type[TypeEngine[Any]]] = {int: BigInteger, str: String}


class _ArrayText(UserDefinedType[str]):
    """A PostgreSQL array parameter sent as its text form (`{1,2,3}`) and
    cast in the statement (`$1::BIGINT[]`). psycopg dumps a Python list
    element by element in Python (its array dumper has no C version): 80 us
    for 64 integers, 190 us for 64 strings, against 8-14 us to join them
    into the array's text here, which PostgreSQL parses in C."""

    cache_ok = True
    render_bind_cast = True

    def __init__(self, item_sql: str) -> None:
        self.item_sql = item_sql

    def get_col_spec(self, **kw: Any) -> str:
        return f"{self.item_sql}[]"


_ARRAY_TEXT = {
    int: _ArrayText("BIGINT"),
    str: _ArrayText("VARCHAR"),
    bytes: _ArrayText("BYTEA"),
}
_KINDS = {int: "an integer", str: "a string", bytes: "a bytes"}


def _of(value: Any, item: type) -> bool:
    if item is int:
        return type(value) is int
    return isinstance(value, (bytes, bytearray, memoryview) if item is bytes else item)


def array_text(items: Sequence[Any], item: type) -> str:
    """The text form of a PostgreSQL array of `item` (int, str or bytes)
    values; None is NULL. Strings are always quoted, with backslash and
    quote escaped, so any string comes back as it was; bytes are written in
    bytea's hex form. A value of another type is a TypeError (a float or a
    bool is no id)."""
    values = items if isinstance(items, (list, tuple)) else list(items)
    if not all(type(v) is item for v in values):
        for v in values:
            if v is not None and not _of(v, item):
                raise TypeError(f"{_KINDS[item]} list holds {type(v).__name__} {v!r:.40}")
    if item is int:
        return "{" + ",".join(["NULL" if v is None else str(v) for v in values]) + "}"
    if item is bytes:
        # Each element is the text \x<hex>, its backslash escaped in the array.
        return (
            "{"
            + ",".join(["NULL" if v is None else f'"\\\\x{bytes(v).hex()}"' for v in values])
            + "}"
        )
    quoted = [
        "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for v in values
    ]
    return "{" + ",".join(quoted) + "}"


class ValueList(TypeDecorator[list[Any]]):
    """A list bound as one parameter: an array on PostgreSQL (sent as its
    text, see `_ArrayText`), JSON on SQLite."""

    impl = String
    cache_ok = True

    def __init__(self, item: type = str) -> None:
        super().__init__()
        self.item = item

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return _ARRAY_TEXT[self.item]
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return array_text(value, self.item)
        return json.dumps(value if isinstance(value, list) else list(value))


def values(name: str, item: type = str) -> BindParameter[Any]:
    """A bound list of `item` values (str or int)."""
    return bindparam(name, type_=ValueList(item))


class InValues(ColumnElement[bool]):
    """`column IN <bound list>` (or NOT IN), with one SQL text for any size."""

    inherit_cache = True
    type = Boolean()
    # A comparison: SQLite needs no "= 1" after it in a WHERE clause.
    _is_implicitly_boolean = True
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("param", InternalTraversal.dp_clauseelement),
        ("negate", InternalTraversal.dp_boolean),
    ]

    def __init__(self, col: ColumnElement[Any], param: BindParameter[Any], negate: bool) -> None:
        self.column = col
        self.param = param
        self.negate = negate


def in_values(col: ColumnElement[Any], name: str, item: type = str) -> InValues:
    """`col` is one of the list bound as `name` (a Python list or tuple)."""
    return InValues(col, values(name, item), False)


def not_in_values(col: ColumnElement[Any], name: str, item: type = str) -> InValues:
    return InValues(col, values(name, item), True)


@compiles(InValues, "postgresql")
def _in_values_pg(element: InValues, compiler: Any, **kw: Any) -> str:
    col = compiler.process(element.column, **kw)
    param = compiler.process(element.param, **kw)
    if element.negate:
        return f"NOT ({col} = ANY ({param}))"
    return f"{col} = ANY ({param})"


@compiles(InValues)
def _in_values_default(element: InValues, compiler: Any, **kw: Any) -> str:
    col = compiler.process(element.column, **kw)
    param = compiler.process(element.param, **kw)
    op = "NOT IN" if element.negate else "IN"
    return f"{col} {op} (SELECT value FROM json_each({param}))"


def rows_source(backend: str, name: str, columns: Sequence[tuple[str, type]]) -> FromClause:
    """A derived table `name` of the rows bound by `rows_params(backend,
    name, columns, rows)`: `unnest` of one array per column on PostgreSQL,
    `json_each` of one JSON array of rows on SQLite."""
    return _rows_source(backend, name, tuple(columns))


@functools.cache
def _rows_source(backend: str, name: str, columns: tuple[tuple[str, type], ...]) -> FromClause:
    if backend == "postgresql":
        arrays = [values(f"{name}_{col}", item) for col, item in columns]
        return (
            func.unnest(*arrays)
            .table_valued(*(column(col, _SQL_TYPES[item]()) for col, item in columns))
            .render_derived(name=name)
        )
    each = func.json_each(bindparam(name, type_=String())).table_valued("value")
    return select(
        *(
            func.json_extract(each.c.value, f"$[{i}]", type_=_SQL_TYPES[item]()).label(col)
            for i, (col, item) in enumerate(columns)
        )
    ).subquery(name)


def rows_params(
    backend: str, name: str, columns: Sequence[tuple[str, type]], rows: Sequence[Sequence[Any]]
) -> dict[str, Any]:
    """The parameters binding `rows` (tuples in the order of `columns`) to
    `rows_source(backend, name, columns)`."""
    if backend == "postgresql":
        return {f"{name}_{col}": [row[i] for row in rows] for i, (col, _) in enumerate(columns)}
    return {name: json.dumps([list(row) for row in rows])}


def dialect_insert(backend: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT in the backend's own dialect, for its ON CONFLICT clauses
    (both backends speak them)."""
    return postgresql.insert(table) if backend == "postgresql" else sqlite.insert(table)
