#!/bin/bash
# tools/fuzz-seeds.sh [OUTDIR]: capture real initiator traffic against holdfast and turn
# it into the fuzz seed corpora (default OUTDIR: fixtures/fuzz; existing files are kept,
# new ones added, duplicates skipped by content hash).
#
# Step 1 (libiscsi, qemu-img): starts holdfast with three targets on 127.0.0.1:3290-3292
# (open, one-way CHAP, mutual CHAP: the names and secrets fuzz/src/lib.rs expects),
# records loopback traffic on those ports with tcpdump, runs libiscsi tools (iscsi-ls,
# iscsi-inq, iscsi-readcapacity16, iscsi-test-cu for a few families, CHAP logins) and
# qemu-img (info, convert both ways), then runs tools/fuzz-seeds.py on the capture.
# Step 2 (optional, the Linux kernel initiator): the same three targets on
# 127.0.0.1:3295-3297, a second capture while the QEMU guest of
# ../shared/vm-initiator runs fixtures/guest/capture-open-iscsi.sh (open-iscsi:
# discovery, plain / CRC32C-digest / CHAP / mutual-CHAP / wrong-secret logins, sg_inq,
# sg_readcap, sg_persist sequences, dd O_DIRECT, mkfs.ext4, logout; slirp connects
# from 127.0.0.1, so the traffic is on lo), then fuzz-seeds.py --known (skips what the
# corpus already covers) with a byte budget for what this step adds.
# Env: SKIP_VM=1 skips step 2, SKIP_LIBISCSI=1 skips step 1; VM_BUDGET (bytes added by
#      step 2, default 450000), VM_TIMEOUT (s, default 600), VM_INITIATOR_DIR.
# Needs: tcpdump (root or CAP_NET_RAW), libiscsi-bin, qemu-utils + qemu-block-extra,
# python3; step 2 also ../shared/vm-initiator (image built: build-image.sh, cached).
# Not part of tools/test: the corpus is committed; rerun it when the protocol surface
# grows.
# fixtures/fuzz/quorum_record/ (no traffic: encoded quorum-LUN records) comes from
# HOLDFAST_WRITE_FUZZ_SEEDS=1 cargo test --test server -- quorum_fuzz_seeds:: instead.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"
OUT=${1:-$HF_ROOT/fixtures/fuzz}
VMI=$HF_SHARED/vm-initiator
GUEST_SCRIPT=$HF_ROOT/fixtures/guest/capture-open-iscsi.sh
make_tmpdir
need=(tcpdump python3)
[ "${SKIP_LIBISCSI:-0}" = 1 ] || need+=(iscsi-ls iscsi-inq iscsi-readcapacity16 iscsi-test-cu qemu-img)
for t in "${need[@]}"; do
  command -v "$t" >/dev/null || die "$t missing"
done
OPEN=iqn.2026-11.org.holdfast:fuzz-open
CHAP=iqn.2026-11.org.holdfast:fuzz-chap
MUTUAL=iqn.2026-11.org.holdfast:fuzz-mutual
kill_quietly() { kill "$1" 2>/dev/null || true; }

# write_config FILE BASE: the open, CHAP and mutual-CHAP targets on BASE..BASE+2
write_config() {
  local base=$1 file=$2 p
  for p in $base $((base + 1)) $((base + 2)); do
    ! port_listening "$p" || die "port $p is taken"
  done
  cat >"$file" <<TOML
data_dir = "data"

[[target]]
name = "$OPEN"
[[target.portal]]
listen = "127.0.0.1:$base"
[[target.lun]]
id = 0
path = "open0.img"
size = "16MiB"
[[target.lun]]
id = 1
path = "open1.img"
size = "64MiB"

[[target]]
name = "$CHAP"
[[target.portal]]
listen = "127.0.0.1:$((base + 1))"
[[target.lun]]
id = 0
path = "chap0.img"
size = "16MiB"
[target.chap]
username = "fuzzuser"
secret = "fuzz-initiator-secret"

[[target]]
name = "$MUTUAL"
[[target.portal]]
listen = "127.0.0.1:$((base + 2))"
[[target.lun]]
id = 0
path = "mutual0.img"
size = "16MiB"
[target.chap]
username = "fuzzuser"
secret = "fuzz-initiator-secret"
mutual_username = "fuzztarget"
mutual_secret = "fuzz-target-secret-2"
TOML
  chmod 600 "$file" # it holds CHAP secrets
}

