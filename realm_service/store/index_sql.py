"""Index entries: staged under a job's generation, switched in with the
realm's stats when the job completes, searched in the current generation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table, and_, bindparam, case, delete, func, insert, or_, select, update

from realm_service.domain import IndexEntry, RealmState
from realm_service.errors import RealmNotFound
from realm_service.store.db import Tx
from realm_service.store.tables import IndexEntryRow, RealmFileRow, RealmRow


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


def stage_entries(
    tx: Tx,
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
        tx.session.execute(
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
        tx.session.execute(insert(IndexEntryRow), rows)


def count_staged_many(tx: Tx, generations: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """`count_staged` for several (realm, generation) pairs in one query."""
    if not generations:
        return {}
    wanted = set(generations)
    rows = tx.session.execute(
        select(IndexEntryRow.realm_id, IndexEntryRow.generation, func.count())
        .where(
            IndexEntryRow.realm_id.in_(sorted({r for r, _ in wanted})),
            IndexEntryRow.generation.in_(sorted({g for _, g in wanted})),
            IndexEntryRow.deleted.is_(False),
        )
        .group_by(IndexEntryRow.realm_id, IndexEntryRow.generation)
    )
    return {(r, g): int(n) for r, g, n in rows if (r, g) in wanted}


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


def switch_generations(tx: Tx, jobs: Sequence[tuple[str, int, bool]], *, now: datetime) -> None:
    """`switch_generation` for completed jobs of distinct realms, given as
    (realm, generation, from_scratch). Generations that replace a realm's
    index (from-scratch jobs, or a realm's first) take a fixed number of
    statements however many there are; incremental merges go one by one."""
    if not jobs:
        return
    ids = [realm_id for realm_id, _, _ in jobs]
    realms: dict[str, int | None] = {
        realm_id: generation
        for realm_id, generation in tx.session.execute(_LOCK_GENERATIONS, {"realm_ids": ids})
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
            _merge_generation(tx, realm_id, generation, was)
            current[realm_id] = was
    if replaced:
        # Generations are attempt ids, unique across realms: an entry of these
        # realms that is not in one of the new generations is not in its own.
        tx.session.execute(
            _DROP_REPLACED,
            {"realm_ids": list(replaced), "generations": list(replaced.values())},
        )
    counts: dict[str, tuple[int, int, int]] = {
        realm_id: (int(entries or 0), int(errors or 0), int(cards or 0))
        for realm_id, entries, errors, cards in tx.session.execute(
            _COUNT_ENTRIES, {"realm_ids": ids, "generations": sorted(set(current.values()))}
        )
    }
    files: dict[str, int] = {
        realm_id: int(n) for realm_id, n in tx.session.execute(_COUNT_FILES, {"realm_ids": ids})
    }
    tx.session.execute(
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


def _merge_generation(tx: Tx, realm_id: str, generation: int, current: int) -> None:
    """An incremental job's entries replace those of the same paths in the
    realm's current generation; its tombstones remove them."""
    staged_paths = select(IndexEntryRow.path).where(
        IndexEntryRow.realm_id == realm_id, IndexEntryRow.generation == generation
    )
    tx.session.execute(
        delete(IndexEntryRow).where(
            IndexEntryRow.realm_id == realm_id,
            IndexEntryRow.generation == current,
            IndexEntryRow.path.in_(staged_paths.scalar_subquery()),
        )
    )
    tx.session.execute(
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
    tx.session.execute(
        update(IndexEntryRow)
        .where(IndexEntryRow.realm_id == realm_id, IndexEntryRow.generation == generation)
        .values(generation=current)
    )


def search(
    tx: Tx,
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
    return [to_entry(r) for r in tx.session.scalars(q)]
