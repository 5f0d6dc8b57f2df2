#!/bin/bash
# tools/vm-multipath.sh
# The Linux kernel initiator with dm-multipath across two holdfast gateways on one RBD
# image: starts a throwaway Ceph cluster (tools/ceph-up.sh), creates an image, starts two
# `holdfast target` gateways on it (127.0.0.1, two ports; tpgt and ALUA group 1 and 2),
# boots the vm-initiator guest built with multipath-tools and runs
# fixtures/guest/multipath.sh in it: both paths, one map in two priority groups, ext4,
# fio randwrite with crc32c verify. Once the guest says I/O runs, this script kill -9s the
# gateway whose path carries the writes; fio must finish clean through the other one,
# the dead path must show failed, e2fsck -fn must be clean. Prints PASS/FAIL
# vm-multipath/failover with the I/O stall (fio's longest write completion latency).
# KILL_BOTH=1 (self-check of the checks: both gateways are killed, so I/O has no path
# left; fio fails once no_path_retry runs out) must FAIL.
# Env: FIO_SIZE (256M), VM_TIMEOUT (guest, s; 600), VM_MPATH_IMAGE_DIR (guest image
#      with multipath-tools; ~/.cache/vm-initiator-mpath), KEEP_TMP=1.
set -euo pipefail
HF_NAME=vm-multipath
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VMI=$HF_SHARED/vm-initiator
GUEST_SCRIPT=$HF_ROOT/fixtures/guest/multipath.sh
IMAGE_DIR=${VM_MPATH_IMAGE_DIR:-$HOME/.cache/vm-initiator-mpath}
IQN=iqn.2026-11.org.holdfast:mpath
INITIATOR=iqn.2026-11.org.holdfast:mpath-guest
LUN_SIZE=1GiB
NAME=vm-multipath/failover

[ -x "$VMI/run-guest.sh" ] || die "$VMI/run-guest.sh missing (../shared beside the repository root)"
[ -f "$GUEST_SCRIPT" ] || die "$GUEST_SCRIPT missing"
fail_exit() { report FAIL "$NAME" "$1"; exit 1; }

make_tmpdir
# a separate image dir: the stock image has no multipath-tools (cached after the first
# build, ~70 s; build-image.sh needs root)
log "guest image with multipath-tools in $IMAGE_DIR (build-image.sh, cached)"
EXTRA_PACKAGES=multipath-tools run_tracked "$VMI/build-image.sh" "$IMAGE_DIR" \
  >"$HF_TMP/build-image.log" 2>&1 || { tail -n 20 "$HF_TMP/build-image.log" >&2; fail_exit "guest image build failed"; }

CEPH_DIR=$HF_TMP/ceph
on_exit "$HF_ROOT/tools/ceph-down.sh" "$CEPH_DIR"
log "starting a Ceph cluster in $CEPH_DIR"
"$HF_ROOT/tools/ceph-up.sh" "$CEPH_DIR" >"$HF_TMP/ceph-up.log" 2>&1 ||
  { tail -n 30 "$HF_TMP/ceph-up.log" >&2; fail_exit "tools/ceph-up.sh failed"; }
IMAGE=holdfast/mpath-$$
rbd -c "$CEPH_DIR/ceph.conf" create --size "$(($(size_bytes "$LUN_SIZE") >> 20))M" "$IMAGE" ||
  fail_exit "rbd create $IMAGE failed"

declare -A PORT PID
for n in 1 2; do
  reserve_port "PORT[$n]"
  rbd_gateway_config "$HF_TMP/gw$n/holdfast.toml" "$n" "${PORT[$n]}" "$CEPH_DIR/ceph.conf" \
    "$IQN" "$LUN_SIZE" "$IMAGE"
  start_holdfast "$HF_TMP/gw$n/holdfast.toml" "$HF_TMP/gw$n/holdfast.log" || fail_exit "gateway $n did not start"
  PID[$n]=$HOLDFAST_PID
done