# capture_start PCAP BASE / capture_stop: tcpdump on lo, ports BASE..BASE+2
capture_start() {
  local base=$2
  tcpdump -i lo -s 0 -U -w "$1" "tcp port $base or tcp port $((base + 1)) or tcp port $((base + 2))" \
    >>"$HF_TMP/tcpdump.log" 2>&1 &
  TCPDUMP_PID=$!
  on_exit kill_quietly "$TCPDUMP_PID"
  sleep 1
}
capture_stop() {
  sleep 1
  kill -INT "$TCPDUMP_PID" 2>/dev/null || true
  wait "$TCPDUMP_PID" 2>/dev/null || true
  log "capture $1: $(stat -c %s "$1") bytes"
}

# every tool may fail (an unsupported option, a test failing): the traffic is what counts
run() { log "$*"; timeout 120 "$@" >>"$HF_TMP/tools.log" 2>&1 || log "  (exit $?)"; }

# --- step 1: libiscsi and qemu-img ------------------------------------------------------
if [ "${SKIP_LIBISCSI:-0}" != 1 ]; then
  BASE=3290
  mkdir -p "$HF_TMP/libiscsi"
  write_config $BASE "$HF_TMP/libiscsi/holdfast.toml"
  PCAP=$HF_TMP/capture.pcap
  capture_start "$PCAP" $BASE
  start_holdfast "$HF_TMP/libiscsi/holdfast.toml" "$HF_TMP/holdfast.log"
  U=iscsi://127.0.0.1:$BASE/$OPEN
  run iscsi-ls -s "iscsi://127.0.0.1:$BASE"
  run iscsi-ls -s "iscsi://fuzzuser%fuzz-initiator-secret@127.0.0.1:$((BASE + 1))"
  run iscsi-inq "$U/0"
  run iscsi-inq -e 1 -c 0x00 "$U/1"
  run iscsi-inq -e 1 -c 0x80 "$U/1"
  run iscsi-inq -e 1 -c 0x83 "$U/1"
  run iscsi-inq -e 1 -c 0xb0 "$U/1"
  run iscsi-readcapacity16 "$U/1"
  run iscsi-inq "iscsi://127.0.0.1:$BASE/$OPEN/1?header_digest=crc32c"
  run iscsi-inq "iscsi://fuzzuser%fuzz-initiator-secret@127.0.0.1:$((BASE + 1))/$CHAP/0"
  run iscsi-inq "iscsi://fuzzuser%wrong-secret-000000@127.0.0.1:$((BASE + 1))/$CHAP/0"
  run iscsi-inq "iscsi://127.0.0.1:$((BASE + 1))/$CHAP/0"
  run iscsi-inq "iscsi://fuzzuser%fuzz-initiator-secret@127.0.0.1:$((BASE + 2))/$MUTUAL/0?target_user=fuzztarget&target_password=fuzz-target-secret-2"
  run iscsi-inq "iscsi://127.0.0.1:$BASE/iqn.2026-11.org.holdfast:no-such-target/0"
  for fam in SCSI.Inquiry SCSI.TestUnitReady SCSI.ModeSense6 SCSI.ReportSupportedOpcodes \
    SCSI.ReadCapacity16 SCSI.PrinReadKeys SCSI.PrinReportCapabilities SCSI.ProutRegister \
    SCSI.ProutReserve SCSI.ProutClear SCSI.ProutPreempt SCSI.Reserve6 SCSI.CompareAndWrite \
    SCSI.Unmap SCSI.GetLBAStatus SCSI.Verify16 SCSI.WriteSame16 SCSI.StartStopUnit \
    SCSI.PreventAllow iSCSI.iSCSIcmdsn iSCSI.iSCSIResiduals iSCSI.iSCSITMF; do
    run iscsi-test-cu -d -i iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test \
      -I iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2 -t "$fam" "$U/1" "$U/1"
  done
  head -c 1048576 /dev/urandom >"$HF_TMP/small.img"
  run qemu-img info "$U/0"
  run qemu-img convert -n -O raw "$HF_TMP/small.img" "$U/0"
  run qemu-img convert -O raw "$U/0" "$HF_TMP/back.img"
  stop_holdfast "$HOLDFAST_PID"
  capture_stop "$PCAP"
  python3 "$HF_ROOT/tools/fuzz-seeds.py" "$PCAP" "$OUT" "$BASE" $((BASE + 1)) $((BASE + 2))
