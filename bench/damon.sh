# bench/damon.sh — pause the kernel's DAMON access monitor while a bench runs.
# Sourced by bench/run, bench/common.sh (loop, memory, scale, stream) and
# bench/all.  Provides damon_pause, damon_resume and damon_note.
#
# Why: some hosts (these cloud VMs among them) run a DAMON "kdamond" thread
# that samples which memory is in use by clearing the accessed bit of a page
# per region every sample interval, to page out what stays cold.  Under a
# shadow-paging hypervisor the next touch of such a page traps to the host:
# for a 2 MiB page measured ~10 us, on the order of what copying 200 KiB costs.
# A 4 GiB RAM disk in huge pages has 2,048 of them and the monitor's up to ~1,300
# samples in them every half second find most of them between two passes of
# a 1M writer: ~5 us per MiB on the server's bill, and fio 1M writes over a
# Unix socket ran 4,688 MiB/s with it against 5,490 without (medians of 5).
# Memory in 4 KiB pages (nbdkit's) is barely sampled.  A machine that does not
# run DAMON has nothing to pause; BENCH_DAMON=keep leaves it running.

DAMON_PAUSED=()

# damon_on DIR: is the kdamond at DIR running?
damon_on() { [ "$(cat "$1/state" 2>/dev/null)" = on ]; }

damon_pause() {
  local d
  [ "${BENCH_DAMON:-pause}" = keep ] && return 0
  for d in /sys/kernel/mm/damon/admin/kdamonds/*; do
    damon_on "$d" || continue
    if echo off > "$d/state" 2>/dev/null; then
      DAMON_PAUSED+=("$d")
      printf '[damon] paused DAMON monitor %s for the run (BENCH_DAMON=keep leaves it on)\n' "$d" >&2
    fi
  done
  return 0
}

damon_resume() {
  local d
  for d in "${DAMON_PAUSED[@]}"; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do   # "on" can find the old thread still exiting
      damon_on "$d" && break
      echo on > "$d/state" 2>/dev/null && break
      sleep 0.2
    done
    damon_on "$d" \
      || printf '[damon] WARNING: could not switch %s back on (echo on > %s/state)\n' "$d" "$d" >&2
  done
  DAMON_PAUSED=()
  return 0
}

# One phrase for a report's header: is a DAMON monitor running now?
damon_note() {
  local d
  for d in /sys/kernel/mm/damon/admin/kdamonds/*; do
    damon_on "$d" && { echo "a DAMON monitor running"; return 0; }
  done
  echo "no DAMON monitor running"
}
