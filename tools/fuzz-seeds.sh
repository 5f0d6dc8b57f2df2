#!/bin/bash
# tools/fuzz-seeds.sh [OUTDIR]: capture real initiator traffic against holdfast and turn
# it into the fuzz seed corpora (default OUTDIR: fixtures/fuzz; existing files are kept,
# new ones added, duplicates skipped by content hash).
#
# Starts target/release/holdfast with three targets on 127.0.0.1:3290-3292 (open,
# one-way CHAP, mutual CHAP: the names and secrets fuzz/src/lib.rs expects), records
# loopback traffic on those ports with tcpdump, runs libiscsi tools (iscsi-ls,
# iscsi-inq, iscsi-readcapacity16, iscsi-test-cu for a few families, CHAP logins) and
# qemu-img (info, convert both ways), then runs tools/fuzz-seeds.py on the capture.
# Needs: tcpdump (root or CAP_NET_RAW), libiscsi-bin, qemu-utils + qemu-block-extra,
# python3. Not part of tools/test: the corpus is committed; rerun it when the protocol
# surface grows.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
OUT=${1:-$HF_ROOT/fixtures/fuzz}
make_tmpdir
for t in tcpdump iscsi-ls iscsi-inq iscsi-readcapacity16 iscsi-test-cu qemu-img python3; do
  command -v "$t" >/dev/null || die "$t missing"
done
BASE=3290
OPEN=iqn.2026-11.org.holdfast:fuzz-open
CHAP=iqn.2026-11.org.holdfast:fuzz-chap
MUTUAL=iqn.2026-11.org.holdfast:fuzz-mutual
for p in $BASE $((BASE + 1)) $((BASE + 2)); do
  ! port_listening "$p" || die "port $p is taken"
done
cat >"$HF_TMP/holdfast.toml" <<TOML
data_dir = "data"

[[target]]
name = "$OPEN"
[[target.portal]]
listen = "127.0.0.1:$BASE"
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
listen = "127.0.0.1:$((BASE + 1))"
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
listen = "127.0.0.1:$((BASE + 2))"
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
PCAP=$HF_TMP/capture.pcap
tcpdump -i lo -s 0 -U -w "$PCAP" "tcp port $BASE or tcp port $((BASE + 1)) or tcp port $((BASE + 2))" \
  >"$HF_TMP/tcpdump.log" 2>&1 &
TCPDUMP_PID=$!
on_exit kill_quietly "$TCPDUMP_PID"
kill_quietly() { kill "$1" 2>/dev/null || true; }
sleep 1
start_holdfast "$HF_TMP/holdfast.toml" "$HF_TMP/holdfast.log"
U=iscsi://127.0.0.1:$BASE/$OPEN
# every tool may fail (an unsupported option, a test failing): the traffic is what counts
run() { log "$*"; timeout 120 "$@" >>"$HF_TMP/tools.log" 2>&1 || log "  (exit $?)"; }
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
stop_holdfast
sleep 1
kill -INT "$TCPDUMP_PID" 2>/dev/null || true
wait "$TCPDUMP_PID" 2>/dev/null || true
log "capture: $(stat -c %s "$PCAP") bytes"
python3 "$HF_ROOT/tools/fuzz-seeds.py" "$PCAP" "$OUT" "$BASE" $((BASE + 1)) $((BASE + 2))
du -sh "$OUT"
