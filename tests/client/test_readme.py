"""README's "Using it from Python" example, run as written against a live
server on loopback (only the address changes)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from tests.client.live import live_system

README = Path(__file__).resolve().parents[2] / "README.md"


def example() -> str:
    text = README.read_text()
    section = text.split("## Using it from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README has no python block under 'Using it from Python'"
    return match.group(1)


def test_the_readme_example_runs(tmp_path: Path) -> None:
    code = example()
    assert 8 <= len([line for line in code.splitlines() if line.strip()]) <= 14
    assert '"127.0.0.1:50051"' in code

    with live_system(tmp_path) as live:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace("127.0.0.1:50051", live.address), str(README), "exec"), {})

    lines = out.getvalue().splitlines()
    assert lines[0].startswith("files indexed:")
    assert "notes ready: True" in lines
    assert any("'hello.txt'" in line for line in lines)
    assert lines[-1].startswith("not found: ") and "nope" in lines[-1]
