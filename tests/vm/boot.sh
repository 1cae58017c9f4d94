#!/usr/bin/env bash
# Boot the test kernel with an initramfs under TCG and print its serial log.
#   boot.sh INITRD [TIMEOUT_SECONDS]
set -euo pipefail
here=$(dirname "$(realpath "$0")")
cache=$("$here/kernel.sh")
kver=$(cat "$cache/kernel.ready")
timeout "${2:-300}" qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 1 -nodefaults \
  -no-user-config -display none -serial stdio -no-reboot \
  -kernel "$cache/root/boot/vmlinuz-$kver" -initrd "$1" \
  -append "console=ttyS0 panic=-1 oops=panic quiet" < /dev/null
