#!/usr/bin/python3
"""Local attach (loop over FUSE): mkfs, mount, checksums across re-plug, EBUSY, fio."""
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vdbtest import (Skip, case, check, eq, fail, main, run, run_ok, is_root, loop_devices,  # noqa: E402
                     sha256_file, have)

MiB = 1 << 20


def need_attach():
    if not is_root():
        raise Skip("needs root")
    for dev in ("/dev/loop-control", "/dev/fuse"):
        if not os.path.exists(dev):
            raise Skip("%s missing" % dev)


def mounted(dev):
    with open("/proc/mounts") as f:
        return any(l.split()[0] == dev for l in f)


@case("plug file --attach loop: mkfs.ext4, mount, files survive unplug and re-plug", timeout=300)
def t_fs_roundtrip(d):
    need_attach()
    img = os.path.join(d.data_dir, "fs.img")
    d.plug("file", img, "--create", "--size", "64M", "--name", "fs", "--attach", "loop")
    dev = d.disk("fs")["device"]
    check(dev and re.fullmatch(r"/dev/loop\d+", dev), "device %r" % dev)
    eq(d.disk("fs")["frontend"], "loop", "frontend")
    check(dev in d.cli_ok("list"), "device not in vdbus list")
    run_ok(["mkfs.ext4", "-q", "-F", dev], timeout=120)
    mnt = tempfile.mkdtemp(prefix="mnt-", dir=d.base)
    run_ok(["mount", dev, mnt])
    sums = {}
    try:
        for i in range(5):
            p = os.path.join(mnt, "file%d" % i)
            with open(p, "wb") as f:
                f.write(os.urandom((i + 1) * 300 * 1024))
            sums[p] = sha256_file(p)
        os.makedirs(os.path.join(mnt, "dir/sub"))
    finally:
        run_ok(["umount", mnt])
    d.cli_ok("unplug", "fs")
    check(not any(back.startswith(d.base) and dv == dev for dv, back in loop_devices()),
          "loop device %s still bound after unplug" % dev)
    d.plug("file", img, "--name", "fs", "--attach", "loop")
    dev = d.disk("fs")["device"]
    run_ok(["fsck.ext4", "-n", "-f", dev], timeout=120)
    run_ok(["mount", dev, mnt])
    try:
        for p, s in sums.items():
            eq(sha256_file(p), s, "checksum of %s after re-plug" % os.path.basename(p))
        check(os.path.isdir(os.path.join(mnt, "dir/sub")), "directory lost")
    finally:
        run_ok(["umount", mnt])
    d.cli_ok("unplug", "fs")


@case("unplug of a mounted disk is refused (EBUSY); --force works; device gone after", timeout=300)
def t_busy(d):
    need_attach()
    d.plug("ram", "--size", "32M", "--name", "b", "--attach", "loop")
    dev = d.disk("b")["device"]
    run_ok(["mkfs.ext4", "-q", "-F", dev], timeout=120)
    mnt = tempfile.mkdtemp(prefix="mnt-", dir=d.base)
    run_ok(["mount", dev, mnt])
    try:
        rc, out, err = d.cli("unplug", "b")
        eq(rc, 1, "unplug of a mounted disk (stderr %r)" % err)
        check(err.startswith("vdbus: b: ") and len(err.strip().splitlines()) == 1, "message %r" % err)
        check("busy" in err.lower() or "mounted" in err.lower() or "in use" in err.lower(), "message %r" % err)
        r = d.control("unplug", {"name": "b"})
        eq(r.get("errno"), 16, "control errno (EBUSY)")
        rc, out, err = d.cli("unplug", "--all")
        eq(rc, 1, "unplug --all with a mounted disk")
        check(d.disk("b") is not None, "mounted disk unplugged without --force")
        with open(os.path.join(mnt, "x"), "w") as f:
            f.write("still works")
        d.cli_ok("unplug", "b", "--force")
    finally:
        run(["umount", "-l", mnt])
    eq(d.disk("b"), None, "disk after --force")
    check(not any(dv == dev and back.startswith(d.base) for dv, back in loop_devices()),
          "loop device still bound after forced unplug")


