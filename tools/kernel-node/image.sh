#!/bin/bash
# tools/kernel-node/image.sh: builds (or confirms up to date) the vm-initiator guest
# image that tests/cluster/kernel_node.rs boots inside `cargo test`, and prints the
# `../shared` folder it used. tools/test runs it before `cargo test` unless SKIP_VM=1.
# build-image.sh is idempotent (<1 s when up to date; ~70 s cold; needs root to build).
# Env: VM_INITIATOR_DIR (image dir), HOLDFAST_SHARED (another shared/).
set -euo pipefail
HF_NAME=kernel-node-image
# shellcheck source=SCRIPTDIR/../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
VMI=$HF_SHARED/vm-initiator
[ -x "$VMI/build-image.sh" ] || die "$VMI/build-image.sh missing (../shared beside the repository root)"
log "guest image (build-image.sh, cached)"
"$VMI/build-image.sh" ${VM_INITIATOR_DIR:+"$VM_INITIATOR_DIR"}
echo "$HF_SHARED"
