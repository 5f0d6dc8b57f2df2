# shellcheck shell=bash disable=SC2034
# tools/lib.sh: helpers shared by the tools/*.sh end-to-end scripts.
# Source it (after `set -euo pipefail`):  . "$(dirname "$0")/lib.sh"
#
# Provides
#   HF_ROOT        repository root (the folder holding tools/)
#   HF_SHARED      ../shared beside the repository root (override: HOLDFAST_SHARED)
#   HOLDFAST_BIN   the target binary (default: ${CARGO_TARGET_DIR:-$HF_ROOT/target}/release/holdfast)
#   log MSG / die MSG                     progress lines on stderr / fail and exit 1
#   on_exit CMD [ARG...]                  run CMD at exit (LIFO), also on failure/signal
#   run_tracked CMD [ARG...]              run CMD (own process group) and wait; stopped by
#                                         the exit trap if the script ends first
#   make_tmpdir                           sets HF_TMP to a fresh mktemp dir, removed at exit
#                                         (KEEP_TMP=1 keeps it; it is always kept and printed
#                                          when the script fails)
#   free_port                             prints a free port in HF_PORT_MIN..HF_PORT_MAX
#                                         (default 3261..3269; never 3260)
#   reserve_port VAR                      the same, stored in VAR and remembered (use it
#                                         when starting several targets)
#   port_listening PORT                   true if something listens on 127.0.0.1:PORT
#   write_holdfast_config FILE PORT IQN LUN1_SIZE
#                                         a config with LUN 0 = 64MiB, LUN 1 = LUN1_SIZE,
#                                         data_dir "data" beside FILE; append more TOML
#                                         (e.g. [target.chap]) with cat >> FILE
#   start_holdfast CONFIG LOGFILE         start "$HOLDFAST_BIN target --config CONFIG" in
#                                         the background, wait until its portal listens
#                                         (and its "ready" line, at most 5 s more);
#                                         sets HOLDFAST_PID and HOLDFAST_PORT
#   stop_holdfast [PID]                   SIGTERM, wait, require exit status 0
#   report PASS|FAIL|SKIP NAME [DETAIL]   one result line; also appended to $E2E_RESULTS
#                                         (set by tools/test) so it can count them
#   size_bytes 64MiB|1GiB|…               prints the size in bytes

