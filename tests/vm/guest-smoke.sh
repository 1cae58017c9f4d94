# Guest: the kernel has what the frontends need, and vdbusd serves a disk
# over NBD inside the guest (its loopback and Unix sockets only).
R=/run/vdbus V="vdbus --socket $R/vdbus.sock"
for dev in /dev/ublk-control /dev/nbd0 /dev/loop-control /dev/fuse; do
  if [ -e $dev ]; then echo "PASS kernel has $dev"; else echo "FAIL kernel has $dev: missing"; fi
done
if ! vdbusd --run-dir $R --state-dir /var/lib/vdbus --nbd-listen unix:$R/nbd.sock; then
  echo "FAIL vdbusd starts: exit $?"; exit 0
fi
$V plug ram --size 64M --name smoke --attach none >/dev/null &&
  nbdinfo "nbd+unix:///smoke?socket=$R/nbd.sock" | grep -q 'export-size: 67108864' &&
  echo "PASS vdbusd serves a RAM disk over NBD in the guest" ||
  echo "FAIL vdbusd serves a RAM disk over NBD in the guest"
if $V plug ram --size 64M --name lp --attach loop >/dev/null; then
  dev=$($V list | awk '$1 == "lp" {print $5}')
  if mkfs.ext4 -q "$dev" && mkdir -p /mnt/lp && mount "$dev" /mnt/lp && echo hi > /mnt/lp/x &&
     umount /mnt/lp && $V unplug lp; then
    echo "PASS loop attach: mkfs, mount, unplug"
  else
    echo "FAIL loop attach: mkfs/mount/unplug of $dev"
  fi
else
  echo "FAIL loop attach: plug failed"
fi
$V unplug --all >/dev/null
kill "$(cat $R/vdbusd.pid 2>/dev/null || pidof vdbusd)" 2>/dev/null

# --queues: several ublk queues / kernel NBD connections on a 1-CPU guest.
for _ in $(seq 100); do pidof vdbusd >/dev/null || break; sleep 0.1; done
if vdbusd --run-dir $R --state-dir /var/lib/vdbus-q --nbd-listen none --queues 2; then
  for fe in ublk nbd-kernel; do
    if $V plug ram --size 64M --name q-$fe --attach $fe >/dev/null; then
      dev=$($V list | awk -v n=q-$fe '$1 == n {print $5}')
      info=$($V info q-$fe | grep frontend_info)
      want=2
      # The kernel caps ublk's hardware queues at the number of CPUs.
      [ $fe = ublk ] && [ "$(nproc)" -lt 2 ] && want=1
      if echo "$info" | grep -qE "$want (queues|connections)" &&
         fio --name=q --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
             --iodepth=16 --size=32M --verify=crc32c --verify_fatal=1 >/dev/null 2>&1; then
        echo "PASS --queues 2: $fe has $want queue(s) on $(nproc) CPU(s) and verifies"
      else
        echo "FAIL --queues 2: $fe: $info"
      fi
      $V unplug q-$fe >/dev/null
    else
      echo "FAIL --queues 2: plug --attach $fe"
    fi
  done
  $V unplug --all >/dev/null
  kill "$(pidof vdbusd)" 2>/dev/null
else
  echo "FAIL --queues 2: vdbusd starts"
fi
