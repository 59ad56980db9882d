"""Every SQL statement about realms, their files, index entries and
idempotency keys. Functions take an open session and return domain objects."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from realm_service.domain import IndexEntry, Realm, RealmFile, RealmState
from realm_service.errors import FileNotFound, RealmNotFound
from realm_service.store.tables import (
    IdempotencyKeyRow,
    IndexEntryRow,
    JobRow,
    RealmFileRow,
    RealmRow,
)


def to_realm(row: RealmRow) -> Realm:
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


def to_file(row: RealmFileRow) -> RealmFile:
    return RealmFile(path=row.path, mtime=row.mtime, size=row.size, sha256=row.sha256)


def to_entry(row: IndexEntryRow) -> IndexEntry:
    return IndexEntry(
        path=row.path,
        mtime=row.mtime,
        size=row.size,
        sha256=row.sha256,
        media_type=row.media_type,
        card_type=row.card_type,
        title=row.title,
        search_text=row.search_text,
        links=tuple(json.loads(row.links or "[]")),
        error_message=row.error_message,
    )


# -- realms -------------------------------------------------------------------


def insert_new_realm(
    session: Session,
    *,
    realm_id: str,
    display_name: str,
    priority: int,
    now: datetime,
    files: Sequence[tuple[str, bytes]] = (),
) -> Realm:
    """A realm the caller has just read as absent, with its files, in two
    statements. A concurrent creator's row makes the insert fail on the
    primary key (a Conflict at the transaction's edge)."""
    row = RealmRow(
        realm_id=realm_id,
        display_name=display_name,
        state=RealmState.INDEXING.value,
        created_priority=priority,
        create_time=now,
        files=len(files),
        cards=0,
        errors=0,
        entries=0,
        last_index_time=None,
        current_generation=None,
    )
    session.add(row)
    session.flush()
    if files:
        session.execute(insert(RealmFileRow), _file_rows(realm_id, files, now))
    return to_realm(row)


def get_realm(session: Session, realm_id: str, *, lock: bool = False) -> Realm:
    q = select(RealmRow).where(RealmRow.realm_id == realm_id)
    if lock:
        q = q.with_for_update()
    row = session.scalars(q).first()
    if row is None:
        raise RealmNotFound(f"realm {realm_id!r} does not exist")
    return to_realm(row)


def realm_exists(session: Session, realm_id: str) -> bool:
    return session.get(RealmRow, realm_id) is not None


def list_realms(session: Session, *, after: str | None, limit: int) -> list[Realm]:
    q = select(RealmRow).order_by(RealmRow.realm_id).limit(limit)
    if after:
        q = q.where(RealmRow.realm_id > after)
    return [to_realm(r) for r in session.scalars(q)]


def realm_ids_page(
    session: Session, *, after: str | None, limit: int, unindexed_only: bool = False
) -> list[str]:
    q = select(RealmRow.realm_id).order_by(RealmRow.realm_id).limit(limit)
    if after:
        q = q.where(RealmRow.realm_id > after)
    if unindexed_only:
        # Realms with no index whose first job is missing, or queued below the
        # priority their creation asked for: the ones a mount must act on.
        scratch = (JobRow.realm_id == RealmRow.realm_id) & (JobRow.kind == "from-scratch")
        has_job = exists().where(scratch, JobRow.state.in_(("queued", "running", "succeeded")))
        queued_low = exists().where(
            scratch, JobRow.state == "queued", JobRow.priority < RealmRow.created_priority
        )
        q = q.where(RealmRow.current_generation.is_(None), or_(~has_job, queued_low))
    return list(session.scalars(q))


def set_realm_state(session: Session, realm_id: str, state: RealmState) -> None:
    session.execute(update(RealmRow).where(RealmRow.realm_id == realm_id).values(state=state.value))


# -- files --------------------------------------------------------------------


def put_file(
    session: Session, *, realm_id: str, path: str, content: bytes, now: datetime
) -> RealmFile:
    digest = hashlib.sha256(content).hexdigest()
    row = session.get(RealmFileRow, (realm_id, path))
    if row is None:
        row = RealmFileRow(
            realm_id=realm_id, path=path, content=content, mtime=now, size=len(content)
        )
        row.sha256 = digest
        session.add(row)
        session.execute(
            update(RealmRow).where(RealmRow.realm_id == realm_id).values(files=RealmRow.files + 1)
        )
    else:
        row.content = content
        row.mtime = now
        row.size = len(content)
        row.sha256 = digest
    session.flush()
    return to_file(row)


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


def delete_file(session: Session, *, realm_id: str, path: str) -> None:
    result = session.execute(
        delete(RealmFileRow).where(RealmFileRow.realm_id == realm_id, RealmFileRow.path == path)
    )
    if getattr(result, "rowcount", 0) == 0:
        raise FileNotFound(f"file {path[:200]!r} does not exist in realm {realm_id!r}")
    session.execute(
        update(RealmRow).where(RealmRow.realm_id == realm_id).values(files=RealmRow.files - 1)
    )


def list_files(session: Session, realm_id: str) -> list[RealmFile]:
    q = (
        select(RealmFileRow.path, RealmFileRow.mtime, RealmFileRow.size, RealmFileRow.sha256)
        .where(RealmFileRow.realm_id == realm_id)
        .order_by(RealmFileRow.path)
    )

    return [RealmFile(path=p, mtime=m, size=s, sha256=h) for p, m, s, h in session.execute(q)]


def read_file(session: Session, *, realm_id: str, path: str) -> tuple[RealmFile, bytes]:
    row = session.get(RealmFileRow, (realm_id, path))
    if row is None:
        raise FileNotFound(f"file {path[:200]!r} does not exist in realm {realm_id!r}")
    return to_file(row), row.content


# -- index entries ------------------------------------------------------------


def stage_entries(
    session: Session,
    *,
    realm_id: str,
    generation: int,
    entries: Sequence[IndexEntry],
    deleted_paths: Sequence[str],
) -> None:
    """Write entries (and tombstones) under a generation; re-sent paths replace."""
    paths = [e.path for e in entries] + list(deleted_paths)
    if not paths:
        return
    for start in range(0, len(paths), 500):
        chunk = paths[start : start + 500]
        session.execute(
            delete(IndexEntryRow).where(
                IndexEntryRow.realm_id == realm_id,
                IndexEntryRow.generation == generation,
                IndexEntryRow.path.in_(chunk),
            )
        )
    rows: list[dict[str, object]] = [
        {
            "realm_id": realm_id,
            "generation": generation,
            "path": e.path,
            "deleted": False,
            "mtime": e.mtime,
            "size": e.size,
            "sha256": e.sha256,
            "media_type": e.media_type,
            "card_type": e.card_type,
            "title": e.title,
            "search_text": e.search_text,
            "links": json.dumps(list(e.links)),
            "error_message": e.error_message,
        }
        for e in {e.path: e for e in entries}.values()
    ]
    epoch = datetime.fromtimestamp(0).astimezone()
    rows += [
        {
            "realm_id": realm_id,
            "generation": generation,
            "path": p,
            "deleted": True,
            "mtime": epoch,
            "size": 0,
            "sha256": "",
            "media_type": "",
            "card_type": "",
            "title": "",
            "search_text": "",
            "links": "[]",
            "error_message": "",
        }
        for p in dict.fromkeys(deleted_paths)
        if p not in {e.path for e in entries}
    ]
    if rows:
        session.execute(insert(IndexEntryRow), rows)


def count_staged(session: Session, realm_id: str, generation: int) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(IndexEntryRow)
            .where(
                IndexEntryRow.realm_id == realm_id,
                IndexEntryRow.generation == generation,
                IndexEntryRow.deleted.is_(False),
            )
        )
        or 0
    )


