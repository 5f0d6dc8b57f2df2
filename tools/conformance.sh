#!/bin/bash
# tools/conformance.sh [OUTDIR]
# Runs libiscsi's conformance suite (iscsi-test-cu, through ../shared/peer/testcu.sh)
# against a freshly started holdfast (LUN 1 = 1 GiB, data in a temp dir) and
# checks the per-family summary:
#   - every family: failed = 0, noresult = 0, status ok (no timeout/crash/parse mismatch)
#   - skipped tests only in families where skipping is legitimate (ALLOWED_SKIP)
#   - every requested family appears in the summary, and something passed at all
#   - holdfast is still running afterwards and exits 0 on SIGTERM
# Summary and full log are copied to OUTDIR (default target/conformance/).
# Env:
#   PR_FAMILIES=run|skip   run (default); skip leaves
#                          out SCSI.Prin*, SCSI.Prout*, SCSI.Reserve6, SCSI.MultipathIO
#   CONFORMANCE_FAMILIES   explicit space-separated family list (overrides the above)
#   FAMILY_TIMEOUT         per-family timeout in s (testcu.sh default 300)
#   KEEP_TMP=1             keep the temp dir (holdfast log, config)
#   CONFORMANCE_CEPH=DIR   serve LUNs 1 and 2 from RBD images in the cluster that
#                          tools/ceph-up.sh started in DIR (tools/ceph-conformance.sh)
#   CONFORMANCE_GATEWAYS=2 (with CONFORMANCE_CEPH) two gateways on the same images
#                          (127.0.0.13, tpgt and ALUA group 1; 127.0.0.14, 2): the
#                          families run through each, and SCSI.MultipathIO once with
#                          its two paths on the two gateways
set -euo pipefail
HF_NAME=conformance
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT=${1:-${CONFORMANCE_OUT:-$HF_ROOT/target/conformance}}
IQN=iqn.2026-11.org.holdfast:conformance
LUN=1
PR_FAMILIES=${PR_FAMILIES:-run}
# Families whose tests may be skipped: optional features holdfast does not offer
# (XCOPY, SANITIZE, WRITE ATOMIC) or states a read-write, always-present disk
# cannot be in (read-only media, removable media without medium).
# PreventAllow and StartStopUnit's eject cases need a removable-medium LUN; a VM disk is not.
ALLOWED_SKIP="SCSI.ExtendedCopy SCSI.ReceiveCopyResults SCSI.Sanitize SCSI.WriteAtomic16 SCSI.ReadOnly SCSI.NoMedia SCSI.PreventAllow SCSI.StartStopUnit"
# Families with cases that need more than one logical block per physical block (LBPPB > 1).
# They run a second time against LUN 2 (physical_block_size = 4096); a skip in the first
# pass is accepted only if that second pass ran them with no skip and no failure. (The
# GetLBAStatus family cannot run there: one of its cases only holds for LBPPB = 1.)
LBPPB_FAMILIES="SCSI.CompareAndWrite SCSI.WriteSame10 SCSI.WriteSame16"
PR_RE='^SCSI\.(Prin|Prout|Reserve6|MultipathIO)'

command -v iscsi-test-cu >/dev/null || die "iscsi-test-cu missing (apt-get install libiscsi-bin)"
TESTCU=$HF_SHARED/peer/testcu.sh
[ -x "$TESTCU" ] || die "$TESTCU missing (../shared beside the repository root)"

if [ -n "${CONFORMANCE_FAMILIES:-}" ]; then
  FAMILIES=$CONFORMANCE_FAMILIES
else
  FAMILIES=$(iscsi-test-cu --list | awk -F. 'NF==2 && $1!="ALL" && $1!="LINUX"')
  case "$PR_FAMILIES" in
    skip) FAMILIES=$(grep -Ev "$PR_RE" <<<"$FAMILIES" || true) ;;
    run) ;;
    *) die "PR_FAMILIES must be skip or run" ;;
  esac
