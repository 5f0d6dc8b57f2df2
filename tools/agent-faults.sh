#!/usr/bin/env bash
# Randomized agent faults, long mode: tests/cluster/agent_faults.rs (a target, three
# `holdfast agent`s and a test guest per group, as processes) in release mode. Each round
# draws a fault from a seeded RNG (kill -9 of a node, SIGSTOP 1-6 s, SIGTERM restart of
# an agent, kill -9 of the target, `ctl move`) and waits for the cluster to settle; at
# the end `holdfast guest check` must be clean for every group. `cargo test` runs 16
# rounds with a fixed seed; this runs ROUNDS (default 200, ~8 min) with SEED
# (default random, printed). KEEP_CLUSTER=1 keeps the cluster's files (events.jsonl,
# agentN.log, ack logs) and prints where.
#   ROUNDS=200 SEED=20261122 tools/agent-faults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export FAULT_ROUNDS="${ROUNDS:-200}"
export FAULT_SEED="${SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
echo "agent-faults: FAULT_SEED=$FAULT_SEED FAULT_ROUNDS=$FAULT_ROUNDS" >&2
exec cargo test --release --test cluster -- agent_faults:: --nocapture
