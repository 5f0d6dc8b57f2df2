#!/bin/bash
# tools/ceph-bench.sh: a holdfast gateway on Ceph RBD versus `rbd bench` straight to
# librbd, on the same throwaway cluster in the same run, and scaling from one to two
# gateways. Not part of tools/test or CI (~5 min; wants a quiet machine).
#
# Starts a cluster (tools/ceph-up.sh, in a temp dir, torn down at exit), creates two
# images A and B (IMAGE_SIZE each), preconditions both (one full pass of 1 MiB
# sequential writes with rbd bench, so reads hit written objects), starts two gateways
# (holdfast target, ALUA groups 1 and 2, each serving A as LUN 0 and B as LUN 1), then
# per round and per case runs these modes:
#   rbd    rbd bench on A (librbd straight, one client)
#   gw     qemu-img bench on A through gateway 1 (one client)
#   rbd2   two rbd bench in parallel, on A and on B
#   gw1x2  two qemu-img bench in parallel, A and B, both through gateway 1
#   gw2    two qemu-img bench in parallel, A through gateway 1, B through gateway 2
# Cases: 4k random read and write at QD RAND_QD (32), 1 MiB sequential read and write at
# QD SEQ_QD (8; the same depth on both sides). The gateway's cost is 1 - gw/rbd (and
# 1 - gw2/rbd2); scaling from one to two gateways is gw2/gw1x2 (same two clients, one
# gateway or two) and gw2/gw (one client on one gateway to two clients on two).
#
# Two clients, two images: each client writes its own image. Two clients writing one
# image through two gateways would bounce the image's RBD exclusive lock between the
# gateways' librbd instances on every write (a lock handover round trip each time),
# which measures lock ping-pong, not gateway scaling (and a multipath initiator avoids
# it by sending I/O only to the ALUA-optimized gateway). Within each mode an image is
# written by one client only, so its lock moves at most once, at the mode's start.
#
# Like for like, and where the tools differ:
# - rbd bench runs with --rbd_cache=false, as the gateways' librbd (a write is
#   acknowledged once in RADOS), and as the gateways' cephx user (client.holdfast).
# - 4k random: rbd bench draws uniform random offsets (repeats possible); qemu-img bench
#   has no random mode and strides by a large prime number of blocks (-S 4096*393241,
#   wrapping modulo the image size, as tools/bench and ../shared/peer/perf.sh), which
#   visits scattered blocks without repeats. For RBD both are "scattered 4 KiB I/O over
#   all objects"; neither side has a cache.
# - 1 MiB sequential: rbd bench --io-pattern full-seq (the io-threads I/Os in flight are
#   consecutive blocks: one stream), qemu-img bench -s 1M -S 1M -d QD (the same); rbd
#   bench's `seq` would be QD separate streams in separate regions, so it is not used.
# - Both sides run a fixed I/O count per client (neither tool has a time limit; N_*
#   below). rbd bench's figure is its own ops/sec (it times from its first I/O, after
#   open, and includes a final flush on writes); qemu-img bench's is
#   the count over its "Run completed in" time (from its first I/O, after login/open).
#   The defaults take ~5-8 s per rbd bench client on a 2-core machine; raise them
#   (e.g. all x4) for steadier figures.
#   Two-client modes: total I/Os of both over the slower client's time (conservative;
#   the clients start within ~0.1 s of each other).
# - The iSCSI path adds qemu-img's libiscsi client and TCP over loopback; that is part
#   of what the gateway costs a real initiator.
# CPU: holdfast's CPU time (utime+stime from /proc/PID/stat, both gateways summed) per
# I/O, and the CPU time of everything the bench runs (Ceph daemons, gateways, clients;
# not other work on the machine) per I/O, for each mode, and the clients' own (rbd bench
# holds librbd's client side, so its CPU per I/O is what librbd costs inside a gateway).
# All daemons (3 memstore OSDs, mon, mgr), gateways and clients share this machine's
# cores: on a small machine this measures CPU cost per I/O more than Ceph throughput.
#
# Env: IMAGE_SIZE (1GiB), ROUNDS (1; each round prints its own figures, then medians),
#      N_RANDREAD (150000), N_RANDWRITE (25000), N_SEQREAD (6144), N_SEQWRITE (1536)
#      (I/Os per client per case; 1 MiB sequential wraps around the image), RAND_QD (32), SEQ_QD (8), CASES ("randread-4k randwrite-4k seqread-1m
#      seqwrite-1m"), MODES ("rbd gw rbd2 gw1x2 gw2"), CASE_TIMEOUT (s per client
#      command, 180), NO_BUILD=1 (use the existing release binary), HOLDFAST_BIN,
#      KEEP_TMP=1, RESULTS (also copy the raw result lines to this file).
set -euo pipefail
HF_NAME=ceph-bench
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IMAGE_SIZE=${IMAGE_SIZE:-1GiB}
ROUNDS=${ROUNDS:-1}
# I/O counts per client per case: ~5-8 s each for rbd bench on a 2-core machine
N_RANDREAD=${N_RANDREAD:-150000}; N_RANDWRITE=${N_RANDWRITE:-25000}
N_SEQREAD=${N_SEQREAD:-6144}; N_SEQWRITE=${N_SEQWRITE:-1536}
RAND_QD=${RAND_QD:-32}; SEQ_QD=${SEQ_QD:-8}
CASES=${CASES:-"randread-4k randwrite-4k seqread-1m seqwrite-1m"}
MODES=${MODES:-"rbd gw rbd2 gw1x2 gw2"}
CASE_TIMEOUT=${CASE_TIMEOUT:-180}
STRIDE=$((4096 * ${STRIDE_BLOCKS:-393241}))
IQN=iqn.2026-11.org.holdfast:cbench
POOL=holdfast
IMG_A=$POOL/bench-a
IMG_B=$POOL/bench-b
SIZE=$(size_bytes "$IMAGE_SIZE")
[ $((SIZE % 1048576)) = 0 ] || die "IMAGE_SIZE must be a whole number of MiB"
for c in $CASES; do
  case $c in randread-4k | randwrite-4k | seqread-1m | seqwrite-1m) ;; *) die "unknown case $c" ;; esac