fi
FAMILIES=$(tr ' ' '\n' <<<"$FAMILIES" | sed '/^$/d')
[ -n "$FAMILIES" ] || die "no families to run"
log "PR_FAMILIES=$PR_FAMILIES; $(wc -l <<<"$FAMILIES") families"

make_tmpdir
PORT=""
reserve_port PORT
write_holdfast_config "$HF_TMP/holdfast.toml" "$PORT" "$IQN" 1GiB
cat >>"$HF_TMP/holdfast.toml" <<EOF

[[target.lun]]
id = 2
path = "lun2-4k.img"
size = "1GiB"
physical_block_size = 4096
EOF
GATEWAYS=${CONFORMANCE_GATEWAYS:-1}
case "$GATEWAYS" in
  1) ;;
  2) [ -n "${CONFORMANCE_CEPH:-}" ] || die "CONFORMANCE_GATEWAYS=2 needs CONFORMANCE_CEPH" ;;
  *) die "CONFORMANCE_GATEWAYS must be 1 or 2" ;;
esac
if [ -n "${CONFORMANCE_CEPH:-}" ]; then
  # the same LUNs on fresh RBD images (pool holdfast), reached as client.holdfast
  for n in 1 2; do
    rbd -c "$CONFORMANCE_CEPH/ceph.conf" create --size 1G "holdfast/conformance-$n-$$" ||
      die "rbd create holdfast/conformance-$n-$$ failed"
  done
  sed -i -e "s|^path = \"lun1.img\"|rbd = \"holdfast/conformance-1-$$\"|" \
    -e "s|^path = \"lun2-4k.img\"|rbd = \"holdfast/conformance-2-$$\"|" "$HF_TMP/holdfast.toml"
  printf '\n[ceph]\nconf = "%s/ceph.conf"\nclient = "client.holdfast"\n' "$CONFORMANCE_CEPH" \
    >>"$HF_TMP/holdfast.toml"
  grep -q '^rbd = ' "$HF_TMP/holdfast.toml" || die "no RBD LUN in $HF_TMP/holdfast.toml"
fi
NAMES=(holdfast)
MPIO_FAMILY=""
if [ "$GATEWAYS" = 2 ]; then
  # Gateway 2: the same images, its own portal, tpgt, ALUA group and data_dir.
  PORT_B=""
  reserve_port PORT_B
  sed -e "s|^listen = \"127.0.0.1:$PORT\"|listen = \"127.0.0.14:$PORT_B\"|" -e 's|^tpgt = 1$|tpgt = 2|' \
    -e 's|^data_dir = "data"$|data_dir = "data-gw2"|' "$HF_TMP/holdfast.toml" >"$HF_TMP/holdfast-gw2.toml"
  printf '\n[alua]\ngroup = 2\n[[alua.peer]]\ngroup = 1\n' >>"$HF_TMP/holdfast-gw2.toml"
  sed -i -e "s|^listen = \"127.0.0.1:$PORT\"|listen = \"127.0.0.13:$PORT\"|" "$HF_TMP/holdfast.toml"
  printf '\n[alua]\ngroup = 1\n[[alua.peer]]\ngroup = 2\n' >>"$HF_TMP/holdfast.toml"
  grep -q "127.0.0.14:$PORT_B" "$HF_TMP/holdfast-gw2.toml" || die "gateway 2 config not derived"
  HOSTS=("127.0.0.13:$PORT" "127.0.0.14:$PORT_B")
  NAMES=(holdfast holdfast-gw2)
  # MultipathIO runs once, across the gateways, instead of once through each.
  if grep -qx 'SCSI.MultipathIO' <<<"$FAMILIES"; then
    MPIO_FAMILY=SCSI.MultipathIO
    FAMILIES=$(grep -vx 'SCSI.MultipathIO' <<<"$FAMILIES")
  fi
else
  HOSTS=("127.0.0.1:$PORT")
fi
start_holdfast "$HF_TMP/holdfast.toml" "$HF_TMP/holdfast.log" || {
  report FAIL conformance "holdfast did not start"; exit 1; }
