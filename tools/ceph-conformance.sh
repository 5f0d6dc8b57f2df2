#!/bin/bash
# tools/ceph-conformance.sh [OUTDIR]: libiscsi's conformance suite through two gateways
# on the same RBD images: starts a throwaway Ceph cluster (tools/ceph-up.sh), runs
# tools/conformance.sh with CONFORMANCE_CEPH and CONFORMANCE_GATEWAYS=2 (the same
# families, exclusions and checks as on files, through each gateway; LUNs 1 and 2 are
# RBD images; SCSI.MultipathIO with one path through each gateway), stops the cluster.
# Results in OUTDIR (default target/conformance-rbd/).
set -euo pipefail
HF_NAME=ceph-conformance
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
OUT=${1:-$HF_ROOT/target/conformance-rbd}
make_tmpdir
CEPH_DIR=$HF_TMP/ceph
on_exit "$HF_ROOT/tools/ceph-down.sh" "$CEPH_DIR"
log "starting a Ceph cluster in $CEPH_DIR"
"$HF_ROOT/tools/ceph-up.sh" "$CEPH_DIR" >"$HF_TMP/ceph-up.log" 2>&1 || {
  tail -n 30 "$HF_TMP/ceph-up.log" >&2
  report FAIL ceph-conformance "tools/ceph-up.sh failed"
  exit 1
}
CONFORMANCE_CEPH=$CEPH_DIR CONFORMANCE_GATEWAYS=2 "$HF_ROOT/tools/conformance.sh" "$OUT"
