#!/usr/bin/env bash
# Tests the Python and Node client shims against a real quotad and a real
# Redis (each suite starts its own redis-server and quotad on temporary
# sockets and stops them). Run from anywhere; needs python3 (3.10+; the docs
# test, scripts/test-docs.py, needs 3.11+ for tomllib, as Debian 12 has), node
# (20+) with npm, and redis-server; installs the packages' dependencies from
# PyPI and the npm registry.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

export QUOTAD_BIN="${QUOTAD_BIN:-$root/target/debug/quotad}"
if [ ! -x "$QUOTAD_BIN" ]; then
  echo "== building quotad (debug)"
  cargo build --locked
fi

if ! command -v redis-server >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y redis-server
fi

# --- Python -----------------------------------------------------------------
# A virtualenv in clients/python/.venv. Debian's python3 lacks ensurepip
# unless python3-venv is installed: install it when we can, else fall back to
# a user install (PEP 668 makes that need --break-system-packages).
echo "== Python client"
venv="$root/clients/python/.venv"
python=""
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  python="$venv/bin/python"
elif python3 -m venv "$venv" >/dev/null 2>&1; then
  python="$venv/bin/python"
else
  rm -rf "$venv"
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null; }; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    $sudo apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "python${pyver}-venv" >/dev/null || true
  fi
  if python3 -m venv "$venv" >/dev/null 2>&1; then
    python="$venv/bin/python"
  else
    rm -rf "$venv"
    echo "python3 -m venv is unavailable: installing for the user instead"
    python=python3
    pip_user=(--user)
    python3 -m pip install --user --dry-run --no-deps msgpack >/dev/null 2>&1 || pip_user+=(--break-system-packages)
  fi
fi
"$python" -m pip install -q --disable-pip-version-check ${pip_user[@]+"${pip_user[@]}"} -e "clients/python[test]"
# The tests include a live /metrics scrape read by prometheus_client's
# OpenMetrics parser (tests/test_metrics.py; it is a [test] dependency).
(
  cd clients/python
  "$python" -m mypy
  "$python" -m pytest -q -p no:cacheprovider
)
# docs/protocol.md, checked against the same binary on both backends.
scripts/test-conformance.sh "$python"
# Faults injected under load, in the reduced form (docs/reliability.md).
"$python" scripts/chaos.py --seconds 1.5

# --- Node -------------------------------------------------------------------
echo "== Node client"
(
  cd clients/node
  npm ci --no-audit --no-fund --loglevel=error
  npm run --silent typecheck
  node --test --test-concurrency=1 test/*.test.js
)
