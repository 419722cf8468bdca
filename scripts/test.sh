#!/usr/bin/env bash
# Runs quotad's whole test suite. Every test that needs Redis starts its own
# redis-server (standalone, Sentinel, or a 3-node Cluster) on spare ports or
# sockets and stops it; this script only makes sure the Debian packages that
# provide them are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null \
  || ! command -v redis-sentinel >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y redis-server redis-sentinel
fi

cargo test --locked
