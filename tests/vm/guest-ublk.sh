# Guest: the ublk frontend.  Filesystems on GPT and MBR partitions of ublk
# disks (RAM and file), data intact across unplug and re-plug, fio verify on
# the raw device, busy/forced unplug, recovery of a disk after the daemon is
# killed with SIGKILL in the middle of writes.  Measurements are in
# guest-bench.sh.
R=/run/vdbus V="vdbus --socket /run/vdbus/vdbus.sock" LOG=/tmp/vdbusd.log
failed=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failed=1; }

start_daemon() {
  vdbusd -f --run-dir $R --state-dir /var/lib/vdbus --nbd-listen unix:$R/nbd.sock >>$LOG 2>&1 &
  for _ in $(seq 100); do
    $V list >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
devof() { $V list | awk -v n="$1" '$1 == n {print $5}'; }
wait_node() { # path: wait up to 5 s for a block device node
  for _ in $(seq 50); do [ -b "$1" ] && return 0; sleep 0.1; done
  return 1
}
# Write a few files of random data to dir and record their checksums in sumfile.
fill() { # dir sumfile
  for i in 1 2 3; do dd if=/dev/urandom of="$1/f$i" bs=1M count=$((i * 3)) 2>/dev/null || return 1; done
  mkdir -p "$1/sub" && cp "$1/f2" "$1/sub/copy" || return 1
  (cd "$1" && sha256sum f1 f2 f3 sub/copy) > "$2"
}

if [ ! -e /dev/ublk-control ]; then
  echo "FAIL ublk: /dev/ublk-control missing (ublk_drv not loaded)"; exit 0
fi
start_daemon || { fail "vdbusd starts" "$(tail -5 $LOG)"; exit 0; }
mkdir -p /mnt/a /mnt/b

# ---- GPT, ext4 on partition 1, RAM and file disks; the file disk re-plugged
gpt_fs() { # name sumfile: GPT with two partitions, ext4 on p1, files
  dev=$(devof "$1")
  [ -n "$dev" ] || return 1
  printf 'label: gpt\n,48M\n,\n' | sfdisk -q "$dev" >/dev/null 2>&1 || return 2
  wait_node "${dev}p1" && wait_node "${dev}p2" || return 3
  mkfs.ext4 -q -F "${dev}p1" && mount "${dev}p1" /mnt/a || return 4
  fill /mnt/a "$2" || { umount /mnt/a; return 5; }
  umount /mnt/a && e2fsck -fn "${dev}p1" >/dev/null 2>&1 || return 6
}
if $V plug ram --size 96M --name gram --attach ublk >/dev/null &&
   $V plug file /var/tmp/gfile.img --size 96M --create --name gfile --attach ublk >/dev/null; then
  gpt_fs gram /tmp/gram.sum && r1=0 || r1=$?
  gpt_fs gfile /tmp/gfile.sum && r2=0 || r2=$?
  [ $r1 = 0 ] && pass "ublk RAM disk: GPT, ext4 on partition 1, files, fsck" ||
    fail "ublk RAM disk: GPT, ext4 on partition 1, files, fsck" "step $r1"
  d1=$(devof gram) d2=$(devof gfile)
  if [ $r2 = 0 ] && $V unplug gram >/dev/null && $V unplug gfile >/dev/null &&
     [ ! -e "$d1" ] && [ ! -e "$d2" ] &&
     $V plug file /var/tmp/gfile.img --name gfile --attach ublk >/dev/null &&
     dev=$(devof gfile) && wait_node "${dev}p1" && mount "${dev}p1" /mnt/a &&
     (cd /mnt/a && sha256sum -c -s /tmp/gfile.sum) && umount /mnt/a &&
     e2fsck -fn "${dev}p1" >/dev/null 2>&1; then
    pass "ublk file disk: GPT, ext4, unplug, plug again: checksums match"
  else
    fail "ublk file disk: GPT, ext4, unplug, plug again: checksums match" "step $r2"
    umount /mnt/a 2>/dev/null
  fi
  $V unplug gfile >/dev/null 2>&1
else
  fail "ublk GPT tests" "plug failed"
fi
rm -f /var/tmp/gfile.img

# ---- MBR with two partitions, ext4 on partition 2
if $V plug ram --size 96M --name mbr --attach ublk >/dev/null && dev=$(devof mbr) &&
   printf 'label: dos\n,32M,L\n,,L\n' | sfdisk -q "$dev" >/dev/null 2>&1 &&
   wait_node "${dev}p2" && mkfs.ext4 -q -F "${dev}p2" && mount "${dev}p2" /mnt/b &&
   fill /mnt/b /tmp/mbr.sum && umount /mnt/b && mount "${dev}p2" /mnt/b &&
   (cd /mnt/b && sha256sum -c -s /tmp/mbr.sum) && umount /mnt/b &&
   e2fsck -fn "${dev}p2" >/dev/null 2>&1; then
  pass "ublk RAM disk: MBR, ext4 on partition 2, checksums, fsck"
else
  fail "ublk RAM disk: MBR, ext4 on partition 2, checksums, fsck" "see log"
  umount /mnt/b 2>/dev/null
fi
$V unplug mbr >/dev/null 2>&1

# ---- fio with verification on the raw device
if $V plug ram --size 64M --name fio --attach ublk >/dev/null && dev=$(devof fio) &&
   fio --name=verify --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite \
       --bsrange=4k-256k --iodepth=32 --size=48M --verify=crc32c --verify_fatal=1 \
       --do_verify=1 > /tmp/fio.out 2>&1; then
  pass "ublk raw device: fio io_uring direct randwrite, verify=crc32c"
else
  fail "ublk raw device: fio io_uring direct randwrite, verify=crc32c" "$(tail -3 /tmp/fio.out 2>/dev/null)"
fi
$V unplug fio >/dev/null 2>&1

# ---- busy: a mounted disk is not unplugged, --force does it
if $V plug ram --size 64M --name busy --attach ublk >/dev/null && dev=$(devof busy) &&
   mkfs.ext4 -q -F "$dev" && mount "$dev" /mnt/a; then
  if $V unplug busy >/dev/null 2>&1; then
    fail "unplug of a mounted ublk disk is refused" "unplug succeeded"
  elif [ -b "$dev" ] && [ "$(devof busy)" = "$dev" ]; then
    pass "unplug of a mounted ublk disk is refused"
  else
    fail "unplug of a mounted ublk disk is refused" "device changed"
  fi
  if $V unplug --force busy >/dev/null 2>&1 && ! $V list | grep -q '^busy ' && [ ! -e "$dev" ]; then
    pass "unplug --force of a mounted ublk disk removes $dev"
  else
    fail "unplug --force of a mounted ublk disk removes $dev" "$(ls /dev/ublkb* 2>&1)"
  fi
  umount -l /mnt/a 2>/dev/null
else
  fail "busy unplug tests" "plug/mkfs/mount failed"
fi

# ---- snapshot of a mounted ublk disk while fio writes to it: the writer
# never notices (the disk becomes an overlay under its feet), and a clone of
# the snapshot, attached as another ublk device, has the files from before
# (crash-consistent: the clone's journal is replayed into its own overlay).
if $V plug ram --size 96M --name snapsrc --attach ublk >/dev/null && dev=$(devof snapsrc) &&
   mkfs.ext4 -q -F "$dev" && mount "$dev" /mnt/a && fill /mnt/a /tmp/snap.sum && sync; then
  fio --name=snap --directory=/mnt/a --size=16M --rw=randwrite --bs=4k --ioengine=io_uring \
      --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1 > /tmp/fio-snap.out 2>&1 &
  wfio=$!
  sleep 1
  kill -0 $wfio 2>/dev/null && during=yes || during=no
  $V snapshot snapsrc --as snap1 >/dev/null 2>/tmp/snap.err; src=$?
  wait $wfio; frc=$?
  echo "# snapshot taken with fio running: $during"
  if [ $src = 0 ] && [ $frc = 0 ] && [ "$(devof snapsrc)" = "$dev" ] &&
     $V clone snap1 --as snapc --attach ublk >/dev/null && cdev=$(devof snapc) &&
     mount "$cdev" /mnt/b && (cd /mnt/b && sha256sum -c -s /tmp/snap.sum); then
    umount /mnt/b
    if (cd /mnt/a && sha256sum -c -s /tmp/snap.sum) && umount /mnt/a &&
       e2fsck -fn "$dev" >/dev/null 2>&1 && e2fsck -fn "$cdev" >/dev/null 2>&1; then
      pass "snapshot of a mounted ublk disk under fio verify: writer unharmed, clone has the files, fsck clean"
    else
      fail "snapshot of a mounted ublk disk under fio verify: writer unharmed, clone has the files, fsck clean" \
        "after the clone check"
    fi
  else
    fail "snapshot of a mounted ublk disk under fio verify: writer unharmed, clone has the files, fsck clean" \
      "snapshot rc $src ($(cat /tmp/snap.err)), fio rc $frc, $(tail -2 /tmp/fio-snap.out)"
  fi
  umount /mnt/b 2>/dev/null; umount /mnt/a 2>/dev/null
  $V unplug snapc >/dev/null 2>&1; $V unplug snapsrc >/dev/null 2>&1; $V unplug snap1 >/dev/null 2>&1
else
  fail "snapshot test" "plug/mkfs/mount/fill failed"
fi

# ---- kill -9 in the middle of writes to a mounted filesystem
# A file disk (restored at restart) and a RAM disk (volatile: not restored,
# its stale device must be deleted).
dd if=/dev/urandom of=/tmp/src bs=1M count=64 2>/dev/null
want=$(sha256sum < /tmp/src)
if $V plug file /var/tmp/rec.img --size 256M --create --name rec --attach ublk >/dev/null &&
   $V plug ram --size 32M --name vol --attach ublk >/dev/null &&
   dev=$(devof rec) && vdev=$(devof vol) && mkfs.ext4 -q -F "$dev" && mount "$dev" /mnt/b; then
  ( dd if=/tmp/src of=/mnt/b/big bs=256k oflag=direct 2>/dev/null; echo $? > /tmp/dd.rc ) &
  wdd=$!
  fio --name=rec --directory=/mnt/b --size=24M --rw=randwrite --bs=4k --ioengine=io_uring \
      --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1 > /tmp/fio-rec.out 2>&1 &
  wfio=$!
  sleep 2
  running=0
  kill -0 $wdd 2>/dev/null && running=$((running + 1))
  kill -0 $wfio 2>/dev/null && running=$((running + 1))
  kill -9 "$(pidof vdbusd)"
  echo "# killed vdbusd with $running writers running"
  sleep 1
  if ! start_daemon; then
    fail "vdbusd restarts after kill -9" "$(tail -5 $LOG)"
  else
    wait $wdd; wait $wfio; frc=$?
    if [ "$(cat /tmp/dd.rc)" = 0 ] && [ $frc = 0 ] && [ "$(sha256sum < /mnt/b/big)" = "$want" ] &&
       [ "$(devof rec)" = "$dev" ] && grep -q "rec: recovered as $dev" $LOG &&
       umount /mnt/b && e2fsck -fn "$dev" >/dev/null 2>&1; then
      pass "kill -9 of vdbusd during writes: the ublk disk recovers, writers finish, data and fsck intact"
    else
      fail "kill -9 of vdbusd during writes: the ublk disk recovers, writers finish, data and fsck intact" \
        "dd rc $(cat /tmp/dd.rc), fio rc $frc, dev $(devof rec) (was $dev)"
      tail -5 /tmp/fio-rec.out
      umount /mnt/b 2>/dev/null
    fi
    if [ ! -e "$vdev" ] && ! $V list | grep -q '^vol '; then
      pass "after kill -9, the stale device of a volatile disk is deleted"
    else
      fail "after kill -9, the stale device of a volatile disk is deleted" "$vdev still there"
    fi
  fi
  $V unplug rec >/dev/null 2>&1
else
  fail "kill -9 recovery test" "plug/mkfs/mount failed"
fi
rm -f /var/tmp/rec.img /tmp/src

# (measurements: tests/vm/guest-bench.sh)

$V unplug --all >/dev/null 2>&1
kill "$(pidof vdbusd)" 2>/dev/null
for _ in $(seq 50); do pidof vdbusd >/dev/null || break; sleep 0.1; done
if [ $failed = 1 ]; then
  echo "# ---- vdbusd log"; sed 's/^/# /' $LOG | tail -60
  dmesg | tail -30 | sed 's/^/# /'
fi
ls /dev/ublkb* >/dev/null 2>&1 && echo "FAIL ublk devices left at the end: $(ls /dev/ublkb*)"
