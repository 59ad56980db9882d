from __future__ import annotations

import pytest

from realm_service.domain import (
    validate_content,
    validate_path,
    validate_priority,
    validate_realm_id,
)
from realm_service.errors import InvalidArgument


@pytest.mark.parametrize("rid", ["a", "abc", "a-b", "a1", "0", "x" * 63, "a--b"])
def test_valid_realm_ids(rid: str) -> None:
    assert validate_realm_id(rid) == rid


@pytest.mark.parametrize("rid", ["", "A", "-a", "a-", "x" * 64, "a_b", "a.b", "a b", "é"])
def test_invalid_realm_ids(rid: str) -> None:
    with pytest.raises(InvalidArgument, match="realm_id"):
        validate_realm_id(rid)


@pytest.mark.parametrize("path", ["a", "a/b.json", "dir/sub/file.txt", ".gitignore", "a..b"])
def test_valid_paths(path: str) -> None:
    assert validate_path(path) == path


@pytest.mark.parametrize(
    "path",
    ["", "/abs", "../up", "a/../b", "a//b", "a/./b", "a/", "a\x00b", "a\nb", "a\\b", "x" * 1025],
)
def test_invalid_paths(path: str) -> None:
    with pytest.raises(InvalidArgument, match="path"):
        validate_path(path)


def test_priority_bounds_and_default() -> None:
    assert validate_priority(None, 10) == 10
    assert validate_priority(0, 10) == 0
    assert validate_priority(100, 10) == 100
    for bad in (-1, 101):
        with pytest.raises(InvalidArgument, match="priority"):
            validate_priority(bad, 10)


def test_content_size_limit() -> None:
    assert validate_content(b"x" * 10, 10) == b"x" * 10
    with pytest.raises(InvalidArgument, match="11 bytes"):
        validate_content(b"x" * 11, 10)
