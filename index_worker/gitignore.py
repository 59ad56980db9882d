"""The subset of .gitignore matching that realms need (git's "gitwildmatch").

Supported: blank lines and `#` comments, `!` negation, trailing `/` (directories
only), leading or inner `/` (anchored at the realm root), `*`, `?`, `[...]`,
and `**` as a leading `**/`, an inner `/**/` or a trailing `/**`; backslash
escapes a character. As in git, the last matching pattern wins, and a file
inside an ignored directory stays ignored whatever later patterns say, because
git never looks inside an excluded directory.

Realm listings contain files only, so directories are the path prefixes of
the files: `is_ignored` checks each of a file's ancestor directories first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

GITIGNORE_PATH = ".gitignore"


@dataclass(frozen=True)
class IgnorePattern:
    """One compiled line of a .gitignore."""

    text: str
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool


def parse_gitignore(text: str) -> tuple[IgnorePattern, ...]:
    """Compile the lines of a .gitignore, skipping blanks, comments and empty patterns."""
    patterns: list[IgnorePattern] = []
    for line in text.splitlines():
        pattern = _parse_line(line)
        if pattern is not None:
            patterns.append(pattern)
    return tuple(patterns)


def is_ignored(path: str, patterns: Sequence[IgnorePattern]) -> bool:
    """Whether the realm file at `path` (relative POSIX) is excluded by the patterns."""
    if not patterns:
        return False
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        if _decide("/".join(parts[:depth]), True, patterns):
            return True
    return _decide("/".join(parts), False, patterns)


def _decide(path: str, is_dir: bool, patterns: Sequence[IgnorePattern]) -> bool:
    ignored = False
    for pattern in patterns:
        if pattern.dir_only and not is_dir:
            continue
        if pattern.regex.fullmatch(path):
            ignored = not pattern.negated
    return ignored


def _parse_line(line: str) -> IgnorePattern | None:
    if not line or line.startswith("#"):
        return None
    body = _strip_trailing_spaces(line)
    negated = body.startswith("!")
    if negated:
        body = body[1:]
    dir_only = body.endswith("/") and not body.endswith("\\/")
    if dir_only:
        body = body.rstrip("/")
    if not body:
        return None
    # A slash at the start or in the middle anchors the pattern at the root;
    # otherwise it matches a name at any depth.
    anchored = "/" in body
    body = body.removeprefix("/")
    if not body:
        return None
    regex = _translate(body)
    if not anchored:
        regex = "(?:.*/)?" + regex
    return IgnorePattern(line, re.compile(regex, re.DOTALL), negated, dir_only)


def _strip_trailing_spaces(line: str) -> str:
    """Drop trailing spaces unless the last one is escaped with a backslash."""
    end = len(line)
    while end > 0 and line[end - 1] == " ":
        if end >= 2 and line[end - 2] == "\\":
            break
        end -= 1
    return line[:end]


def _translate(glob: str) -> str:
    """Translate one gitignore glob (no leading `/`, no `!`) to a regex over a path."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            j = i
            while j < n and glob[j] == "*":
                j += 1
            stars = j - i
            at_segment_start = i == 0 or glob[i - 1] == "/"
            at_segment_end = j == n or glob[j] == "/"
            if stars >= 2 and at_segment_start and at_segment_end:
                if j == n:
                    # Trailing "/**" (or a lone "**"): everything inside.
                    out.append(".*")
                    i = j
                else:
                    # "**/" matches zero or more whole directories.
                    out.append("(?:.*/)?")
                    i = j + 1
                continue
            out.append("[^/]*")
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            translated, i = _char_class(glob, i)
            out.append(translated)
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _char_class(glob: str, start: int) -> tuple[str, int]:
    """Translate `[...]` starting at `start`; an unclosed `[` is a literal."""
    i = start + 1
    negate = i < len(glob) and glob[i] in "!^"
    if negate:
        i += 1
    members: list[str] = []
    first = True
    while i < len(glob) and (glob[i] != "]" or first):
        c = glob[i]
        if c == "\\" and i + 1 < len(glob):
            members.append(re.escape(glob[i + 1]))
            i += 2
        elif c == "-" and members and i + 1 < len(glob) and glob[i + 1] != "]":
            members.append("-")
            i += 1
        else:
            members.append(re.escape(c) if c not in "-" else "\\-")
            i += 1
        first = False
    if i >= len(glob):
        return re.escape("["), start + 1
    body = "".join(members)
    # A class never matches the path separator, negated or not.
    return ("(?!/)[^" + body + "]" if negate else "(?!/)[" + body + "]"), i + 1
