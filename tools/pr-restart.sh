#!/usr/bin/env bash
# APTPL survives SIGKILL: random PR OUT sequences (APTPL=1) against the target binary,
# SIGKILL at random moments (some with a command in flight), restart, compare READ KEYS /
# READ RESERVATION / READ FULL STATUS with a model. `cargo test` runs 20 rounds; this runs
# a long one. ROUNDS (default 500) and SEED (default random, printed) pass through.
#   ROUNDS=2000 SEED=42 tools/pr-restart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PR_RESTART_ROUNDS="${ROUNDS:-500}"
if [[ -n "${SEED:-}" ]]; then export PR_RESTART_SEED="$SEED"; fi
exec cargo test --release --test server -- pr_restart:: --nocapture