done
for m in $MODES; do
  case $m in rbd | gw | rbd2 | gw1x2 | gw2) ;; *) die "unknown mode $m" ;; esac
done

for c in qemu-img rbd ceph-mon ceph-osd ceph-mgr timeout bc python3; do
  command -v "$c" >/dev/null || die "$c missing (tools/deps.sh test installs the packages)"
done
if [ "${NO_BUILD:-0}" != 1 ]; then
  log "cargo build --release --bin holdfast"
  (cd "$HF_ROOT" && cargo build --release --quiet --bin holdfast)
fi
[ -x "$HOLDFAST_BIN" ] || die "$HOLDFAST_BIN missing"

# kill_below PID: TERM to every process below PID, deepest first: at exit, the bench
# clients still running (`timeout` puts each in a process group of its own, so neither a
# terminal's ^C nor the exit trap would reach them, and they would wait out CASE_TIMEOUT
# against a cluster already gone)
kill_below() {
  local p
  for p in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    kill_below "$p"
    kill -TERM "$p" 2>/dev/null || true
  done
}
on_exit kill_below $$

make_tmpdir
RES=$HF_TMP/results.txt   # round case mode ios seconds gw_cpu_ticks all_cpu_ticks client_cpu_ticks
: >"$RES"
CLK_TCK=$(getconf CLK_TCK)
load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "# tools/ceph-bench.sh $(date -Is) on $(nproc) cpus, $(uname -r)"
echo "# holdfast $(git -C "$HF_ROOT" describe --always --dirty 2>/dev/null || echo '?'); $(rbd --version 2>/dev/null | cut -d' ' -f1-3)"
echo "# IMAGE_SIZE=$IMAGE_SIZE ROUNDS=$ROUNDS N_RANDREAD=$N_RANDREAD N_RANDWRITE=$N_RANDWRITE N_SEQREAD=$N_SEQREAD N_SEQWRITE=$N_SEQWRITE RAND_QD=$RAND_QD SEQ_QD=$SEQ_QD"
echo "# load average at start: $(load)"

