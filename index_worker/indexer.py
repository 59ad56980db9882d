"""File -> index entry. Pure: the same path, bytes and mtime always give the same entry.

Nothing here raises on bad content: a file that cannot be understood becomes an
entry with `error_message` set (the job still succeeds and the realm's stats
count the error, DESIGN.md section 6).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import mimetypes
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import replace as _replace
from datetime import datetime
from typing import Any

from index_worker.gitignore import GITIGNORE_PATH, IgnorePattern, is_ignored, parse_gitignore

__all__ = [
    "CARD_MEDIA_TYPE",
    "GITIGNORE_PATH",
    "IgnorePattern",
    "IndexEntry",
    "index_file",
    "is_ignored",
    "parse_gitignore",
]

CARD_MEDIA_TYPE = "application/vnd.card+json"
JSON_MEDIA_TYPE = "application/json"
BINARY_MEDIA_TYPE = "application/octet-stream"
TEXT_MEDIA_TYPE = "text/plain"

# Bounds keep one entry well inside a gRPC message whatever the file holds.
MAX_TEXT_BYTES = 64 * 1024
MAX_SEARCH_TEXT_CHARS = 64 * 1024
MAX_TITLE_CHARS = 1024
MAX_LINKS = 1000
# A NUL byte in the head of a file is the usual sign of binary content.
_SNIFF_BYTES = 8 * 1024

# A private table built from Python's defaults only: the host's /etc/mime.types
# must not change what an entry says, or two workers would disagree.
_MIME = mimetypes.MimeTypes()
for _ext, _type in {
    ".ts": "text/typescript",
    ".gts": "text/x-glimmer-typescript",
    ".gjs": "text/x-glimmer-javascript",
    ".md": "text/markdown",
    ".json": JSON_MEDIA_TYPE,
}.items():
    _MIME.add_type(_type, _ext)


@dataclass(frozen=True)
class IndexEntry:
    """What the index stores for one file; empty strings mean "not applicable"."""

    path: str
    mtime: datetime
    size: int
    sha256: str
    media_type: str
    card_type: str = ""
    title: str = ""
    search_text: str = ""
    links: tuple[str, ...] = ()
    error_message: str = ""


def index_file(path: str, content: bytes, mtime: datetime) -> IndexEntry:
    """Index one file of a realm. Its text fields never hold NUL: a card
    whose title has one is still a card (the NUL becomes U+FFFD), and the
    server, whose PostgreSQL store cannot hold NUL in text, refuses entries
    that carry one."""
    return _without_nul(_index_file(path, content, mtime))


def _without_nul(entry: IndexEntry) -> IndexEntry:
    fields = ("card_type", "title", "search_text", "error_message")
    if not any("\x00" in getattr(entry, f) for f in fields) and not any(
        "\x00" in link for link in entry.links
    ):
        return entry
    return _replace(
        entry,
        **{f: getattr(entry, f).replace("\x00", "\ufffd") for f in fields},
        links=tuple(link.replace("\x00", "\ufffd") for link in entry.links),
    )


def _index_file(path: str, content: bytes, mtime: datetime) -> IndexEntry:
    base = IndexEntry(
        path=path,
        mtime=mtime,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        media_type=BINARY_MEDIA_TYPE,
    )
    if path.lower().endswith(".json"):
        return _index_json(base, content)
    text = _decode_text(content)
    media_type = _MIME.guess_type(path, strict=False)[0]
    if media_type is None:
        media_type = TEXT_MEDIA_TYPE if text is not None else BINARY_MEDIA_TYPE
    return _replace(base, media_type=media_type, search_text=_bound(text or ""))


def _index_json(base: IndexEntry, content: bytes) -> IndexEntry:
    try:
        document = json.loads(content)
    except (ValueError, RecursionError) as exc:
        return _replace(base, media_type=JSON_MEDIA_TYPE, error_message=f"invalid JSON: {exc}")
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, dict) or data.get("type") != "card":
        text = _decode_text(content) or ""
        return _replace(base, media_type=JSON_MEDIA_TYPE, search_text=_bound(text))
    return _index_card(_replace(base, media_type=CARD_MEDIA_TYPE), data)


def _index_card(base: IndexEntry, data: dict[str, Any]) -> IndexEntry:
    meta = data.get("meta")
    adopts_from = meta.get("adoptsFrom") if isinstance(meta, dict) else None
    if not isinstance(adopts_from, dict):
        return _replace(base, error_message="card has no data.meta.adoptsFrom")
    module, name = adopts_from.get("module"), adopts_from.get("name")
    if not (isinstance(module, str) and module and isinstance(name, str) and name):
        return _replace(
            base, error_message="card data.meta.adoptsFrom needs string module and name"
        )
    attributes = data.get("attributes", {})
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        return _replace(base, error_message="card data.attributes is not an object")
    relationships = data.get("relationships", {})
    if relationships is None:
        relationships = {}
    if not isinstance(relationships, dict):
        return _replace(base, error_message="card data.relationships is not an object")

    title = _card_title(attributes) or base.path
    strings = list(_strings(attributes))
    if title not in strings:
        strings.append(title)
    return _replace(
        base,
        card_type=f"{module}/{name}",
        title=title[:MAX_TITLE_CHARS],
        search_text=_bound(" ".join(strings)),
        links=_links(relationships),
    )


def _card_title(attributes: dict[str, Any]) -> str:
    for key in ("title", "cardTitle", "name"):
        value = attributes.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _strings(value: Any) -> Iterator[str]:
    """Every non-empty string inside a JSON value, in document order.

    Iterative, because a deeply nested document that the parser accepted must
    not exhaust the recursion limit here.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item.strip():
                yield item
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def _links(relationships: dict[str, Any]) -> tuple[str, ...]:
    """`relationships.<name>.links.self` targets; a relationship may be a list of them."""
    found: list[str] = []
    for relationship in relationships.values():
        items = relationship if isinstance(relationship, list) else [relationship]
        for item in items:
            links = item.get("links") if isinstance(item, dict) else None
            target = links.get("self") if isinstance(links, dict) else None
            targets = target if isinstance(target, list) else [target]
            for link in targets:
                # Null marks an empty relationship; duplicates add nothing to search.
                if isinstance(link, str) and link and link not in found:
                    found.append(link)
    return tuple(found[:MAX_LINKS])


def _decode_text(content: bytes) -> str | None:
    """The head of the file as text, or None when it looks binary."""
    head = content[:MAX_TEXT_BYTES]
    if b"\x00" in head[:_SNIFF_BYTES]:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    try:
        # final=False tolerates a character cut in half by the size bound,
        # but only when the bound actually cut the file.
        return decoder.decode(head, final=len(content) <= MAX_TEXT_BYTES)
    except UnicodeDecodeError:
        return None


def _bound(text: str) -> str:
    return text[:MAX_SEARCH_TEXT_CHARS]
