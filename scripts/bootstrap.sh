#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install,
# editable, the client distribution (client/) and the project with its
# PostgreSQL and development extras. Re-runs are cheap: the install is
# skipped while both pyproject.toml files and requirements.lock are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml client/pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet -c requirements.lock --upgrade pip
  # requirements.lock pins the whole tree (scripts/lock.py writes it).
  .venv/bin/python -m pip install --quiet -c requirements.lock -e ./client -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
