#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/, AFL++ through `cargo afl`, stable Rust)
# and runs each for a few seconds from its committed corpus; fails if any
# run finds a crash. See fuzz/README.md. Installs what is missing: Debian's
# afl++ (apt-get) and cargo-afl (crates.io).
# Usage: test-fuzz.sh [SECONDS]   (per target, default 5)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-5}"
targets=(decode config)

if ! command -v afl-fuzz >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y afl++
fi
cargo afl --version >/dev/null 2>&1 || cargo install --locked cargo-afl
# AFL++'s runtime for this rustc (once per toolchain; a no-op afterwards).
cargo afl config --build >/dev/null 2>&1 || true

# Its own target dir: instrumented objects must not mix with the main build's.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
cargo afl build --locked --release
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# No TTY UI, no core_pattern or CPU governor demands (CI machines).
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
for t in "${targets[@]}"; do
  cargo afl fuzz -V "$seconds" -i "corpus/$t" -o "$out/$t" "$CARGO_TARGET_DIR/release/$t" >"$out/$t.log" 2>&1 || {
    tail -n 20 "$out/$t.log"; echo "fuzz $t: afl-fuzz failed" >&2; exit 1; }
  stats="$out/$t/default/fuzzer_stats"
  execs=$(awk '$1 == "execs_done" {print $3}' "$stats")
  crashes=$(awk '$1 == "saved_crashes" {print $3}' "$stats")
  echo "fuzz $t: $execs execs, $crashes crashes"
  if [ "$crashes" != 0 ]; then
    ls "$out/$t/default/crashes" >&2
    exit 1
  fi
done
