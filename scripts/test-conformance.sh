#!/usr/bin/env bash
# Runs scripts/conformance.py against a real quotad on each backend: the
# embedded memory one, and Redis (a redis-server on a temporary socket);
# then on the memory backend with [[access]] rules that grant this user the
# conformance tenants only, without the admin ops, so `forbidden` is checked.
# Usage: test-conformance.sh [PYTHON]   (a python3 that can import msgpack;
# default: clients/python/.venv/bin/python, made by scripts/test-clients.sh).
# The daemon is $QUOTAD_BIN, else target/debug/quotad.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
python="${1:-$root/clients/python/.venv/bin/python}"
quotad="${QUOTAD_BIN:-$root/target/debug/quotad}"
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

wait_for() { # path pid what
  for _ in $(seq 500); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || { echo "$3 exited early" >&2; return 1; }
    sleep 0.02
  done
  echo "$3 did not create $1" >&2
  return 1
}

redis-server --port 0 --unixsocket "$dir/redis-server.sock" --save "" --appendonly no --dir "$dir" >/dev/null &
pids+=($!)
wait_for "$dir/redis-server.sock" $! redis-server

policy='[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 20, refill_per_sec = 10 }, { name = "daily", kind = "daily_quota", limit = 1000 }]
[policies.conformance_concurrency]
rules = [{ name = "inflight", kind = "concurrency", limit = 3, lease_ms = 60000 }]'
# Tenant records from this file on the memory backend, from Redis on the
# other: the admin ops are checked against both kinds of source. The
# concurrency policy is there so the lease checks run (--require-leases).
for backend in memory redis; do
  backend_tables='[quota]
source = "file"'
  [ "$backend" = redis ] && backend_tables="[redis]
url = \"redis+unix://$dir/redis-server.sock\"
[quota]
source = \"redis\""
  printf '[server]\nsocket = "%s"\n%s\n%s\n' "$dir/$backend.sock" "$backend_tables" "$policy" >"$dir/$backend.toml"
  "$quotad" serve --config "$dir/$backend.toml" >"$dir/$backend.log" 2>&1 &
  pids+=($!)
  wait_for "$dir/$backend.sock" $! "quotad ($backend)"
  echo "== conformance: $backend backend"
  if ! "$python" scripts/conformance.py --socket "$dir/$backend.sock" --require-leases; then
    echo "-- quotad log:" && cat "$dir/$backend.log"
    exit 1
  fi
done

# Access rules: this uid may use `conformance-*` only, and no admin op.
printf '[server]\nsocket = "%s"\n[[access]]\nuids = [%s]\ntenants = ["conformance-*"]\n%s\n' \
  "$dir/access.sock" "$(id -u)" "$policy" >"$dir/access.toml"
"$quotad" serve --config "$dir/access.toml" >"$dir/access.log" 2>&1 &
pids+=($!)
wait_for "$dir/access.sock" $! "quotad (access rules)"
echo "== conformance: memory backend, [[access]] rules"
if ! "$python" scripts/conformance.py --socket "$dir/access.sock" --forbidden-tenant not-granted --admin-forbidden; then
  echo "-- quotad log:" && cat "$dir/access.log"
  exit 1
fi
