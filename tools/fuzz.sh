#!/bin/bash
# tools/fuzz.sh [SECONDS_PER_TARGET]: build the cargo-fuzz targets in fuzz/ and run each
# for a fixed time, starting from its seed corpus (fixtures/fuzz/<target>/, copied to a
# temp dir so the committed corpus never changes). Reports (tools/lib.sh `report`) per
# target PASS/FAIL with the executions and crashes; exits non-zero if any target
# crashed (or failed to build or run).
#
#   tools/fuzz.sh                      20 s per target (what tools/test runs)
#   FUZZ_SECONDS=3600 tools/fuzz.sh    a long run
#   FUZZ_TARGETS="pr_out pdu_decode" tools/fuzz.sh 60
#
# Crash inputs are kept in fuzz/artifacts/<target>/ (git-ignored); reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-...
# FUZZ_CORPUS_OUT=DIR keeps the grown corpora (DIR/<target>/) for a later minimisation.
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=address, sancov passes);
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. The build goes to
# ${CARGO_TARGET_DIR:-target}/fuzz-build, so it never disturbs the normal build.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
SECONDS_PER_TARGET=${1:-${FUZZ_SECONDS:-20}}
TARGETS=${FUZZ_TARGETS:-pdu_decode text_and_login cdb_dispatch pr_out cmdsn_and_transfer quorum_record target_conn initiator_conn}
export RUSTC_BOOTSTRAP=1
BUILD_DIR=${CARGO_TARGET_DIR:-$HF_ROOT/target}/fuzz-build
. "$HF_ROOT/tools/deps.sh"
[ "${NO_INSTALL:-0}" = 1 ] || deps_install fuzz >&2 || true
if ! deps_verify fuzz >&2; then
  report FAIL "fuzz" "cargo-fuzz missing or broken: cargo install --locked cargo-fuzz"
  exit 1
fi
make_tmpdir
cd "$HF_ROOT"

log "building fuzz targets (release, ASan, debug assertions) into $BUILD_DIR"
cargo fuzz build --target-dir "$BUILD_DIR" >"$HF_TMP/build.log" 2>&1 || {
  tail -n 40 "$HF_TMP/build.log"
  report FAIL "fuzz build" "cargo fuzz build failed"
  exit 1
}

FAILED=0
SUMMARY=()
for t in $TARGETS; do
  corpus=$HF_TMP/corpus/$t
  artifacts=$HF_ROOT/fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  if [ -d "fixtures/fuzz/$t" ]; then cp -r "fixtures/fuzz/$t/." "$corpus/"; fi
  seeds=$(find "$corpus" -type f | wc -l)
  before=$(find "$artifacts" -type f | wc -l)
  dict=()
  [ -f "fixtures/fuzz/$t.dict" ] && dict=("-dict=fixtures/fuzz/$t.dict")
  log "$t: ${SECONDS_PER_TARGET} s from $seeds seeds"
  rc=0
  # -timeout: an input running 25 s is a hang; the ASan/libFuzzer defaults otherwise.
  cargo fuzz run --target-dir "$BUILD_DIR" "$t" "$corpus" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=25 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${dict[@]}" >"$HF_TMP/$t.log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$HF_TMP/$t.log" | tail -n1)
  [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$HF_TMP/$t.log" | tail -n1)
  crashes=$(( $(find "$artifacts" -type f | wc -l) - before ))
  grown=$(find "$corpus" -type f | wc -l)
  detail="${execs:-?} executions in ${SECONDS_PER_TARGET} s, corpus $seeds -> $grown, crashes $crashes"
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    FAILED=1
    grep -E -m 20 'panicked at|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY|Test unit written' "$HF_TMP/$t.log" || tail -n 30 "$HF_TMP/$t.log"
    report FAIL "fuzz $t" "$detail; exit $rc; inputs in fuzz/artifacts/$t/"
    SUMMARY+=("FAIL $t: $detail")
  else
    report PASS "fuzz $t" "$detail"
    SUMMARY+=("$t: $detail")
  fi
  if [ -n "${FUZZ_CORPUS_OUT:-}" ]; then
    mkdir -p "$FUZZ_CORPUS_OUT/$t" && cp -r "$corpus/." "$FUZZ_CORPUS_OUT/$t/"
  fi
done
echo "== fuzz summary (${SECONDS_PER_TARGET} s per target)"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
