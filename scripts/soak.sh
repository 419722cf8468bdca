#!/usr/bin/env bash
# A 10-minute soak of a real quotad under mixed load (scripts/soak.py;
# docs/reliability.md). Not part of CI. Builds the debug binary unless
# $QUOTAD_BIN names one.
# Usage: soak.sh [PYTHON] [soak.py options, e.g. --minutes 30]
#   PYTHON: a python3 that can import msgpack (default:
#   clients/python/.venv/bin/python, made by scripts/test-clients.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-clients/python/.venv/bin/python}"
shift || true
if [ -z "${QUOTAD_BIN:-}" ]; then
  cargo build --locked --bin quotad
  QUOTAD_BIN="${CARGO_TARGET_DIR:-target}/debug/quotad"
fi
exec "$python" scripts/soak.py --quotad "$QUOTAD_BIN" "$@"
