#!/usr/bin/env bash
# Crash-durability check: SIGKILL the release target under a write load, restart, and
# verify every acknowledged block. ROUNDS (default 5) and SEED (default 1) pass through.
#   ROUNDS=100 SEED=42 tools/kill-durability.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export ROUNDS="${ROUNDS:-5}" SEED="${SEED:-1}"
cargo build --release --bin holdfast
exec cargo test --release --test kill_durability -- --ignored --nocapture
