#!/bin/bash
# tools/package-test.sh: the Debian package, built and installed where nothing else is.
#   1. tools/package.sh builds target/debian/holdfast_*.deb (NO_BUILD=1 is passed on)
#   2. package-contents: `dpkg-deb -c` lists /usr/bin/holdfast, both systemd units,
#      gzipped man pages (holdfast.1.gz, holdfast-target.1.gz, holdfast-agent.1.gz,
#      holdfast-ctl.1.gz, ...), the bash, zsh and fish completions, /etc/holdfast/target.toml
#      (a conffile), README and copyright; the unpacked bash completion registers
#      `holdfast` and completes its subcommands; holdfast-ctl-move.1 documents --wait
#   3. package-clean-root: a minimal Debian root of the host's release (debootstrap
#      --variant=minbase from the host's own apt mirror, about 1 min, cached in
#      target/package-test/root-CODENAME for reruns) gets the package with its own
#      dpkg -i in a chroot; then, in a private network, mount and PID namespace
#      (unshare; /proc mounted inside, gone with the namespace), the chroot runs
#      `holdfast target --config /etc/holdfast/target.toml` and the host's iscsi-ls and
#      iscsi-inq log in on 127.0.0.1:3260: LUN 0 and LUN 1 answer, direct-access; the
#      target's files appear in /var/lib/holdfast/target; SIGTERM stops it with status 0.
# Needs root (chroot, unshare), debootstrap, libiscsi-bin, cargo-deb (tools/deps.sh).
# Env: NO_BUILD=1, DEBIAN_MIRROR (default: the first Debian URI of the host's apt
#      sources), KEEP_TMP=1.
# Greps at the end of a pipe read it all (no -q): under pipefail an early exit would
# fail the writer with SIGPIPE.
set -euo pipefail
HF_NAME=package-test
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$(id -u)" = 0 ] || die "needs root (chroot, unshare): sudo $0"
for c in dpkg-deb debootstrap unshare chroot ip iscsi-ls iscsi-inq; do
  command -v "$c" >/dev/null || die "$c missing (tools/deps.sh: deps_install test)"
done
make_tmpdir
CACHE=$HF_ROOT/target/package-test
WORK=$CACHE/work
# host_mirror: the first non-security Debian URI the host's apt sources name (deb822
# .sources files or one-line sources.list), so the root comes from where apt installs from
host_mirror() {
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
    grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
      awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}'
  } | grep -v -- '-security' | head -n 1 || true
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror)}
[ -n "$MIRROR" ] || die "no Debian mirror in /etc/apt/sources*: set DEBIAN_MIRROR"
IQN=iqn.2026-11.org.holdfast:storage

# --- 1. build -------------------------------------------------------------------
log "building the package (tools/package.sh)"
DEB=$("$HF_ROOT/tools/package.sh" | tail -n 1) || { report FAIL package-build; exit 1; }
log "package: $DEB"

