#!/bin/bash
# tools/vm-reload.sh
# The Linux kernel initiator (open-iscsi in the QEMU guest of ../shared/vm-initiator)
# through a live reload of holdfast (issue 12): the guest (tools/vm-reload/guest-reload.sh)
# logs in and writes LUN 0 with fio (O_DIRECT); meanwhile this script rewrites the
# target's config (LUN 0 32 MiB -> 48 MiB, LUN 1 added, an ACL entry added, the CHAP
# secret the guest logged in with rotated) and runs `holdfast target reload --socket`. The guest rescans, must see the new size and the new
# LUN with fio still running and ending without error, on the same session. Here,
# `holdfast target sessions --json` must show the guest's session with the same ISID and
# TSIH before the reload and after the guest's checks. Prints PASS/FAIL vm-reload/reload.
# Env: IO_SECONDS (fio runtime in the guest, default 40), VM_TIMEOUT (s), KEEP_TMP=1,
#      DROP_SESSION=1: self-check of the checks, the target is also killed (-9) and
#      started again right after the reload, so every session drops: must FAIL.
set -euo pipefail
HF_NAME=vm-reload
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VMI=$HF_SHARED/vm-initiator
GUEST_SCRIPT=$HF_ROOT/tools/vm-reload/guest-reload.sh
IQN=iqn.2026-11.org.holdfast:vm-reload
INITIATOR=iqn.2026-11.org.holdfast:guest
OTHER=iqn.2026-11.org.holdfast:added-by-reload
IO_SECONDS=${IO_SECONDS:-40}
CHAP_USER=guest
CHAP_SECRET=guest-secret-123
ROTATED_SECRET=rotated-secret-456

[ -x "$VMI/run-guest.sh" ] || die "$VMI/run-guest.sh missing (../shared beside the repository root)"
command -v jq >/dev/null || die "jq is required"

make_tmpdir
log "guest image (build-image.sh, cached)"
if ! run_tracked "$VMI/build-image.sh" ${VM_INITIATOR_DIR:+"$VM_INITIATOR_DIR"} >"$HF_TMP/build-image.log" 2>&1; then
  tail -n 20 "$HF_TMP/build-image.log" >&2
  report FAIL vm-reload/reload "guest image build failed"
  exit 1
fi

reserve_port PORT
CFG=$HF_TMP/holdfast.toml
SOCK=$HF_TMP/data/admin.sock
SHARE=$HF_TMP/share
mkdir -p "$SHARE"
# write_config LUN0_SIZE WITH_LUN1(0|1) CHAP_SECRET ACL_INITIATORS...
write_config() {
  local lun0=$1 lun1=$2 secret=$3 init
  shift 3
  {
    printf 'data_dir = "data"\n[[target]]\nname = "%s"\n' "$IQN"
    printf '[[target.portal]]\nlisten = "127.0.0.1:%s"\ntpgt = 1\n' "$PORT"
    printf '[[target.lun]]\nid = 0\npath = "lun0.img"\nsize = "%s"\n' "$lun0"
    [ "$lun1" = 1 ] && printf '[[target.lun]]\nid = 1\npath = "lun1.img"\nsize = "8MiB"\n'
    for init in "$@"; do printf '[[target.acl]]\ninitiator = "%s"\n' "$init"; done
    printf '[target.chap]\nusername = "%s"\nsecret = "%s"\n' "$CHAP_USER" "$secret"
  } >"$CFG.tmp"
  chmod 600 "$CFG.tmp" # it holds the CHAP secret
  mv "$CFG.tmp" "$CFG"
}
# guest_session: "ISID TSIH" of the guest's session(s) on the target
guest_session() {
  "$HOLDFAST_BIN" target sessions --socket "$SOCK" --json |
    jq -r --arg i "$INITIATOR" '[.sessions[] | select(.initiator == $i) | "\(.isid) \(.tsih)"] | join(",")'
}
write_config 32MiB 0 "$CHAP_SECRET" "$INITIATOR"
start_holdfast "$CFG" "$HF_TMP/holdfast.log" || { report FAIL vm-reload/reload "holdfast did not start"; exit 1; }
TARGET_PID=$HOLDFAST_PID