def count_staged_many(
    session: Session, generations: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """`count_staged` for several (realm, generation) pairs in one query."""
    if not generations:
        return {}
    wanted = set(generations)
    rows = session.execute(
        select(IndexEntryRow.realm_id, IndexEntryRow.generation, func.count())
        .where(
            IndexEntryRow.realm_id.in_(sorted({r for r, _ in wanted})),
            IndexEntryRow.generation.in_(sorted({g for _, g in wanted})),
            IndexEntryRow.deleted.is_(False),
        )
        .group_by(IndexEntryRow.realm_id, IndexEntryRow.generation)
    )
    return {(r, g): int(n) for r, g, n in rows if (r, g) in wanted}


def switch_generation(
    session: Session, *, realm_id: str, generation: int, from_scratch: bool, now: datetime
) -> None:
    """Make a completed job's entries the realm's index, with its stats, in the
    caller's transaction: searches see the old index or the new, never half."""
    switch_generations(session, [(realm_id, generation, from_scratch)], now=now)


_REALMS = cast(Table, RealmRow.__table__)
_ENTRIES = cast(Table, IndexEntryRow.__table__)
_FILES = cast(Table, RealmFileRow.__table__)
# The statements of a generation switch, built once: a completion costs their
# execution, not their construction (compiled forms are cached).
_LOCK_GENERATIONS = (
    select(_REALMS.c.realm_id, _REALMS.c.current_generation)
    .where(_REALMS.c.realm_id.in_(bindparam("realm_ids", expanding=True)))
    .order_by(_REALMS.c.realm_id)
    .with_for_update()
)
_DROP_REPLACED = delete(_ENTRIES).where(
    _ENTRIES.c.realm_id.in_(bindparam("realm_ids", expanding=True)),
    or_(
        _ENTRIES.c.generation.not_in(bindparam("generations", expanding=True)),
        _ENTRIES.c.deleted.is_(True),
    ),
)
_COUNT_ENTRIES = (
    select(
        _ENTRIES.c.realm_id,
        func.count(),
        func.sum(case((_ENTRIES.c.error_message != "", 1), else_=0)),
        func.sum(
            case((and_(_ENTRIES.c.card_type != "", _ENTRIES.c.error_message == ""), 1), else_=0)
        ),
    )
    .where(
        _ENTRIES.c.realm_id.in_(bindparam("realm_ids", expanding=True)),
        _ENTRIES.c.generation.in_(bindparam("generations", expanding=True)),
    )
    .group_by(_ENTRIES.c.realm_id)
)
_COUNT_FILES = (
    select(_FILES.c.realm_id, func.count())
    .where(_FILES.c.realm_id.in_(bindparam("realm_ids", expanding=True)))
    .group_by(_FILES.c.realm_id)
)
_SET_GENERATION = (
    update(_REALMS)
    .where(_REALMS.c.realm_id == bindparam("b_realm"))
    .values(
        current_generation=bindparam("b_generation"),
        entries=bindparam("b_entries"),
        errors=bindparam("b_errors"),
        cards=bindparam("b_cards"),
        files=bindparam("b_files"),
        last_index_time=bindparam("b_now"),
        state=RealmState.READY.value,
    )
)


def switch_generations(
    session: Session, jobs: Sequence[tuple[str, int, bool]], *, now: datetime
) -> None:
    """`switch_generation` for completed jobs of distinct realms, given as
    (realm, generation, from_scratch). Generations that replace a realm's
    index (from-scratch jobs, or a realm's first) take a fixed number of
    statements however many there are; incremental merges go one by one."""
    if not jobs:
        return
    ids = [realm_id for realm_id, _, _ in jobs]
    realms: dict[str, int | None] = {
        realm_id: generation
        for realm_id, generation in session.execute(_LOCK_GENERATIONS, {"realm_ids": ids})
    }
    current: dict[str, int] = {}
    replaced: dict[str, int] = {}
    for realm_id, generation, from_scratch in jobs:
        if realm_id not in realms:
            raise RealmNotFound(f"realm {realm_id!r} does not exist")
        was = realms[realm_id]
        if from_scratch or was is None:
            replaced[realm_id] = current[realm_id] = generation
        else:
            _merge_generation(session, realm_id, generation, was)
            current[realm_id] = was
    if replaced:
        # Generations are attempt ids, unique across realms: an entry of these
        # realms that is not in one of the new generations is not in its own.
        session.execute(
            _DROP_REPLACED,
            {"realm_ids": list(replaced), "generations": list(replaced.values())},
        )
    counts: dict[str, tuple[int, int, int]] = {
        realm_id: (int(entries or 0), int(errors or 0), int(cards or 0))
        for realm_id, entries, errors, cards in session.execute(
            _COUNT_ENTRIES, {"realm_ids": ids, "generations": sorted(set(current.values()))}
        )
    }
    files: dict[str, int] = {
        realm_id: int(n) for realm_id, n in session.execute(_COUNT_FILES, {"realm_ids": ids})
    }
    session.execute(
        _SET_GENERATION,
        [
            {
                "b_realm": realm_id,
                "b_generation": current[realm_id],
                "b_entries": counts.get(realm_id, (0, 0, 0))[0],
                "b_errors": counts.get(realm_id, (0, 0, 0))[1],
                "b_cards": counts.get(realm_id, (0, 0, 0))[2],
                "b_files": files.get(realm_id, 0),
                "b_now": now,
            }
            for realm_id in ids
        ],
    )


def _merge_generation(session: Session, realm_id: str, generation: int, current: int) -> None:
    """An incremental job's entries replace those of the same paths in the
    realm's current generation; its tombstones remove them."""
    staged_paths = select(IndexEntryRow.path).where(
        IndexEntryRow.realm_id == realm_id, IndexEntryRow.generation == generation
    )
    session.execute(
        delete(IndexEntryRow).where(
            IndexEntryRow.realm_id == realm_id,
            IndexEntryRow.generation == current,
            IndexEntryRow.path.in_(staged_paths.scalar_subquery()),
        )
    )
    session.execute(
        delete(IndexEntryRow).where(
            IndexEntryRow.realm_id == realm_id,
            or_(
                and_(IndexEntryRow.generation == generation, IndexEntryRow.deleted.is_(True)),
                and_(
                    IndexEntryRow.generation != generation,
                    IndexEntryRow.generation != current,
                ),
            ),
        )
    )
    session.execute(
        update(IndexEntryRow)
        .where(IndexEntryRow.realm_id == realm_id, IndexEntryRow.generation == generation)
        .values(generation=current)
    )


def search(
    session: Session,
    *,
    realm_id: str,
    generation: int | None,
    card_type: str,
    text: str,
    after_path: str | None,
    limit: int,
) -> list[IndexEntry]:
    if generation is None:
        return []
    q = (
        select(IndexEntryRow)
        .where(IndexEntryRow.realm_id == realm_id, IndexEntryRow.generation == generation)
        .order_by(IndexEntryRow.path)
        .limit(limit)
    )
    if card_type:
        q = q.where(IndexEntryRow.card_type == card_type)
    if text:
        pattern = (
            "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        )
        q = q.where(
            or_(
                func.lower(IndexEntryRow.search_text).like(pattern, escape="\\"),
                func.lower(IndexEntryRow.title).like(pattern, escape="\\"),
            )
        )
    if after_path:
        q = q.where(IndexEntryRow.path > after_path)
    return [to_entry(r) for r in session.scalars(q)]


# -- idempotency ----------------------------------------------------------------


def find_key(session: Session, scope: str, key: str) -> tuple[str, int | None] | None:
    row = session.get(IdempotencyKeyRow, (scope, key))
    return None if row is None else (row.realm_id, row.job_id)


def put_key(
    session: Session, *, scope: str, key: str, realm_id: str, job_id: int | None, now: datetime
) -> None:
    session.add(
        IdempotencyKeyRow(scope=scope, key=key, realm_id=realm_id, job_id=job_id, create_time=now)
    )
    session.flush()


def sweep_keys(session: Session, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` idempotency keys created before `before`; returns
    how many went. Bounded, so a large backlog of old keys is swept over
    several short transactions instead of one long lock."""
    ids = (
        select(IdempotencyKeyRow.scope, IdempotencyKeyRow.key)
        .where(IdempotencyKeyRow.create_time < before)
        .limit(limit)
    )
    doomed = session.execute(ids).all()
    if not doomed:
        return 0
    session.execute(
        delete(IdempotencyKeyRow).where(
            or_(
                *(
                    and_(IdempotencyKeyRow.scope == scope, IdempotencyKeyRow.key == key)
                    for scope, key in doomed
                )
            )
        )
    )
    return len(doomed)
