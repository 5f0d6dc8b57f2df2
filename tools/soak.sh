#!/usr/bin/env bash
# Soak: SOAK_SESSIONS (default 64) sessions doing mixed 4 KiB random I/O with periodic
# logout/login against the release target (a child process) for SECONDS (default
# SOAK_SECONDS or 120); fails if the target's RSS grows beyond a bound after warm-up
# or its fd count grows. Long mode:
#   SOAK_SECONDS=3600 SOAK_SESSIONS=256 tools/soak.sh
# Prints the RSS/fd figures; one PASS/FAIL line through lib.sh's report.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$HF_ROOT"
export SOAK_SECONDS="${1:-${SOAK_SECONDS:-120}}" SOAK_SESSIONS="${SOAK_SESSIONS:-64}"
cargo build --release --bin holdfast
rc=0
out=$(cargo test --release --test server -- soak:: --ignored --nocapture 2>&1) || rc=$?
printf '%s\n' "$out" | grep -E '^soak:|panicked|^test result' || printf '%s\n' "$out" | tail -n 40
figures=$(printf '%s\n' "$out" | grep -E '^soak: (RSS|fds)' | sed 's/^soak: //' | paste -sd';' -)
if [ "$rc" -eq 0 ]; then
  report PASS "soak ${SOAK_SESSIONS}x${SOAK_SECONDS}s" "$figures"
else
  report FAIL "soak ${SOAK_SESSIONS}x${SOAK_SECONDS}s" "exit $rc"
  exit 1
fi
