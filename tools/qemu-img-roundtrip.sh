#!/bin/bash
# tools/qemu-img-roundtrip.sh
# Starts holdfast (LUN 1 = 1 GiB, fresh data dir in a temp dir), then with
# libiscsi-based clients (QEMU's iscsi:// block driver and libiscsi-bin):
#   - iscsi-ls -s lists the target with LUN 0 and LUN 1 (direct-access)
#   - iscsi-inq: standard INQUIRY says direct-access; VPD 0x80 (serial) and
#     0x83 (device identification, with an NAA designator) answer
#   - iscsi-readcapacity16: total size = the configured 1 GiB, sane block length
#   - qemu-img convert -n writes 256 MiB of random data into LUN 1; reading the
#     whole LUN back gives the same 256 MiB (cmp) and zeros after it
#   - holdfast exits 0 on SIGTERM
# Env: RT_SIZE_MIB (default 256), KEEP_TMP=1.
set -euo pipefail
HF_NAME=qemu-img-roundtrip
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IQN=iqn.2026-11.org.holdfast:roundtrip
LUN=1
LUN_SIZE=1GiB
LUN_BYTES=$(size_bytes "$LUN_SIZE")
MIB=${RT_SIZE_MIB:-256}
for c in qemu-img iscsi-ls iscsi-inq iscsi-readcapacity16 cmp; do
  command -v "$c" >/dev/null || die "$c missing (apt-get install qemu-utils qemu-block-extra libiscsi-bin)"
done

make_tmpdir
PORT=""
reserve_port PORT
write_holdfast_config "$HF_TMP/holdfast.toml" "$PORT" "$IQN" "$LUN_SIZE"
start_holdfast "$HF_TMP/holdfast.toml" "$HF_TMP/holdfast.log" || {
  report FAIL qemu-img-roundtrip "holdfast did not start"; exit 1; }
PORTAL=127.0.0.1:$PORT
URL=iscsi://$PORTAL/$IQN/$LUN

fails=0
check() {   # check NAME CMD...   (runs CMD, prints ok/FAILED)
  local name=$1; shift
  if "$@"; then echo "  ok      $name"; else echo "  FAILED  $name"; fails=$((fails + 1)); fi
}

# --- discovery / inquiry / capacity ----------------------------------------------
ls_ok() {
  local out
  out=$(iscsi-ls -s "iscsi://$PORTAL" 2>&1) || { echo "$out"; return 1; }
  awk '{print "    " $0}' <<<"$out"
  grep -q "^Target:$IQN Portal:" <<<"$out" &&
    grep -Eq '^Lun:0[[:space:]]' <<<"$out" &&
    grep -Eq '^Lun:1[[:space:]]+Type:DIRECT_ACCESS \(Size:' <<<"$out"
}
inq_ok() {
  local std serial devid
  std=$(iscsi-inq "$URL" 2>&1) || { echo "$std"; return 1; }
  grep -E '^(Peripheral Device Type|Vendor|Product|Revision):' <<<"$std" | sed 's/^/    /'
  grep -q '^Peripheral Device Type:DIRECT_ACCESS' <<<"$std" || return 1
  grep -Eq '^Vendor:.*[^[:space:]]' <<<"$std" || return 1
  serial=$(iscsi-inq -e 1 -c 128 "$URL" 2>&1) || { echo "$serial"; return 1; }
  echo "    $serial"
  grep -Eq '^Unit Serial Number:\[ *[^] ]' <<<"$serial" || return 1
  devid=$(iscsi-inq -e 1 -c 131 "$URL" 2>&1) || { echo "$devid"; return 1; }
  grep -q 'Designator Type:(3) NAA' <<<"$devid" || { echo "$devid"; return 1; }
  echo "    VPD 0x83: $(grep -c '^DEVICE DESIGNATOR' <<<"$devid") designator(s), NAA present"
}
cap_ok() {
  local out blk lba total
  out=$(iscsi-readcapacity16 "$URL" 2>&1) || { echo "$out"; return 1; }
  blk=$(awk -F: '/^LOGICAL BLOCK LENGTH IN BYTES/{print $2}' <<<"$out")
  lba=$(awk -F: '/^RETURNED LOGICAL BLOCK ADDRESS/{print $2}' <<<"$out")
  total=$(awk -F: '/^Total size/{print $2}' <<<"$out")
  echo "    block length $blk, last LBA $lba, total $total bytes (configured $LUN_BYTES)"
  case "$blk" in 512|4096) ;; *) return 1 ;; esac
  [ "$total" = "$LUN_BYTES" ] && [ $(((lba + 1) * blk)) -eq "$LUN_BYTES" ]
}
echo "== iscsi-ls / iscsi-inq / iscsi-readcapacity16 on $URL"
check "iscsi-ls -s lists $IQN with LUN 0 and LUN 1" ls_ok
check "iscsi-inq: direct-access, vendor, VPD 0x80 serial, VPD 0x83 NAA" inq_ok
check "iscsi-readcapacity16: size = $LUN_SIZE" cap_ok

# --- qemu-img write / read back --------------------------------------------------
echo "== qemu-img round trip, $MIB MiB"
head -c $((MIB << 20)) /dev/urandom >"$HF_TMP/in.bin"
write_ok() {
  local t0 t1
  t0=$(date +%s.%N)
  # -n: the target exists (do not create it); the raw format writes at offset 0
  qemu-img convert -n -f raw -O raw "$HF_TMP/in.bin" "$URL" || return 1
  t1=$(date +%s.%N)
  echo "    wrote $MIB MiB in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') s"
}
read_ok() {
  local t0 t1
  rm -f "$HF_TMP/out.bin"
  t0=$(date +%s.%N)
  qemu-img convert -f raw -O raw "$URL" "$HF_TMP/out.bin" || return 1
  t1=$(date +%s.%N)
  echo "    read back the whole LUN ($(stat -c %s "$HF_TMP/out.bin") bytes) in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') s"
  [ "$(stat -c %s "$HF_TMP/out.bin")" -eq "$LUN_BYTES" ]
}
same_ok() {
  cmp -n $((MIB << 20)) "$HF_TMP/in.bin" "$HF_TMP/out.bin" &&
    echo "    sha256 $(sha256sum <"$HF_TMP/in.bin" | cut -c1-16)… identical"
}
rest_zero_ok() {
  cmp -n $((LUN_BYTES - (MIB << 20))) <(tail -c +$(((MIB << 20) + 1)) "$HF_TMP/out.bin") /dev/zero
}
if check "qemu-img convert -n FILE $URL" write_ok; then
  if check "qemu-img convert $URL OUT" read_ok; then
    check "first $MIB MiB read back byte-identical" same_ok
    check "never-written rest of the fresh LUN reads as zeros" rest_zero_ok
  fi
fi
rm -f "$HF_TMP/in.bin" "$HF_TMP/out.bin"

if kill -0 "$HOLDFAST_PID" 2>/dev/null; then
  check "holdfast exits 0 on SIGTERM" stop_holdfast "$HOLDFAST_PID"
else
  echo "  FAILED  holdfast died during the test"; fails=$((fails + 1))
fi

if [ "$fails" -eq 0 ]; then
  report PASS qemu-img-roundtrip "$MIB MiB through iscsi://, capacity, inquiry"
else
  echo "holdfast log tail:"; tail -n 20 "$HF_TMP/holdfast.log" | sed 's/^/    /'
  report FAIL qemu-img-roundtrip "$fails check(s) failed"
  exit 1
fi
