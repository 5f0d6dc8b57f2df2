# shellcheck shell=bash
# tools/deps.sh: installs and verifies what the test and bench scripts need.
# Source it, then call
#   deps_install test|bench|fuzz|vm ...   install what is missing for those uses
#                                         (test includes the package build and its
#                                          clean-root test: cargo-deb, debootstrap)
#   deps_verify  test|bench|fuzz|vm ...   check every tool works; prints one line per
#                                         tool, returns non-zero naming what is broken
#
# QEMU: Debian's qemu-block-extra (the iscsi:// driver) must be the exact version of
# qemu-utils (and of qemu-system-x86). A machine may start with a newer qemu-utils
# (backports) that has no matching qemu-block-extra in the configured sources; asking
# apt for qemu-block-extra alone then *removes* qemu-utils. So the QEMU packages are
# installed together, pinned to one version that every one of them has, allowing the
# downgrade.

_deps_sudo=()
[ "$(id -u)" = 0 ] || _deps_sudo=(sudo)
_DEPS_UPDATED=0

_deps_say() { printf '[deps] %s\n' "$*"; }

_deps_apt() {
  DEBIAN_FRONTEND=noninteractive "${_deps_sudo[@]}" apt-get "$@"
}

_deps_update_once() {
  [ "$_DEPS_UPDATED" = 1 ] && return 0
  _deps_say "apt-get update"
  _deps_apt update -q >/dev/null || return 1
  _DEPS_UPDATED=1
}

# _deps_installed_version PKG: the installed version, empty if not installed
_deps_installed_version() {
  dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null |
    awk '$1 == "install" && $3 == "installed" {print $4}'
}

# _deps_versions PKG: every version apt can install, one per line
_deps_versions() {
  apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}'
}

# _deps_qemu_version PKG...: the version to pin PKG... to. The installed qemu-utils
# version when every package has it (no change), else the newest version all have.
_deps_qemu_version() {
  local have p common
  have=$(_deps_installed_version qemu-utils)
  common=$(_deps_versions "$1" | sort -u)
  for p in "${@:2}"; do
    common=$(comm -12 <(printf '%s\n' "$common") <(_deps_versions "$p" | sort -u))
  done
  if [ -n "$have" ] && grep -qxF "$have" <<<"$common"; then
    echo "$have"
    return 0
  fi
  [ -n "$common" ] || return 1
  local v best=""
  while read -r v; do
    if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
  done <<<"$common"
  echo "$best"
}

# deps_qemu PKG...: install qemu-utils, qemu-block-extra and PKG... at one version
deps_qemu() {
  local pkgs=(qemu-utils qemu-block-extra "$@") v p need=0 args=()
  for p in "${pkgs[@]}"; do
    [ "$(_deps_installed_version "$p")" = "$(_deps_installed_version qemu-utils)" ] &&
      [ -n "$(_deps_installed_version "$p")" ] || need=1
  done
  if [ "$need" = 0 ]; then
    _deps_say "QEMU packages at one version: ${pkgs[*]} $(_deps_installed_version qemu-utils)"
    return 0
  fi
  v=$(_deps_qemu_version "${pkgs[@]}") || {
    _deps_update_once || return 1
    v=$(_deps_qemu_version "${pkgs[@]}")
  } || {
    echo "deps: no version is available for all of ${pkgs[*]} (apt-cache madison qemu-utils qemu-block-extra)" >&2
    return 1
  }
  for p in "${pkgs[@]}"; do args+=("$p=$v"); done
  _deps_say "installing ${args[*]} together (qemu-utils was: $(_deps_installed_version qemu-utils))"
  _deps_update_once || return 1
  _deps_apt install -y -q --allow-downgrades --no-install-recommends "${args[@]}" >/dev/null
}

