"""Set-up prints nothing to worry about: the editable install of the project
is a plain path entry (no setuptools warning about a flat layout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_editable_build_warns_of_nothing(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         f"import setuptools.build_meta as b; b.build_editable({str(tmp_path)!r})"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    output = build.stdout + build.stderr
    assert "Please be careful" not in output
    assert "Warning" not in output, output[-3000:]
