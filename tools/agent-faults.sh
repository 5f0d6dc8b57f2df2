#!/usr/bin/env bash
# Randomized agent faults, long mode: tests/cluster/agent_faults.rs (a target, three
# `holdfast agent`s in their own network namespaces and a test guest per group, as
# processes). Each round draws a fault from a seeded RNG (kill -9 of a node, SIGSTOP
# 1-6 s, SIGTERM restart of an agent, a partition of a node 0.3-8 s, a target outage
# 0.5-15 s, `ctl move`) and waits for the cluster to settle; at the end `holdfast guest
# check` must be clean for every group. `cargo test` runs 16 rounds with a fixed seed;
# this runs ROUNDS rounds (default 200) for each of several seeds. Needs root (network
# namespaces).
#
#   SEED=20261122 tools/agent-faults.sh            one seed
#   SEEDS="1 2 3" ROUNDS=50 tools/agent-faults.sh  these seeds
#   RUNS=10 ROUNDS=50 tools/agent-faults.sh        10 random seeds (the default: 1)
#   FOR=3600 ROUNDS=40 tools/agent-faults.sh       random seeds until an hour has passed
#
# Each run's output goes to LOGDIR/seed-SEED.log (LOGDIR default
# target/agent-faults/DATE). A failed run keeps its cluster's files (events.jsonl,
# agentN.log, ack logs; the log names the directory); a clean one's are removed.
# After a failure the next seeds still run (KEEP_GOING=0: stop). The summary lists
# rounds x seeds clean and each failing seed with its first panic line; the exit status
# is 1 if any run failed. PROFILE=dev uses the debug build (default: release).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-200}"
logdir="${LOGDIR:-target/agent-faults/$(date -u +%Y%m%dT%H%M%SZ)}"
profile=(--release)
[ "${PROFILE:-release}" = dev ] && profile=()
mkdir -p "$logdir"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
cargo test "${profile[@]}" --test cluster --no-run

random_seed() { od -An -N4 -tu4 /dev/urandom | tr -d ' '; }

clean=0
failed=()
run_one() {
    local seed="$1" log="$logdir/seed-$1.log" kept
    echo "agent-faults: FAULT_SEED=$seed FAULT_ROUNDS=$rounds -> $log" >&2
    if FAULT_SEED="$seed" FAULT_ROUNDS="$rounds" KEEP_CLUSTER=1 \
        cargo test "${profile[@]}" --test cluster -- \
        agent_faults::random_faults --nocapture >"$log" 2>&1; then
        clean=$((clean + 1))
        kept=$(sed -n 's/^cluster files kept in //p' "$log")
        [ -n "$kept" ] && rm -rf "$kept"
        grep -h '^agent_faults: FAULT_SEED=.* rounds in' "$log" >&2 || true
    else
        failed+=("$seed: $(grep -m1 -A1 'panicked at' "$log" | tail -1)")
        echo "agent-faults: FAULT_SEED=$seed FAILED; see $log" >&2
        [ "${KEEP_GOING:-1}" = 1 ] || return 1
    fi
}

if [ -n "${SEED:-}" ]; then
    seeds=("$SEED")
elif [ -n "${SEEDS:-}" ]; then
    read -r -a seeds <<<"$SEEDS"
elif [ -z "${FOR:-}" ]; then
    seeds=()
    for _ in $(seq "${RUNS:-1}"); do seeds+=("$(random_seed)"); done
fi
status=0
if [ -n "${FOR:-}" ] && [ -z "${SEED:-}${SEEDS:-}" ]; then
    end=$(($(date +%s) + FOR))
    while [ "$(date +%s)" -lt "$end" ]; do
        run_one "$(random_seed)" || { status=1; break; }
    done
else
    for s in "${seeds[@]}"; do
        run_one "$s" || { status=1; break; }
    done
fi
echo "agent-faults: $rounds rounds x $clean seeds clean, ${#failed[@]} failed (logs in $logdir)"
for f in "${failed[@]}"; do echo "  FAILED FAULT_SEED=$f"; done
[ "${#failed[@]}" -eq 0 ] && [ "$status" -eq 0 ]
