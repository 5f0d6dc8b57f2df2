#!/usr/bin/env bash
# Crash-durability check: SIGKILL the release target under load, restart, and verify.
# Two tests, run one after the other:
#   kill_durability          writes only: every acknowledged block survives
#   kill_durability_mixed_pr writes on LUN 0 + APTPL PR OUT (REGISTER/RESERVE/RELEASE/
#                            unregister) on LUN 1: every acknowledged block and every
#                            acknowledged APTPL registration survives
# ROUNDS (default 5) and SEED (default 1) pass through.
#   ROUNDS=100 SEED=42 tools/kill-durability.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export ROUNDS="${ROUNDS:-5}" SEED="${SEED:-1}"
cargo build --release --bin holdfast
exec cargo test --release --test server -- kill_durability:: --ignored --nocapture --test-threads=1
