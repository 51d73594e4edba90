#!/usr/bin/env bash
# Installs what edgefleet needs on a fresh Debian/Ubuntu machine: Mosquitto and its
# clients, libfaketime, socat and PostgreSQL (tests only), and the package in .venv.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
if [ "$extras" = test ]; then
  command -v faketime >/dev/null || need+=(faketime)
  # A pseudo-terminal pair for the Modbus RTU tests, and a PostgreSQL server the tests run
  # as a private cluster in a temporary folder (never the system's own).
  command -v socat >/dev/null || need+=(socat)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: edgefleet needs Python >= 3.11 ($python is $("$python" --version 2>&1))" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
spec="."
[ "$extras" = test ] && spec=".[test]"
.venv/bin/pip install -q --disable-pip-version-check -e "$spec"
