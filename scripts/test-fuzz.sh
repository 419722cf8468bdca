#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/: AFL++ through the `afl` crate, stable Rust)
# and runs each from its committed corpus for SECONDS, the targets side by
# side. Fails if a run finds a crash or a hang (by AFL++'s default, an input
# still running after 1 s), or no new input at all (which would mean the
# coverage feedback is missing). See fuzz/README.md.
# Installs Debian's afl++ if afl-fuzz is missing (apt-get, with sudo when
# not root).
# Usage: test-fuzz.sh [SECONDS]   (per target, default 5)
# Each run's findings stay in fuzz/out/<target>/ (replaced by the next run).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-5}"
targets=(decode config)

if ! command -v afl-fuzz >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y afl++
fi
# The runtime the targets link: forkserver, shared-memory input, the
# coverage map behind the sanitizer-coverage hooks. It comes with afl-fuzz,
# so the two always match (AFL_PATH is AFL++'s own name for its directory).
runtime="${AFL_PATH:-/usr/lib/afl}/afl-compiler-rt.o"
[ -f "$runtime" ] || { echo "no AFL++ runtime at $runtime: set AFL_PATH" >&2; exit 1; }

# The instrumentation `cargo afl build` adds (edge coverage by trace-pc-guard
# plus comparison operands), without needing cargo-afl or an AFL++ build of
# its own. An explicit --target keeps RUSTFLAGS off build scripts and proc
# macros: they run in the compiler, not in the target, and stay plain.
# Opt-levels and assertions are the root Cargo.toml's `fuzz` profile.
host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -C passes=sancov-module \
  -C llvm-args=-sanitizer-coverage-level=3 \
  -C llvm-args=-sanitizer-coverage-trace-pc-guard \
  -C llvm-args=-sanitizer-coverage-prune-blocks=0 \
  -C llvm-args=-sanitizer-coverage-trace-compares \
  -C link-arg=$runtime ${RUSTFLAGS:-}"
cargo build --locked --profile fuzz -p quotad-fuzz --target "$host"
bin="${CARGO_TARGET_DIR:-$PWD/../target}/$host/fuzz"

# No TTY UI, no core_pattern or CPU governor demands (CI machines), no CPU
# pinning (the targets run side by side).
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
pids=()
for t in "${targets[@]}"; do
  rm -rf "out/$t"
  mkdir -p out
  afl-fuzz -V "$seconds" -i "corpus/$t" -o "out/$t" -- "$bin/$t" >"out/$t.log" 2>&1 &
  pids+=($!)
done
field() { awk -v k="$1" '$1 == k {print $3}' "out/$2/default/fuzzer_stats"; }
failed=0
for i in "${!targets[@]}"; do
  t=${targets[$i]}
  if ! wait "${pids[$i]}"; then
    tail -n 20 "out/$t.log"; echo "fuzz $t: afl-fuzz failed (fuzz/out/$t.log)" >&2; failed=1; continue
  fi
  echo "fuzz $t: $(field execs_done "$t") execs in $(field run_time "$t") s," \
    "$(field corpus_found "$t") new inputs, $(field edges_found "$t") edges," \
    "$(field saved_crashes "$t") crashes, $(field saved_hangs "$t") hangs"
  if [ "$(field saved_crashes "$t")" != 0 ] || [ "$(field saved_hangs "$t")" != 0 ]; then
    echo "fuzz $t: see fuzz/out/$t/default/{crashes,hangs}/; replay one with $bin/$t < FILE" >&2
    failed=1
  elif [ "$(field corpus_found "$t")" = 0 ]; then
    echo "fuzz $t: no new input found: is the coverage feedback there?" >&2
    failed=1
  fi
done
exit "$failed"