# log_lock_holder: logs the image's RBD lock holder whenever it changes (once a
# second), so the log shows when the lock moved after the kill
log_lock_holder() {
  local prev=- cur
  while :; do
    cur=$(rbd -c "$CEPH_DIR/ceph.conf" lock ls "$IMAGE" 2>/dev/null | awk 'NR > 2 {printf "%s %s ", $1, $NF}')
    [ "$cur" = "$prev" ] || log "rbd lock holder: ${cur:-none}"
    prev=$cur
    sleep 1
  done
}
log_lock_holder &
on_exit kill "$!"

# kill_active: waits for the guest's io-running file, kill -9s the gateway on the port
# it names, then tells the guest (killed)
kill_active() {
  local share=$1 guest=$2 port n
  while [ ! -e "$share/io-running" ]; do
    kill -0 "$guest" 2>/dev/null || return 0
    sleep 0.2
  done
  port=$(sed -n 's/^PORT=\([0-9]*\)$/\1/p' "$share/io-running")
  for n in 1 2; do
    [ "${PORT[$n]}" = "$port" ] || continue
    log "guest I/O running: kill -9 gateway $n (pid ${PID[$n]}, port $port, the path carrying the I/O)"
    kill -KILL "${PID[$n]}"
    wait "${PID[$n]}" 2>/dev/null || true
    KILLED=$n
    if [ "${KILL_BOTH:-0}" = 1 ]; then
      log "KILL_BOTH=1: kill -9 gateway $((3 - n)) too (pid ${PID[$((3 - n))]})"
      kill -KILL "${PID[$((3 - n))]}"
    fi
    date +%s.%N >"$share/killed"
    return 0
  done
  log "guest named port '$port', which is no gateway's"
}

SHARE=$HF_TMP/share
mkdir -p "$SHARE"
OUT=$HF_TMP/guest.log
KILLED=""
log "guest boot (log $OUT)"
setsid "$VMI/run-guest.sh" "$GUEST_SCRIPT" --image-dir "$IMAGE_DIR" --udev \
  --share "$SHARE:/mnt/host" --env HOST_SHARE=/mnt/host --portal-port "${PORT[1]}" \
  --timeout "${VM_TIMEOUT:-600}" --initiator-name "$INITIATOR" \
  --env "IQN=$IQN" --env LUN=0 --env "PORT_A=${PORT[1]}" --env "PORT_B=${PORT[2]}" \
  --env "FIO_SIZE=${FIO_SIZE:-256M}" >"$OUT" 2>&1 </dev/null &
GUEST=$!
stop_guest() { kill -TERM -- "-$1" 2>/dev/null || true; }
on_exit stop_guest "$GUEST"
T_RUN=$(date +%s)
kill_active "$SHARE" "$GUEST"
rc=0
wait "$GUEST" || rc=$?
sed 's/^/    | /' "$OUT"
log "guest finished after $(($(date +%s) - T_RUN)) s, run-guest.sh status $rc"

line=$(grep -a '^CASE-RESULT multipath ' "$OUT" | tail -n1 || true)
stall=$(sed -n 's/^STALL-MS \([0-9]*\).*/\1/p' "$OUT" | tail -n1)
survivor=$((3 - ${KILLED:-0}))
if [ -z "$KILLED" ]; then
  report FAIL "$NAME" "no gateway killed (guest: ${line:-no result}, status $rc)"
elif [ "$line" = "CASE-RESULT multipath PASS" ] && [ "$rc" = 0 ]; then
  if stop_holdfast "${PID[$survivor]}"; then
    report PASS "$NAME" "gateway $KILLED killed mid-fio, I/O continued through gateway $survivor, verify and e2fsck clean, stall ${stall:-?} ms"
    exit 0
  fi
  report FAIL "$NAME" "surviving gateway $survivor did not stop cleanly"
elif [ -n "$line" ]; then
  report FAIL "$NAME" "${line#CASE-RESULT multipath FAIL }, run-guest.sh status $rc"
else
  report FAIL "$NAME" "no result from the guest (run-guest.sh status $rc)"
fi
for n in 1 2; do
  echo "gateway $n log tail:"
  tail -n 20 "$HF_TMP/gw$n/holdfast.log" | sed 's/^/    /'
done
exit 1
