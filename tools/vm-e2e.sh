#!/bin/bash
# tools/vm-e2e.sh
# The Linux kernel initiator (open-iscsi in the QEMU guest of ../shared/vm-initiator)
# against holdfast. Three holdfast instances, each with its own config and port:
#   plain   no CHAP                      -> cases plain (mkfs + mount + fio verify
#                                           FIO_RUNTIME s) and digests (CRC32C)
#   chap    one-way CHAP                 -> cases chap, badchap (wrong secret) and
#                                           nochap (no credentials: must be refused)
#   mutual  mutual CHAP                  -> case mutual
# Two guest boots (fixtures/guest/iscsi-cases.sh): "plain digests", then
# "chap mutual badchap nochap". Prints PASS/FAIL per case (vm-e2e/<case>).
# Env: QUICK=1 (fio 10 s instead of 60 s), FIO_RUNTIME, VM_CASES_1 / VM_CASES_2
#      (override the case lists; empty = skip that boot), VM_TIMEOUT (per boot, s),
#      VM_INITIATOR_DIR (image dir), KEEP_TMP=1.
set -euo pipefail
HF_NAME=vm-e2e
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VMI=$HF_SHARED/vm-initiator
GUEST_SCRIPT=$HF_ROOT/fixtures/guest/iscsi-cases.sh
IQN=iqn.2026-11.org.holdfast:vm
INITIATOR=iqn.2026-11.org.holdfast:guest
LUN_SIZE=1GiB
CHAP_USER=guest
CHAP_SECRET=guest-secret-123
MUTUAL_USER=target
MUTUAL_SECRET=target-secret-456
if [ "${QUICK:-0}" = 1 ]; then FIO_RUNTIME=${FIO_RUNTIME:-10}; else FIO_RUNTIME=${FIO_RUNTIME:-60}; fi
CASES_1=${VM_CASES_1-plain digests}
CASES_2=${VM_CASES_2-chap mutual badchap nochap}

[ -x "$VMI/run-guest.sh" ] || die "$VMI/run-guest.sh missing (../shared beside the repository root)"
[ -f "$GUEST_SCRIPT" ] || die "$GUEST_SCRIPT missing"

make_tmpdir
# guest image: build-image.sh is idempotent (<1 s when up to date), needs root to build
log "guest image (build-image.sh, cached)"
if ! run_tracked "$VMI/build-image.sh" ${VM_INITIATOR_DIR:+"$VM_INITIATOR_DIR"} >"$HF_TMP/build-image.log" 2>&1; then
  tail -n 20 "$HF_TMP/build-image.log" >&2
  for c in $CASES_1 $CASES_2; do report FAIL "vm-e2e/$c" "guest image build failed"; done
  exit 1
fi
declare -A PORT
for kind in plain chap mutual; do
  reserve_port "PORT[$kind]"
  cfg=$HF_TMP/$kind/holdfast.toml
  mkdir -p "$HF_TMP/$kind"
  write_holdfast_config "$cfg" "${PORT[$kind]}" "$IQN" "$LUN_SIZE"
  case "$kind" in
    chap) printf '\n[target.chap]\nusername = "%s"\nsecret = "%s"\n' "$CHAP_USER" "$CHAP_SECRET" >>"$cfg" ;;
    mutual) printf '\n[target.chap]\nusername = "%s"\nsecret = "%s"\nmutual_username = "%s"\nmutual_secret = "%s"\n' \
              "$CHAP_USER" "$CHAP_SECRET" "$MUTUAL_USER" "$MUTUAL_SECRET" >>"$cfg" ;;
  esac
  chmod 600 "$cfg" # it holds the CHAP secret
done

declare -A PID
started=1
for kind in plain chap mutual; do
  if start_holdfast "$HF_TMP/$kind/holdfast.toml" "$HF_TMP/$kind/holdfast.log"; then
    PID[$kind]=$HOLDFAST_PID
  else
    started=0
  fi
done
if [ "$started" = 0 ]; then
  for c in $CASES_1 $CASES_2; do report FAIL "vm-e2e/$c" "holdfast did not start"; done
  exit 1
fi

fails=0
# run_boot CASES TIMEOUT: one guest boot running CASES; reports each case
run_boot() {
  local cases=$1 timeout=$2 out rc=0 c line
  [ -n "$cases" ] || return 0
  out=$HF_TMP/guest-$(tr ' ' '-' <<<"$cases").log
  log "guest boot: cases '$cases' (timeout ${timeout}s, log $out)"
  run_tracked "$VMI/run-guest.sh" "$GUEST_SCRIPT" --portal-port "${PORT[plain]}" --timeout "$timeout" \
    --initiator-name "$INITIATOR" \
    --env "CASES=$cases" --env "IQN=$IQN" --env LUN=1 --env "LUN_BYTES=$(size_bytes "$LUN_SIZE")" \
    --env "PORT_PLAIN=${PORT[plain]}" --env "PORT_CHAP=${PORT[chap]}" --env "PORT_MUTUAL=${PORT[mutual]}" \
    --env "CHAP_USER=$CHAP_USER" --env "CHAP_SECRET=$CHAP_SECRET" \
    --env "MUTUAL_USER=$MUTUAL_USER" --env "MUTUAL_SECRET=$MUTUAL_SECRET" \
    --env "FIO_RUNTIME=$FIO_RUNTIME" --env FIO_SHORT=10 \
    >"$out" 2>&1 </dev/null || rc=$?
  sed 's/^/    | /' "$out"
  log "guest boot finished, run-guest.sh status $rc"
  for c in $cases; do
    line=$(grep -a "^CASE-RESULT $c " "$out" | tail -n1 || true)
    case "$line" in
      "CASE-RESULT $c PASS"*) report PASS "vm-e2e/$c" "${line#"CASE-RESULT $c PASS "}" ;;
      "CASE-RESULT $c FAIL"*) report FAIL "vm-e2e/$c" "${line#"CASE-RESULT $c FAIL "}"; fails=$((fails + 1)) ;;
      *) report FAIL "vm-e2e/$c" "no result from the guest (run-guest.sh status $rc)"; fails=$((fails + 1)) ;;
    esac
  done
}

# boot ~10 s, plain: mkfs + fio FIO_RUNTIME + fsck, digests: fio 10 s; TCG is slow
run_boot "$CASES_1" "${VM_TIMEOUT:-$((FIO_RUNTIME + 300))}"
run_boot "$CASES_2" "${VM_TIMEOUT:-300}"

for kind in plain chap mutual; do
  if ! kill -0 "${PID[$kind]}" 2>/dev/null; then
    report FAIL "vm-e2e/holdfast-$kind-alive" "holdfast ($kind) died during the guest runs"
    fails=$((fails + 1))
  elif ! stop_holdfast "${PID[$kind]}"; then
    report FAIL "vm-e2e/holdfast-$kind-stop" "holdfast ($kind) did not exit 0 on SIGTERM"
    fails=$((fails + 1))
  fi
done
if [ "$fails" -ne 0 ]; then
  for kind in plain chap mutual; do
    echo "holdfast ($kind) log tail:"; tail -n 15 "$HF_TMP/$kind/holdfast.log" | sed 's/^/    /'
  done
  exit 1
fi
