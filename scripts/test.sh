#!/usr/bin/env bash
# Run the whole test suite. Store tests run on SQLite and on PostgreSQL
# (REALM_TEST_PG_URL, default postgresql://postgres@127.0.0.1:5432/test).
# With CI=true an unreachable PostgreSQL fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
