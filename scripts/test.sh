#!/usr/bin/env bash
# Sets everything up, then runs lint, types and the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# tests/integration/test_systemd_units.py runs `systemd-analyze verify` on the units; containers lack systemd.
if ! command -v systemd-analyze >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "test: installing systemd (for systemd-analyze)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports  # the layers and cycles of docs/architecture.md (pyproject's [tool.importlinter])
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
