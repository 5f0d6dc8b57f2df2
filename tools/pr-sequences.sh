#!/bin/bash
# tools/pr-sequences.sh
# The persistent-reservation sequences real cluster stacks send, against a freshly
# started holdfast, every step checked (exit status and output):
#   pr-sequences/fence-scsi   Pacemaker fence_scsi through `holdfast pr` (LUN 0): two
#                             nodes unfence (REGISTER AND IGNORE, the first RESERVEs
#                             type 5), node1 fences node2 (PREEMPT AND ABORT), node2's
#                             writes get RESERVATION CONFLICT, node2 unfences again
#   pr-sequences/windows      Windows failover-cluster validation through `holdfast pr`
#                             (LUN 1): CLEAR, per-node registration, RESERVE (WE-RO),
#                             "held by me" vs "held by another", the other node's
#                             RESERVE conflicts, PREEMPT, RELEASE, unregister (key 0)
#   pr-sequences/guest-*      the same two sequences from the Linux kernel initiator
#                             (sg_persist, two open-iscsi ifaces) in the
#                             ../shared/vm-initiator guest, one boot
#                             (fixtures/guest/pr-sequences.sh); SKIP_VM=1 leaves it out
# Each node is a fixed (initiator name, ISID) pair, so that one invocation's REGISTER
# and the next one's RESERVE come from the same I_T nexus.
# Env: SKIP_VM=1, VM_TIMEOUT (s, default 300), KEEP_TMP=1, HOLDFAST_BIN.
set -euo pipefail
HF_NAME=pr-sequences
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IQN=iqn.2026-11.org.holdfast:pr-sequences
GUEST_SCRIPT=$HF_ROOT/fixtures/guest/pr-sequences.sh
VMI=$HF_SHARED/vm-initiator

make_tmpdir
PORT=""
reserve_port PORT
write_holdfast_config "$HF_TMP/holdfast.toml" "$PORT" "$IQN" 64MiB
if ! start_holdfast "$HF_TMP/holdfast.toml" "$HF_TMP/holdfast.log"; then
  for s in fence-scsi windows; do report FAIL "pr-sequences/$s" "holdfast did not start"; done
  exit 1
fi

# --- step helpers ----------------------------------------------------------------
# A sequence runs its steps in order and stops at the first failure, remembered in
# STEP_FAILED; run_sequence reports PASS or FAIL with that step.
STEP_FAILED=""
OUT=""
LUN=0
FAILS=0
fail_report() { report FAIL "$@"; FAILS=$((FAILS + 1)); }

# pr_as NODE_NAME ISID ARGS...: `holdfast pr` on $LUN as that node; stdout in $OUT
pr_as() {
  local name=$1 isid=$2 rc=0; shift 2
  "$HOLDFAST_BIN" pr "iscsi://127.0.0.1:$PORT/$IQN/$LUN" --initiator-name "$name" --isid "$isid" "$@" \
    >"$HF_TMP/out" 2>"$HF_TMP/err" || rc=$?
  OUT=$(cat "$HF_TMP/out")
  printf '    $ holdfast pr ... %s   [as %s] -> exit %s\n' "$*" "$name" "$rc" >>"$HF_TMP/steps.log"
  sed 's/^/      | /' "$HF_TMP/out" "$HF_TMP/err" >>"$HF_TMP/steps.log"
  return "$rc"
}

# expect RC DESCRIPTION NODE ARGS...: the step must exit with RC
expect() {
  local want=$1 desc=$2 node=$3 rc=0; shift 3
  [ -z "$STEP_FAILED" ] || return 1
  "$node" "$@" || rc=$?
  if [ "$rc" != "$want" ]; then
    STEP_FAILED="$desc: exit $rc, expected $want: $(tr '\n' ' ' <"$HF_TMP/err")"
    log "FAILED step: $STEP_FAILED"
    return 1
  fi
  log "ok: $desc (exit $rc)"
}

# out_has DESCRIPTION PATTERN / out_lacks DESCRIPTION PATTERN: about the last step's stdout
out_has() {
  [ -z "$STEP_FAILED" ] || return 1
  if ! grep -Eq -- "$2" <<<"$OUT"; then
    STEP_FAILED="$1: output lacks /$2/: $(tr '\n' ' ' <<<"$OUT")"
    log "FAILED step: $STEP_FAILED"
    return 1
  fi
}
out_lacks() {
  [ -z "$STEP_FAILED" ] || return 1
  if grep -Eq -- "$2" <<<"$OUT"; then
    STEP_FAILED="$1: output has /$2/: $(tr '\n' ' ' <<<"$OUT")"
    log "FAILED step: $STEP_FAILED"
    return 1
  fi
}

