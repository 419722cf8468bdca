#!/usr/bin/env bash
# Installs the clients the way a user gets them, outside the repo, and uses
# them against a real quotad:
# - Both packages ship the repo's LICENSE, unchanged.
# - Node: `npm pack` clients/node, check the tarball's files and exports,
#   `npm install <tarball>` into a temporary project (a real copy, not a
#   symlink), and run a check; then examples/express's `npm start`, stopped
#   by a SIGTERM to npm alone, must leave no node behind.
# - Python: build the wheel (`python -m build`), install it with its
#   [fastapi] extra into a fresh virtualenv, serve examples/fastapi from it
#   with uvicorn and make the README's requests.
# Needs the npm registry and PyPI. Usage: QUOTAD_BIN=... scripts/test-packages.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
QUOTAD_BIN="${QUOTAD_BIN:-$root/target/debug/quotad}"
tmp=$(mktemp -d /tmp/quotad-packages.XXXXXX)
pids=()
cleanup() {
  for pid in ${pids[@]+"${pids[@]}"}; do kill -TERM -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

fail() { echo "test-packages: FAIL: $*" >&2; exit 1; }
# step <seconds> <what> <command...>: runs it with a deadline; on failure shows its output.
step() {
  local limit=$1 what=$2
  shift 2
  if ! timeout "$limit" "$@" >"$tmp/step.log" 2>&1; then
    cat "$tmp/step.log" >&2
    fail "$what (exit $?, deadline ${limit} s; needs the registries reachable)"
  fi
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# wait_port <port> <pid> <what>
wait_port() {
  for _ in $(seq 1200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || fail "$3 exited before listening on port $1"
    sleep 0.1
  done
  fail "$3 did not listen on port $1 within 120 s"
}

[ -x "$QUOTAD_BIN" ] || fail "no quotad at $QUOTAD_BIN (cargo build, or set QUOTAD_BIN)"
# A fresh daemon (empty cache) per example: both apps cache `GET /notes`
# under the same canonical key, so one must not see the other's entries.
start_quotad() {
  "$QUOTAD_BIN" serve --socket "$tmp/$1.sock" 2>"$tmp/$1.log" &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$tmp/$1.sock" ] && break; sleep 0.05; done
  [ -S "$tmp/$1.sock" ] || fail "quotad did not start: $(cat "$tmp/$1.log")"
  export QUOTAD_SOCKET="$tmp/$1.sock"
}
start_quotad quotad-node
start=$SECONDS

# --- Node ---------------------------------------------------------------------
echo "== Node: npm pack, npm install <tarball>"
version=$(node -p 'require("./clients/node/package.json").version')
step 120 "npm pack" npm pack ./clients/node --pack-destination "$tmp"
tgz="$tmp/quotad-$version.tgz"
[ -f "$tgz" ] || fail "npm pack wrote no $tgz"
files=$(tar -tzf "$tgz" | sort | tr '\n' ' ')
want="package/LICENSE package/README.md package/express.d.ts package/index.d.ts package/package.json $(cd clients/node && ls src/*.js | sed 's|^|package/|' | sort | tr '\n' ' ')"
[ "$files" = "$(echo "$want" | tr ' ' '\n' | sort | grep . | tr '\n' ' ')" ] || fail "tarball files: $files; expected: $want"
tar -xOzf "$tgz" package/LICENSE | cmp -s - LICENSE || fail "the tarball's LICENSE differs from the repo's LICENSE"

mkdir "$tmp/app"
echo '{ "name": "app", "private": true, "type": "module" }' >"$tmp/app/package.json"
(cd "$tmp/app" && step 180 "npm install the tarball" npm install --no-audit --no-fund "$tgz")
[ -d "$tmp/app/node_modules/quotad" ] && [ ! -L "$tmp/app/node_modules/quotad" ] || fail "node_modules/quotad is not a real directory"
cat >"$tmp/app/check.js" <<'EOF'
import { readFileSync, existsSync } from 'node:fs';
import { Client } from 'quotad';
import { quotad } from 'quotad/express';

// Every target of the package's exports and types is in the install.
const dir = 'node_modules/quotad/';
const pkg = JSON.parse(readFileSync(dir + 'package.json', 'utf8'));
const targets = [pkg.main, pkg.types, ...Object.values(pkg.exports).flatMap((e) => typeof e === 'string' ? [e] : Object.values(e))];
for (const t of targets) if (!existsSync(dir + t)) throw new Error(`exports name ${t}, missing from the package`);
if (pkg.engines?.node !== '>=20') throw new Error(`engines: ${JSON.stringify(pkg.engines)}`);
if (typeof quotad !== 'function') throw new Error('quotad/express has no quotad()');

const q = new Client(undefined, { failureMode: 'raise' });
const d = await q.check('acme', 'user:1');
q.close();
if (!d.allowed || d.degraded || d.limit !== 20) throw new Error(`unexpected decision ${JSON.stringify(d)}`);
console.log('node client from the tarball: allowed, limit 20');
EOF
(cd "$tmp/app" && step 30 "a check through the installed client" node check.js)
cat "$tmp/step.log"

echo "== Node: examples/express, npm install && npm start, SIGTERM to npm"
mkdir -p "$tmp/repo/examples" "$tmp/repo/clients"
cp -r clients/node "$tmp/repo/clients/node"
rm -rf "$tmp/repo/clients/node/node_modules"
cp -r examples/express "$tmp/repo/examples/express"
rm -rf "$tmp/repo/examples/express/node_modules"
(cd "$tmp/repo/examples/express" && step 180 "npm install in examples/express" npm install --no-audit --no-fund)
port=$(free_port)
(cd "$tmp/repo/examples/express" && PORT=$port exec setsid npm start >"$tmp/express.log" 2>&1) &
npm_pid=$!
pids+=("$npm_pid")
wait_port "$port" "$npm_pid" "npm start"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/notes")
[ "$code" = 200 ] || fail "GET /notes answered $code: $(cat "$tmp/express.log")"
kill -TERM "$npm_pid"
for _ in $(seq 100); do
  pgrep -g "$npm_pid" >/dev/null || break
  sleep 0.1
done
! pgrep -g "$npm_pid" >/dev/null || fail "10 s after SIGTERM to npm, still running: $(pgrep -a -g "$npm_pid")"
echo "npm start: SIGTERM stopped it, nothing left"

# --- Python -------------------------------------------------------------------
echo "== Python: python -m build, install the wheel in a fresh venv"
python3 -m venv "$tmp/build-venv" || fail "python3 -m venv failed (install python3-venv)"
step 180 "pip install build" "$tmp/build-venv/bin/pip" install -q --disable-pip-version-check build
step 300 "python -m build" "$tmp/build-venv/bin/python" -m build --outdir "$tmp/dist" clients/python
pyversion=$(sed -n 's/^version = "\(.*\)"/\1/p' clients/python/pyproject.toml)
wheel="$tmp/dist/quotad-$pyversion-py3-none-any.whl"
[ -f "$wheel" ] || fail "no $wheel: $(ls "$tmp/dist")"
# Asked of zipfile itself: `zipfile -l | grep -q` fails under pipefail when
# grep exits before the listing is written (BrokenPipeError).
python3 -c 'import sys, zipfile; sys.exit("quotad/py.typed" not in zipfile.ZipFile(sys.argv[1]).namelist())' \
  "$wheel" || fail "the wheel lacks quotad/py.typed"
license="quotad-$pyversion.dist-info/licenses/LICENSE"
python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
  "$wheel" "$license" 2>/dev/null | cmp -s - LICENSE || fail "the wheel's $license is missing or differs from the repo's LICENSE"
python3 -m venv "$tmp/venv"
step 300 "pip install the wheel with [fastapi]" "$tmp/venv/bin/pip" install -q --disable-pip-version-check "$wheel[fastapi]"
where=$(cd "$tmp" && "$tmp/venv/bin/python" -c 'import quotad; print(quotad.__file__)')
case "$where" in "$tmp/venv/"*) ;; *) fail "quotad imported from $where, not the venv" ;; esac

start_quotad quotad-python
port=$(free_port)
(cd "$tmp" && exec setsid "$tmp/venv/bin/uvicorn" --app-dir "$root/examples/fastapi" app:app --port "$port" >"$tmp/uvicorn.log" 2>&1) &
uv_pid=$!
pids+=("$uv_pid")
wait_port "$port" "$uv_pid" "uvicorn"
cat >"$tmp/requests.py" <<'EOF'
"""The FastAPI example's README requests, checked."""
import json
import sys
import time
import urllib.error
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"


def call(path, method="GET", body=None, headers=None):
    req = urllib.request.Request(base + path, method=method, headers=headers or {},
                                 data=json.dumps(body).encode() if body is not None else None)
    if body is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def expect(what, got, want):
    if got != want:
        sys.exit(f"{what}: got {got!r}, expected {want!r}")


status, h, body = call("/notes")
expect("GET /notes", (status, h["x-cache"], body), (200, "miss", {"notes": []}))
expect("RateLimit-Policy", h["ratelimit-policy"], '"burst";q=20;w=2')
expect("GET /notes again", call("/notes")[1]["x-cache"], "hit")
expect("POST /notes", call("/notes", "POST", {"text": "buy milk"})[::2], (201, {"id": 1, "invalidated": 1}))
status, h, body = call("/notes")
expect("GET /notes after the write", (h["x-cache"], body), ("miss", {"notes": [{"id": 1, "text": "buy milk"}]}))
expect("another tenant", call("/notes", headers={"x-tenant": "acme"})[2], {"notes": []})
expect("summary", call("/notes/1/summary")[2], {"words": 2, "longest": "milk"})
# One key until denied: a burst of 20, plus the 10/s refilled meanwhile.
start, allowed = time.monotonic(), 0
while (r := call("/notes", headers={"x-api-key": "burst"}))[0] == 200 and allowed < 500:
    allowed += 1
refilled = 10 * (time.monotonic() - start)
if not 20 <= allowed <= 21 + refilled:
    sys.exit(f"{allowed} allowed before a denial (burst 20, {refilled:.1f} refilled)")
status, h, body = r
expect("a denial", (status, body["error"], "retry-after" in h), (429, "rate_limited", True))
print(f"FastAPI example from the wheel: the README's requests answered as documented ({allowed} allowed, then 429)")
EOF
step 60 "the FastAPI example's requests" "$tmp/venv/bin/python" "$tmp/requests.py" "$port"
cat "$tmp/step.log"
echo "test-packages: ok ($((SECONDS - start)) s)"
