#!/usr/bin/env bash
# Runs quotad's whole test suite. Every test that needs Redis or PostgreSQL
# starts its own server (Redis standalone, Sentinel or a 3-node Cluster;
# PostgreSQL) on spare ports or sockets and stops it; this script only makes
# sure the Debian packages that provide them are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# systemd-socket-activate and systemd-analyze (package systemd) run the
# socket-activation and unit tests; no systemd needs to be running.
# promtool (package prometheus) checks deploy/prometheus/alerts.yml and
# runs its unit tests; only promtool is used. afl-fuzz (package afl++)
# fuzzes the fuzz/ targets for a few seconds (scripts/test-fuzz.sh).
for tool in redis-server redis-cli redis-sentinel psql systemd-socket-activate promtool afl-fuzz; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y \
    redis-server redis-sentinel postgresql postgresql-client systemd prometheus afl++
fi

cargo test --locked
# The fuzz targets: an instrumented build of their own (fuzz/), then a few
# seconds of coverage-guided fuzzing each; a crash fails the suite.
echo "== Fuzz targets"
scripts/test-fuzz.sh 5
if [ -x scripts/test-clients.sh ]; then
  scripts/test-clients.sh
fi
# The READMEs' code blocks, run as a new user would; then the clients
# installed from their npm tarball and Python wheel.
echo "== READMEs"
python3 scripts/test-docs.py
echo "== Packages"
scripts/test-packages.sh