# --- cluster, images, preconditioning -------------------------------------------------
CEPH_DIR=$HF_TMP/ceph
on_exit "$HF_ROOT/tools/ceph-down.sh" "$CEPH_DIR"
# two images, 2 replicas, 3 OSDs: ~1.3 images' worth per OSD; room for PG imbalance
MEMSTORE=$((SIZE * 2 + (512 << 20)))
[ "$MEMSTORE" -ge $((1 << 30)) ] || MEMSTORE=$((1 << 30))
log "starting a Ceph cluster in $CEPH_DIR (memstore $((MEMSTORE >> 20)) MiB per OSD)"
CEPH_MEMSTORE_BYTES=$MEMSTORE CEPH_UP_TIMEOUT=120 timeout 300 "$HF_ROOT/tools/ceph-up.sh" "$CEPH_DIR" \
  >"$HF_TMP/ceph-up.log" 2>&1 || { tail -n 30 "$HF_TMP/ceph-up.log" >&2; die "tools/ceph-up.sh failed"; }
CONF=$CEPH_DIR/ceph.conf
# as the gateways: their cephx user, no librbd cache
RBD=(rbd -c "$CONF" --id holdfast --rbd_cache=false)
for img in "$IMG_A" "$IMG_B"; do
  timeout 60 "${RBD[@]}" create --size "$((SIZE >> 20))M" "$img" || die "rbd create $img failed"
done

# rbd_bench IMAGE TYPE IO_SIZE QD COUNT PATTERN: prints "ios seconds"
rbd_bench() {
  local out ops rate
  out=$(timeout -k 5 "$CASE_TIMEOUT" "${RBD[@]}" bench --io-type "$2" --io-size "$3" \
    --io-threads "$4" --io-total "$(($5 * $3))" --io-pattern "$6" "$1" 2>&1) || {
    log "rbd bench $* failed (status $?): $(tail -n 3 <<<"$out")"
    return 1
  }
  read -r ops rate < <(sed -n 's/^elapsed: *[0-9]* *ops: *\([0-9]*\) *ops\/sec: *\([0-9.]*\).*/\1 \2/p' <<<"$out")
  [ -n "${rate:-}" ] || { log "rbd bench: no result line in: $(tail -n 3 <<<"$out")"; return 1; }
  echo "$ops $(echo "$ops / $rate" | bc -l)"
}

# qemu_bench PORT LUN CLIENT_NO IO_SIZE QD COUNT STEP WRITE(0/1): prints "ios seconds"
qemu_bench() {
  local w=() out t opts
  [ "$8" = 1 ] && w=(-w)
  # its own initiator name per client: two clients on one gateway are two sessions
  opts="driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=127.0.0.1:$1"
  opts+=",file.target=$IQN,file.lun=$2,file.initiator-name=iqn.2026-11.org.holdfast:cbench-client$3"
  out=$(cd /tmp && timeout -k 5 "$CASE_TIMEOUT" qemu-img bench --image-opts -c "$6" -d "$5" \
    -s "$4" -S "$7" "${w[@]}" "$opts" 2>&1) || {
    log "qemu-img bench (port $1 lun $2) failed (status $?): $(tail -n 3 <<<"$out")"
    return 1
  }
  t=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
  [ -n "$t" ] || { log "qemu-img bench: no result line in: $(tail -n 3 <<<"$out")"; return 1; }
  echo "$6 $t"
}

