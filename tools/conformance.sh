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
start_holdfast "$HF_TMP/holdfast.toml" "$HF_TMP/holdfast.log" || {
  report FAIL conformance "holdfast did not start"; exit 1; }

log "running testcu.sh 127.0.0.1:$PORT $IQN $LUN"
T0=$(date +%s)
# testcu.sh overwrites the LUN (-d) and writes NAME-testcu*.txt into its OUTDIR
FAMILIES=$(tr '\n' ' ' <<<"$FAMILIES") \
  run_tracked "$TESTCU" "127.0.0.1:$PORT" "$IQN" "$LUN" "$HF_TMP/results" holdfast >"$HF_TMP/testcu.out" 2>&1 || true
LB_RUN=""
for fam in $LBPPB_FAMILIES; do
  grep -qx "$fam" <<<"$FAMILIES" && LB_RUN="$LB_RUN $fam"
done
if [ -n "$LB_RUN" ]; then
  log "second pass on LUN 2 (physical block 4096):$LB_RUN"
  FAMILIES="$LB_RUN" run_tracked "$TESTCU" "127.0.0.1:$PORT" "$IQN" 2 "$HF_TMP/results" holdfast-4k \
    >"$HF_TMP/testcu-4k.out" 2>&1 || true
fi
T1=$(date +%s)
SUM=$HF_TMP/results/holdfast-testcu-summary.txt
SUM4K=$HF_TMP/results/holdfast-4k-testcu-summary.txt

mkdir -p "$OUT"
cp "$HF_TMP/results/"holdfast*-testcu*.txt "$OUT/" 2>/dev/null || true
cp "$HF_TMP/holdfast.log" "$OUT/holdfast.log" 2>/dev/null || true

problems=()
alive=1
kill -0 "$HOLDFAST_PID" 2>/dev/null || { alive=0; problems+=("holdfast died during the run"); }

if [ ! -s "$SUM" ]; then
  problems+=("no summary written (testcu.sh output: $(tail -n 3 "$HF_TMP/testcu.out" | tr '\n' ' '))")
else
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
    if [ ${#why[@]} -eq 0 ]; then v=ok; else v="BAD: ${why[*]}"; problems+=("$fam ${why[*]}"); fi
    printf '%-34s %6d %6d %7d %8d  %-8s %s\n' "$fam" "$p" "$f" "$s" "$n" "$status" "$v"
  done < <(sed -n '3,$p' "$SUM" | grep -v '^TOTAL')
  grep '^TOTAL' "$SUM" || true
  if [ -s "$SUM4K" ]; then
    echo "second pass, LUN 2 with 4 KiB physical blocks:"
    sed -n '3,$p' "$SUM4K"
    while read -r fam p f s n status _; do
      [[ "$fam" == *.* ]] || continue
      if [ "$f" -ne 0 ] || [ "$n" -ne 0 ] || [ "$status" != ok ]; then problems+=("$fam (4k pass) failed=$f noresult=$n status=$status"); fi
    done < <(sed -n '3,$p' "$SUM4K" | grep -v '^TOTAL')
  fi
  for fam in $FAMILIES; do
    awk -v f="$fam" '$1==f{found=1} END{exit !found}' "$SUM" || problems+=("$fam missing from summary")
  done
  total_passed=$(awk '$1=="TOTAL"{print $2}' "$SUM")
  [ "${total_passed:-0}" -gt 0 ] || problems+=("no test passed at all")
fi
echo "summary: $OUT/holdfast-testcu-summary.txt  full log: $OUT/holdfast-testcu.txt  ($((T1 - T0)) s)"

if [ "$alive" = 1 ]; then
  stop_holdfast "$HOLDFAST_PID" || problems+=("holdfast did not exit 0 on SIGTERM")
fi

if [ ${#problems[@]} -eq 0 ]; then
  report PASS conformance "$(wc -l <<<"$FAMILIES") families, PR_FAMILIES=$PR_FAMILIES"
else
  printf '  problem: %s\n' "${problems[@]}"
  report FAIL conformance "${#problems[@]} problem(s)"
  exit 1
fi
