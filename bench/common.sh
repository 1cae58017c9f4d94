# bench/common.sh — shell helpers shared by bench/run, bench/loop, bench/memory,
# bench/scale, bench/stream and bench/all.
# Source it after setting NAME (the script's name, for messages and the
# default output file /tmp/vdbus-bench/$NAME.md).  It sets HERE ROOT PY LIB,
# and provides: log die need build_vdbus make_workspace start_bg stop_pid
# wait_uri start_vdbusd vdbus_cli precondition_nbd source_rev.
# Cleanup (hooks in CLEANUP_HOOKS, the servers, hooks in CLEANUP_AFTER_HOOKS,
# the temp dir) runs on exit, Ctrl-C and SIGTERM.

HERE=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PY=/usr/bin/python3
LIB="$HERE/benchlib.py"
OUT=${BENCH_OUT:-/tmp/vdbus-bench/$NAME.md}
TSV=${OUT%.md}.tsv

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$NAME" -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# need TOOL...: fail loudly if a tool is missing
need() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found (install it: see bench/README.md)"
  done
}
need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root"; }

source "$HERE/damon.sh"

[ -x "$PY" ] || die "$PY not found (Debian's python3 is required)"

# the source the binaries were built from (the working tree may be dirty)
source_rev() {
  local rev
  rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
  if [ "$rev" != '?' ] && [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no -- src include meson.build 2>/dev/null)" ]; then
    rev="$rev+dirty"
  fi
  echo "$rev"
}

# build_vdbus: sets VDBUSD and VDBUS (release build in build-bench/ unless VDBUS_BUILD)
build_vdbus() {
  need meson ninja
  local build
  if [ -n "${VDBUS_BUILD:-}" ]; then
    build=$VDBUS_BUILD
  else
    build=$ROOT/build-bench
    if [ ! -f "$build/build.ninja" ]; then
      log "meson setup $build --buildtype=release"
      meson setup "$build" "$ROOT" --buildtype=release >&2
    fi
    log "ninja -C $build"
    ninja -C "$build" >&2
  fi
  VDBUSD=$(find "$build" -type f -name vdbusd -perm -u+x | head -n1)
  VDBUS=$(find "$build" -type f -name vdbus -perm -u+x | head -n1)
  [ -n "$VDBUSD" ] && [ -n "$VDBUS" ] || die "vdbusd/vdbus not found in $build"
}

PIDS=()
CLEANUP_HOOKS=()         # run first, while the servers still run (detach loop devices, …)
CLEANUP_AFTER_HOOKS=()   # run once they are gone, before $W is removed (unmount what they used)
W=
_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p h
  for h in "${CLEANUP_HOOKS[@]}"; do "$h" || true; done
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  for h in "${CLEANUP_AFTER_HOOKS[@]}"; do "$h" || true; done
  [ -n "$W" ] && rm -rf "$W"
  damon_resume
  exit $rc
}

# make_workspace: temp dir $W, cleanup traps, output dir; empties $TSV
make_workspace() {
  W=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/vdbus-$NAME.XXXXXX")
  trap _cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  damon_pause
  mkdir -p "$(dirname "$OUT")"
  : > "$TSV"
}

# start_bg LOGNAME CMD...: background process, pid in $BGPID
start_bg() {
  local name=$1; shift
  "$@" >"$W/$name.log" 2>&1 &
  BGPID=$!
  PIDS+=("$BGPID")
}

stop_pid() {
  local pid=$1 p keep=()
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# wait_uri URI PID NAME: wait until the export answers (or the server died)
wait_uri() {
  local uri=$1 pid=$2 name=$3
  for _ in $(seq 200); do
    kill -0 "$pid" 2>/dev/null || return 1
    nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  log "$name: $uri did not come up"; return 1
}

# start_vdbusd TAG [vdbusd args...]: a fresh vdbusd with its own run/state dirs
# and NBD socket $W/TAG/nbd.sock; sets VDPID and VDCTL (control socket)
start_vdbusd() {
  local tag=$1; shift
  mkdir -p "$W/$tag/run" "$W/$tag/state"
  start_bg "vdbusd-$tag" "$VDBUSD" -f --run-dir "$W/$tag/run" --state-dir "$W/$tag/state" \
    --nbd-listen "unix:$W/$tag/nbd.sock" "$@"
  VDPID=$BGPID
  VDCTL=$W/$tag/run/vdbus.sock
  for _ in $(seq 200); do [ -S "$VDCTL" ] && break; kill -0 "$VDPID" 2>/dev/null || break; sleep 0.05; done
  [ -S "$VDCTL" ] || { cat "$W/vdbusd-$tag.log" >&2; die "vdbusd did not start"; }
}
vdbus_cli() { "$VDBUS" --socket "$VDCTL" "$@"; }

# precondition_nbd URI SIZE LABEL: write the whole export once (1M sequential)
precondition_nbd() {
  log "precondition $3 ($2)"
  fio --name=precondition --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=8 \
      --size="$2" --output-format=terse >/dev/null \
    || die "precondition of $3 failed"
}
