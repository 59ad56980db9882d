"""Index entries: staged under a job's generation, switched in with the
realm's stats when the job completes, searched in the current generation."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    Insert,
    Table,
    Update,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    text,
    update,
)

from realm_service.domain import IndexEntry, RealmState
from realm_service.errors import RealmNotFound
from realm_service.store import direct
from realm_service.store.db import Tx, WouldWait
from realm_service.store.sets import (
    dialect_insert,
    in_values,
    not_in_values,
    rows_params,
    rows_source,
)
from realm_service.store.tables import IndexEntryRow, JobRow, RealmFileRow, RealmRow, UTCDateTime


def to_entry(row: Any) -> IndexEntry:
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
    """Write entries (and tombstones) under a generation in one statement: an
    upsert by (realm, generation, path), so a re-sent path replaces."""
    if not entries and not deleted_paths:
        return
    rows: dict[str, dict[str, object]] = {
        p: {
            "realm_id": realm_id,
            "generation": generation,
            "path": p,
            "deleted": True,
            "mtime": _EPOCH,
            "size": 0,
            "sha256": "",
            "media_type": "",
            "card_type": "",
            "title": "",
            "search_text": "",
            "links": "[]",
            "error_message": "",
        }
        for p in deleted_paths
    }
    # An entry wins over a tombstone of the same path, the last entry over
    # earlier ones.
    for e in entries:
        rows[e.path] = {
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
    tx.conn.execute(_upsert(tx.backend), list(rows.values()))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Generations switched in with at least this many entries refresh the planner
# statistics of index_entries (PostgreSQL) after their commit.
ANALYZE_AFTER_ENTRIES = 10_000
_ENTRY_KEY = ("realm_id", "generation", "path")


@functools.cache
def _upsert(backend: str) -> Insert:
    """INSERT ... ON CONFLICT (key) DO UPDATE of every other column, in the
    backend's dialect (both speak it); built once per backend."""
    table = cast(Table, IndexEntryRow.__table__)
    stmt = dialect_insert(backend, table)
    return stmt.on_conflict_do_update(
        index_elements=list(_ENTRY_KEY),
        set_={c.name: stmt.excluded[c.name] for c in table.c if c.name not in _ENTRY_KEY},
    )


