# Guest: the nbd-kernel frontend.  Disks attached as /dev/nbdN (kernel NBD
# over socket pairs served by vdbusd): partitions, ext4, persistence of a
# file disk across unplug/plug, fio verification, refusal to unplug a
# mounted disk, recovery after a kill -9 of the daemon (NBD_CMD_RECONFIGURE).
R=/run/vdbus V="vdbus --socket $R/vdbus.sock"
LOG=/tmp/vdbusd.log

pass() { echo "PASS nbd-kernel: $1"; }
fail() { echo "FAIL nbd-kernel: $1"; }
# Start vdbusd in the foreground (its log in $LOG); wait for its socket.
start_daemon() {
  rm -f $R/vdbus.sock
  vdbusd -f -v --run-dir $R --state-dir /var/lib/vdbus --nbd-listen unix:$R/nbd.sock \
    >>$LOG 2>&1 &
  DPID=$!
  for _ in $(seq 100); do
    [ -S $R/vdbus.sock ] && $V list >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
devof() { $V list | awk -v n="$1" '$1 == n {print $5}'; }
# Wait (up to $2 tenths of a second) until path $1 exists.
wait_for() { for _ in $(seq "$2"); do [ -e "$1" ] && return 0; sleep 0.1; done; return 1; }
gone_for() { for _ in $(seq "$2"); do [ -e "$1" ] || return 0; sleep 0.1; done; return 1; }
show_log() { tail -n 15 $LOG | sed 's/^/# /'; dmesg | grep -i nbd | tail -n 10 | sed 's/^/# /'; }

mkdir -p /mnt/a /mnt/b /var/tmp
if ! start_daemon; then
  fail "vdbusd starts"; show_log; exit 0
fi

# ---- GPT, ext4, files; a file disk keeps them across unplug and plug ----
if $V plug ram --size 64M --name r --attach nbd-kernel >/dev/null &&
   $V plug file /var/tmp/f.img --create --size 64M --name f --attach nbd-kernel >/dev/null; then
  pass "plug a RAM disk and a file disk"
else
  fail "plug a RAM disk and a file disk"; show_log
fi
ok=1
for n in r f; do
  dev=$(devof $n)
  case "$dev" in /dev/nbd*) ;; *) ok=0; echo "# $n: device '$dev'"; continue ;; esac
  printf 'label: gpt\n,32M\n,\n' | sfdisk -q "$dev" >/dev/null 2>&1 || { ok=0; echo "# sfdisk $dev"; }
  blockdev --rereadpt "$dev"
  wait_for "${dev}p2" 50 || { ok=0; echo "# no ${dev}p2"; continue; }
  mkfs.ext4 -q "${dev}p1" && mount "${dev}p1" /mnt/a || { ok=0; echo "# mkfs/mount ${dev}p1"; continue; }
  for i in 1 2 3; do dd if=/dev/urandom of=/mnt/a/file$i bs=64k count=$((i * 16)) 2>/dev/null; done
  (cd /mnt/a && sha256sum file1 file2 file3) > /tmp/sums.$n
  umount /mnt/a || ok=0
  mount "${dev}p1" /mnt/a && (cd /mnt/a && sha256sum -c /tmp/sums.$n >/dev/null) || ok=0
  umount /mnt/a || ok=0
done
[ $ok = 1 ] && pass "GPT with two partitions, ext4, files and checksums" ||
  { fail "GPT with two partitions, ext4, files and checksums"; show_log; }

old=$(devof f)
if $V unplug f && gone_for "${old}p1" 50 && $V plug file /var/tmp/f.img --name f --attach nbd-kernel >/dev/null; then
  dev=$(devof f)
  wait_for "${dev}p1" 50
  if mount "${dev}p1" /mnt/a && (cd /mnt/a && sha256sum -c /tmp/sums.f >/dev/null) && umount /mnt/a; then
    pass "file disk: unplug, plug again, partitions re-read, checksums match"
  else
    fail "file disk: checksums after unplug and plug"; show_log
  fi
else
  fail "file disk: unplug and plug again"; show_log
fi
$V unplug r >/dev/null; $V unplug f >/dev/null

# ---- MBR; fio with verification on the raw device ----
if $V plug ram --size 96M --name m --attach nbd-kernel >/dev/null; then
  dev=$(devof m)
  if printf 'label: dos\n,48M,L\n,,L\n' | sfdisk -q "$dev" >/dev/null 2>&1 && blockdev --rereadpt "$dev" &&
     wait_for "${dev}p2" 50 && [ "$(blockdev --getsize64 "${dev}p1")" = 50331648 ]; then
    pass "MBR with two partitions"
  else
    fail "MBR with two partitions"; show_log
  fi
  if fio --name=verify --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite \
       --bsrange=4k-128k --iodepth=16 --size=64M --verify=crc32c --do_verify=1 \
       --verify_fatal=1 --output=/tmp/fio-verify.txt >/dev/null 2>&1; then
    pass "fio io_uring direct random writes with crc32c verification on $dev"
  else
    fail "fio verification on $dev"; tail -n 10 /tmp/fio-verify.txt | sed 's/^/# /'; show_log
  fi
  $V unplug m >/dev/null
else
  fail "plug a disk for MBR and fio"; show_log
fi