# deps_apt PKG...: install the Debian packages that are not installed
deps_apt() {
  local p missing=()
  for p in "$@"; do
    [ -n "$(_deps_installed_version "$p")" ] || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  _deps_update_once || return 1
  _deps_say "installing ${missing[*]}"
  _deps_apt install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

_deps_packages() {
  local use
  for use in "$@"; do
    case $use in
      # prometheus: for promtool (check metrics); its daemon is not used
      # debootstrap, iproute2: tools/package-test.sh (a clean Debian root, its own netns)
      # chromium: the status page test (tests/cluster/status_page.rs)
      # systemd, procps: systemd-analyze verify (tests/server/service.rs), ps
      # ceph-*: a throwaway cluster for the RBD backend (tools/ceph-up.sh,
      # tests/server/rbd.rs); holdfast itself loads librados2/librbd1 at run time
      # cpio, binutils (strip): the QEMU test guest's initramfs (fixtures/qemu-guest/build.sh)
      test) echo libiscsi-bin tgt bc iperf3 sg3-utils prometheus debootstrap iproute2 chromium systemd procps \
        ceph-mon ceph-osd ceph-mgr ceph-common librados2 librbd1 uuid-runtime cpio binutils ;;
      bench) echo libiscsi-bin tgt bc iperf3 ;;
      fuzz | vm) ;;
      *) echo "deps: unknown use '$use' (test|bench|fuzz|vm)" >&2; return 1 ;;
    esac
  done
}

deps_install() {
  local pkgs qemu_extra=()
  command -v dpkg-query >/dev/null || { echo "deps: no dpkg: install the packages yourself" >&2; return 1; }
  pkgs=$(_deps_packages "$@") || return 1
  # shellcheck disable=SC2086
  deps_apt $pkgs || return 1
  case " $* " in *" vm "*) qemu_extra=(qemu-system-x86) ;; esac
  case " $* " in *" test "* | *" bench "* | *" vm "*) deps_qemu "${qemu_extra[@]}" || return 1 ;; esac
  case " $* " in *" test "* | *" fuzz "*) _deps_rust "$@" || return 1 ;; esac
}

_deps_rust() {
  local c
  if command -v rustup >/dev/null; then
    for c in rustfmt clippy; do
      rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
    done
  fi
  case " $* " in
    *" fuzz "* | *" test "*)
      # tools/fuzz.sh; works on stable through RUSTC_BOOTSTRAP=1
      command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz ;;
  esac
  case " $* " in *" test "*) deps_cargo_deb ;; esac
}

# deps_cargo_deb: cargo-deb for tools/package.sh (measured: 5 min 54 s wall, 1 min 40 s
# CPU to compile with CARGO_BUILD_JOBS=1 on a shared 2-core machine)
deps_cargo_deb() {
  command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
}

# _deps_check NAME CMD...: runs CMD quietly; one ok/MISSING line
_deps_check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    printf '  ok       %s\n' "$name"
  else
    printf '  BROKEN   %s: %s\n' "$name" "$(tail -n 2 <<<"$out" | tr '\n' ' ')"
    _DEPS_BROKEN+=("$name")
  fi
}

_deps_qemu_iscsi() {
  # --help lists iscsi even without the module, so open an iscsi:// URL on a closed
  # port: a loaded driver fails to connect, a missing one says "Unknown protocol"
  local out
  qemu-img --version | head -n 1
  out=$(timeout 20 qemu-img info "iscsi://127.0.0.1:1/iqn.2026-11.org.holdfast:probe/0" 2>&1) || true
  if grep -q "Unknown protocol" <<<"$out" || ! grep -q "iSCSI" <<<"$out"; then
    echo "qemu-img has no working iscsi driver: $out (qemu-utils $(_deps_installed_version qemu-utils), qemu-block-extra $(_deps_installed_version qemu-block-extra))"
    return 1
  fi
}

_deps_promtool() {
  promtool --version | head -n 1
  # a valid exposition passes, one without HELP fails: promtool really lints
  printf '# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n' | promtool check metrics || return 1
  if printf '# TYPE x_total counter\nx_total 1\n' | promtool check metrics >/dev/null 2>&1; then
    echo "promtool check metrics accepted a series without help text"
    return 1
  fi
}

# headless Chromium renders a page (tests/cluster/status_page.rs drives it over DevTools)
_deps_chromium() {
  local out
  out=$(timeout 60 chromium --headless --no-sandbox --disable-gpu --dump-dom \
    'data:text/html,<p id=x>holdfast-probe</p>' 2>/dev/null) || { echo "chromium failed: $out"; return 1; }
  grep -q 'holdfast-probe' <<<"$out" || { echo "chromium rendered nothing: $out"; return 1; }
}