# host side of the handshake, in the background while the guest runs
host_side() {
  local before after out
  for _ in $(seq 1800); do [ -f "$SHARE/ready" ] || [ -f "$SHARE/failed" ] && break; sleep 0.1; done
  [ -f "$SHARE/ready" ] || { echo "host: no 'ready' from the guest"; return 1; }
  before=$(guest_session)
  echo "host: guest ready ($(tr '\n' ' ' <"$SHARE/ready")); target has session $before"
  write_config 48MiB 1 "$ROTATED_SECRET" "$INITIATOR" "$OTHER"
  out=$("$HOLDFAST_BIN" target reload --socket "$SOCK" 2>&1) || {
    echo "host: reload failed: $out"; : >"$SHARE/reloaded"; return 1; }
  echo "host: $out"
  local change
  for change in "LUN 0 grown from 33554432 to 50331648 bytes" "LUN 1 added" \
    "ACL entry $OTHER added" "CHAP credentials changed"; do
    grep -qF "$change" <<<"$out" || echo "the reload did not report '$change'" >"$SHARE/host-failed"
  done
  if [ "${DROP_SESSION:-0}" = 1 ]; then
    echo "host: DROP_SESSION=1: kill -9 of the target, started again"
    kill -KILL "$TARGET_PID"
    RUST_LOG=info "$HOLDFAST_BIN" target --config "$CFG" </dev/null >>"$HF_TMP/holdfast.log" 2>&1 &
    echo $! >"$HF_TMP/restarted.pid"
    for _ in $(seq 100); do port_listening "$PORT" && [ -S "$SOCK" ] && break; sleep 0.1; done
  fi
  : >"$SHARE/reloaded"
  for _ in $(seq 1800); do [ -f "$SHARE/checked" ] || [ -f "$SHARE/failed" ] && break; sleep 0.1; done
  [ -f "$SHARE/checked" ] || { echo "host: the guest did not finish its checks"; return 1; }
  after=$(guest_session)
  echo "host: after the guest's checks the target has session $after"
  if [ -z "$before" ] || [ "$before" != "$after" ] || [ "${before/,/}" != "$before" ]; then
    echo "guest session on the target was '$before', now '$after'" >"$SHARE/host-failed"
  fi
  : >"$SHARE/host-done"
  [ ! -f "$SHARE/host-failed" ]
}
host_side >"$HF_TMP/host-side.log" 2>&1 &
HOST_SIDE=$!
_HF_PIDS+=("$HOST_SIDE")

out=$HF_TMP/guest.log
log "guest boot (timeout ${VM_TIMEOUT:-$((IO_SECONDS + 240))}s, log $out)"
rc=0
run_tracked "$VMI/run-guest.sh" "$GUEST_SCRIPT" --portal-port "$PORT" \
  --timeout "${VM_TIMEOUT:-$((IO_SECONDS + 240))}" --initiator-name "$INITIATOR" --share "$SHARE" \
  --env "IQN=$IQN" --env "GROWN_BYTES=$(size_bytes 48MiB)" --env "NEW_LUN_BYTES=$(size_bytes 8MiB)" \
  --env "IO_SECONDS=$IO_SECONDS" --env "CHAP_USER=$CHAP_USER" --env "CHAP_SECRET=$CHAP_SECRET" \
  >"$out" 2>&1 </dev/null || rc=$?
: >"$SHARE/failed"   # releases host_side if the guest died early
host_rc=0; wait "$HOST_SIDE" || host_rc=$?
if [ -f "$HF_TMP/restarted.pid" ]; then
  # started by host_side's subshell, not a child here: the exit trap stops it
  wait "$TARGET_PID" 2>/dev/null || true
  _HF_PIDS+=("$(cat "$HF_TMP/restarted.pid")")
  TARGET_PID=""
fi
sed 's/^/    | /' "$out" "$HF_TMP/host-side.log"
log "guest finished, run-guest.sh status $rc; host side status $host_rc"

fails=0
line=$(grep -a "^CASE-RESULT reload " "$out" | tail -n1 || true)
case "$line" in
  "CASE-RESULT reload PASS"*)
    if [ "$host_rc" = 0 ]; then report PASS vm-reload/reload "${line#"CASE-RESULT reload PASS "}"
    else report FAIL vm-reload/reload "host side: $(tail -n1 "$HF_TMP/host-side.log")"; fails=1; fi ;;
  "CASE-RESULT reload FAIL"*) report FAIL vm-reload/reload "${line#"CASE-RESULT reload FAIL "}"; fails=1 ;;
  *) report FAIL vm-reload/reload "no result from the guest (run-guest.sh status $rc)"; fails=1 ;;
esac
if [ -n "$TARGET_PID" ] && ! stop_holdfast "$TARGET_PID"; then
  report FAIL vm-reload/holdfast-stop "holdfast did not exit 0 on SIGTERM"
  fails=1
fi
if [ "$fails" -ne 0 ]; then
  echo "holdfast log tail:"; tail -n 20 "$HF_TMP/holdfast.log" | sed 's/^/    /'
  exit 1
fi