# --- 2. contents ----------------------------------------------------------------
contents_ok() {
  local list p missing=0
  list=$(dpkg-deb -c "$DEB" | awk '{print $6}' | sed 's|^\./|/|')
  for p in /usr/bin/holdfast \
    /usr/lib/systemd/system/holdfast-target.service \
    /usr/lib/systemd/system/holdfast-agent.service \
    /usr/share/man/man1/holdfast.1.gz /usr/share/man/man1/holdfast-target.1.gz \
    /usr/share/man/man1/holdfast-agent.1.gz /usr/share/man/man1/holdfast-ctl.1.gz \
    /usr/share/man/man1/holdfast-ctl-move.1.gz /usr/share/man/man1/holdfast-pr.1.gz \
    /usr/share/bash-completion/completions/holdfast \
    /usr/share/zsh/vendor-completions/_holdfast \
    /usr/share/fish/vendor_completions.d/holdfast.fish \
    /etc/holdfast/target.toml \
    /usr/share/doc/holdfast/README.md /usr/share/doc/holdfast/copyright; do
    if grep -qxF "$p" <<<"$list"; then echo "  listed   $p"; else echo "  MISSING  $p"; missing=1; fi
  done
  dpkg-deb -f "$DEB" Package Version Architecture Depends | sed 's/^/  /'
  dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles | grep -x /etc/holdfast/target.toml >/dev/null ||
    { echo "  /etc/holdfast/target.toml is not a conffile"; missing=1; }
  return "$missing"
}
unpacked_ok() {
  local x=$HF_TMP/unpacked out
  dpkg-deb -x "$DEB" "$x"
  # the completion script loads in bash and completes the subcommands
  out=$(bash -c '
    source "$1/usr/share/bash-completion/completions/holdfast"
    complete -p holdfast
    COMP_WORDS=(holdfast c); COMP_CWORD=1; COMP_LINE="holdfast c"; COMP_POINT=10
    _holdfast holdfast c holdfast; printf "%s\n" "${COMPREPLY[@]}"' _ "$x" 2>&1) ||
    { echo "$out"; return 1; }
  echo "$out" | sed 's/^/  bash: /'
  grep -q '^complete .* holdfast$' <<<"$out" && grep -qx ctl <<<"$out" || return 1
  zcat "$x/usr/share/man/man1/holdfast-ctl-move.1.gz" | grep 'wait' >/dev/null ||
    { echo "  holdfast-ctl-move.1 does not mention --wait"; return 1; }
  grep -q 'holdfast' "$x/usr/share/zsh/vendor-completions/_holdfast" &&
    grep -q 'complete -c holdfast' "$x/usr/share/fish/vendor_completions.d/holdfast.fish"
}
FAILS=0
if contents_ok && unpacked_ok; then
  report PASS package-contents
else
  report FAIL package-contents "dpkg-deb -c $DEB"
  FAILS=$((FAILS + 1))
fi

# --- 3. clean root --------------------------------------------------------------
# shellcheck source=/dev/null
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$CODENAME" ] || die "no VERSION_CODENAME in /etc/os-release"
PRISTINE=$CACHE/root-$CODENAME

# never rm -rf a tree with something mounted in it
remove_work() {
  local m
  for m in proc sys dev; do
    if mountpoint -q "$WORK/$m" 2>/dev/null; then umount -l "$WORK/$m" || return 1; fi
  done
  rm -rf "$WORK"
}

make_root() {
  if [ ! -x "$PRISTINE/usr/bin/dpkg" ]; then
    local t0=$SECONDS
    log "debootstrap --variant=minbase $CODENAME from $MIRROR (cached in $PRISTINE)"
    rm -rf "$PRISTINE.part"
    debootstrap --variant=minbase "$CODENAME" "$PRISTINE.part" "$MIRROR" >"$HF_TMP/debootstrap.log" 2>&1 ||
      { tail -n 20 "$HF_TMP/debootstrap.log"; return 1; }
    mv "$PRISTINE.part" "$PRISTINE"
    log "debootstrap took $((SECONDS - t0)) s"
  fi
  remove_work
  cp -a "$PRISTINE" "$WORK"
}

# runs in a new network, mount and PID namespace: $1 = the root, $2 = where to log
serve_and_probe() {
  unshare --net --mount --pid --fork --kill-child bash -s -- "$1" "$2" "$IQN" <<'INNER'
set -euo pipefail
root=$1 out=$2 iqn=$3
ip link set lo up
mount -t proc proc "$root/proc"
chroot "$root" /usr/bin/holdfast target --config /etc/holdfast/target.toml \
  </dev/null >"$out/target.log" 2>&1 &
pid=$!
for _ in $(seq 300); do
  (exec 3<>/dev/tcp/127.0.0.1/3260) 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { echo "target exited:"; cat "$out/target.log"; exit 1; }
  sleep 0.1
done
rc=0
iscsi-ls -s iscsi://127.0.0.1:3260 >"$out/iscsi-ls.txt" 2>&1 || rc=1
iscsi-inq "iscsi://127.0.0.1:3260/$iqn/1" >"$out/iscsi-inq.txt" 2>&1 || rc=1
kill -TERM "$pid"
trc=0
wait "$pid" || trc=$?
echo "target exit status $trc"
[ "$trc" = 0 ] && exit "$rc"
exit 1
INNER
}

clean_root_ok() {
  local t0=$SECONDS
  make_root || { echo "  could not make the Debian root"; return 1; }
  cp "$DEB" "$WORK/tmp/holdfast.deb"
  chroot "$WORK" dpkg -i /tmp/holdfast.deb 2>&1 | sed 's/^/  dpkg: /'
  chroot "$WORK" dpkg -s holdfast | grep '^Status: install ok installed' >/dev/null ||
    { echo "  dpkg -i in the clean root failed"; return 1; }
  log "root ready and package installed in $((SECONDS - t0)) s"
  local rc=0
  serve_and_probe "$WORK" "$HF_TMP" 2>&1 | sed 's/^/  /' || rc=1
  sed 's/^/  target: /' "$HF_TMP/target.log"
  sed 's/^/  iscsi-ls: /' "$HF_TMP/iscsi-ls.txt" "$HF_TMP/iscsi-inq.txt" 2>/dev/null
  [ "$rc" = 0 ] || return 1
  grep -q "^Target:$IQN Portal:" "$HF_TMP/iscsi-ls.txt" &&
    grep -Eq '^Lun:0[[:space:]]' "$HF_TMP/iscsi-ls.txt" &&
    grep -Eq '^Lun:1[[:space:]]+Type:DIRECT_ACCESS' "$HF_TMP/iscsi-ls.txt" &&
    grep -q '^Peripheral Device Type:DIRECT_ACCESS' "$HF_TMP/iscsi-inq.txt" || {
    echo "  the LUNs did not answer as expected"
    return 1
  }
  [ -f "$WORK/var/lib/holdfast/target/quorum.img" ] && [ -f "$WORK/var/lib/holdfast/target/vmdisk.img" ] ||
    { echo "  no LUN files in /var/lib/holdfast/target of the root"; return 1; }
  echo "  clean root: $((SECONDS - t0)) s"
}
on_exit remove_work
if clean_root_ok; then
  report PASS package-clean-root
else
  report FAIL package-clean-root
  FAILS=$((FAILS + 1))
fi
[ "$FAILS" = 0 ]
