"""The indexer and .gitignore matching: pure functions, no grpc."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from index_worker.indexer import (
    CARD_MEDIA_TYPE,
    MAX_SEARCH_TEXT_CHARS,
    index_file,
    is_ignored,
    parse_gitignore,
)

MTIME = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def card(attributes: dict[str, Any], relationships: dict[str, Any] | None = None) -> bytes:
    data: dict[str, Any] = {
        "type": "card",
        "attributes": attributes,
        "meta": {"adoptsFrom": {"module": "../person", "name": "Person"}},
    }
    if relationships is not None:
        data["relationships"] = relationships
    return json.dumps({"data": data}).encode()


def test_card_entry_has_type_title_text_and_links() -> None:
    content = card(
        {"title": "Mango", "description": "A good dog", "tags": ["brown", {"x": "friendly"}]},
        {
            "owner": {"links": {"self": "../Person/hassan"}},
            "friends": [
                {"links": {"self": "../Pet/vangogh"}},
                {"links": {"self": "../Pet/ringo"}},
            ],
            "empty": {"links": {"self": None}},
        },
    )
    entry = index_file("Pet/mango.json", content, MTIME)
    assert entry.media_type == CARD_MEDIA_TYPE
    assert entry.card_type == "../person/Person"
    assert entry.title == "Mango"
    assert entry.error_message == ""
    for word in ("Mango", "A good dog", "brown", "friendly"):
        assert word in entry.search_text
    assert entry.links == ("../Person/hassan", "../Pet/vangogh", "../Pet/ringo")
    assert entry.path == "Pet/mango.json"
    assert entry.size == len(content)
    assert entry.sha256 == hashlib.sha256(content).hexdigest()
    assert entry.mtime == MTIME


@pytest.mark.parametrize(
    ("attributes", "title"),
    [
        ({"cardTitle": "From cardTitle", "name": "n"}, "From cardTitle"),
        ({"name": "From name"}, "From name"),
        ({"count": 3}, "Pet/nameless.json"),
    ],
)
def test_card_title_falls_back_to_card_title_name_then_path(
    attributes: dict[str, Any], title: str
) -> None:
    entry = index_file("Pet/nameless.json", card(attributes), MTIME)
    assert entry.title == title
    assert title in entry.search_text


def test_index_json_root_card_is_a_card() -> None:
    content = json.dumps(
        {
            "data": {
                "type": "card",
                "attributes": {"title": "Home"},
                "meta": {"adoptsFrom": {"module": "https://x/base/cards-grid", "name": "Grid"}},
            }
        }
    ).encode()
    entry = index_file("index.json", content, MTIME)
    assert entry.card_type == "https://x/base/cards-grid/Grid"
    assert entry.title == "Home"


@pytest.mark.parametrize(
    ("content", "media_type", "fragment"),
    [
        (b'{"data": {"type": "card", "attributes": {}}}', CARD_MEDIA_TYPE, "adoptsFrom"),
        (
            b'{"data": {"type": "card", "meta": {"adoptsFrom": {"module": "m"}}}}',
            CARD_MEDIA_TYPE,
            "adoptsFrom",
        ),
        (
            b'{"data": {"type": "card", "attributes": [1], '
            b'"meta": {"adoptsFrom": {"module": "m", "name": "N"}}}}',
            CARD_MEDIA_TYPE,
            "attributes",
        ),
        (b'{"data": {"type": "card", ', "application/json", "invalid JSON"),
        (b"[" * 100_000, "application/json", "invalid JSON"),
    ],
)
def test_broken_card_is_an_error_entry_not_an_exception(
    content: bytes, media_type: str, fragment: str
) -> None:
    entry = index_file("Pet/broken.json", content, MTIME)
    assert fragment in entry.error_message
    assert entry.media_type == media_type
    assert entry.card_type == ""
    assert entry.sha256 == hashlib.sha256(content).hexdigest()


def test_json_that_is_not_a_card_is_plain_json() -> None:
    content = b'{"displayName": "My Realm", "data": [1, 2]}'
    entry = index_file("realm.json", content, MTIME)
    assert entry.media_type == "application/json"
    assert entry.card_type == ""
    assert entry.error_message == ""
    assert "My Realm" in entry.search_text


def test_text_file_is_searchable_and_bounded() -> None:
    entry = index_file("notes/readme.md", b"# Hello\nrealm notes", MTIME)
    assert entry.media_type == "text/markdown"
    assert entry.search_text == "# Hello\nrealm notes"

    big = ("\u00e9" * 100_000).encode()  # two bytes per character
    entry = index_file("big.txt", big, MTIME)
    assert entry.media_type == "text/plain"
    assert 0 < len(entry.search_text) <= MAX_SEARCH_TEXT_CHARS
    assert set(entry.search_text) == {"\u00e9"}


def test_unknown_extension_is_sniffed() -> None:
    assert index_file("LICENSE", b"MIT License", MTIME).media_type == "text/plain"
    blob = index_file("data.bin2", b"\x00\x01\x02\xff", MTIME)
    assert blob.media_type == "application/octet-stream"
    assert blob.search_text == ""


def test_binary_file_has_media_type_and_no_text() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
    entry = index_file("images/logo.png", png, MTIME)
    assert entry.media_type == "image/png"
    assert entry.search_text == ""
    assert entry.error_message == ""
    assert entry.size == len(png)


def test_typescript_module_is_text_not_video() -> None:
    entry = index_file("person.gts", b"export class Person {}", MTIME)
    assert entry.media_type == "text/x-glimmer-typescript"
    assert "Person" in entry.search_text
    assert index_file("util.ts", b"export {}", MTIME).media_type == "text/typescript"


@given(path=st.sampled_from(["a.json", "b.txt", "c.png", "d"]), content=st.binary(max_size=300))
def test_indexing_is_deterministic_and_never_raises(path: str, content: bytes) -> None:
    first = index_file(path, content, MTIME)
    assert first == index_file(path, content, MTIME)
    assert first.sha256 == hashlib.sha256(content).hexdigest()


@given(
    attributes=st.dictionaries(
        st.text(max_size=5), st.one_of(st.text(max_size=10), st.integers()), max_size=5
    )
)
def test_card_indexing_is_deterministic(attributes: dict[str, Any]) -> None:
    content = card(attributes)
    assert index_file("x.json", content, MTIME) == index_file("x.json", content, MTIME)


GITIGNORE = """
# comments and blank lines are skipped