# precondition: one full pass of 1 MiB writes over each image (both at once)
log "preconditioning $IMG_A and $IMG_B (1 MiB full-seq writes over $IMAGE_SIZE each)"
PRE_TIMEOUT=$((CASE_TIMEOUT + (SIZE >> 20) / 10))   # at >= 10 MiB/s
CASE_TIMEOUT=$PRE_TIMEOUT rbd_bench "$IMG_A" write 1048576 8 $((SIZE >> 20)) full-seq >"$HF_TMP/pre-a" &
pa=$!
CASE_TIMEOUT=$PRE_TIMEOUT rbd_bench "$IMG_B" write 1048576 8 $((SIZE >> 20)) full-seq >"$HF_TMP/pre-b" &
pb=$!
wait "$pa" || die "preconditioning $IMG_A failed"
wait "$pb" || die "preconditioning $IMG_B failed"
for f in pre-a pre-b; do
  read -r ios secs <"$HF_TMP/$f"
  printf '# precondition %s: %.0f MiB/s\n' "$f" "$(echo "$ios / $secs" | bc -l)"
done

# --- gateways -----------------------------------------------------------------------
declare -A PORT GWPID
for n in 1 2; do
  reserve_port "PORT[$n]"
  rbd_gateway_config "$HF_TMP/gw$n/holdfast.toml" "$n" "${PORT[$n]}" "$CONF" "$IQN" \
    "$IMAGE_SIZE" "$IMG_A" "$IMG_B"
  RUST_LOG=${RUST_LOG:-warn} start_holdfast "$HF_TMP/gw$n/holdfast.toml" "$HF_TMP/gw$n/holdfast.log" ||
    die "gateway $n did not start"
  GWPID[$n]=$HOLDFAST_PID
done

# --- cases ----------------------------------------------------------------------------
# case_params CASE: sets IOSZ QD COUNT RBD_TYPE RBD_PAT STEP WRITE
case_params() {
  case $1 in
    randread-4k) IOSZ=4096 QD=$RAND_QD COUNT=$N_RANDREAD RBD_TYPE=read RBD_PAT=rand STEP=$STRIDE WRITE=0 ;;
    randwrite-4k) IOSZ=4096 QD=$RAND_QD COUNT=$N_RANDWRITE RBD_TYPE=write RBD_PAT=rand STEP=$STRIDE WRITE=1 ;;
    seqread-1m) IOSZ=1048576 QD=$SEQ_QD COUNT=$N_SEQREAD RBD_TYPE=read RBD_PAT=full-seq STEP=1048576 WRITE=0 ;;
    seqwrite-1m) IOSZ=1048576 QD=$SEQ_QD COUNT=$N_SEQWRITE RBD_TYPE=write RBD_PAT=full-seq STEP=1048576 WRITE=1 ;;
  esac
}

