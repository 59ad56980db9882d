"""Write requirements.lock: every package the project installs (with its
PostgreSQL and development extras, and the client distribution), pinned.

Usage: .venv/bin/python scripts/lock.py   (after changing a dependency in a
pyproject.toml). scripts/bootstrap.sh installs with the lock as constraints,
so CI and every machine get the same tree; tests/unit/test_lock.py fails
when the installed tree and the lock disagree.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
HEADER = """\
# The whole dependency tree of realm-service[dev,postgres] and realm-client,
# pinned. Written by scripts/lock.py (pip-compile); do not edit by hand.
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "lock.in", Path(tmp) / "lock.txt"
        # The project's own distributions, editable, resolve their
        # dependencies; they are dropped from the result below.
        source.write_text(f"-e {ROOT / 'client'}\n-e {ROOT}[dev,postgres]\n")
        subprocess.run(
            [sys.executable, "-m", "piptools", "compile", "--quiet", "--no-header",
             "--no-emit-index-url", "--no-emit-find-links", "--strip-extras",
             "--allow-unsafe", "--annotation-style", "line", "-o", str(out), str(source)],
            check=True, cwd=tmp,
        )  # fmt: skip
        pins = [
            line.split("#", 1)[0].strip()
            for line in out.read_text().splitlines()
            if line and not line.startswith(("-e ", "#", " "))
        ]
    LOCK.write_text(HEADER + "".join(f"{pin}\n" for pin in sorted(pins, key=str.lower)))


if __name__ == "__main__":
    main()