*.log
!keep.log
/build
tmp/
docs/**/draft-*.md
**/secret
cache/**
!cache/readme.md
a?c.txt
[0-9]*.bak
\\#literal
"""


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("debug.log", True),
        ("sub/dir/debug.log", True),
        ("keep.log", False),  # negation re-includes
        ("sub/keep.log", False),
        ("build", True),
        ("build/out.js", True),  # anchored directory
        ("src/build/out.js", False),  # anchored: only at the root
        ("tmp/x.txt", True),  # directory pattern
        ("a/tmp/x.txt", True),  # unanchored directory at any depth
        ("tmp", False),  # trailing slash: a file named tmp is not a directory
        ("docs/draft-1.md", True),  # "/**/" matches zero directories
        ("docs/a/b/draft-2.md", True),
        ("docs/a/final.md", False),
        ("secret", True),
        ("deep/er/secret", True),
        ("cache/x", True),
        ("cache/readme.md", False),  # "cache/**" ignores contents, not the directory
        ("abc.txt", True),
        ("abbc.txt", False),
        ("a/c.txt", False),  # "?" never matches "/"
        ("7days.bak", True),
        ("days.bak", False),
        ("#literal", True),
        ("Card.json", False),
    ],
)
def test_gitignore_patterns(path: str, ignored: bool) -> None:
    assert is_ignored(path, parse_gitignore(GITIGNORE)) is ignored


def test_file_in_ignored_directory_cannot_be_reincluded() -> None:
    patterns = parse_gitignore("logs/\n!logs/important.txt\n")
    assert is_ignored("logs/important.txt", patterns)


def test_reinclude_directory_then_file_like_git() -> None:
    patterns = parse_gitignore("/*\n!/foo\n/foo/*\n!/foo/bar\n")
    assert is_ignored("top.txt", patterns)
    assert is_ignored("foo/other.txt", patterns)
    assert not is_ignored("foo/bar/kept.txt", patterns)


def test_empty_or_comment_only_gitignore_ignores_nothing() -> None:
    assert parse_gitignore("# nothing\n\n   \n") == ()
    assert not is_ignored("anything.json", ())


def test_nul_in_a_card_never_reaches_an_entry() -> None:
    """A card titled "evil\\u0000title" used to yield an entry the PostgreSQL
    store refused, over and over; it is a card like any other."""
    content = card(
        {"title": "evil\u0000title", "body": "a\u0000b"},
        {"rel": {"links": {"self": "../x\u0000y"}}},
    )
    entry = index_file("cards/evil.json", content, MTIME)
    assert entry.media_type == CARD_MEDIA_TYPE and not entry.error_message
    assert entry.title == "evil\ufffdtitle"
    assert "\x00" not in entry.search_text and "a\ufffdb" in entry.search_text
    assert entry.links == ("../x\ufffdy",)
    # A text file with a NUL past the binary sniff is text with U+FFFD.
    text = index_file("notes.txt", b"x" * 10_000 + b"\x00tail", MTIME)
    assert "\x00" not in text.search_text and text.search_text.endswith("\ufffdtail")


def test_gitignore_matching_is_pathspecs() -> None:
    """pathspec's GitIgnoreSpec does the matching; the module adds only git's
    rule that an excluded directory's files stay excluded."""
    import pathspec

    from index_worker import gitignore

    assert gitignore.GitIgnoreSpec is pathspec.GitIgnoreSpec
    spec = pathspec.GitIgnoreSpec.from_lines(GITIGNORE.splitlines())
    patterns = parse_gitignore(GITIGNORE)
    for path in ("debug.log", "keep.log", "build/out.js", "abc.txt", "docs/a/final.md"):
        assert is_ignored(path, patterns) is spec.match_file(path)