PIDS=("$HOLDFAST_PID")
if [ "$GATEWAYS" = 2 ]; then
  start_holdfast "$HF_TMP/holdfast-gw2.toml" "$HF_TMP/holdfast-gw2.log" || {
    report FAIL conformance "gateway 2 did not start"; exit 1; }
  PIDS+=("$HOLDFAST_PID")
fi

LB_RUN=""
for fam in $LBPPB_FAMILIES; do
  grep -qx "$fam" <<<"$FAMILIES" && LB_RUN="$LB_RUN $fam"
done
T0=$(date +%s)
for i in "${!HOSTS[@]}"; do
  log "running testcu.sh ${HOSTS[$i]} $IQN $LUN"
  # testcu.sh overwrites the LUN (-d) and writes NAME-testcu*.txt into its OUTDIR
  FAMILIES=$(tr '\n' ' ' <<<"$FAMILIES") \
    run_tracked "$TESTCU" "${HOSTS[$i]}" "$IQN" "$LUN" "$HF_TMP/results" "${NAMES[$i]}" \
    >"$HF_TMP/testcu-${NAMES[$i]}.out" 2>&1 || true
  if [ -n "$LB_RUN" ]; then
    log "second pass on LUN 2 (physical block 4096):$LB_RUN"
    FAMILIES="$LB_RUN" run_tracked "$TESTCU" "${HOSTS[$i]}" "$IQN" 2 "$HF_TMP/results" "${NAMES[$i]}-4k" \
      >"$HF_TMP/testcu-${NAMES[$i]}-4k.out" 2>&1 || true
  fi
done
# MultipathIO.Reset sends a LUN RESET through one path and expects its unit attention on
# the other: across gateways, the reset is announced to the other gateway on the image's
# PR object (docs/CEPH.md, "A LU reset spans the gateways").
MPIO_TESTS=()
if [ -n "$MPIO_FAMILY" ]; then
  MPIO_TESTS=(Simple CompareAndWrite CompareAndWriteAsync Reset)
fi
for t in "${MPIO_TESTS[@]}"; do
  second=${HOSTS[1]}
  log "running $MPIO_FAMILY.$t, paths ${HOSTS[0]} and $second"
  run_tracked timeout -k 5 "${FAMILY_TIMEOUT:-300}" iscsi-test-cu -d \
    -i iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test \
    -I iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2 -t "$MPIO_FAMILY.$t" \
    "iscsi://${HOSTS[0]}/$IQN/$LUN" "iscsi://$second/$IQN/$LUN" \
    >"$HF_TMP/results/holdfast-mpio-$t-testcu.txt" 2>&1 || true
done
T1=$(date +%s)

mkdir -p "$OUT"
cp "$HF_TMP/results/"holdfast*-testcu*.txt "$OUT/" 2>/dev/null || true
cp "$HF_TMP/"holdfast*.log "$OUT/" 2>/dev/null || true

problems=()
alive=()
for pid in "${PIDS[@]}"; do
  if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); else problems+=("holdfast $pid died during the run"); fi
done

# mpio_verdict TEST: CUnit's own tally of one MultipathIO test on two gateways: it ran
# and passed, not skipped.
mpio_verdict() {
  local file=$HF_TMP/results/holdfast-mpio-$1-testcu.txt row
  row=$(awk '/^ +tests /{print $2, $3, $4, $5; exit}' "$file" 2>/dev/null)
  printf '%-34s (total ran passed failed) %s\n' "$MPIO_FAMILY.$1" "${row:-no summary}"
  read -r total ran passed failed <<<"${row:-0 0 0 1}"
  if [ "$total" -eq 0 ] || [ "$ran" -ne "$total" ] || [ "$passed" -ne "$total" ] ||
    [ "$failed" -ne 0 ] || grep -q '\[SKIPPED\]' "$file"; then
    problems+=("$MPIO_FAMILY.$1 on two paths: ${row:-no summary} (see $OUT/$(basename "$file"))")
  fi
}