@case("fio --ioengine=io_uring --direct=1 verify on the loop device", timeout=300)
def t_fio(d):
    need_attach()
    if not have("fio"):
        raise Skip("fio not installed")
    d.plug("ram", "--size", "64M", "--name", "f", "--attach", "loop")
    dev = d.disk("f")["device"]
    rc, out, err = run(["fio", "--name=v", "--filename=" + dev, "--ioengine=io_uring", "--direct=1",
                        "--rw=randwrite", "--bs=4k", "--size=32M", "--iodepth=16", "--verify=crc32c",
                        "--verify_state_save=0",
                        "--verify_fatal=1", "--output-format=json"], timeout=240)
    if rc != 0 and "io_uring" in (out + err) and "not supported" in (out + err).lower():
        raise Skip("io_uring not available")
    eq(rc, 0, "fio exit code (%s)" % err[-1500:])
    j = json.loads(out[out.index("{"):])
    eq(j["jobs"][0]["error"], 0, "fio error")
    check(j["jobs"][0]["read"]["io_bytes"] >= 32 * MiB, "fio verified %d bytes" % j["jobs"][0]["read"]["io_bytes"])
    st = d.info("f")["stats"]
    check(st["writes"] > 0 and st["bytes_written"] >= 32 * MiB, "counters after fio: %r" % st)
    d.cli_ok("unplug", "f")
    check(not os.path.exists(os.path.join(d.run_dir, "disks", "f")), "FUSE file left after unplug")


@case("fio verify with large and mixed request sizes (4k to 1M) on loop devices over RAM and file disks",
      timeout=300)
def t_fio_large(d):
    need_attach()
    if not have("fio"):
        raise Skip("fio not installed")
    img = os.path.join(d.data_dir, "fl.img")
    d.plug("ram", "--size", "96M", "--name", "lr", "--attach", "loop")
    d.plug("file", img, "--create", "--size", "96M", "--name", "lf", "--attach", "loop")
    for name in ("lr", "lf"):
        dev = d.disk(name)["device"]
        for rw in ("write", "randwrite"):
            rc, out, err = run(["fio", "--name=v", "--filename=" + dev, "--ioengine=io_uring",
                                "--direct=1", "--rw=" + rw, "--bssplit=4k/10:64k/20:256k/30:1m/40",
                                "--size=80M", "--iodepth=8", "--verify=crc32c",
                                "--verify_state_save=0", "--verify_fatal=1",
                                "--randrepeat=0", "--output-format=json"], timeout=240)
            if rc != 0 and "io_uring" in (out + err) and "not supported" in (out + err).lower():
                raise Skip("io_uring not available")
            eq(rc, 0, "fio %s on %s exit code (%s)" % (rw, name, err[-1500:]))
            j = json.loads(out[out.index("{"):])
            eq(j["jobs"][0]["error"], 0, "fio error")
        # What the device shows is what the disk holds (read back over NBD).
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            m = mmap.mmap(-1, 8 * MiB)
            n = os.preadv(fd, [m], 0)
            head = bytes(m[:n])
        finally:
            os.close(fd)
        h = d.nbd(name)
        eq(h.pread(8 * MiB, 0) == head, True, "%s: loop device and NBD export agree" % name)
        h.shutdown()
    d.cli_ok("unplug", "lr")
    d.cli_ok("unplug", "lf")


@case("--attach loop on a read-only disk gives a read-only device", timeout=120)
def t_ro(d):
    need_attach()
    d.plug("ram", "--size", "8M", "--name", "ro", "--readonly", "--attach", "loop")
    dev = d.disk("ro")["device"]
    out = run_ok(["blockdev", "--getro", dev]).strip()
    eq(out, "1", "blockdev --getro")
    eq(run_ok(["blockdev", "--getsize64", dev]).strip(), str(8 * MiB), "device size")
    d.cli_ok("unplug", "ro")


if __name__ == "__main__":
    main()