run_sequence() {
  local name=$1 fn=$2
  STEP_FAILED=""
  : >"$HF_TMP/steps.log"
  log "sequence $name"
  "$fn" || true
  if [ -z "$STEP_FAILED" ]; then
    report PASS "pr-sequences/$name"
  else
    sed 's/^/  /' "$HF_TMP/steps.log" >&2
    fail_report "pr-sequences/$name" "$STEP_FAILED"
  fi
}

# --- (a) Pacemaker fence_scsi -------------------------------------------------------
# fence_scsi keys: a cluster-derived prefix and the node id (here 3abe000N).
node1() { pr_as iqn.2026-11.org.holdfast:fence-node1 0x400001000001 "$@"; }
node2() { pr_as iqn.2026-11.org.holdfast:fence-node2 0x400002000001 "$@"; }
K1=0x3abe0001 K2=0x3abe0002

seq_fence_scsi() {
  LUN=0
  # unfence node1: register-and-ignore; no reservation yet, so it reserves (type 5)
  expect 0 "node1 unfence: register-ignore" node1 register-ignore --sa-key "$K1" || return
  expect 0 "node1 unfence: read-reservation" node1 read-reservation || return
  out_has "no reservation before the first unfence" "there is NO reservation held" || return
  expect 0 "node1 unfence: reserve WE-RO" node1 reserve --key "$K1" --type write-exclusive-registrants-only || return
  # unfence node2: register-and-ignore; the reservation exists, so no reserve
  expect 0 "node2 unfence: register-ignore" node2 register-ignore --sa-key "$K2" || return
  expect 0 "node2 unfence: read-reservation" node2 read-reservation || return
  out_has "node2 sees node1's reservation" "Key=$K1" || return
  out_has "reservation type is WE-RO" "type: Write Exclusive, registrants only" || return
  expect 0 "read-keys after unfence" node1 read-keys || return
  out_has "read-keys lists node1" "^ +$K1\$" || return
  out_has "read-keys lists node2" "^ +$K2\$" || return
  out_has "read-keys counts 2" "2 registered reservation keys follow" || return
  expect 0 "node2 (registrant) writes" node2 write-test --lba 16 || return
  # fence node2
  expect 0 "node1 fences node2: preempt-abort" node1 preempt-abort --key "$K1" --sa-key "$K2" --type 5 || return
  expect 0 "verify: read-keys" node1 read-keys --json || return
  out_has "node1 still registered" "\"$K1\"" || return
  out_lacks "node2's key is gone" "\"$K2\"" || return
  expect 24 "fenced node2's write gets RESERVATION CONFLICT" node2 write-test --lba 16 || return
  expect 0 "verify: read-reservation" node1 read-reservation --key "$K1" --json || return
  out_has "node1 still holds the reservation" '"held_by_key":true' || return
  out_has "still WE-RO" '"type":"write-exclusive-registrants-only"' || return
  expect 24 "fenced node2 cannot preempt back (not registered)" node2 preempt-abort --key "$K2" --sa-key "$K1" --type 5 || return
  # node2 rejoins: unfence again
  expect 0 "node2 re-unfence: register-ignore" node2 register-ignore --sa-key "$K2" || return
  expect 0 "read-keys after re-unfence" node2 read-keys || return
  out_has "node2 registered again" "^ +$K2\$" || return
  expect 0 "re-unfenced node2 writes" node2 write-test --lba 16 || return
  # leave the LUN clean for the guest's run of the same sequence
  expect 0 "cleanup: clear" node1 clear --key "$K1" || return
  expect 0 "read-keys after cleanup" node1 read-keys || return
  out_has "no keys after cleanup" "there are NO registered reservation keys" || return
}

# --- (b) Windows failover-cluster validation -------------------------------------
win1() { pr_as iqn.1991-05.com.microsoft:win-node1 0x400001370000 "$@"; }
win2() { pr_as iqn.1991-05.com.microsoft:win-node2 0x400001370000 "$@"; }
W1=0x57494e3100000001 W2=0x57494e3200000002

