#!/usr/bin/env bash
# Build a gzip'd initramfs for the vdbus VM tests.
#   mkinitrd.sh BUILD_DIR GUEST_SCRIPT OUTPUT
# It holds busybox, vdbusd and vdbus from BUILD_DIR with their shared
# libraries, the guest tools the tests need (mkfs.ext4, e2fsck, sfdisk, fio,
# blockdev…) and the kernel modules ublk_drv, nbd, loop and ext4 with their
# dependencies.  GUEST_SCRIPT runs as /test.sh after /init has set things up.
set -euo pipefail
export PATH=/usr/sbin:/sbin:$PATH
build=$(realpath "$1"); script=$(realpath "$2"); out=$(realpath -m "$3")
here=$(dirname "$(realpath "$0")")
cache=$("$here/kernel.sh")
kver=$(cat "$cache/kernel.ready")
kroot=$cache/root
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
mkdir -p bin sbin lib lib64 usr/bin usr/sbin dev proc sys tmp run mnt etc modules var/tmp
cp /bin/busybox bin/busybox

copy_with_libs() {
  for f in "$@"; do
    [ -e "$f" ] || { echo "mkinitrd: missing $f" >&2; exit 1; }
    mkdir -p ".$(dirname "$f")"
    cp -L "$f" ".$f"
    ldd "$f" 2>/dev/null | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
      [ -n "$lib" ] && [ -e "$lib" ] || continue
      mkdir -p ".$(dirname "$lib")"
      [ -e ".$lib" ] || cp -L "$lib" ".$lib"
    done
  done
}
copy_with_libs "$build/vdbusd" "$build/vdbus"
mv ".$build/vdbusd" ".$build/vdbus" usr/bin/
tools=(/sbin/mkfs.ext4 /sbin/e2fsck /sbin/sfdisk /sbin/blockdev /usr/bin/fio /sbin/losetup
       /usr/bin/sha256sum /usr/bin/nbdinfo /sbin/fdisk /sbin/wipefs)
for t in "${tools[@]}"; do
  t=$(command -v "$(basename "$t")" || echo "$t")
  copy_with_libs "$t"
done
# mkfs.ext4 wants its config; fio wants nothing else.
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf etc/

# Modules and what they depend on, decompressed (busybox insmod takes .ko).
mods="ublk_drv nbd loop fuse ext4 crc32c_generic"
for m in $mods; do
  for dep in $(modinfo -b "$kroot" -k "$kver" -F depends "$m" 2>/dev/null | tr ',' ' ') $m; do
    f=$(modinfo -b "$kroot" -k "$kver" -F filename "$dep" 2>/dev/null) || continue
    case "$f" in (*builtin*|"") continue;; esac
    # dependencies of dependencies
    for dd in $(modinfo -b "$kroot" -k "$kver" -F depends "$dep" | tr ',' ' '); do
      g=$(modinfo -b "$kroot" -k "$kver" -F filename "$dd" 2>/dev/null) || continue
      case "$g" in (*builtin*|"") continue;; esac
      [ -e "modules/$dd.ko" ] || xz -dc "$kroot/${g#/}" > "modules/$dd.ko" 2>/dev/null || xz -dc "$g" > "modules/$dd.ko"
      echo "$dd" >> modules/order
    done
    [ -e "modules/$dep.ko" ] || xz -dc "$kroot/${f#/}" > "modules/$dep.ko" 2>/dev/null || xz -dc "$f" > "modules/$dep.ko"
    echo "$dep" >> modules/order
  done
done

cat > init <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/shm /var/tmp
exec </dev/console >/dev/console 2>&1
export PATH=/usr/bin:/usr/sbin:/bin:/sbin LD_LIBRARY_PATH=/lib:/lib64:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
for m in $(awk '!seen[$0]++' /modules/order); do insmod /modules/$m.ko 2>/dev/null; done
sh /test.sh
echo "VDBUS-VM-END"
poweroff -f
INIT
chmod +x init
cp "$script" test.sh
mkdir -p dev && mknod -m 600 dev/console c 5 1 2>/dev/null || true
find . | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -1 > "$out"
