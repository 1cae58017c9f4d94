#!/bin/bash
# Install everything needed to build and test vdbus (Debian 12, as root).
# Idempotent: apt-get update/install only run when a package is missing.
set -u
export DEBIAN_FRONTEND=noninteractive

PKGS=(meson ninja-build pkg-config gcc liburing-dev libfuse3-dev fuse3 libnbd-dev
      libjansson-dev libgnutls28-dev libnl-genl-3-dev nbdkit libnbd-bin python3-libnbd
      qemu-utils fio e2fsprogs help2man kmod fdisk qemu-system-x86 busybox-static
      util-linux make xfsprogs strace
      ceph-mon ceph-osd ceph-common librbd-dev librados-dev python3-rbd python3-rados)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps.sh: missing packages (${missing[*]}) and not root; run as root" >&2
    exit 1
  fi
  echo "deps.sh: installing: ${missing[*]}"
  apt-get update -qq || { echo "deps.sh: apt-get update failed" >&2; exit 1; }
  apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
    { echo "deps.sh: apt-get install failed" >&2; exit 1; }
else
  echo "deps.sh: all packages present"
fi

# Kernel pieces for local attach: best effort (containers may lack them).
if [ "$(id -u)" -eq 0 ]; then
  modprobe loop 2>/dev/null || true
  modprobe fuse 2>/dev/null || true
fi
[ -e /dev/loop-control ] || echo "deps.sh: note: /dev/loop-control missing (attach tests will skip)"
[ -e /dev/fuse ] || echo "deps.sh: note: /dev/fuse missing (attach tests will skip)"
exit 0
