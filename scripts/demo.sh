#!/usr/bin/env bash
# Sets everything up, then runs the local fleet demo and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/fleet_demo.py "$@"