# ---- a mounted disk is not unplugged without --force ----
if $V plug ram --size 64M --name b --attach nbd-kernel >/dev/null; then
  dev=$(devof b); idx=${dev#/dev/nbd}
  printf 'label: gpt\n,32M\n,\n' | sfdisk -q "$dev" >/dev/null 2>&1; blockdev --rereadpt "$dev"
  wait_for "${dev}p2" 50
  mkfs.ext4 -q "${dev}p1" && mount "${dev}p1" /mnt/b
  if ! $V unplug b 2>/tmp/unplug.err && grep -q "in use" /tmp/unplug.err && [ -n "$(devof b)" ]; then
    pass "unplug of a mounted disk is refused"
  else
    fail "unplug of a mounted disk is refused"; cat /tmp/unplug.err | sed 's/^/# /'
  fi
  if $V unplug b --force && [ -z "$(devof b)" ]; then
    umount -l /mnt/b 2>/dev/null
    if gone_for "${dev}p1" 100 && gone_for "${dev}p2" 10 && gone_for "/sys/block/nbd$idx/nbd${idx}p1" 10; then
      pass "unplug --force of a mounted disk leaves no stale partition nodes"
    else
      fail "unplug --force leaves no stale partition nodes: $(ls ${dev}p* 2>&1)"; show_log
    fi
  else
    fail "unplug --force of a mounted disk"; umount -l /mnt/b 2>/dev/null; show_log
  fi
else
  fail "plug a disk for the busy test"; show_log
fi

# ---- kill -9 of the daemon during verified writes; RECONFIGURE ----
if $V plug file /var/tmp/k.img --create --size 128M --name k --attach nbd-kernel >/dev/null &&
   dev=$(devof k) && printf 'label: gpt\n,\n' | sfdisk -q "$dev" >/dev/null 2>&1 &&
   blockdev --rereadpt "$dev" && wait_for "${dev}p1" 50 && mkfs.ext4 -q "${dev}p1" &&
   mount "${dev}p1" /mnt/a; then
  $V plug ram --size 16M --name rr --attach nbd-kernel >/dev/null; rrdev=$(devof rr)
  fio --name=crash --filename=/mnt/a/data --ioengine=psync --direct=1 --rw=write --bs=64k \
      --size=32M --rate=2m --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --output=/tmp/fio-crash.txt >/dev/null 2>&1 &
  FIO=$!
  sleep 4
  kill -0 $FIO 2>/dev/null && midway=1 || midway=0
  kill -9 $DPID; wait $DPID 2>/dev/null
  echo "# vdbusd killed (writer running: $midway); restarting"
  sleep 1
  if start_daemon && [ "$(devof k)" = "$dev" ] && $V info k | grep -q recovered; then
    pass "after kill -9 the restarted daemon takes $dev back (RECONFIGURE)"
  else
    fail "after kill -9 the restarted daemon takes $dev back"; $V list; show_log
  fi
  # A RAM disk comes back empty: a new device; the old one is disconnected.
  if [ -n "$rrdev" ] && [ "$(devof rr)" != "$rrdev" ] && gone_for "/sys/block/${rrdev#/dev/}/backend" 50; then
    pass "after kill -9 a RAM disk gets a new device; the unclaimed old one is disconnected"
  else
    fail "unclaimed device $rrdev after the restart (rr is now $(devof rr))"; show_log
  fi
  $V unplug rr >/dev/null
  # The writer goes on once the kernel retries what was lost (request timeout).
  for _ in $(seq 180); do kill -0 $FIO 2>/dev/null || break; sleep 1; done
  if kill -0 $FIO 2>/dev/null; then
    kill -9 $FIO; fail "the writer finishes after the restart (still running)"; show_log
  elif wait $FIO && [ $midway = 1 ]; then
    pass "the writer finishes after the restart and fio verification passes"
  else
    fail "fio verification after the restart"; tail -n 10 /tmp/fio-crash.txt | sed 's/^/# /'; show_log
  fi
  umount /mnt/a
  if e2fsck -fn "${dev}p1" >/tmp/fsck.txt 2>&1; then
    pass "e2fsck -fn is clean after the crash"
  else
    fail "e2fsck -fn after the crash"; tail -n 10 /tmp/fsck.txt | sed 's/^/# /'
  fi
  $V unplug k >/dev/null
  rm -f /var/tmp/k.img /var/tmp/f.img
else
  fail "set up a mounted file disk for the crash test"; show_log
fi

# ---- a connection the kernel gave up on (request timeout) is healed ----
# Restart the daemon with a 5 s request timeout, stop it for longer than
# that during a write: the kernel drops the socket, the daemon gives it a
# new one (NBD_CMD_RECONFIGURE) and the requeued write completes.
kill $DPID; wait $DPID 2>/dev/null
export VDBUS_NBD_KERNEL_TIMEOUT=5
start_daemon || { fail "vdbusd restarts"; show_log; }
unset VDBUS_NBD_KERNEL_TIMEOUT
if $V plug file /var/tmp/h.img --create --size 32M --name h --attach nbd-kernel >/dev/null; then
  dev=$(devof h)
  dd if=/dev/urandom of=/tmp/h.data bs=1M count=4 2>/dev/null
  kill -STOP $DPID
  dd if=/tmp/h.data of="$dev" bs=1M oflag=direct conv=fsync 2>/dev/null &
  DD=$!
  sleep 9
  kill -CONT $DPID
  for _ in $(seq 90); do kill -0 $DD 2>/dev/null || break; sleep 1; done
  if ! kill -0 $DD 2>/dev/null && wait $DD &&
     [ "$(dd if="$dev" bs=1M count=4 iflag=direct 2>/dev/null | sha256sum)" = "$(sha256sum < /tmp/h.data)" ] &&
     grep -q "reconnected" $LOG; then
    pass "a connection dropped at the request timeout is healed; the write completes"
  else
    kill -9 $DD 2>/dev/null
    fail "healing a connection dropped at the request timeout"; show_log
  fi
  $V unplug h >/dev/null
  rm -f /var/tmp/h.img
else
  fail "plug a disk for the heal test"; show_log
fi

# (measurements: tests/vm/guest-bench.sh)
$V unplug --all >/dev/null
kill $DPID 2>/dev/null; wait $DPID 2>/dev/null
