#!/bin/bash
# tools/kernel-node/guest-node.sh: a cluster node inside the vm-initiator guest
# (../shared/vm-initiator/run-guest.sh runs it as root), whose VM writes through the
# Linux kernel initiator. Driven by tests/cluster/kernel_node.rs.
#
#   1. open-iscsi logs in as the node's VM initiator name (HF_VM_INITIATOR, written to
#      /etc/iscsi/initiatorname.iscsi) through TARGET_HOST:HF_DATA_PORT (the test's relay
#      to the target, default TARGET_PORT: the target itself);
#   2. the block device of LUN HF_LUN becomes HF_DEVICE (a symlink to /dev/sdX), the
#      path the node config's VM command (`holdfast guest run --device`) uses;
#   3. `holdfast agent --config SHARE/HF_CONFIG` runs from the host's build (copied from
#      the share to tmpfs, so a frozen or slow 9p share cannot stall its page-ins); its
#      own sessions use the repository's initiator over TCP to the portal of its config;
#   4. requests from the host, as files in the share:
#        probe-request (an epoch)  one write through the kernel device as that epoch
#                                  (`guest run --device --exit-after 1`); its exit
#                                  status goes to probe-rc, its ack log is probe-acks.log
#        guest-stop                stop the agent, save the kernel log, exit 0
#      Status lines go to SHARE/guest-status; the kernel log to SHARE/guest-dmesg.log.
#
# Env (run-guest.sh --env): HF_TARGET_IQN, HF_LUN, HF_VM_INITIATOR, HF_CONFIG (file
# name in the share), HF_DEVICE, HF_DATA_PORT, HF_SHARE (where --share is mounted, default /mnt/host).
set -euo pipefail
# run-guest.sh --share mounts the host folder here (VM_HOST_SHARE is not exported)
SHARE=${HF_SHARE:-/mnt/host}
mountpoint -q "$SHARE" || { echo "FAIL $SHARE is not mounted (run-guest.sh --share)"; exit 1; }
PORTAL="$TARGET_HOST:${HF_DATA_PORT:-$TARGET_PORT}"
RUN=/run/hf
STATUS=$SHARE/guest-status
mkdir -p "$RUN"

status() { echo "$*" | tee -a "$STATUS"; }
fail() { status "FAIL $*"; dmesg >"$SHARE/guest-dmesg.log" 2>&1 || true; exit 1; }

# --- 1. kernel initiator login as the node's VM initiator name -------------------------
echo "InitiatorName=$HF_VM_INITIATOR" >/etc/iscsi/initiatorname.iscsi
iscsid
for _ in $(seq 50); do rc=0; iscsiadm -m session >/dev/null 2>&1 || rc=$?; [ $rc -ne 20 ] && break; sleep 0.1; done
iscsiadm -m discovery -t sendtargets -p "$PORTAL" >/dev/null || fail "discovery through $PORTAL"
# The target answers SendTargets with its own address (127.0.0.1, the guest's loopback
# here): replace the node record by one through the portal we reached.
iscsiadm -m node -T "$HF_TARGET_IQN" -o delete >/dev/null 2>&1 || true
iscsiadm -m node -T "$HF_TARGET_IQN" -p "$PORTAL,1" -o new >/dev/null
# A thawed or fenced node must find out through the target, not give up on its own:
# keep commands queued across a dead connection until the session comes back.
iscsiadm -m node -T "$HF_TARGET_IQN" -p "$PORTAL" -o update \
  -n node.session.timeo.replacement_timeout -v 120 >/dev/null
iscsiadm -m node -T "$HF_TARGET_IQN" -p "$PORTAL" --login >/dev/null || fail "login as $HF_VM_INITIATOR"

# --- 2. the group's disk: the SCSI disk whose LUN is HF_LUN ----------------------------
dev=""
for _ in $(seq 100); do
  for d in /sys/class/scsi_disk/*:"$HF_LUN"; do
    [ -d "$d/device/block" ] || continue
    dev=$(ls "$d/device/block" | head -n1)
  done
  [ -n "$dev" ] && [ -b "/dev/$dev" ] && break
  dev=""
  sleep 0.1
done
[ -n "$dev" ] || fail "no block device for LUN $HF_LUN"
ln -sf "/dev/$dev" "$HF_DEVICE"
status "login $HF_VM_INITIATOR device /dev/$dev lun $HF_LUN"

# --- 3. the agent -----------------------------------------------------------------------
cp "$SHARE/holdfast" "$RUN/holdfast"
HOLDFAST_LOG=${HF_AGENT_LOG:-info,holdfast::initiator=warn} \
  "$RUN/holdfast" agent --config "$SHARE/$HF_CONFIG" 2>>"$SHARE/agent-guest.log" &
AGENT=$!
status "agent pid $AGENT"

# --- 4. requests from the host ---------------------------------------------------------
probe() {
  local epoch=$1 rc=0
  status "probe write as epoch $epoch"
  "$RUN/holdfast" guest run --device "$HF_DEVICE" --epoch "$epoch" --exit-after 1 \
    --interval 1ms --ack-log "$SHARE/probe-acks.log" 2>>"$SHARE/probe.log" || rc=$?
  dmesg >"$SHARE/guest-dmesg.log" 2>&1 || true
  echo "$rc" >"$SHARE/probe-rc.tmp"
  mv "$SHARE/probe-rc.tmp" "$SHARE/probe-rc"
  status "probe exit $rc"
}
while :; do
  if [ -f "$SHARE/probe-request" ]; then
    epoch=$(tr -dc '0-9' <"$SHARE/probe-request")
    rm -f "$SHARE/probe-request"
    probe "$epoch"
  fi
  if [ -f "$SHARE/guest-stop" ]; then
    break
  fi
  if [ -n "$AGENT" ] && ! kill -0 "$AGENT" 2>/dev/null; then status "agent exited"; AGENT=""; fi
  sleep 0.2
done
if [ -n "$AGENT" ]; then
  kill -TERM "$AGENT" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$AGENT" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$AGENT" 2>/dev/null || true
fi
dmesg >"$SHARE/guest-dmesg.log" 2>&1 || true
status "stopped"