# client_ticks PID: the clients' CPU: cutime+cstime of PID, the shell that started them
# and has waited for them (their CPU and their children's). The PID is measure()'s shell,
# passed in: $BASHPID inside $(...) would be the command substitution's own subshell.
client_ticks() { awk '{print $16 + $17}' "/proc/$1/stat"; }
gw_ticks() { local n s=0; for n in 1 2; do s=$((s + $(awk '{print $14 + $15}' "/proc/${GWPID[$n]}/stat"))); done; echo "$s"; }
# all_ticks PID: CPU of everything this bench runs: the Ceph daemons, both gateways, and
# the clients (client_ticks PID), but not other work on the machine
all_ticks() {
  local f pid s
  s=$(($(gw_ticks) + $(client_ticks "$1")))
  for f in "$CEPH_DIR"/run/*.pid; do
    pid=$(cat "$f" 2>/dev/null) || continue
    [ -r "/proc/$pid/stat" ] && s=$((s + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$s"
}

# client SPEC OUTFILE: SPEC is rbd:IMAGE or gw:GATEWAY:LUN:CLIENT_NO
client() {
  local s
  IFS=: read -r -a s <<<"$1"
  if [ "${s[0]}" = rbd ]; then
    rbd_bench "${s[1]}" "$RBD_TYPE" "$IOSZ" "$QD" "$COUNT" "$RBD_PAT" >"$2"
  else
    qemu_bench "${PORT[${s[1]}]}" "${s[2]}" "${s[3]}" "$IOSZ" "$QD" "$COUNT" "$STEP" "$WRITE" >"$2"
  fi
}

# measure ROUND CASE MODE: runs the mode's clients (in parallel), appends a result line
measure() {
  local r=$1 c=$2 m=$3 specs=() pids=() i g0 g1 b0 b1 c0 c1 ios=0 secs=0 n t ok=1 me=$BASHPID
  case $m in
    rbd) specs=("rbd:$IMG_A") ;;
    gw) specs=("gw:1:0:1") ;;
    rbd2) specs=("rbd:$IMG_A" "rbd:$IMG_B") ;;
    gw1x2) specs=("gw:1:0:1" "gw:1:1:2") ;;
    gw2) specs=("gw:1:0:1" "gw:2:1:2") ;;
  esac
  case_params "$c"
  g0=$(gw_ticks); b0=$(all_ticks "$me"); c0=$(client_ticks "$me")
  for i in "${!specs[@]}"; do
    client "${specs[$i]}" "$HF_TMP/out.$i" &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || ok=0; done
  g1=$(gw_ticks); b1=$(all_ticks "$me"); c1=$(client_ticks "$me")
  if [ "$ok" = 1 ]; then
    for i in "${!specs[@]}"; do
      read -r n t <"$HF_TMP/out.$i"
      ios=$((ios + n))
      secs=$(awk -v a="$t" -v b="$secs" 'BEGIN { print (a + 0 > b + 0) ? a : b }')
    done
  else
    log "round $r $c $m: a client failed; recorded as 0"
    ios=0 secs=0
  fi
  echo "$r $c $m $ios $secs $((g1 - g0)) $((b1 - b0)) $((c1 - c0))" >>"$RES"
  if [ "$ios" -gt 0 ]; then
    log "$(printf 'round %s %-13s %-6s %8.0f IOPS %8.1f MiB/s' "$r" "$c" "$m" \
      "$(echo "$ios / $secs" | bc -l)" "$(echo "$ios * $IOSZ / 1048576 / $secs" | bc -l)")"
  fi
}

read -r -a MODE_LIST <<<"$MODES"
for r in $(seq 1 "$ROUNDS"); do
  order=("${MODE_LIST[@]}")
  if [ $((r % 2)) = 0 ]; then  # even rounds: the modes in reverse order
    order=(); for ((i = ${#MODE_LIST[@]} - 1; i >= 0; i--)); do order+=("${MODE_LIST[$i]}"); done
  fi
  log "round $r/$ROUNDS (modes ${order[*]}, load $(load))"
  echo "# round $r modes ${order[*]} load average $(load)"
  for c in $CASES; do
    for m in "${order[@]}"; do measure "$r" "$c" "$m"; done
  done
done
echo "# load average after the rounds: $(load)"
for n in 1 2; do
  stop_holdfast "${GWPID[$n]}" || log "gateway $n did not stop cleanly (log $HF_TMP/gw$n/holdfast.log)"
done
[ -z "${RESULTS:-}" ] || cp "$RES" "$RESULTS"

python3 - "$RES" "$CLK_TCK" "$ROUNDS" <<'PY'
import sys, statistics as st, collections
res, tck, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
iosz = {"randread-4k": 4096, "randwrite-4k": 4096, "seqread-1m": 1 << 20, "seqwrite-1m": 1 << 20}
d = collections.OrderedDict()   # (round, case) -> mode -> (iops, ios, gw_s, busy_s, client_s)
for line in open(res):
    r, case, mode, ios, secs, g, b, c = line.split()
    ios, secs = int(ios), float(secs)
    d.setdefault((int(r), case), {})[mode] = (ios / secs if secs else 0.0, ios, int(g) / tck, int(b) / tck,
                                              int(c) / tck)

def pct(a, b):
    return f"{(1 - a / b) * 100:+.0f}%" if a and b else "-"
def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"
def us(cpu, ios):
    return f"{cpu / ios * 1e6:.0f}" if ios else "-"

def tables(title, rows):
    # rows: case -> mode -> (iops, ios, gw_s, busy_s, client_s)
    print(f"\n{title}")
    print(f"{'case':<13} {'rbd IOPS':>9} {'rbd MiB/s':>9} {'gw IOPS':>9} {'gw MiB/s':>9} {'gw cost':>7}"
          f" {'gw cpu':>7} {'all rbd':>8} {'all gw':>8} {'cl rbd':>7} {'cl gw':>7}")
    for case, m in rows.items():
        z = (0, 0, 0, 0, 0)
        a, g = m.get("rbd", z), m.get("gw", z)
        mb = iosz[case] / 1048576
        print(f"{case:<13} {a[0]:9.0f} {a[0]*mb:9.1f} {g[0]:9.0f} {g[0]*mb:9.1f} {pct(g[0], a[0]):>7}"
              f" {us(g[2], g[1]):>7} {us(a[3], a[1]):>8} {us(g[3], g[1]):>8}"
              f" {us(a[4], a[1]):>7} {us(g[4], g[1]):>7}")
    print(f"{'case':<13} {'rbd x2':>9} {'1gw 2cl':>9} {'2gw 2cl':>9} {'2gw MiB/s':>9} {'2gw cost':>8}"
          f" {'2gw/1gw':>7} {'2gw/gw':>7} {'cpu 1gw':>7} {'cpu 2gw':>7}")
    for case, m in rows.items():
        z = (0, 0, 0, 0, 0)
        a2, g12, g2, g = m.get("rbd2", z), m.get("gw1x2", z), m.get("gw2", z), m.get("gw", z)
        mb = iosz[case] / 1048576
        print(f"{case:<13} {a2[0]:9.0f} {g12[0]:9.0f} {g2[0]:9.0f} {g2[0]*mb:9.1f} {pct(g2[0], a2[0]):>8}"
              f" {ratio(g2[0], g12[0]):>7} {ratio(g2[0], g[0]):>7} {us(g12[2], g12[1]):>7} {us(g2[2], g2[1]):>7}")

if rounds > 1:
    for r in range(1, rounds + 1):
        tables(f"round {r}", collections.OrderedDict((c, m) for (rr, c), m in d.items() if rr == r))
# medians of IOPS over the rounds; CPU pooled over all rounds
per = collections.OrderedDict()
for (r, case), m in d.items():
    for mode, v in m.items():
        per.setdefault(case, {}).setdefault(mode, []).append(v)
med = collections.OrderedDict()
for case, m in per.items():
    med[case] = {mode: (st.median(x[0] for x in v), *(sum(x[i] for x in v) for i in range(1, 5)))
                 for mode, v in m.items()}
tables(f"result ({'median of ' + str(rounds) + ' rounds' if rounds > 1 else '1 round'})", med)
print("""
gw cost = 1 - gw/rbd (positive: the gateway is slower; the goal is under 20 %); 2gw cost = 1 - (2gw 2cl)/(rbd x2).
gw cpu, cpu 1gw, cpu 2gw = holdfast CPU microseconds per I/O (both gateways summed);
all rbd / all gw = CPU microseconds per I/O of everything the bench runs (Ceph daemons, gateways, clients).
cl rbd / cl gw = the client's CPU microseconds per I/O: rbd bench (librbd's client side) / qemu-img bench (libiscsi).
rbd x2 = two rbd bench on two images; 1gw 2cl = two qemu-img bench through gateway 1; 2gw 2cl = one through each gateway.
2gw/1gw = (2gw 2cl)/(1gw 2cl): one gateway to two for the same two clients; 2gw/gw = (2gw 2cl)/(gw, one client).""")
PY
