#!/bin/bash
# tools/vm-reload/guest-reload.sh: the kernel initiator through a live reload of the
# target (../shared/vm-initiator/run-guest.sh runs it as root; tools/vm-reload.sh is the
# host side). Handshake through files in the share:
#   1. open-iscsi logs in (CHAP), fio writes LUN 0 (O_DIRECT) in the background;
#   2. guest -> host: "ready" (session id, size of LUN 0);
#   3. the host grows LUN 0, adds LUN 1 and an ACL entry, rotates the CHAP secret, reloads; host -> guest: "reloaded";
#   4. with fio still running: `iscsiadm -m session --rescan`, LUN 0 has the new size and
#      LUN 1 is there (lsscsi); fio ends without error; same session id, no connection
#      error or recovery in the kernel log (nothing logged in again);
#   5. guest -> host: "checked"; the host compares its own session list; host -> guest:
#      "host-done"; then logout.
# Prints "CASE-RESULT reload PASS|FAIL [reason]".
# Env: IQN, CHAP_USER, CHAP_SECRET, GROWN_BYTES (LUN 0 after the reload), NEW_LUN_BYTES (LUN 1), IO_SECONDS.
set -uo pipefail
SHARE=/mnt/host
PORTAL="$TARGET_HOST:$TARGET_PORT"
say() { echo "guest: $*"; }
fail() {
  echo "CASE-RESULT reload FAIL $*"
  dmesg >"$SHARE/guest-dmesg.log" 2>&1 || true
  echo "$*" >"$SHARE/failed"
  exit 1
}
# wait_file NAME SECONDS
wait_file() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do [ -f "$SHARE/$1" ] && return 0; sleep 0.1; done
  return 1
}
mountpoint -q "$SHARE" || fail "$SHARE is not mounted (run-guest.sh --share)"

# --- 1. login, background writer ----------------------------------------------------
iscsid
for _ in $(seq 50); do rc=0; iscsiadm -m session >/dev/null 2>&1 || rc=$?; [ $rc -ne 20 ] && break; sleep 0.1; done
iscsiadm -m discovery -t st -p "$PORTAL" >/dev/null || fail "discovery through $PORTAL"
iscsiadm -m node -T "$IQN" -o delete >/dev/null 2>&1 || true
iscsiadm -m node -T "$IQN" -p "$PORTAL,1" -o new >/dev/null
iscsiadm -m node -T "$IQN" -p "$PORTAL" -o update -n node.session.auth.authmethod -v CHAP >/dev/null
iscsiadm -m node -T "$IQN" -p "$PORTAL" -o update -n node.session.auth.username -v "$CHAP_USER" >/dev/null
iscsiadm -m node -T "$IQN" -p "$PORTAL" -o update -n node.session.auth.password -v "$CHAP_SECRET" >/dev/null
iscsiadm -m node -T "$IQN" -p "$PORTAL" --login >/dev/null || fail "login (CHAP)"
dev=""
for _ in $(seq 100); do
  for d in /sys/class/scsi_disk/*:0; do
    [ -d "$d/device/block" ] && dev=$(ls "$d/device/block" | head -n1)
  done
  [ -n "$dev" ] && [ -b "/dev/$dev" ] && break
  dev=""; sleep 0.1
done
[ -n "$dev" ] || fail "no block device for LUN 0"
# session ids (iscsiadm's [N]); ISID and TSIH are checked on the host, from the target
sid_of() { iscsiadm -m session | sed -n 's/^tcp: \[\([0-9]*\)\].*/\1/p' | xargs echo; }
sid0=$(sid_of)
size0=$(blockdev --getsize64 "/dev/$dev")
# the same session, never dropped: same ids, no connection error or recovery logged
session_kept() {
  local sid1
  sid1=$(sid_of)
  [ "$sid1" = "$sid0" ] || fail "session ids changed: [$sid0] -> [$sid1]"
  dmesg >"$SHARE/guest-dmesg.log" 2>&1 || true
  if grep -E "conn error|detected conn|session recovery|reinstat" "$SHARE/guest-dmesg.log"; then
    fail "the kernel log shows a connection error or recovery"
  fi
}
say "logged in: session [$sid0], LUN 0 = /dev/$dev, $size0 bytes"

fio --eta=never --name=live --filename="/dev/$dev" --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
  --size="$size0" --time_based --runtime="$IO_SECONDS" --output="$SHARE/fio.txt" &
FIO=$!
sleep 2
kill -0 "$FIO" 2>/dev/null || fail "fio ended at once: $(tail -n 5 "$SHARE/fio.txt")"
printf 'sid=%s\nsize=%s\n' "$sid0" "$size0" >"$SHARE/ready.tmp"
mv "$SHARE/ready.tmp" "$SHARE/ready"

# --- 3. the host reloads ---------------------------------------------------------------
wait_file reloaded 120 || fail "no 'reloaded' from the host"
kill -0 "$FIO" 2>/dev/null || fail "fio ended before the reload: I/O did not span it"
say "host reloaded while fio runs; rescanning"

# --- 4. rescan, new size, new LUN --------------------------------------------------------
iscsiadm -m session --rescan >/dev/null || fail "iscsiadm -m session --rescan"
session_kept
size1=""
for _ in $(seq 100); do
  size1=$(blockdev --getsize64 "/dev/$dev")
  [ "$size1" = "$GROWN_BYTES" ] && break
  sleep 0.1
done
[ "$size1" = "$GROWN_BYTES" ] || fail "LUN 0 is $size1 bytes after the rescan, want $GROWN_BYTES"
lsscsi | sed 's/^/guest: lsscsi: /'
new=""
for _ in $(seq 100); do
  for d in /sys/class/scsi_disk/*:1; do
    [ -d "$d/device/block" ] && new=$(ls "$d/device/block" | head -n1)
  done
  [ -n "$new" ] && [ -b "/dev/$new" ] && break
  new=""; sleep 0.1
done
[ -n "$new" ] || fail "LUN 1 not seen after iscsiadm -m session --rescan"
lsscsi | grep -q ":1\] *disk" || fail "lsscsi does not list LUN 1"
[ "$(blockdev --getsize64 "/dev/$new")" = "$NEW_LUN_BYTES" ] || fail "LUN 1 size $(blockdev --getsize64 "/dev/$new")"
kill -0 "$FIO" 2>/dev/null || fail "fio ended before the rescan finished: I/O did not span it"
say "LUN 0 now $size1 bytes, LUN 1 = /dev/$new; fio still running"
# the grown part is readable through the same session
dd if="/dev/$dev" of=/dev/null bs=1M skip=$((size0 >> 20)) iflag=direct status=none \
  || fail "reading the grown part of LUN 0"
rc=0; wait "$FIO" || rc=$?
[ "$rc" = 0 ] || fail "fio exit $rc: $(grep -i err "$SHARE/fio.txt" | head -n 3)"
grep -q "err= 0" "$SHARE/fio.txt" || fail "fio reported errors: $(grep -i 'err=' "$SHARE/fio.txt")"
session_kept

# --- 5. the host checks its side -----------------------------------------------------------
: >"$SHARE/checked"
wait_file host-done 60 || fail "no 'host-done' from the host"
[ -f "$SHARE/host-failed" ] && fail "host: $(cat "$SHARE/host-failed")"
iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout >/dev/null || true
echo "CASE-RESULT reload PASS LUN 0 $size0 -> $size1 bytes and LUN 1 seen after rescan under fio, CHAP secret rotated, session [$sid0] kept"