# systemd-analyze verify works without systemd as PID 1 (tests/server/service.rs runs it
# on packaging/systemd/*.service): check it on a unit of its own, and that it speaks up
# about a bad setting (the test counts any output as a finding).
_deps_systemd_verify() {
  local d rc=0 out
  d=$(mktemp -d)
  printf '[Service]\nType=notify\nExecStart=/bin/true\n' >"$d/ok.service"
  printf '[Service]\nType=nonsense\nExecStart=/bin/true\n' >"$d/bad.service"
  out=$(systemd-analyze verify --man=no "$d/ok.service" 2>&1) && [ -z "$out" ] || rc=1
  grep -q nonsense <<<"$(systemd-analyze verify --man=no "$d/bad.service" 2>&1)" || rc=1
  rm -rf "$d"
  [ "$rc" = 0 ] || echo "systemd-analyze verify does not work here: $out"
  return "$rc"
}

_deps_ceph() {
  local c
  for c in ceph-mon ceph-osd ceph-mgr ceph rbd ceph-authtool monmaptool uuidgen; do
    command -v "$c" >/dev/null || { echo "$c not on PATH"; return 1; }
  done
  ceph --version
}

# what dlopen will find: the sonames in the loader's cache
_deps_ceph_libs() {
  local l
  for l in librados.so.2 librbd.so.1; do
    /sbin/ldconfig -p | grep -q "^[[:space:]]*$l " || { echo "$l not in the loader cache"; return 1; }
  done
}

_deps_tool() { command -v "$1" >/dev/null || { echo "$1 not on PATH"; return 1; }; }

deps_verify() {
  local use
  _DEPS_BROKEN=()
  echo "tools:"
  for use in "$@"; do
    case $use in
      bench) case " $* " in *" test "*) continue ;; esac ;;&
      test | bench)
        _deps_check "qemu-img with iscsi:// (qemu-utils + qemu-block-extra)" _deps_qemu_iscsi
        _deps_check "iscsi-test-cu, iscsi-inq, iscsi-ls, iscsi-perf, iscsi-readcapacity16 (libiscsi-bin)" \
          bash -c 'for c in iscsi-test-cu iscsi-inq iscsi-ls iscsi-perf iscsi-readcapacity16; do command -v $c >/dev/null || { echo "$c missing"; exit 1; }; done'
        _deps_check "tgtd, tgtadm (tgt)" bash -c 'command -v tgtd && command -v tgtadm'
        _deps_check "bc" bash -c 'echo 1+1 | bc | grep -qx 2'
        _deps_check "iperf3" iperf3 --version
        ;;&
      test)
        _deps_check "sg_persist (sg3-utils)" _deps_tool sg_persist
        _deps_check "promtool check metrics (prometheus)" _deps_promtool
        _deps_check "chromium --headless (the status page test)" _deps_chromium
        _deps_check "systemd-analyze verify (systemd)" _deps_systemd_verify
        _deps_check "cargo fmt" cargo fmt --version
        _deps_check "cargo clippy" cargo clippy --version
        _deps_check "cargo fuzz" cargo fuzz --version
        _deps_check "cargo deb" cargo deb --version
        _deps_check "debootstrap" _deps_tool debootstrap
        _deps_check "ceph-mon, ceph-osd, ceph-mgr, ceph, rbd (Ceph 15 or later)" _deps_ceph
        _deps_check "librados.so.2, librbd.so.1 loadable (the RBD backend dlopens them)" _deps_ceph_libs
        _deps_check "cpio, strip, dpkg-deb (fixtures/qemu-guest/build.sh)" \
          bash -c 'command -v cpio && command -v strip && command -v dpkg-deb'
        _deps_check "unshare, chroot, ip (util-linux, coreutils, iproute2)" \
          bash -c 'command -v unshare && command -v chroot && command -v ip'
        ;;
      fuzz) _deps_check "cargo fuzz" cargo fuzz --version ;;
      vm)
        _deps_check "qemu-system-x86_64" qemu-system-x86_64 --version
        _deps_check "qemu-system-x86 and qemu-block-extra at one version" bash -c \
          "[ \"\$(dpkg-query -W -f='\${Version}' qemu-system-x86)\" = \"\$(dpkg-query -W -f='\${Version}' qemu-block-extra)\" ]"
        ;;
    esac
  done
  if [ ${#_DEPS_BROKEN[@]} -gt 0 ]; then
    echo "deps: not working after install: ${_DEPS_BROKEN[*]}" >&2
    return 1
  fi
}