def count_staged_many(tx: Tx, generations: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Entries staged (deletions aside) for each (realm, generation) pair, in
    one query."""
    if not generations:
        return {}
    wanted = set(generations)
    rows = tx.conn.execute(
        _COUNT_STAGED,
        {
            "realm_ids": sorted({r for r, _ in wanted}),
            "generations": sorted({g for _, g in wanted}),
        },
    )
    return {(r, g): int(n) for r, g, n in rows if (r, g) in wanted}


_REALMS = cast(Table, RealmRow.__table__)
_ENTRIES = cast(Table, IndexEntryRow.__table__)
_JOBS = cast(Table, JobRow.__table__)
_FILES = cast(Table, RealmFileRow.__table__)
# Entries staged (not deletions) by (realm, generation), of the lists bound;
# built once with one SQL text for any list (an ORM select with expanding
# IN, built each time, was most of a completion's Python time).
_COUNT_STAGED = (
    select(_ENTRIES.c.realm_id, _ENTRIES.c.generation, func.count())
    .where(
        in_values(_ENTRIES.c.realm_id, "realm_ids"),
        in_values(_ENTRIES.c.generation, "generations", int),
        _ENTRIES.c.deleted.is_(False),
    )
    .group_by(_ENTRIES.c.realm_id, _ENTRIES.c.generation)
)
# The statements of a generation switch, built once: a completion costs their
# execution, not their construction (compiled forms are cached).
_LOCK_GENERATIONS = (
    select(
        _REALMS.c.realm_id,
        _REALMS.c.current_generation,
        _REALMS.c.entries,
        _REALMS.c.errors,
        _REALMS.c.cards,
        _REALMS.c.files,
    )
    .where(in_values(_REALMS.c.realm_id, "realm_ids"))
    .order_by(_REALMS.c.realm_id)
    .with_for_update()
)
# Another job's checkpoint (a queued from-scratch job's entries, kept across
# its attempts) outlives the switch: a realm's first index may come from
# another job (an incremental one) while it waits to run again. The
# generations switched in are not spared as checkpoints (a resumed job's own
# is one until it succeeds): their tombstones go. NOT EXISTS, not NOT IN: an
# anti-join on PostgreSQL rather than a subquery per deleted entry.
_OTHER_CHECKPOINT = exists().where(
    _JOBS.c.realm_id == _ENTRIES.c.realm_id,
    _JOBS.c.checkpoint == _ENTRIES.c.generation,
    not_in_values(_JOBS.c.checkpoint, "generations", int),
)
# Of a new generation it drops only tombstones: `_switch_counted` counts
# the rest in the same statement, before the drop, and relies on it.
_DROP_REPLACED = delete(_ENTRIES).where(
    in_values(_ENTRIES.c.realm_id, "realm_ids"),
    or_(
        not_in_values(_ENTRIES.c.generation, "generations", int),
        _ENTRIES.c.deleted.is_(True),
    ),
    ~_OTHER_CHECKPOINT,
)
_IS_ERROR = case((_ENTRIES.c.error_message != "", 1), else_=0)
_IS_CARD = case((and_(_ENTRIES.c.card_type != "", _ENTRIES.c.error_message == ""), 1), else_=0)
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
_SWITCH_COLUMNS = (("realm_id", str), ("generation", int))


@functools.cache
def _switch_counted(backend: str) -> Update:
    """Realms switched to new generations (the bound rows: realm, generation),
    each with the new generation's stats counted in the same statement.

    On PostgreSQL the same statement drops the entries the new generations
    replace (`_DROP_REPLACED`, a data-modifying CTE: one round trip less).
    Its counts see the entries as they were before the statement; of a new
    generation the drop removes only its tombstones, so they count the
    entries that are not tombstones: what remains after."""
    switch = rows_source(backend, "g", _SWITCH_COLUMNS)
    new_generation = and_(
        _ENTRIES.c.realm_id == _REALMS.c.realm_id, _ENTRIES.c.generation == switch.c.generation
    )
    if backend == "postgresql":
        new_generation = and_(new_generation, _ENTRIES.c.deleted.is_(False))

    def counted(expr: Any) -> Any:
        return select(expr).where(new_generation).correlate(_REALMS, switch).scalar_subquery()

    statement = (
        update(_REALMS)
        .where(_REALMS.c.realm_id == switch.c.realm_id)
        .values(
            current_generation=switch.c.generation,
            entries=counted(func.count()),
            errors=counted(func.coalesce(func.sum(_IS_ERROR), 0)),
            cards=counted(func.coalesce(func.sum(_IS_CARD), 0)),
            files=select(func.count())
            .select_from(_FILES)
            .where(_FILES.c.realm_id == _REALMS.c.realm_id)
            .correlate(_REALMS)
            .scalar_subquery(),
            last_index_time=bindparam("now", type_=UTCDateTime()),
            state=RealmState.READY.value,
        )
        .returning(_REALMS.c.entries)
    )
    if backend == "postgresql":
        return statement.add_cte(_DROP_REPLACED.cte("dropped"))
    return statement


# An incremental merge, in statements that touch its own paths only (by the
# primary key realm, generation, path), never the rest of the realm.
# The staged paths are read first and named in the statements that follow:
# with a subquery instead, PostgreSQL may hash the whole current generation.
_STAGED = select(
    _ENTRIES.c.path, _ENTRIES.c.deleted, _IS_ERROR.label("error"), _IS_CARD.label("card")
).where(_ENTRIES.c.realm_id == bindparam("realm"), _ENTRIES.c.generation == bindparam("staged"))
# The current versions of the staged paths go, and say what they counted for.
_DROP_OLD_VERSIONS = (
    delete(_ENTRIES)
    .where(
        _ENTRIES.c.realm_id == bindparam("realm"),
        _ENTRIES.c.generation == bindparam("current"),
        in_values(_ENTRIES.c.path, "paths"),
    )
    .returning(_IS_ERROR, _IS_CARD)
)
_DROP_TOMBSTONES = delete(_ENTRIES).where(
    _ENTRIES.c.realm_id == bindparam("realm"),
    _ENTRIES.c.generation == bindparam("staged"),
    _ENTRIES.c.deleted.is_(True),
)
_PROMOTE = (
    update(_ENTRIES)
    .where(_ENTRIES.c.realm_id == bindparam("realm"), _ENTRIES.c.generation == bindparam("staged"))
    .values(generation=bindparam("current"))
)
# Entries of generations that are neither current nor being merged (attempts
# that never completed) lie between the two: the current generation replaced
# every older one when it was switched in, and no attempt of the realm can
# have started after the one being merged (one job of a realm runs at a time;
# a stale lease stages nothing). One range of the primary key; below it, on
# PostgreSQL, lie the replaced generation's dead index entries until vacuum,
# which a wider sweep scanned on every merge (2-3 ms after a big rebuild).
# A from-scratch job's checkpoint (a generation kept across its attempts
# while it waits to run again) lies there too and is spared.
_CHECKPOINTS = select(_JOBS.c.checkpoint).where(
    _JOBS.c.realm_id == bindparam("realm"), _JOBS.c.checkpoint.is_not(None)
)
_DROP_ORPHANS = delete(_ENTRIES).where(
    _ENTRIES.c.realm_id == bindparam("realm"),
    _ENTRIES.c.generation > bindparam("lo"),
    _ENTRIES.c.generation < bindparam("hi"),
    _ENTRIES.c.generation.not_in(_CHECKPOINTS),
)


def switch_generations(
    tx: Tx,
    jobs: Sequence[tuple[str, int, bool]],
    *,
    now: datetime,
    max_replaced: int | None = None,
) -> None:
    """Switch in the generations of completed jobs of distinct realms, given
    as (realm, generation, from_scratch), with the realms' stats. Generations
    that replace a realm's index (from-scratch jobs, or a realm's first) take
    a fixed number of statements however many there are, and count the new
    index; an incremental merge touches its own paths only and adjusts the
    stats by what it replaced and added. With `max_replaced`, a realm whose
    index of more entries than that a from-scratch job replaces raises
    WouldWait before anything is written here (a unit on the event loop
    then runs again in a store thread: dropping that index is no work for
    the loop)."""
    if not jobs:
        return
    ids = [realm_id for realm_id, _, _ in jobs]
    realms = {
        row.realm_id: row for row in direct.rows(tx.conn, _LOCK_GENERATIONS, {"realm_ids": ids})
    }
    if max_replaced is not None and any(
        from_scratch and realm_id in realms and realms[realm_id].entries > max_replaced
        for realm_id, _, from_scratch in jobs
    ):
        raise WouldWait(f"a generation replaces an index of more than {max_replaced} entries")
    stats: dict[str, dict[str, object]] = {}
    replaced: dict[str, int] = {}
    for realm_id, generation, from_scratch in jobs:
        realm = realms.get(realm_id)
        if realm is None:
            raise RealmNotFound(f"realm {realm_id!r} does not exist")
        was = realm.current_generation
        if from_scratch or was is None:
            replaced[realm_id] = generation
            continue
        if tx.backend == "postgresql":
            tx.conn.execute(
                _MERGE_PG,
                {
                    "realm": realm_id,
                    "staged": generation,
                    "current": was,
                    "lo": min(generation, was),
                    "hi": max(generation, was),
                    "now": now,
                    "ready": RealmState.READY.value,
                },
            )
            continue
        entries, errors, cards = _merge_generation(tx, realm_id, generation, was)
        stats[realm_id] = {
            "b_realm": realm_id,
            "b_generation": was,
            "b_entries": realm.entries + entries,
            "b_errors": realm.errors + errors,
            "b_cards": realm.cards + cards,
            "b_files": realm.files,
            "b_now": now,
        }
    if replaced:
        # Generations are attempt ids, unique across realms: an entry of these
        # realms that is not in one of the new generations is not in its own.
        dropping = {"realm_ids": list(replaced), "generations": list(replaced.values())}
        if tx.backend != "postgresql":
            direct.rows(tx.conn, _DROP_REPLACED, dropping)
        # The switch and the new generation's stats in one statement a realm
        # (on PostgreSQL with the drop).
        switched = direct.rows(
            tx.conn,
            _switch_counted(tx.backend),
            {
                **rows_params(tx.backend, "g", _SWITCH_COLUMNS, sorted(replaced.items())),
                **(dropping if tx.backend == "postgresql" else {}),
                "now": now,
            },
        )
        if tx.backend == "postgresql" and sum(r[0] for r in switched) >= ANALYZE_AFTER_ENTRIES:
            # A big new generation: without fresh statistics PostgreSQL
            # reads the realm's next merges through the card-type index,
            # row by row.
            tx.statistics_changed("index_entries")
    if stats:
        tx.conn.execute(_SET_GENERATION, [stats[realm_id] for realm_id in ids if realm_id in stats])


# The same merge on PostgreSQL in one statement (one round trip, where the
# statements above are five or more): the staged entries are read once, the
# current versions of their paths go (by the primary key: the paths are
# handed over as an array, so that the plan is the named-path probe above and
# not a hash of the whole current generation), tombstones and orphans go, the
# rest is promoted, and the realm's stats move by what was replaced and
# added. The parts see one snapshot and touch disjoint rows (current
# generation, staged tombstones, staged entries, generations between), but
# the promotion writes keys (realm, current, path) that the drop of old
# versions frees: PostgreSQL leaves the order of a statement's CTEs open, so
# the promotion waits on `gone` (an init plan, run before its first row).
# tests/store/test_generations.py replaces existing paths this way.
_ERROR_SQL = "CASE WHEN error_message != '' THEN 1 ELSE 0 END"
_CARD_SQL = "CASE WHEN card_type != '' AND error_message = '' THEN 1 ELSE 0 END"
_MERGE_PG = text(
    f"""