seq_windows() {
  LUN=1
  # start clean: register, then CLEAR removes every registration and reservation
  expect 0 "node1 register-ignore" win1 register-ignore --sa-key "$W1" || return
  expect 0 "node1 clear" win1 clear --key "$W1" || return
  expect 0 "read-keys after clear" win1 read-keys || return
  out_has "no keys after clear" "there are NO registered reservation keys" || return
  # per-node registration, node1 reserves
  expect 0 "node1 register-ignore" win1 register-ignore --sa-key "$W1" || return
  expect 0 "node2 register-ignore" win2 register-ignore --sa-key "$W2" || return
  expect 0 "node1 reserve WE-RO" win1 reserve --key "$W1" --type we-ro || return
  expect 0 "node1 read-reservation" win1 read-reservation --key "$W1" || return
  out_has "node1: held by me" "held by this key" || return
  expect 0 "node2 read-reservation" win2 read-reservation --key "$W2" || return
  out_has "node2: held by another" "held by another key" || return
  expect 24 "node2 reserve conflicts" win2 reserve --key "$W2" --type we-ro || return
  # arbitration: node2 takes over by PREEMPT
  expect 0 "node2 preempts node1" win2 preempt --key "$W2" --sa-key "$W1" --type we-ro || return
  expect 0 "node2 read-reservation" win2 read-reservation --key "$W2" --json || return
  out_has "node2: held by me" '"held_by_key":true' || return
  expect 0 "read-keys after preempt" win2 read-keys || return
  out_lacks "node1's key preempted" "$W1" || return
  out_has "node2's key remains" "$W2" || return
  expect 24 "preempted node1's reserve conflicts" win1 reserve --key "$W1" --type we-ro || return
  # cleanup: release, unregister with key 0
  expect 0 "node2 release" win2 release --key "$W2" --type we-ro || return
  expect 0 "read-reservation after release" win2 read-reservation || return
  out_has "no reservation after release" "there is NO reservation held" || return
  expect 0 "node2 unregister (register-ignore, key 0)" win2 register-ignore --sa-key 0 || return
  expect 0 "node1 unregister (register-ignore, key 0)" win1 register-ignore --sa-key 0 || return
  expect 0 "read-keys at the end" win1 read-keys || return
  out_has "no keys at the end" "there are NO registered reservation keys" || return
}

run_sequence fence-scsi seq_fence_scsi
run_sequence windows seq_windows

# --- (c) the Linux kernel initiator in the guest ------------------------------------
GUEST_CASES="fence-scsi windows"
if [ "${SKIP_VM:-0}" = 1 ]; then
  for c in $GUEST_CASES; do report SKIP "pr-sequences/guest-$c" "SKIP_VM=1"; done
elif [ ! -x "$VMI/run-guest.sh" ]; then
  for c in $GUEST_CASES; do fail_report "pr-sequences/guest-$c" "$VMI/run-guest.sh missing"; done
else
  log "guest image (build-image.sh, cached)"
  if ! run_tracked "$VMI/build-image.sh" ${VM_INITIATOR_DIR:+"$VM_INITIATOR_DIR"} >"$HF_TMP/build-image.log" 2>&1; then
    tail -n 20 "$HF_TMP/build-image.log" >&2
    for c in $GUEST_CASES; do fail_report "pr-sequences/guest-$c" "guest image build failed"; done
  else
    out=$HF_TMP/guest.log rc=0
    log "guest boot: cases '$GUEST_CASES' (log $out)"
    run_tracked "$VMI/run-guest.sh" "$GUEST_SCRIPT" --portal-port "$PORT" --timeout "${VM_TIMEOUT:-300}" \
      --initiator-name iqn.2026-11.org.holdfast:pr-guest \
      --env "CASES=$GUEST_CASES" --env "IQN=$IQN" >"$out" 2>&1 </dev/null || rc=$?
    sed 's/^/    | /' "$out"
    log "guest finished, run-guest.sh status $rc"
    for c in $GUEST_CASES; do
      line=$(grep -a "^CASE-RESULT $c " "$out" | tail -n1 || true)
      case "$line" in
        "CASE-RESULT $c PASS"*) report PASS "pr-sequences/guest-$c" ;;
        "CASE-RESULT $c FAIL"*) fail_report "pr-sequences/guest-$c" "${line#"CASE-RESULT $c FAIL "}" ;;
        *) fail_report "pr-sequences/guest-$c" "no result from the guest (run-guest.sh status $rc)" ;;
      esac
    done
  fi
fi

if ! stop_holdfast "$HOLDFAST_PID"; then
  fail_report "pr-sequences/holdfast-stop" "holdfast did not exit 0 on SIGTERM"
fi
[ "$FAILS" -eq 0 ]
