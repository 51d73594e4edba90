#!/usr/bin/env bash
# Sets everything up, then runs lint, types and the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