WITH staged AS MATERIALIZED (
    SELECT path, deleted, {_ERROR_SQL} AS error, {_CARD_SQL} AS card
    FROM index_entries WHERE realm_id = :realm AND generation = :staged
), added AS (
    SELECT count(*) AS n, coalesce(sum(error), 0) AS errors, coalesce(sum(card), 0) AS cards
    FROM staged WHERE NOT deleted
), old AS (
    DELETE FROM index_entries
    WHERE realm_id = :realm AND generation = :current
        AND path = ANY (ARRAY(SELECT path FROM staged))
    RETURNING {_ERROR_SQL} AS error, {_CARD_SQL} AS card
), gone AS (
    SELECT count(*) AS n, coalesce(sum(error), 0) AS errors, coalesce(sum(card), 0) AS cards
    FROM old
), tombstones AS (
    DELETE FROM index_entries WHERE realm_id = :realm AND generation = :staged AND deleted
), orphans AS (
    DELETE FROM index_entries WHERE realm_id = :realm AND generation > :lo AND generation < :hi
        AND generation NOT IN (
            SELECT checkpoint FROM jobs WHERE realm_id = :realm AND checkpoint IS NOT NULL
        )
), promoted AS (
    UPDATE index_entries SET generation = :current
    WHERE realm_id = :realm AND generation = :staged AND NOT deleted
        AND (SELECT n FROM gone) IS NOT NULL
)
UPDATE realms SET
    entries = realms.entries + added.n - gone.n,
    errors = realms.errors + added.errors - gone.errors,
    cards = realms.cards + added.cards - gone.cards,
    last_index_time = :now,
    state = :ready
