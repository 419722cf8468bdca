#!/bin/bash
# What the batch code costs Redis, in instructions per check (repeatable to
# ~±0.5%, where wall-clock CPU on a shared host drifts by far more):
#
#     benches/lua_instructions.sh N distinct|hot [LUA_FILES]
#
# Runs redis-server under `valgrind --tool=callgrind` twice, with few and
# with many `benches/luabench.py` calls of N checks each (LUA_FILES as
# there: a variant of the batch code under test), and divides the
# difference of the two runs' instruction totals by the checks between
# them, so start-up and shutdown cancel out. Needs valgrind and
# redis-server.
set -euo pipefail
n=$1 spread=$2 files=${3:-}
here=$(cd "$(dirname "$0")" && pwd)
# Calls per run: about 1,200 and 13,200 checks' worth.
few=$(( (1200 + n - 1) / n )) many=$(( (13200 + n - 1) / n ))
total() {
    local port out
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    out=$(mktemp)
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        redis-server --port "$port" --save '' --appendonly no --hz 1 >/dev/null 2>&1 &
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.2; done
    python3 "$here/luabench.py" "$port" "$n" "$spread" "$1" "$files" >/dev/null
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    wait
    callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
    rm -f "$out"
}
a=$(total "$few")
b=$(total "$many")
echo "n=$n $spread: $(( (b - a) / ((many - few) * n) )) Redis instructions per check"
