"""Realms and their files. Functions take the caller's `Tx` and return
domain values."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Insert,
    LargeBinary,
    Select,
    String,
    Table,
    bindparam,
    column,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql

from realm_service.domain import Job, JobKind, Realm, RealmFile, RealmState
from realm_service.errors import FileNotFound, RealmNotFound
from realm_service.store import direct
from realm_service.store.db import Effects, LoopTx, Tx
from realm_service.store.rows import (
    CANCELLED,
    JOB_FIELDS,
    NEW_JOB_FIELDS,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    new_job_values,
    to_job,
)
from realm_service.store.sets import dialect_insert, in_values, values
from realm_service.store.tables import (
    IndexEntryRow,
    JobAttemptRow,
    JobRow,
    RealmFileRow,
    RealmRow,
)


def to_realm(row: Any) -> Realm:
    """From a RealmRow or any row with its columns."""
    return Realm(
        realm_id=row.realm_id,
        display_name=row.display_name,
        state=RealmState(row.state),
        create_time=row.create_time,
        files=row.files,
        cards=row.cards,
        errors=row.errors,
        entries=row.entries,
        last_index_time=row.last_index_time,
        current_generation=row.current_generation,
        created_priority=row.created_priority,
    )


def to_file(row: Any) -> RealmFile:
    return RealmFile(path=row.path, mtime=row.mtime, size=row.size, sha256=row.sha256)


# -- realms -------------------------------------------------------------------


def _new_realm(realm_id: str, display_name: str, priority: int, now: datetime, files: int) -> Realm:
    return Realm(
        realm_id=realm_id,
        display_name=display_name,
        state=RealmState.INDEXING,
        create_time=now,
        files=files,
        cards=0,
        errors=0,
        entries=0,
        last_index_time=None,
        current_generation=None,
        created_priority=priority,
    )


def insert_new_realm(
    tx: Tx,
    *,
    realm_id: str,
    display_name: str,
    priority: int,
    now: datetime,
    files: Sequence[tuple[str, bytes]] = (),
    if_absent: bool = False,
) -> Realm | None:
    """A realm the caller has just read as absent, with its files, in two
    statements (prebuilt Core inserts: the ORM's unit of work for one new row
    was most of a CreateRealm's own time). A concurrent creator's row makes
    the insert fail on the primary key (a Conflict at the transaction's
    edge). With `if_absent` the caller has not looked: None, and nothing
    written, when the realm exists (or a concurrent creator's commits)."""
    realm = _new_realm(realm_id, display_name, priority, now, len(files))
    values = {**vars(realm), "state": realm.state.value}
    if if_absent:
        if tx.conn.execute(_insert_realm_if_absent(tx.backend), values).first() is None:
            return None
    else:
        tx.conn.execute(_INSERT_REALM, values)
    if files:
        tx.conn.execute(_INSERT_FILES, _file_rows(realm_id, files, now))
    return realm


def create_realm(
    tx: Tx,
    *,
    realm_id: str,
    display_name: str,
    priority: int,
    now: datetime,
    files: Sequence[tuple[str, bytes]],
    job_priority: int,
    job_time: datetime,
    trace_parent: str = "",
) -> tuple[Realm, Job] | None:
    """A realm, its files and its first from-scratch job, unless the realm
    exists (None, and nothing written). One statement on PostgreSQL
    (data-modifying CTEs: the files and the job are inserted only if the
    realm's row is), which `Database.statements` may run on its own; three
    on SQLite, in the caller's transaction."""
    realm = _new_realm(realm_id, display_name, priority, now, len(files))
    job_values = _first_job_values(realm_id, job_priority, job_time, trace_parent)
    if tx.backend == "postgresql":
        params = _create_realm_params(realm, job_values, files, now)
        return _created(tx, realm, direct.first(tx.conn, _create_realm_pg(), params))
    realm_values = {**vars(realm), "state": realm.state.value}
    if direct.first(tx.conn, _insert_realm_if_absent(tx.backend), realm_values) is None:
        return None
    direct.many(tx.conn, _INSERT_FILES, _file_rows(realm_id, files, now))
    return _created(tx, realm, direct.first(tx.conn, _INSERT_JOB, job_values))


async def create_realm_on_loop(
    tx: LoopTx,
    *,
    realm_id: str,
    display_name: str,
    priority: int,
    now: datetime,
    files: Sequence[tuple[str, bytes]],
    job_priority: int,
    job_time: datetime,
    trace_parent: str = "",
) -> tuple[Realm, Job] | None:
    """`create_realm`'s one PostgreSQL statement, run on the event loop
    (`Database.loop_statements`)."""
    realm = _new_realm(realm_id, display_name, priority, now, len(files))
    job_values = _first_job_values(realm_id, job_priority, job_time, trace_parent)
    params = _create_realm_params(realm, job_values, files, now)
    return _created(tx, realm, await direct.first_on_loop(tx, _create_realm_pg(), params))


def _first_job_values(
    realm_id: str, priority: int, now: datetime, trace_parent: str
) -> dict[str, Any]:
    return new_job_values(
        realm_id=realm_id,
        kind=JobKind.FROM_SCRATCH,
        priority=priority,
        now=now,
        trace_parent=trace_parent,
    )


def _create_realm_params(
    realm: Realm,
    job_values: dict[str, Any],
    files: Sequence[tuple[str, bytes]],
    now: datetime,
) -> dict[str, Any]:
    rows = _file_rows(realm.realm_id, files, now)
    return {
        **{f"r_{name}": value for name, value in vars(realm).items()},
        "r_state": realm.state.value,
        **{f"j_{name}": value for name, value in job_values.items()},
        "f_path": [r["path"] for r in rows],
        "f_content": [r["content"] for r in rows],
        "f_size": [r["size"] for r in rows],
        "f_sha256": [r["sha256"] for r in rows],
        "f_mtime": now,
    }


def _created(tx: Effects, realm: Realm, job_row: Any | None) -> tuple[Realm, Job] | None:
    """The realm and its first job, from the job's row (None: the realm was
    there, nothing was written); the job is new work at commit."""
    if job_row is None:
        return None
    job = to_job(job_row)
    tx.announce_new_work()
    tx.job_changed([job.job_id])
    return realm, job


@functools.cache
def _create_realm_pg() -> Select[Any]:
    realm_names = [c.name for c in _R.c]
    new_realm = (
        postgresql.insert(_R)
        .values({name: bindparam(f"r_{name}", type_=_R.c[name].type) for name in realm_names})
        .on_conflict_do_nothing(index_elements=[_R.c.realm_id])
        .returning(_R.c.realm_id)
        .cte("new_realm")
    )
    listed = (
        func.unnest(
            values("f_path", str),
            values("f_content", bytes),
            values("f_size", int),
            values("f_sha256", str),
        )
        .table_valued(
            column("path", String()),
            column("content", LargeBinary()),
            column("size", BigInteger()),
            column("sha256", String()),
        )
        .render_derived(name="f")
    )
    new_files = (
        insert(_FILES_TABLE)
        .from_select(
            ["realm_id", "path", "content", "mtime", "size", "sha256"],
            select(
                new_realm.c.realm_id,
                listed.c.path,
                listed.c.content,
                bindparam("f_mtime", type_=_F.mtime.type),
                listed.c.size,
                listed.c.sha256,
            ).select_from(new_realm.join(listed, true())),
        )
        .cte("new_files")
    )
    job_names = [name for name in NEW_JOB_FIELDS if name != "realm_id"]
    new_job = (
        insert(_J)
        .from_select(
            ["realm_id", *job_names],
            select(
                new_realm.c.realm_id,
                *(bindparam(f"j_{name}", type_=_J.c[name].type) for name in job_names),
            ).select_from(new_realm),
        )
        .returning(*(_J.c[name] for name in JOB_FIELDS))
        .cte("new_job")
    )
    return select(*(new_job.c[name] for name in JOB_FIELDS)).add_cte(new_files)


def get_realm(tx: Tx, realm_id: str, *, lock: bool = False) -> Realm:
    row = tx.conn.execute(_REALM_LOCKED if lock else _REALM, {"realm_id": realm_id}).first()
    if row is None:
        raise RealmNotFound(f"realm {realm_id!r} does not exist")
    return to_realm(row)


def realm_exists(tx: Tx, realm_id: str) -> bool:
    return tx.conn.execute(_REALM_EXISTS, {"realm_id": realm_id}).first() is not None


# Most requests read their realm first: prebuilt Core statements (an ORM
# entity select costs several times as much in Python).
_R = cast(Table, RealmRow.__table__)
_J = cast(Table, JobRow.__table__)
_INSERT_JOB = insert(_J).returning(*(_J.c[name] for name in JOB_FIELDS))
_INSERT_REALM = insert(_R)


@functools.cache
def _insert_realm_if_absent(backend: str) -> Insert:
    return (
        dialect_insert(backend, _R)
        .on_conflict_do_nothing(index_elements=[_R.c.realm_id])
        .returning(_R.c.realm_id)
    )


_REALM = select(_R).where(_R.c.realm_id == bindparam("realm_id"))
_REALM_LOCKED = _REALM.with_for_update()
_REALM_EXISTS = select(_R.c.realm_id).where(_R.c.realm_id == bindparam("realm_id"))


def list_realms(tx: Tx, *, after: str | None, limit: int) -> list[Realm]:
    q = select(RealmRow).order_by(RealmRow.realm_id).limit(limit)
    if after:
        q = q.where(RealmRow.realm_id > after)
    return [to_realm(r) for r in tx.conn.execute(q)]


def realm_ids_page(
    tx: Tx, *, after: str | None, limit: int, unindexed_only: bool = False
) -> list[str]:
    q = select(RealmRow.realm_id).order_by(RealmRow.realm_id).limit(limit)
    if after:
        q = q.where(RealmRow.realm_id > after)
    if unindexed_only:
        # Realms with no index whose first job is missing, or queued below the
        # priority their creation asked for: the ones a mount must act on.
        scratch = (JobRow.realm_id == RealmRow.realm_id) & (
            JobRow.kind == JobKind.FROM_SCRATCH.value
        )
        has_job = exists().where(scratch, JobRow.state.in_((QUEUED, RUNNING, SUCCEEDED, CANCELLED)))
        queued_low = exists().where(
            scratch, JobRow.state == QUEUED, JobRow.priority < RealmRow.created_priority
        )
        q = q.where(RealmRow.current_generation.is_(None), or_(~has_job, queued_low))
    return list(tx.conn.scalars(q))


def set_realm_state(tx: Tx, realm_id: str, state: RealmState) -> None:
    tx.conn.execute(update(RealmRow).where(RealmRow.realm_id == realm_id).values(state=state.value))


# -- files --------------------------------------------------------------------


def put_file(tx: Tx, *, realm_id: str, path: str, content: bytes, now: datetime) -> RealmFile:
    stored = RealmFile(
        path=path, mtime=now, size=len(content), sha256=hashlib.sha256(content).hexdigest()
    )
    values = {
        "b_realm": realm_id,
        "b_path": path,
        "b_content": content,
        "b_mtime": now,
        "b_size": stored.size,
        "b_sha256": stored.sha256,
    }
    if getattr(tx.conn.execute(_REPLACE_FILE, values), "rowcount", 0) == 0:
        tx.conn.execute(_INSERT_FILE, values)
        tx.conn.execute(_COUNT_NEW_FILE, {"b_realm": realm_id})
    return stored


def _file_rows(
    realm_id: str, files: Sequence[tuple[str, bytes]], now: datetime
) -> list[dict[str, Any]]:
    return [
        {
            "realm_id": realm_id,
            "path": path,
            "content": content,
            "mtime": now,
            "size": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
        }
        for path, content in files
    ]


def delete_file(tx: Tx, *, realm_id: str, path: str) -> None:
    result = tx.conn.execute(
        delete(RealmFileRow).where(RealmFileRow.realm_id == realm_id, RealmFileRow.path == path)
    )
    if getattr(result, "rowcount", 0) == 0:
        raise FileNotFound(f"file {path[:200]!r} does not exist in realm {realm_id!r}")
    tx.conn.execute(
        update(RealmRow).where(RealmRow.realm_id == realm_id).values(files=RealmRow.files - 1)
    )


def list_files(tx: Tx, realm_id: str) -> list[RealmFile]:
    q = (
        select(RealmFileRow.path, RealmFileRow.mtime, RealmFileRow.size, RealmFileRow.sha256)
        .where(RealmFileRow.realm_id == realm_id)
        .order_by(RealmFileRow.path)
    )

    return [RealmFile(path=p, mtime=m, size=s, sha256=h) for p, m, s, h in tx.conn.execute(q)]


def read_file(tx: Tx, *, realm_id: str, path: str) -> tuple[RealmFile, bytes]:
    row = tx.conn.execute(
        select(RealmFileRow).where(RealmFileRow.realm_id == realm_id, RealmFileRow.path == path)
    ).first()
    if row is None:
        raise FileNotFound(f"file {path[:200]!r} does not exist in realm {realm_id!r}")
    return to_file(row), row.content


def file_page(
    tx: Tx,
    realm_id: str,
    *,
    after: str | None,
    paths: Sequence[str] | None,
    limit: int,
    skip_generation: int | None = None,
) -> list[RealmFile]:
    """Metadata of up to `limit` files in path order after `after`: every
    file of the realm, or only those named in `paths` (which exist). With
    `skip_generation` (a checkpoint), files with an entry in it are left out."""
    if paths is not None:
        rows = tx.conn.execute(_NAMED_META, {"realm_id": realm_id, "paths": list(paths)})
        listed = sorted(rows)
        if after is not None:
            listed = [r for r in listed if r[0] > after]
        return [RealmFile(path=p, mtime=m, size=s, sha256=h) for p, m, s, h in listed[:limit]]
    if skip_generation is not None:
        return _page_skipping(tx, realm_id, after, limit, skip_generation)
    q = select(*_META).where(_F.realm_id == realm_id).order_by(_F.path).limit(limit)
    if after is not None:
        q = q.where(_F.path > after)
    return [RealmFile(path=p, mtime=m, size=s, sha256=h) for p, m, s, h in tx.conn.execute(q)]


def _page_skipping(
    tx: Tx, realm_id: str, after: str | None, limit: int, generation: int
) -> list[RealmFile]:
    """The next `limit` files after `after` that have no entry in the
    generation (a checkpoint), a chunk of SKIP_CHUNK files at a time; only
    the paths that are left come back from the store."""
    wanted: list[str] = []
    cursor = after or ""
    while len(wanted) < limit:
        keys = {"realm_id": realm_id, "generation": generation, "after": cursor}
        last = tx.conn.scalar(_NTH_AFTER, {**keys, "skip": SKIP_CHUNK - 1})
        if last is not None:
            keys["last"] = last
        wanted += list(tx.conn.scalars(_UNKEPT[last is not None], keys))[: limit - len(wanted)]
        if last is None:
            break
        cursor = last
    if not wanted:
        return []
    # In the store's order of paths (the listing's), not Python's.
    found = {f.path: f for f in file_page(tx, realm_id, after=None, paths=wanted, limit=limit)}
    return [found[p] for p in wanted if p in found]


def files_with_content(
    tx: Tx, realm_id: str, paths: Sequence[str], *, contiguous: bool = False
) -> list[tuple[RealmFile, bytes]]:
    """These files (those that still exist) with their content, in path
    order, metadata and bytes from one statement. `contiguous`: `paths` are
    in path order and every file of the realm between the first and the last
    (a page of a listing), read as one range of the primary key."""
    if not paths:
        return []
    if contiguous:
        rows = list(
            tx.conn.execute(
                _RANGE_CONTENT,
                {"realm_id": realm_id, "first": paths[0], "last": paths[-1], "paths": list(paths)},
            )
        )
    else:
        rows = sorted(tx.conn.execute(_NAMED_CONTENT, {"realm_id": realm_id, "paths": list(paths)}))
    return [
        (RealmFile(path=p, mtime=m, size=s, sha256=h), bytes(content))
        for p, m, s, h, content in rows
    ]


# A realm's named files: `= ANY(array)` (PostgreSQL) or `IN (json_each)`
# (SQLite) probes the primary key once a path. No ORDER BY (the rows are
# sorted here): with one, PostgreSQL may walk the realm's whole key range in
# path order and filter it, which it prefers whenever its statistics
# underestimate the realm (right after a bulk load, 7 ms for two files of a
# 50,000-file realm against 0.02 ms).
_FILES_TABLE = cast(Table, RealmFileRow.__table__)
_INSERT_FILES = insert(_FILES_TABLE)
_F = _FILES_TABLE.c
_E = cast(Table, IndexEntryRow.__table__)
_META = (_F.path, _F.mtime, _F.size, _F.sha256)
# A checkpoint's files are skipped by reading the listing and the entries'
# paths side by side, a range of each primary key at a time, and comparing
# here: an anti-join leaves the plan to the statistics, which right after a
# bulk load may be far off (PostgreSQL then took minutes for one page).
SKIP_CHUNK = 10_000
_NTH_AFTER = (
    select(_F.path)
    .where(_F.realm_id == bindparam("realm_id"), _F.path > bindparam("after"))
    .order_by(_F.path)
    .offset(bindparam("skip"))
    .limit(1)
)


def _in_range(column: Any, bounded: bool) -> list[Any]:
    where = [column > bindparam("after")]
    if bounded:
        where.append(column <= bindparam("last"))
    return where


# The files of a range of paths without an entry in the generation: a set
# difference of two ranges of primary keys, whatever the statistics say.
_UNKEPT = {
    bounded: select(_F.path)
    .where(_F.realm_id == bindparam("realm_id"), *_in_range(_F.path, bounded))
    .except_(
        select(_E.c.path).where(
            _E.c.realm_id == bindparam("realm_id"),
            _E.c.generation == bindparam("generation"),
            *_in_range(_E.c.path, bounded),
        )
    )
    .order_by(text("path"))
    for bounded in (False, True)
}
_NAMED_META = select(*_META).where(
    _F.realm_id == bindparam("realm_id"), in_values(_F.path, "paths")
)
_NAMED_CONTENT = select(*_META, _F.content).where(
    _F.realm_id == bindparam("realm_id"), in_values(_F.path, "paths")
)
_RANGE_CONTENT = (
    select(*_META, _F.content)
    .where(
        _F.realm_id == bindparam("realm_id"),
        _F.path >= bindparam("first"),
        _F.path <= bindparam("last"),
        # Files created in the range since the listing are not read.
        in_values(_F.path, "paths"),
    )
    .order_by(_F.path)
)


_REPLACE_FILE = (
    update(_FILES_TABLE)
    .where(
        _FILES_TABLE.c.realm_id == bindparam("b_realm"),
        _FILES_TABLE.c.path == bindparam("b_path"),
    )
    .values(
        content=bindparam("b_content"),
        mtime=bindparam("b_mtime"),
        size=bindparam("b_size"),
        sha256=bindparam("b_sha256"),
    )
)
_INSERT_FILE = insert(_FILES_TABLE).values(
    realm_id=bindparam("b_realm"),
    path=bindparam("b_path"),
    content=bindparam("b_content"),
    mtime=bindparam("b_mtime"),
    size=bindparam("b_size"),
    sha256=bindparam("b_sha256"),
)
_COUNT_NEW_FILE = (
    update(_R).where(_R.c.realm_id == bindparam("b_realm")).values(files=_R.c.files + 1)
)


def existing_paths(tx: Tx, realm_id: str, paths: Sequence[str]) -> set[str]:
    """Which of these paths are files of the realm."""
    found: set[str] = set()
    ordered = list(paths)
    for start in range(0, len(ordered), 500):
        found.update(
            tx.conn.scalars(
                select(RealmFileRow.path).where(
                    RealmFileRow.realm_id == realm_id,
                    RealmFileRow.path.in_(ordered[start : start + 500]),
                )
            )
        )
    return found


def put_files(
    tx: Tx,
    *,
    realm_id: str,
    files: Sequence[tuple[str, bytes]],
    existing: set[str],
    now: datetime,
) -> list[RealmFile]:
    """Create or replace files in a few statements: one executemany of
    updates for the `existing` ones, one multi-row insert of the others, and
    the realm's file count. Answers in the order of `files`."""
    rows = _file_rows(realm_id, files, now)
    replaced = [
        {
            "b_realm": realm_id,
            "b_path": r["path"],
            "b_content": r["content"],
            "b_mtime": now,
            "b_size": r["size"],
            "b_sha256": r["sha256"],
        }
        for r in rows
        if r["path"] in existing
    ]
    created = [r for r in rows if r["path"] not in existing]
    if replaced:
        tx.conn.execute(_REPLACE_FILE, replaced)
    if created:
        tx.conn.execute(_INSERT_FILES, created)
        tx.conn.execute(
            update(RealmRow)
            .where(RealmRow.realm_id == realm_id)
            .values(files=RealmRow.files + len(created))
        )
    return [RealmFile(path=r["path"], mtime=now, size=r["size"], sha256=r["sha256"]) for r in rows]


def delete_files(tx: Tx, *, realm_id: str, paths: Sequence[str]) -> int:
    """Delete files the caller has checked exist; returns how many went."""
    deleted = 0
    ordered = list(paths)
    for start in range(0, len(ordered), 500):
        result = tx.conn.execute(
            delete(RealmFileRow).where(
                RealmFileRow.realm_id == realm_id,
                RealmFileRow.path.in_(ordered[start : start + 500]),
            )
        )
        deleted += int(getattr(result, "rowcount", 0) or 0)
    if deleted:
        tx.conn.execute(
            update(RealmRow)
            .where(RealmRow.realm_id == realm_id)
            .values(files=RealmRow.files - deleted)
        )
    return deleted


def delete_realm(tx: Tx, realm_id: str) -> tuple[list[tuple[int, str | None]], int]:
    """Delete a realm (locked by the caller) with everything of it: files,
    index entries, jobs and their attempts (by the foreign keys' cascade).
    Returns its queued and running jobs as (job id, lease id or None), and
    how many files it had."""
    active = [
        (int(job_id), lease_id)
        for job_id, lease_id in tx.conn.execute(
            select(JobRow.id, JobRow.lease_id).where(
                JobRow.realm_id == realm_id, JobRow.state.in_((QUEUED, RUNNING))
            )
        )
    ]
    files = int(
        tx.conn.scalar(
            select(func.count()).select_from(RealmFileRow).where(RealmFileRow.realm_id == realm_id)
        )
        or 0
    )
    # Children first: SQLite enforces the cascade only with foreign keys on,
    # and explicit deletes keep the order of locks the same on both stores.
    tx.conn.execute(delete(IndexEntryRow).where(IndexEntryRow.realm_id == realm_id))
    tx.conn.execute(delete(RealmFileRow).where(RealmFileRow.realm_id == realm_id))
    job_ids = select(JobRow.id).where(JobRow.realm_id == realm_id).scalar_subquery()
    tx.conn.execute(delete(JobAttemptRow).where(JobAttemptRow.job_id.in_(job_ids)))
    tx.conn.execute(delete(JobRow).where(JobRow.realm_id == realm_id))
    tx.conn.execute(delete(RealmRow).where(RealmRow.realm_id == realm_id))
    return active, files
