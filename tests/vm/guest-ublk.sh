# Guest: ublk frontend (temporary smoke)
R=/run/vdbus V="vdbus --socket $R/vdbus.sock" LOG=/tmp/vdbusd.log
start_daemon() {
  vdbusd -f -v --run-dir $R --state-dir /var/lib/vdbus --nbd-listen unix:$R/nbd.sock >>$LOG 2>&1 &
  for i in $(seq 100); do [ -S $R/vdbus.sock ] && $V list >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}
start_daemon || { echo "FAIL daemon start"; cat $LOG; exit 0; }
if $V plug ram --size 64M --name r1 --attach ublk; then
  $V list; $V info r1
  dev=$($V list | awk '$1 == "r1" {print $5}')
  echo "dev=$dev"; ls -l /dev/ublk*
  dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
  dd if=/tmp/pat of=$dev bs=1M oflag=direct 2>&1
  dd if=$dev of=/tmp/back bs=1M count=8 iflag=direct 2>&1
  cmp /tmp/pat /tmp/back && echo "PASS ublk dd roundtrip" || echo "FAIL ublk dd roundtrip"
  $V unplug r1 && echo "PASS ublk unplug" || echo "FAIL ublk unplug"
  ls -l /dev/ublk*
else
  echo "FAIL plug ublk"
fi
$V unplug --all >/dev/null
kill $(pidof vdbusd); sleep 1
echo "---- daemon log"; cat $LOG
