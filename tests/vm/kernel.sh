#!/usr/bin/env bash
# Fetch (once, cached) a Debian kernel that has ublk_drv and nbd, unpack it
# and index its modules.  Prints the directory holding vmlinuz and modules.
# Cache: $VDBUS_VM_CACHE (default /var/cache/vdbus-vm).
set -euo pipefail
export PATH=/usr/sbin:/sbin:$PATH
cache=${VDBUS_VM_CACHE:-/var/cache/vdbus-vm}
mkdir -p "$cache"
cd "$cache"
if [ ! -f kernel.ready ]; then
  pkg=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq >/dev/null
    pkg=$(apt-cache depends linux-image-6.12-amd64 | awk '/Depends: linux-image-6/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || { echo "kernel.sh: no linux-image-6.12-amd64 in the apt sources" >&2; exit 1; }
  ls "${pkg}"_*.deb >/dev/null 2>&1 || apt-get download "$pkg" >/dev/null
  rm -rf root && mkdir root
  dpkg-deb -x "$(ls "${pkg}"_*.deb | head -1)" root
  kver=$(ls root/lib/modules | head -1)
  depmod -b root "$kver"
  echo "$kver" > kernel.ready
fi
echo "$cache"
