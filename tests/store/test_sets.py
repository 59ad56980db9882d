"""Lists bound as one parameter (store/sets.py), on both stores: the claim
and completion statements depend on them selecting exactly what an IN list
would, for any size, including none and more than SQLite's 999 variables."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from sqlalchemy import Table, select, update

from realm_service.domain import Job, JobKind, JobState, PathChange
from realm_service.store.db import Database
from realm_service.store.rows import job_with, make_job
from realm_service.store.sets import (
    array_text,
    in_values,
    not_in_values,
    rows_params,
    rows_source,
)
from realm_service.store.tables import RealmRow

REALMS = cast(Table, RealmRow.__table__)


def _add_realms(db: Database, n: int) -> list[str]:
    ids = [f"r{i:05d}" for i in range(n)]
    now = datetime.now(UTC)
    with db.session_for_tests() as s:
        s.execute(
            REALMS.insert(),
            [
                {"realm_id": r, "display_name": r, "state": "ready", "created_priority": 0,
                 "create_time": now, "files": 0, "cards": 0, "errors": 0, "entries": i}
                for i, r in enumerate(ids)
            ],
        )  # fmt: skip
    return ids


@pytest.mark.parametrize("size", [0, 1, 3, 1500])
def test_in_values_selects_what_an_in_list_would(db: Database, size: int) -> None:
    ids = _add_realms(db, 1600)
    wanted = [*ids[::-1][:size], "no-such-realm"]
    with db.session_for_tests() as s:
        got = s.scalars(
            select(REALMS.c.realm_id).where(in_values(REALMS.c.realm_id, "ids")), {"ids": wanted}
        ).all()
        assert sorted(got) == sorted(ids[::-1][:size])
        entries = list(range(0, 1600, 7))
        rest = s.scalars(
            select(REALMS.c.entries).where(not_in_values(REALMS.c.entries, "n", int)),
            {"n": entries},
        ).all()
        assert sorted(rest) == [n for n in range(1600) if n % 7]


# Strings that an array's text form must quote or escape (PostgreSQL binds
# lists as that text): quotes, backslashes, separators, braces, blanks, the
# word NULL, non-ASCII.
AWKWARD = ['a', '', 'NULL', 'null', 'x"y', 'b\\c', 'c,d', '{e}', ' f ', 'g h', 'ünï', "it's",
           '\\"', 'tab\there', '"quoted"', '\\']  # fmt: skip


def test_awkward_strings_and_large_numbers_bind_as_they_are(db: Database) -> None:
    now = datetime.now(UTC)
    with db.session_for_tests() as s:
        s.execute(
            REALMS.insert(),
            [
                {"realm_id": r, "display_name": r, "state": "ready", "created_priority": 0,
                 "create_time": now, "files": 0, "cards": 0, "errors": 0, "entries": 2**40 + i}
                for i, r in enumerate([*AWKWARD, "other"])
            ],
        )  # fmt: skip
    with db.session_for_tests() as s:
        got = s.scalars(
            select(REALMS.c.realm_id).where(in_values(REALMS.c.realm_id, "ids")), {"ids": AWKWARD}
        ).all()
        assert sorted(got) == sorted(AWKWARD)
        big = [2**40 + i for i in range(0, len(AWKWARD), 2)]
        by_entries = s.scalars(
            select(REALMS.c.realm_id).where(in_values(REALMS.c.entries, "n", int)), {"n": big}
        ).all()
        assert sorted(by_entries) == sorted(AWKWARD[::2])
        columns = (("realm_id", str), ("name", str))
        source = rows_source(db.backend, "v", columns)
        rows = [(r, f"{r}!") for r in AWKWARD]
        s.execute(
            update(REALMS)
            .where(REALMS.c.realm_id == source.c.realm_id)
            .values(display_name=source.c.name),
            rows_params(db.backend, "v", columns, rows),
        )
        names = dict(s.execute(select(REALMS.c.realm_id, REALMS.c.display_name)).all())
    assert names == {**{r: f"{r}!" for r in AWKWARD}, "other": "other"}


def test_array_text_refuses_values_of_another_type() -> None:
    assert array_text([1, None, -3], int) == "{1,NULL,-3}"
    assert array_text(iter(["a", None]), str) == '{"a",NULL}'
    assert array_text([], int) == "{}"
    for bad in (1.5, True, "1"):
        with pytest.raises(TypeError, match="integer list"):
            array_text([1, bad], int)
    with pytest.raises(TypeError, match="string list"):
        array_text(["a", 1], str)
    assert array_text([b'\x00\\"{', None, b""], bytes) == '{"\\\\x005c227b",NULL,"\\\\x"}'
    with pytest.raises(TypeError, match="bytes list"):
        array_text([b"a", "a"], bytes)


def test_rows_source_updates_each_row_with_its_own_values(db: Database) -> None:
    ids = _add_realms(db, 1200)
    columns = (("realm_id", str), ("cards", int))
    rows = [(r, 1000 + i) for i, r in enumerate(ids[:1100])] + [("no-such-realm", 1)]
    source = rows_source(db.backend, "v", columns)
    stmt = update(REALMS).where(REALMS.c.realm_id == source.c.realm_id).values(cards=source.c.cards)
    with db.session_for_tests() as s:
        s.execute(stmt, rows_params(db.backend, "v", columns, rows))
        got = {r: c for r, c in s.execute(select(REALMS.c.realm_id, REALMS.c.cards))}
    assert got == {r: (1000 + i if i < 1100 else 0) for i, r in enumerate(ids)}
    with db.session_for_tests() as s:  # no rows: nothing changes
        s.execute(stmt, rows_params(db.backend, "v", columns, []))
        assert s.scalar(select(REALMS.c.cards).where(REALMS.c.realm_id == ids[0])) == 1000


def test_fast_job_construction_equals_the_dataclass() -> None:
    now = datetime.now(UTC)
    fields = {f.name: None for f in dataclasses.fields(Job)} | {
        "job_id": 7, "realm_id": "r", "kind": JobKind.INCREMENTAL, "priority": 10,
        "state": JobState.RUNNING, "attempt": 2, "create_time": now, "start_time": now,
        "finish_time": None, "error_message": "", "progress_done": 1, "progress_total": 2,
        "path_changes": (PathChange("a.json", False),), "trace_parent": "", "worker": "w",
    }  # fmt: skip
    real = Job(**fields)
    fast = make_job(**fields)
    assert fast == real and hash(fast) == hash(real) and repr(fast) == repr(real)
    changes = {"state": JobState.SUCCEEDED, "finish_time": now + timedelta(seconds=1)}
    assert job_with(fast, **changes) == dataclasses.replace(real, **changes)
    assert fast.state is JobState.RUNNING  # the original is left as it was
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.state = JobState.QUEUED  # type: ignore[misc]