# verdict NAME: the per-family table of one pass (NAME-testcu-summary.txt and its 4k
# second pass), adding what is wrong to problems
verdict() {
  local SUM=$HF_TMP/results/$1-testcu-summary.txt SUM4K=$HF_TMP/results/$1-4k-testcu-summary.txt
  echo "== $1"
  if [ ! -s "$SUM" ]; then
    problems+=("$1: no summary written (testcu.sh output: $(tail -n 3 "$HF_TMP/testcu-$1.out" | tr '\n' ' '))")
    return
  fi
  # per-family verdict table
  printf '%-34s %6s %6s %7s %8s  %-8s %s\n' FAMILY passed failed skipped noresult status verdict
  while read -r fam p f s n status _; do
    [[ "$fam" == *.* ]] || continue
    why=()
    [ "$f" -eq 0 ] || why+=("failed=$f")
    [ "$n" -eq 0 ] || why+=("noresult=$n")
    [ "$status" = ok ] || why+=("status=$status")
    if [ "$s" -gt 0 ] && [[ " $ALLOWED_SKIP " != *" $fam "* ]]; then
      if [[ " $LBPPB_FAMILIES " == *" $fam "* ]] && [ -s "$SUM4K" ] &&
        awk -v f="$fam" '$1==f && $3==0 && $4==0 && $5==0 && $6=="ok"{ok=1} END{exit !ok}' "$SUM4K"; then
        :
      else
        why+=("skipped=$s")
      fi
    fi
    if [ ${#why[@]} -eq 0 ]; then v=ok; else v="BAD: ${why[*]}"; problems+=("$1: $fam ${why[*]}"); fi
    printf '%-34s %6d %6d %7d %8d  %-8s %s\n' "$fam" "$p" "$f" "$s" "$n" "$status" "$v"
  done < <(sed -n '3,$p' "$SUM" | grep -v '^TOTAL')
  grep '^TOTAL' "$SUM" || true
  if [ -s "$SUM4K" ]; then
    echo "second pass, LUN 2 with 4 KiB physical blocks:"
    sed -n '3,$p' "$SUM4K"
    while read -r fam p f s n status _; do
      [[ "$fam" == *.* ]] || continue
      if [ "$f" -ne 0 ] || [ "$n" -ne 0 ] || [ "$status" != ok ]; then problems+=("$1: $fam (4k pass) failed=$f noresult=$n status=$status"); fi
    done < <(sed -n '3,$p' "$SUM4K" | grep -v '^TOTAL')
  fi
  for fam in $FAMILIES; do
    awk -v f="$fam" '$1==f{found=1} END{exit !found}' "$SUM" || problems+=("$1: $fam missing from summary")
  done
  total_passed=$(awk '$1=="TOTAL"{print $2}' "$SUM")
  [ "${total_passed:-0}" -gt 0 ] || problems+=("$1: no test passed at all")
}
for name in "${NAMES[@]}"; do verdict "$name"; done
[ -z "$MPIO_FAMILY" ] || echo "== $MPIO_FAMILY, paths on two gateways"
for t in "${MPIO_TESTS[@]}"; do mpio_verdict "$t"; done
echo "summary: $OUT/holdfast*-testcu-summary.txt  full logs: $OUT/holdfast*-testcu.txt  ($((T1 - T0)) s)"

for pid in "${alive[@]}"; do
  stop_holdfast "$pid" || problems+=("holdfast $pid did not exit 0 on SIGTERM")
done

if [ ${#problems[@]} -eq 0 ]; then
  report PASS conformance "$(wc -l <<<"$FAMILIES") families through ${#HOSTS[@]} gateway(s)${MPIO_FAMILY:+ + $MPIO_FAMILY across them}, PR_FAMILIES=$PR_FAMILIES"
else
  printf '  problem: %s\n' "${problems[@]}"
  report FAIL conformance "${#problems[@]} problem(s)"
  exit 1
fi
