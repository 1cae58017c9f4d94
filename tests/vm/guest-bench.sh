# Guest: ublk vs nbd-kernel vs loop (over FUSE) on the same kind of RAM disk,
# fio io_uring with direct I/O, interleaved.  Under software emulation only
# the ratios mean anything.  Prints "# BENCH" lines and a ratio table; the
# result line says only that every measurement ran.
R=/run/vdbus V="vdbus --socket $R/vdbus.sock"
RUNTIME=${BENCH_RUNTIME:-4}
vdbusd --run-dir $R --state-dir /var/lib/vdbus --nbd-listen none || { echo "FAIL bench: vdbusd: exit $?"; exit 0; }
devof() { $V list | awk -v n="$1" '$1 == n {print $5}'; }

# measure FRONTEND JOB → prints the number (IOPS, or MiB/s for 1M)
measure() {
  case $2 in
    4k-randread) rw=randread bs=4k qd=32 ;;
    4k-randwrite) rw=randwrite bs=4k qd=32 ;;
    1M-seqread) rw=read bs=1M qd=8 ;;
  esac
  out=$(fio --name=b --filename="$(devof "b-$1")" --ioengine=io_uring --direct=1 --rw=$rw --bs=$bs \
            --iodepth=$qd --size=96M --time_based --runtime="$RUNTIME" --minimal 2>/dev/null)
  case $rw in
    randwrite) echo "$out" | cut -d';' -f49 ;;
    read) echo $(( $(echo "$out" | cut -d';' -f7) / 1024 )) ;;
    *) echo "$out" | cut -d';' -f8 ;;
  esac
}

ok=1
echo "# bench: plugging"
for fe in ublk nbd-kernel loop; do
  if ! $V plug ram --size 128M --name "b-$fe" --attach $fe >/dev/null; then
    echo "FAIL bench: plug a RAM disk with --attach $fe"; ok=0; continue
  fi
  fio --name=fill --filename="$(devof "b-$fe")" --ioengine=io_uring --direct=1 --rw=write \
      --bs=1M --iodepth=8 --size=128M >/dev/null 2>&1
done
[ $ok = 1 ] || exit 0
for job in 4k-randread 4k-randwrite 1M-seqread; do
  for rep in 1 2; do
    for fe in ublk nbd-kernel loop; do
      v=$(measure $fe $job)
      [ -n "$v" ] && [ "$v" -gt 0 ] 2>/dev/null || { echo "FAIL bench: $fe $job gave no result"; ok=0; v=0; }
      echo "# BENCH $fe $job rep$rep $v"
      eval "r_${fe//-/_}_${job//-/_}_$rep=$v"
    done
  done
done
echo "# BENCH | job | ublk | nbd-kernel | loop | ublk/loop | nbd-kernel/loop |"
for job in 4k-randread 4k-randwrite 1M-seqread; do
  j=${job//-/_}
  u=$(( $(eval echo \$r_ublk_${j}_1) + $(eval echo \$r_ublk_${j}_2) ))
  n=$(( $(eval echo \$r_nbd_kernel_${j}_1) + $(eval echo \$r_nbd_kernel_${j}_2) ))
  l=$(( $(eval echo \$r_loop_${j}_1) + $(eval echo \$r_loop_${j}_2) ))
  [ $l -gt 0 ] || l=1
  echo "# BENCH | $job | $((u / 2)) | $((n / 2)) | $((l / 2)) | $(awk "BEGIN{printf \"%.2f\", $u/$l}") | $(awk "BEGIN{printf \"%.2f\", $n/$l}") |"
done
[ $ok = 1 ] && echo "PASS bench: ublk, nbd-kernel and loop measured on RAM disks"
$V unplug --all >/dev/null
kill "$(pidof vdbusd)" 2>/dev/null
