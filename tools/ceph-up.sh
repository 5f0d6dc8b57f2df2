#!/bin/bash
# tools/ceph-up.sh DIR: start a throwaway Ceph cluster on loopback, all state in DIR.
#
# One monitor (127.0.0.1, a free port), one mgr, three memstore OSDs (objects in RAM:
# nothing touches a disk), a replicated pool `holdfast` (size 2) initialised for RBD, and
# the cephx user client.holdfast with the caps a gateway needs (profile rbd on the
# monitor includes `osd blocklist add`, which later fencing of gateways needs).
# Daemons are started by hand (no systemd). Writes DIR/ceph.conf, DIR/ceph.client.admin.keyring,
# DIR/ceph.client.holdfast.keyring and DIR/env (CEPH_CONF=..., for `ceph`/`rbd`).
# tools/ceph-down.sh DIR stops it. Env: CEPH_MON_PORT (default: a free port),
# CEPH_POOL (default holdfast), CEPH_MEMSTORE_BYTES (per OSD, default 1 GiB; RAM is
# used only as objects are written), CEPH_OWNER_PID (tear the cluster down once that
# process is gone: a test process that shares one cluster among its tests).
set -euo pipefail
DIR=${1:?usage: ceph-up.sh DIR}
POOL=${CEPH_POOL:-holdfast}
MEMSTORE=${CEPH_MEMSTORE_BYTES:-1073741824}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
say() { printf '[ceph-up] %s\n' "$*" >&2; }
die() { say "error: $*"; [ -d "$DIR/log" ] && tail -n 20 "$DIR"/log/*.log >&2 || true; exit 1; }
[ ! -e "$DIR/ceph.conf" ] || die "$DIR already holds a cluster (tools/ceph-down.sh $DIR first)"
for c in ceph-mon ceph-osd ceph-mgr ceph ceph-authtool monmaptool rbd uuidgen; do
  command -v "$c" >/dev/null || die "$c missing (tools/deps.sh: ceph-mon ceph-osd ceph-mgr ceph-common)"
done

if [ -n "${CEPH_OWNER_PID:-}" ]; then
  # detached from our stdout/stderr, so a caller reading them to EOF is not held up
  setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" "$3"' \
    watchdog "$CEPH_OWNER_PID" "$(dirname "$0")/ceph-down.sh" "$DIR" </dev/null >/dev/null 2>&1 &
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=${CEPH_MON_PORT:-$(free_port)}
FSID=$(uuidgen)
mkdir -p "$DIR"/{run,log,mon,mgr}

# Everything (sockets, logs, pids, data) under DIR, so several clusters can coexist.
cat >"$DIR/ceph.conf" <<EOF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$PORT
public addr = 127.0.0.1
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/ceph.\$name.keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
pid file = $DIR/run/\$name.pid
mon data = $DIR/mon/\$name
mgr data = $DIR/mgr/\$name
osd data = $DIR/osd/\$name
osd objectstore = memstore
memstore device bytes = $MEMSTORE
osd pool default size = 2
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool delete = true
mon warn on pool no redundancy = false
auth allow insecure global id reclaim = false
# a full /tmp on a shared CI machine must not stop a throwaway monitor
mon data avail warn = 0
mon data avail crit = 0
ms bind msgr1 = false
# every OSD is on this one host: without this, the monitor needs reports from two hosts
# and never marks a hung (SIGSTOPped) OSD down
mon osd min down reporters = 1
# small machine: keep the daemons lean
osd op num shards = 1
osd op num threads per shard = 1

[osd]
osd crush update on start = true
EOF

CONF=(-c "$DIR/ceph.conf")
say "monitor on 127.0.0.1:$PORT (fsid $FSID)"
ceph-authtool --create-keyring "$DIR/ceph.mon.a.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$DIR/ceph.client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$DIR/ceph.mon.a.keyring" --import-keyring "$DIR/ceph.client.admin.keyring" >/dev/null
monmaptool --create --addv a "[v2:127.0.0.1:$PORT]" --fsid "$FSID" "$DIR/monmap" >/dev/null
ceph-mon "${CONF[@]}" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/ceph.mon.a.keyring" \
  >"$DIR/log/mkfs-mon.log" 2>&1 || die "ceph-mon --mkfs failed: $(tail -n 3 "$DIR/log/mkfs-mon.log")"
cp "$DIR/ceph.mon.a.keyring" "$DIR/mon/mon.a/keyring"
ceph-mon "${CONF[@]}" -i a || die "ceph-mon did not start"
ceph "${CONF[@]}" --connect-timeout 20 mon stat >/dev/null || die "monitor does not answer"

say "mgr"
mkdir -p "$DIR/mgr/mgr.x"
ceph "${CONF[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
  -o "$DIR/ceph.mgr.x.keyring"
ceph-mgr "${CONF[@]}" -i x || die "ceph-mgr did not start"

start_osd() {
  local uuid id d
  uuid=$(uuidgen)
  id=$(ceph "${CONF[@]}" osd new "$uuid")
  d="$DIR/osd/osd.$id"
  mkdir -p "$d"
  # --mkkey writes the OSD's key to its keyring path ($DIR/ceph.osd.N.keyring)
  ceph-osd "${CONF[@]}" -i "$id" --mkfs --mkkey --osd-uuid "$uuid" --no-mon-config \
    >"$DIR/log/mkfs-osd.$id.log" 2>&1 || die "ceph-osd --mkfs $id failed"
  ceph "${CONF[@]}" auth add "osd.$id" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$DIR/ceph.osd.$id.keyring" >/dev/null 2>&1
  ceph-osd "${CONF[@]}" -i "$id" || die "ceph-osd $id did not start"
}
say "3 memstore OSDs"
for _ in 1 2 3; do start_osd; done

say "pool $POOL for RBD"
ceph "${CONF[@]}" osd pool create "$POOL" 16 16 replicated >/dev/null 2>&1
ceph "${CONF[@]}" osd pool set "$POOL" size 2 >/dev/null 2>&1
# A gateway's user: image I/O and the PR objects (holdfast.pr.IMAGE) in the pool, and
# (profile rbd on the monitor) the right to blocklist another client, which fencing a
# frozen gateway needs (tests/server/rbd_pr.rs fences one as this user).
ceph "${CONF[@]}" auth get-or-create client.holdfast mon 'profile rbd' \
  osd "profile rbd pool=$POOL" mgr "profile rbd pool=$POOL" -o "$DIR/ceph.client.holdfast.keyring"
chmod 0600 "$DIR"/*.keyring

# Wait until every placement group is active (I/O would otherwise block).
deadline=$((SECONDS + ${CEPH_UP_TIMEOUT:-120}))
until ceph "${CONF[@]}" pg stat 2>/dev/null | grep -Eq "^([0-9]+) pgs: \1 active"; do
  [ "$SECONDS" -lt "$deadline" ] || die "PGs not active: $(ceph "${CONF[@]}" pg stat 2>&1)"
  sleep 0.5
done
timeout 60 rbd "${CONF[@]}" pool init "$POOL" || die "rbd pool init $POOL failed"
echo "CEPH_CONF=$DIR/ceph.conf" >"$DIR/env"
say "up: CEPH_CONF=$DIR/ceph.conf pool=$POOL user=client.holdfast"
