"""Local files to upload: a directory tree, or `PATH=LOCALFILE` pairs."""

from __future__ import annotations

import os
from pathlib import Path

from realmctl.errors import UsageError

SKIPPED_DIRS = frozenset({".git"})


def read_local(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def tree_files(root: Path) -> list[tuple[str, Path]]:
    """(realm path, local path) of every file under root, by realm path.

    Realm paths are relative POSIX paths. Only `.git` directories are skipped;
    symbolic links to files are read through, links to directories are not followed.
    """
    if not root.is_dir():
        raise UsageError(f"not a directory: {root}")
    found: list[tuple[str, Path]] = []

    def fail(exc: OSError) -> None:
        raise UsageError(f"cannot list {exc.filename}: {exc.strerror or exc}")

    for directory, subdirs, names in os.walk(root, onerror=fail):
        subdirs[:] = [name for name in subdirs if name not in SKIPPED_DIRS]
        for name in names:
            local = Path(directory, name)
            found.append((local.relative_to(root).as_posix(), local))
    return sorted(found)


def parse_file_spec(spec: str) -> tuple[str, Path]:
    """`PATH=LOCALFILE` -> (realm path, local path). The realm path is checked by the server."""
    realm_path, sep, local = spec.partition("=")
    if not sep or not realm_path or not local:
        raise UsageError(f"--file expects PATH=LOCALFILE, got {spec!r}")
    return realm_path, Path(local)