FROM added, gone
WHERE realms.realm_id = :realm
"""
).bindparams(bindparam("now", type_=UTCDateTime()))


def _merge_generation(tx: Tx, realm_id: str, generation: int, current: int) -> tuple[int, int, int]:
    """An incremental job's entries replace those of the same paths in the
    realm's current generation; its tombstones remove them. Returns the
    change in (entries, errors, cards)."""
    keys = {"realm": realm_id, "staged": generation, "current": current}
    staged = tx.conn.execute(_STAGED, keys).all()
    paths = [row.path for row in staged]
    kept = [row for row in staged if not row.deleted]
    entries = len(kept)
    errors = sum(row.error for row in kept)
    cards = sum(row.card for row in kept)
    for start in range(0, len(paths), 1000):
        named = {**keys, "paths": paths[start : start + 1000]}
        for error, card in tx.conn.execute(_DROP_OLD_VERSIONS, named):
            entries, errors, cards = entries - 1, errors - error, cards - card
    if len(kept) < len(staged):
        tx.conn.execute(_DROP_TOMBSTONES, keys)
    bounds = {"realm": realm_id, "lo": min(generation, current), "hi": max(generation, current)}
    tx.conn.execute(_DROP_ORPHANS, bounds)
    tx.conn.execute(_PROMOTE, keys)
    return entries, errors, cards


_CUSTOM_PLANS = text("SET LOCAL plan_cache_mode = force_custom_plan")


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
        if tx.backend == "postgresql":
            # The best plan depends on how common the card type is: its own
            # index for a rare one, the walk in path order for a common one.
            # A plan made once for all values (prepared statements, from the
            # sixth run on) would serve every type with one of them.
            tx.conn.execute(_CUSTOM_PLANS)
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
    return [to_entry(r) for r in tx.conn.execute(q)]


def drop_generation(tx: Tx, realm_id: str, generation: int) -> None:
    """Discard what an attempt staged (its generation, never switched in)."""
    tx.conn.execute(
        delete(_ENTRIES).where(_ENTRIES.c.realm_id == realm_id, _ENTRIES.c.generation == generation)
    )


GITIGNORE = ".gitignore"


def gitignore_sha(realm_id: str) -> Any:
    """The realm's .gitignore's sha256 ("" for none), as a scalar subquery."""
    return func.coalesce(
        select(_FILES.c.sha256)
        .where(_FILES.c.realm_id == realm_id, _FILES.c.path == GITIGNORE)
        .scalar_subquery(),
        "",
    )


# A checkpoint's entries whose file is gone or changed (another sha256), and
# its tombstones: a set difference, whatever the statistics say (an anti-join
# planned on stale ones, right after a bulk load, may take minutes).
_CHANGED = (
    select(_ENTRIES.c.path, _ENTRIES.c.sha256)
    .where(
        _ENTRIES.c.realm_id == bindparam("realm"),
        _ENTRIES.c.generation == bindparam("generation"),
    )
    .except_(select(_FILES.c.path, _FILES.c.sha256).where(_FILES.c.realm_id == bindparam("realm")))
)
_TOMBSTONES = select(_ENTRIES.c.path).where(
    _ENTRIES.c.realm_id == bindparam("realm"),
    _ENTRIES.c.generation == bindparam("generation"),
    _ENTRIES.c.deleted.is_(True),
)
_DROP_PATHS = delete(_ENTRIES).where(
    _ENTRIES.c.realm_id == bindparam("realm"),
    _ENTRIES.c.generation == bindparam("generation"),
    in_values(_ENTRIES.c.path, "paths"),
)
_DROP_ALL = delete(_ENTRIES).where(
    _ENTRIES.c.realm_id == bindparam("realm"),
    _ENTRIES.c.generation == bindparam("generation"),
)
_COUNT_KEPT = select(func.count()).where(
    _ENTRIES.c.realm_id == bindparam("realm"),
    _ENTRIES.c.generation == bindparam("generation"),
)


def discard_checkpoint(tx: Tx, job_id: int, realm_id: str, generation: int) -> None:
    """An attempt that stages entries without having opened its job's
    checkpoint (its worker did not read the realm's listing) starts afresh:
    the checkpoint's entries go."""
    tx.conn.execute(_DROP_ALL, {"realm": realm_id, "generation": generation})
    tx.conn.execute(update(_JOBS).where(_JOBS.c.id == job_id).values(checkpoint_kept=0))


def open_checkpoint(tx: Tx, job_id: int, realm_id: str, generation: int, gitignore: str) -> int:
    """Open a from-scratch job's checkpoint for its new attempt: entries whose
    file was deleted or changed since go (all of them when the .gitignore,
    whose sha256 was `gitignore` then, changed: it decides every file), and
    the number kept is recorded on the job (its completion counts them with
    the entries sent). Returns that number."""
    keys = {"realm": realm_id, "generation": generation}
    now_sha = tx.conn.scalar(select(gitignore_sha(realm_id)))
    if now_sha != gitignore:
        tx.conn.execute(_DROP_ALL, keys)
    else:
        gone = {row.path for row in tx.conn.execute(_CHANGED, keys)}
        gone.update(tx.conn.scalars(_TOMBSTONES, keys))
        paths = sorted(gone)
        for start in range(0, len(paths), 1000):
            tx.conn.execute(_DROP_PATHS, {**keys, "paths": paths[start : start + 1000]})
    kept = int(tx.conn.scalar(_COUNT_KEPT, keys) or 0)
    tx.conn.execute(update(_JOBS).where(_JOBS.c.id == job_id).values(checkpoint_kept=kept))
    return kept
