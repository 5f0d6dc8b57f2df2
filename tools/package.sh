#!/bin/bash
# tools/package.sh: builds the Debian package target/debian/holdfast_VERSION-1_ARCH.deb
# and prints its path as the last line.
#   1. cargo build --release
#   2. from that binary (so they cannot drift from --help): man pages
#      (target/package/man), bash/zsh/fish completions (target/package/completions),
#      and the packaged /etc/holdfast/target.toml (target/package/etc): the embedded
#      default configuration with data_dir = "/var/lib/holdfast/target", checked with
#      `holdfast target --check`
#   3. cargo deb --no-build (assets: [package.metadata.deb] in Cargo.toml)
# Needs cargo-deb (tools/deps.sh installs it: cargo install cargo-deb --locked).
# Env: NO_BUILD=1 skips step 1 (the release binary must exist).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release/holdfast
# cargo-deb takes the assets relative to the crate root (only target/release is mapped
# to CARGO_TARGET_DIR)
OUT=$ROOT/target/package

say() { printf '[package] %s\n' "$*" >&2; }

if ! command -v cargo-deb >/dev/null; then
  say "cargo-deb missing: installing it (tools/deps.sh)"
  # shellcheck source=SCRIPTDIR/deps.sh
  . "$ROOT/tools/deps.sh"
  deps_cargo_deb
fi
if [ "${NO_BUILD:-0}" != 1 ]; then
  say "cargo build --release"
  cargo build --release >&2
fi
[ -x "$BIN" ] || { say "no release binary $BIN"; exit 1; }

rm -rf "$OUT/man" "$OUT/completions" "$OUT/etc"
mkdir -p "$OUT/etc"
say "man pages and completions from $BIN"
"$BIN" generate man "$OUT/man" >/dev/null
for sh in bash zsh fish; do
  "$BIN" generate completions "$sh" "$OUT/completions" >/dev/null
done

# The package's target.toml is the embedded default with the data under /var/lib.
conf=$OUT/etc/target.toml
{
  echo "# /etc/holdfast/target.toml, installed by the holdfast package: the embedded"
  echo "# default configuration (holdfast target --print-default-config) with its data"
  echo "# in /var/lib/holdfast/target. See the configuration reference in README.md."
  "$BIN" target --print-default-config |
    sed -e 's|^data_dir = .*|data_dir = "/var/lib/holdfast/target"|' \
      -e 's|under \./holdfast-data|under /var/lib/holdfast/target|'
} >"$conf"
grep -qx 'data_dir = "/var/lib/holdfast/target"' "$conf" || {
  say "the default configuration has no data_dir line to point at /var/lib/holdfast/target:"
  cat "$conf" >&2
  exit 1
}
# (captured first: grep -q in a pipe may exit before the writer, a SIGPIPE under pipefail)
check=$("$BIN" target --check --config "$conf" 2>&1) &&
  grep -q "data in /var/lib/holdfast/target" <<<"$check" || {
  say "holdfast target --check does not accept $conf (or its data is not in /var/lib/holdfast/target):"
  echo "$check" >&2
  exit 1
}

say "cargo deb --no-build"
# stripped like a Debian package (the release profile keeps line tables for backtraces)
deb=$(cargo deb --no-build --strip | tail -n 1)
[ -f "$deb" ] || { say "cargo deb did not name a package file (got: $deb)"; exit 1; }
say "built $deb"
echo "$deb"