fi

# --- step 2: open-iscsi in the vm-initiator guest ----------------------------------------
if [ "${SKIP_VM:-0}" = 1 ]; then
  log "SKIP_VM=1: no open-iscsi capture"
elif [ ! -x "$VMI/run-guest.sh" ]; then
  log "$VMI/run-guest.sh missing: no open-iscsi capture (SKIP_VM=1 silences this)"
else
  BASE=3295
  mkdir -p "$HF_TMP/vm"
  write_config $BASE "$HF_TMP/vm/holdfast.toml"
  log "guest image (build-image.sh, cached)"
  run_tracked "$VMI/build-image.sh" ${VM_INITIATOR_DIR:+"$VM_INITIATOR_DIR"} >"$HF_TMP/build-image.log" 2>&1 ||
    { tail -n 20 "$HF_TMP/build-image.log" >&2; die "build-image.sh failed"; }
  VMPCAP=$HF_TMP/capture-vm.pcap
  capture_start "$VMPCAP" $BASE
  start_holdfast "$HF_TMP/vm/holdfast.toml" "$HF_TMP/holdfast-vm.log"
  log "guest: $GUEST_SCRIPT (log $HF_TMP/guest.log)"
  rc=0
  run_tracked "$VMI/run-guest.sh" "$GUEST_SCRIPT" --portal-port $BASE \
    --timeout "${VM_TIMEOUT:-600}" --initiator-name iqn.2026-11.org.holdfast:fuzz-guest \
    ${VM_INITIATOR_DIR:+--image-dir "$VM_INITIATOR_DIR"} \
    --env OPEN_IQN="$OPEN" --env CHAP_IQN="$CHAP" --env MUTUAL_IQN="$MUTUAL" \
    --env PORT_CHAP=$((BASE + 1)) --env PORT_MUTUAL=$((BASE + 2)) \
    --env CHAP_USER=fuzzuser --env CHAP_SECRET=fuzz-initiator-secret \
    --env MUTUAL_USER=fuzztarget --env MUTUAL_SECRET=fuzz-target-secret-2 \
    >"$HF_TMP/guest.log" 2>&1 || rc=$?
  log "guest finished, run-guest.sh status $rc"
  [ "$rc" -eq 0 ] || tail -n 20 "$HF_TMP/guest.log" >&2
  stop_holdfast "$HOLDFAST_PID"
  capture_stop "$VMPCAP"
  [ -z "${VM_PCAP_COPY:-}" ] || cp "$VMPCAP" "$VM_PCAP_COPY"
  python3 "$HF_ROOT/tools/fuzz-seeds.py" --known --budget "${VM_BUDGET:-450000}" \
    "$VMPCAP" "$OUT" "$BASE" $((BASE + 1)) $((BASE + 2))
fi
du -sh "$OUT"
