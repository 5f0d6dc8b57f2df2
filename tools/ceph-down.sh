#!/bin/bash
# tools/ceph-down.sh DIR: stop the cluster tools/ceph-up.sh started in DIR and remove
# DIR. Idempotent: a missing DIR or already-dead daemons are fine.
set -uo pipefail
DIR=${1:?usage: ceph-down.sh DIR}
[ -d "$DIR" ] || exit 0
pids=()
for f in "$DIR"/run/*.pid; do
  [ -e "$f" ] || continue
  pid=$(cat "$f" 2>/dev/null) || continue
  # Only a ceph daemon whose command line names this cluster's config: a stale pid file
  # must not kill an unrelated process that reused the pid.
  if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$DIR/ceph.conf"; then
    kill "$pid" 2>/dev/null && pids+=("$pid")
  fi
done
for _ in $(seq 50); do
  alive=()
  # a zombie (state Z) is dead: its parent just has not reaped it yet
  for p in "${pids[@]}"; do
    [ -d "/proc/$p" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$p/stat" 2>/dev/null && alive+=("$p")
  done
  [ ${#alive[@]} -eq 0 ] && break
  sleep 0.2
done
for p in "${alive[@]}"; do kill -9 "$p" 2>/dev/null; done
# the watchdog of CEPH_OWNER_PID, if any, may race us here: rm -rf of a gone DIR is fine
rm -rf "$DIR"
