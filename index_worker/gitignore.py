"""A realm's .gitignore, matched as git does, with pathspec's GitIgnoreSpec.

pathspec implements git's "gitwildmatch" patterns and its last-match-wins
rule. One rule of git's it cannot see on a flat list of files: git never
looks inside an excluded directory, so a file there stays ignored whatever
later patterns say. Realm listings contain files only, so the directories
are the path prefixes of the files: `is_ignored` asks about each of a file's
ancestor directories first. For that question a trailing `/**` reads as
`/*/`: in git `dir/**` matches what is inside `dir`, never `dir` itself,
while pathspec, which matches paths and not directories, lets it match `dir/`.

One difference from git remains, pathspec's: after `/foo/*`, a negation
`!/foo` re-includes `foo/bar/` too (git keeps that directory excluded). Such a
.gitignore is rare, and the difference can only index more files, not fewer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from pathspec import GitIgnoreSpec

GITIGNORE_PATH = ".gitignore"


@dataclass(frozen=True)
class IgnorePattern:
    """One line of a .gitignore that is a pattern (not blank, not a comment)."""

    text: str


def parse_gitignore(text: str) -> tuple[IgnorePattern, ...]:
    """The pattern lines of a .gitignore; blanks and comments are left out."""
    lines = (line.rstrip("\r") for line in text.splitlines())
    return tuple(
        IgnorePattern(line)
        for line in lines
        if line.strip() and not line.startswith("#") and line.strip() not in ("!", "/", "!/")
    )


def is_ignored(path: str, patterns: Sequence[IgnorePattern]) -> bool:
    """Whether the realm file at `path` (relative POSIX) is excluded by the patterns."""
    if not patterns:
        return False
    files, directories = _specs(tuple(patterns))
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        if directories.match_file("/".join(parts[:depth]) + "/"):
            return True
    return files.match_file("/".join(parts))


@functools.lru_cache(maxsize=32)
def _specs(patterns: tuple[IgnorePattern, ...]) -> tuple[GitIgnoreSpec, GitIgnoreSpec]:
    """Compiled once per .gitignore (a job asks about every file with the
    same one): the spec for files, and the one for directories."""
    lines = [p.text.rstrip() for p in patterns]
    dirs = [line[: -len("/**")] + "/*/" if line.endswith("/**") else line for line in lines]
    return GitIgnoreSpec.from_lines(lines), GitIgnoreSpec.from_lines(dirs)
