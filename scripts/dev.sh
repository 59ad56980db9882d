#!/usr/bin/env bash
# Run the whole system locally: one realm-service plus index workers on the
# embedded SQLite store under ./data. Extra arguments go to `realm-service dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/realm-service dev --workers 2 "$@"
