"""requirements.lock pins the whole installed tree, and agrees with what is
installed: a dependency added to a pyproject.toml without running
scripts/lock.py fails here."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert match, f"not an exact pin: {line!r}"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def tree(root: str, extras: set[str]) -> set[str]:
    """The installed distributions `root[extras]` needs, transitively."""
    seen: set[str] = set()
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            marker_ok = req.marker is None or any(
                req.marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            )
            key = canonicalize_name(req.name)
            if marker_ok and key not in seen:
                seen.add(key)
                todo.append((req.name, set(req.extras)))
    return seen


def test_every_installed_dependency_is_locked_at_its_installed_version() -> None:
    pins = locked()
    needed = tree("realm-service", {"dev", "postgres"}) - {"realm-client"}
    missing = sorted(needed - pins.keys())
    assert not missing, f"not in requirements.lock (run scripts/lock.py): {missing}"
    differing = {
        name: (pins[name], metadata.version(name))
        for name in needed
        if metadata.version(name) != pins[name]
    }
    assert not differing, f"locked vs installed: {differing}; run scripts/bootstrap.sh"