HF_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HF_SHARED=${HOLDFAST_SHARED:-$HF_ROOT/../shared}
if [ -z "${HOLDFAST_SHARED:-}" ] && [ ! -d "$HF_SHARED" ]; then
  # a git worktree elsewhere: ../shared beside the main checkout
  _hf_common=$(git -C "$HF_ROOT" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
  if [ -n "$_hf_common" ] && [ -d "$_hf_common/../../shared" ]; then
    HF_SHARED=$(cd "$_hf_common/../../shared" && pwd)
  fi
fi
HOLDFAST_BIN=${HOLDFAST_BIN:-${CARGO_TARGET_DIR:-$HF_ROOT/target}/release/holdfast}
HF_NAME=${HF_NAME:-$(basename "$0" .sh)}
HF_PORT_MIN=${HF_PORT_MIN:-3261}
HF_PORT_MAX=${HF_PORT_MAX:-3269}
HF_TMP=""
HOLDFAST_PID=""
HOLDFAST_PORT=""
_HF_CLEANUPS=()
_HF_PIDS=()
_HF_PORTS_TAKEN=" "

# log to the script's original stderr, also from traps that run while a
# redirection (e.g. cmd >file 2>&1) is active
exec {_HF_ERR}>&2
log() { printf '[%s %s] %s\n' "$HF_NAME" "$(date +%T)" "$*" >&"$_HF_ERR"; }
die() { log "ERROR: $*"; exit 1; }

# --- cleanup --------------------------------------------------------------------
on_exit() {
  local q
  printf -v q '%q ' "$@"
  _HF_CLEANUPS+=("$q")
}

_hf_stop() {   # _hf_stop PID|-PGID: TERM, up to 5 s, then KILL
  local t=$1
  kill -0 -- "$t" 2>/dev/null || return 0
  log "cleanup: stopping ${t/#-/process group }"
  kill -TERM -- "$t" 2>/dev/null
  for _ in $(seq 50); do kill -0 -- "$t" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "$t" 2>/dev/null
  wait "${t#-}" 2>/dev/null
}

_hf_exit() {
  local rc=$? i t
  set +e
  trap - EXIT INT TERM HUP
  # holdfast instances and tracked commands still running (e.g. the script failed
  # or was interrupted before it stopped them)
  for ((i = ${#_HF_PIDS[@]} - 1; i >= 0; i--)); do _hf_stop "${_HF_PIDS[$i]}"; done
  for ((i = ${#_HF_CLEANUPS[@]} - 1; i >= 0; i--)); do
    eval "${_HF_CLEANUPS[$i]}" || true
  done
  if [ -n "$HF_TMP" ] && [ -d "$HF_TMP" ]; then
    if [ "${KEEP_TMP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
      log "kept temp dir $HF_TMP (logs, configs; data files removed)"
      find "$HF_TMP" -type f \( -name '*.img' -o -name '*.bin' \) -delete 2>/dev/null
    else
      log "removing temp dir $HF_TMP"
      rm -rf "$HF_TMP"
      log "removed temp dir"
    fi
  fi
  exit "$rc"
}
trap _hf_exit EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM HUP

make_tmpdir() {
  HF_TMP=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-$HF_NAME.XXXXXX")
}

# run_tracked CMD [ARG...]: runs CMD in its own process group in the background and
# waits for it, so that a signal to this script is handled at once and the exit
# trap stops CMD and everything it started. Returns CMD's exit status.
run_tracked() {
  local pid rc=0
  if command -v setsid >/dev/null; then setsid "$@" & else "$@" & fi
  pid=$!
  if command -v setsid >/dev/null; then _HF_PIDS+=("-$pid"); else _HF_PIDS+=("$pid"); fi
  wait "$pid" || rc=$?
  return "$rc"
}

# --- ports ----------------------------------------------------------------------
port_listening() {
  local port=$1
  if command -v ss >/dev/null 2>&1; then
    [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
  fi
}

free_port() {
  local p
  for ((p = HF_PORT_MIN; p <= HF_PORT_MAX; p++)); do
    [ "$p" -eq 3260 ] && continue
    case "$_HF_PORTS_TAKEN" in *" $p "*) continue ;; esac
    if ! port_listening "$p"; then
      echo "$p"
      return 0
    fi
  done
  die "no free port in $HF_PORT_MIN..$HF_PORT_MAX"
}

# reserve_port VAR: like free_port, but stores the port in VAR and remembers it, so
# the next reserve_port/free_port in this shell picks another one even before a
# target listens on it
reserve_port() {
  local p
  p=$(free_port) || exit 1
  _HF_PORTS_TAKEN+="$p "
  printf -v "$1" '%s' "$p"
}

# --- sizes and configs ----------------------------------------------------------
size_bytes() {
  local s=$1 n unit
  n=${s%%[!0-9]*}; unit=${s#"$n"}
  case "$unit" in
    ""|B) echo "$n" ;;
    KiB|K) echo $((n << 10)) ;;
    MiB|M) echo $((n << 20)) ;;
    GiB|G) echo $((n << 30)) ;;
    TiB|T) echo $((n << 40)) ;;
    *) die "size_bytes: unknown unit in $s" ;;
  esac
}

write_holdfast_config() {
  local file=$1 port=$2 iqn=$3 lun1=$4
  cat >"$file" <<EOF
# generated by tools/$HF_NAME.sh
data_dir = "data"

[[target]]
name = "$iqn"

[[target.portal]]
listen = "127.0.0.1:$port"
tpgt = 1

[[target.lun]]
id = 0
path = "lun0.img"
size = "64MiB"

[[target.lun]]
id = 1
path = "lun1.img"
size = "$lun1"
EOF
}

# rbd_gateway_config FILE N PORT CEPH_CONF IQN SIZE IMAGE...: the config of gateway N of
# two (tpgt and ALUA group N, the other one its peer) on 127.0.0.1:PORT, LUN 0, 1, ...
# serving IMAGE... ("POOL/NAME", SIZE each) as client.holdfast
rbd_gateway_config() {
  local file=$1 n=$2 port=$3 conf=$4 iqn=$5 size=$6 lun=0 img
  shift 6
  mkdir -p "$(dirname "$file")"
  cat >"$file" <<EOF
# generated by ${HF_NAME:-tools}
data_dir = "data"

[ceph]
conf = "$conf"
client = "client.holdfast"

[alua]
group = $n
[[alua.peer]]
group = $((3 - n))

[[target]]
name = "$iqn"
[[target.portal]]
listen = "127.0.0.1:$port"
tpgt = $n
EOF
  for img in "$@"; do
    printf '[[target.lun]]\nid = %d\nrbd = "%s"\nsize = "%s"\n' "$lun" "$img" "$size" >>"$file"
    lun=$((lun + 1))
  done
}

# --- holdfast process -----------------------------------------------------------
start_holdfast() {
  local config=$1 logfile=$2 port pid
  [ -x "$HOLDFAST_BIN" ] || die "$HOLDFAST_BIN not built (cargo build --release)"
  [ -f "$config" ] || die "config $config missing"
  port=$(sed -n 's/^[[:space:]]*listen[[:space:]]*=[[:space:]]*"[^"]*:\([0-9]*\)".*/\1/p' "$config" | head -n1)
  [ -n "$port" ] || die "no portal listen = \"HOST:PORT\" in $config"
  port_listening "$port" && die "port $port is already in use (another target running?)"
  case "$_HF_PORTS_TAKEN" in *" $port "*) ;; *) _HF_PORTS_TAKEN+="$port " ;; esac
  log "starting $HOLDFAST_BIN target --config $config (port $port, log $logfile)"
  # stdin from /dev/null; the daemon logs to stderr
  RUST_LOG=${RUST_LOG:-info} "$HOLDFAST_BIN" target --config "$config" </dev/null >>"$logfile" 2>&1 &
  pid=$!
  _HF_PIDS+=("$pid")
  for _ in $(seq 300); do   # 30 s
    if ! kill -0 "$pid" 2>/dev/null; then
      local rc=0
      wait "$pid" || rc=$?
      log "holdfast exited with status $rc before listening; log tail:"
      tail -n 30 "$logfile" >&2
      return 1
    fi
    if port_listening "$port"; then
      # listening; also wait (up to 5 s) for the "ready" line the target prints
      # once it is serving, in case it binds before its targets are set up
      for _ in $(seq 50); do
        grep -q 'ready' "$logfile" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      grep -q 'ready' "$logfile" 2>/dev/null || log "no 'ready' line in $logfile yet; going on"
      HOLDFAST_PID=$pid
      HOLDFAST_PORT=$port
      log "holdfast pid $pid listening on 127.0.0.1:$port"
      return 0
    fi
    sleep 0.1
  done
  log "holdfast did not listen on port $port within 30 s; log tail:"
  tail -n 30 "$logfile" >&2
  return 1
}

stop_holdfast() {
  local pid=${1:-$HOLDFAST_PID} rc
  [ -n "$pid" ] || die "stop_holdfast: no pid"
  if ! kill -0 "$pid" 2>/dev/null; then
    rc=0; wait "$pid" 2>/dev/null || rc=$?
    log "holdfast pid $pid had already exited (status $rc)"
    return 1
  fi
  kill -TERM "$pid"
  for _ in $(seq 200); do   # 20 s
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "holdfast pid $pid still running 20 s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 1
  fi
  rc=0; wait "$pid" || rc=$?
  if [ "$rc" -ne 0 ]; then
    log "holdfast pid $pid exited with status $rc after SIGTERM (expected 0)"
    return 1
  fi
  log "holdfast pid $pid stopped cleanly"
  [ "$pid" = "$HOLDFAST_PID" ] && HOLDFAST_PID=""
  return 0
}

# --- results --------------------------------------------------------------------
report() {
  local verdict=$1 name=$2 detail=${3:-}
  printf '%s: %s%s\n' "$verdict" "$name" "${detail:+ ($detail)}"
  if [ -n "${E2E_RESULTS:-}" ]; then
    printf '%s %s%s\n' "$verdict" "$name" "${detail:+ ($detail)}" >>"$E2E_RESULTS"
  fi
}
