#!/usr/bin/python3
"""Copy-on-write overlays, snapshots, clones and commit, through real NBD
clients (python3-libnbd, nbdcopy, qemu-img, fio) and the loop device."""
import errno
import hashlib
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vdbtest import nbd_errno, pattern  # noqa: E402
from vdbtest import case, check, eq, fail, have, main, run  # noqa: E402
import nbd  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20


def read_all(h, size, step=1 * MiB):
    return b"".join(h.pread(min(step, size - o), o) for o in range(0, size, step))


def extents(h, off, length):
    """[(length, flags)] of base:allocation from off."""
    got = []

    def cb(metacontext, offset, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            for i in range(0, len(entries), 2):
                got.append((entries[i], entries[i + 1]))
        return 0
    h.block_status(length, off, cb)
    return got


def cli_err(d, *args):
    rc, out, err = d.cli(*args)
    check(rc != 0, "vdbus %s succeeded: %s" % (" ".join(args), out))
    check(err.startswith("vdbus: ") and len(err.strip().splitlines()) == 1,
          "one-line error expected, got %r" % err)
    return rc, err


@case("cow over ram: reads go to the base, writes to the overlay; base turns read-only")
def t_cow_basic(d):
    d.plug("ram", "--size", "8M", "--name", "base", "--attach", "none")
    hb = d.nbd("base")
    base_data = pattern(1, 8 * MiB)
    hb.pwrite(base_data, 0)
    hb.flush()
    d.plug("cow", "--base", "base", "--name", "ov", "--attach", "none")
    ho = d.nbd("ov")
    eq(ho.get_size(), 8 * MiB, "overlay size")
    eq(read_all(ho, 8 * MiB), base_data, "overlay reads the base")
    # unaligned write inside one chunk, a write across chunks, a whole-chunk write
    w1 = pattern(2, 1000)
    ho.pwrite(w1, 70000)
    w2 = pattern(3, 200 * KiB)
    ho.pwrite(w2, 1 * MiB - 3000)
    w3 = pattern(4, 64 * KiB)
    ho.pwrite(w3, 4 * MiB)
    want = bytearray(base_data)
    want[70000:71000] = w1
    want[MiB - 3000:MiB - 3000 + len(w2)] = w2
    want[4 * MiB:4 * MiB + 64 * KiB] = w3
    eq(read_all(ho, 8 * MiB), bytes(want), "overlay after writes")
    # the base did not change, and refuses writes while the overlay exists
    eq(read_all(hb, 8 * MiB), base_data, "base after overlay writes")
    eq(nbd_errno(hb.pwrite, b"x" * 512, 0), errno.EPERM, "write to a base with an overlay")
    info = d.info("base")
    check(info["readonly"] and info["overlays"] == 1, "base shown read-only with 1 overlay: %r" % info)
    eq(d.info("ov")["base"], "base", "overlay's base")
    # the base cannot be unplugged, even with --force
    rc, err = cli_err(d, "unplug", "base", "--force")
    check("base of ov" in err, "unplug message names the overlay: %r" % err)
    ho.shutdown()
    d.cli_ok("unplug", "ov")
    hb.pwrite(b"y" * 512, 0)  # writable again
    hb.shutdown()


@case("cow: trim and write_zeroes read as zeroes and never show the base again; block status")
def t_cow_trim_zero(d):
    d.plug("ram", "--size", "4M", "--name", "b", "--attach", "none")
    hb = d.nbd("b")
    base_data = pattern(5, 4 * MiB)
    hb.pwrite(base_data, 0)
    hb.shutdown()
    d.plug("cow", "--base", "b", "--name", "o", "--attach", "none")
    h = d.nbd("o")
    want = bytearray(base_data)
    # whole chunks and a partial chunk at each end
    h.trim(300 * KiB + 100, 100 * KiB - 100)   # (count, offset)
    want[100 * KiB - 100:100 * KiB - 100 + 300 * KiB + 100] = bytes(300 * KiB + 100)
    h.zero(128 * KiB, 1 * MiB)                        # two whole chunks
    want[MiB:MiB + 128 * KiB] = bytes(128 * KiB)
    h.zero(5000, 2 * MiB + 1000, nbd.CMD_FLAG_NO_HOLE)  # partial chunk, allocated zeroes
    want[2 * MiB + 1000:2 * MiB + 6000] = bytes(5000)
    eq(read_all(h, 4 * MiB), bytes(want), "overlay after trim/zero")
    # block status: the zeroed whole chunks of [1M, 1M+128K) are holes that read as zeroes
    ext = extents(h, MiB, 128 * KiB)
    check(ext and ext[0][1] & nbd.STATE_ZERO and ext[0][1] & nbd.STATE_HOLE and ext[0][0] >= 64 * KiB,
          "zeroed chunks reported as zero holes: %r" % ext)
    # data written in the overlay reads as data
    h.pwrite(b"d" * 65536, 3 * MiB)
    ext = extents(h, 3 * MiB, 65536)
    eq(ext[0][1] & nbd.STATE_HOLE, 0, "overlay data is data: %r" % ext)
    # unchanged chunks report what the base says (a RAM base: data where written)
    ext = extents(h, 3 * MiB + 512 * KiB, 64 * KiB)
    eq(ext[0][1] & nbd.STATE_HOLE, 0, "base data through the overlay: %r" % ext)
    h.shutdown()
    # base untouched
    hb = d.nbd("b")
    eq(read_all(hb, 4 * MiB), base_data, "base after trims in the overlay")
    hb.shutdown()


@case("cow: concurrent unaligned writers into the same chunks lose nothing (fio verify)")
def t_cow_fio(d):
    if not have("fio"):
        raise Exception("fio missing")
    d.plug("ram", "--size", "64M", "--name", "b", "--attach", "none")
    rc, out, err = run(["nbdkit", "-U", "-", "pattern", "size=64M", "--run",
                        "nbdcopy \"$uri\" '%s'" % d.uri("b")], timeout=60)
    eq(rc, 0, "fill the base: %s" % err)
    d.plug("cow", "--base", "b", "--name", "o", "--attach", "none", "--chunk-size", "64K")
    # 4k random writes at QD16 on two jobs land in the same 64K chunks concurrently
    rc, out, err = run(["fio", "--name=cow", "--ioengine=nbd", "--uri=" + d.uri("o"),
                        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=2",
                        "--size=32M", "--offset_increment=32M", "--verify=crc32c",
                        "--verify_state_save=0",
                        "--verify_fatal=1", "--do_verify=1", "--group_reporting",
                        "--randrepeat=0", "--norandommap=0"], timeout=240)
    eq(rc, 0, "fio verify on the overlay: %s %s" % (out[-2000:], err[-2000:]))
    # the parts fio did not write still read the base's pattern: check a sample
    h = d.nbd("o")
    hb = d.nbd("b")
    data_o = read_all(h, 64 * MiB)
    data_b = read_all(hb, 64 * MiB)
    same = sum(1 for o in range(0, 64 * MiB, 4096) if data_o[o:o + 4096] == data_b[o:o + 4096])
    check(same < 16384, "fio's writes are in the overlay (only %d of 16384 blocks differ)" % (16384 - same))
    h.shutdown()
    hb.shutdown()


@case("snapshot under a concurrent write load is an exact point-in-time copy")
def t_snapshot_load(d):
    size = 16 * MiB
    d.plug("ram", "--size", "16M", "--name", "live", "--attach", "none")
    h = d.nbd("live")
    h.pwrite(pattern(7, size), 0)
    # A writer that records, for every 4K block, the version it last wrote
    # and whether the write completed before or after the snapshot.
    versions = {}  # block -> list of (version) completed
    stop = threading.Event()
    lock = threading.Lock()
    state = {"snap_start": None, "snap_end": None}

    def block_data(blk, ver):
        return (b"%08d:%08d:" % (blk, ver)).ljust(4096, b"w")

    def writer(seed):
        hw = d.nbd("live")
        import random
        rnd = random.Random(seed)
        ver = 0
        while not stop.is_set():
            blk = rnd.randrange(size // 4096)
            ver += 1
            t_sub = time.time()
            hw.pwrite(block_data(blk, ver * 10 + seed), blk * 4096)
            with lock:
                versions.setdefault(blk, []).append((ver * 10 + seed, time.time(), t_sub))
        hw.shutdown()

    ts = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in ts:
        t.start()
    time.sleep(1.0)
    state["snap_start"] = time.time()
    rc, out, err = d.cli("snapshot", "live", "--as", "snap1")
    state["snap_end"] = time.time()
    time.sleep(1.0)
    stop.set()
    for t in ts:
        t.join()
    eq(rc, 0, "snapshot: %s" % err)
    eq(out.strip(), "snap1", "snapshot name printed")
    info = d.info("snap1")
    check(info["readonly"] and info["snapshot"], "snapshot is read-only: %r" % info)
    eq(d.info("live")["backend"], "cow", "live disk is now an overlay")
    hs = d.nbd("snap1")
    snap = read_all(hs, size)
    live = read_all(h, size)
    # Every block of the snapshot is either the initial pattern or a version
    # that completed before the snapshot finished; and versions completed
    # before the snapshot started must be there (or a later pre-snapshot one).
    init = pattern(7, size)
    changed_after = 0
    for blk in range(size // 4096):
        sblk = snap[blk * 4096:(blk + 1) * 4096]
        hist = versions.get(blk, [])
        if sblk == init[blk * 4096:(blk + 1) * 4096]:
            done_before = [v for v, t, _ in hist if t < state["snap_start"]]
            check(not done_before, "block %d: snapshot has the initial data but version %r "
                  "completed before the snapshot" % (blk, done_before[-1:] if done_before else None))
            continue
        tag = sblk[:18]
        check(sblk == block_data(blk, int(tag[9:17]))[:4096] if tag[8:9] == b":" else False,
              "block %d of the snapshot is torn or foreign: %r" % (blk, sblk[:40]))
        ver = int(tag[9:17])
        times = [t for v, t, _ in hist if v == ver]
        check(times and min(times) <= state["snap_end"] + 0.001,
              "block %d: snapshot holds version %d written after the snapshot" % (blk, ver))
        # A version sent after this one completed, and done before the
        # snapshot began, must win (writes in flight together have no order).
        later = [v for v, t, ts in hist if t < state["snap_start"] and ts > min(times)]
        check(not later, "block %d: snapshot holds %d but %r was written after it, before the "
              "snapshot" % (blk, ver, later))
        if live[blk * 4096:(blk + 1) * 4096] != sblk:
            changed_after += 1
    check(changed_after > 0, "the live disk kept changing after the snapshot")
    # the snapshot never changes afterwards
    h.pwrite(b"z" * 4096, 0)
    eq(read_all(hs, size), snap, "snapshot after more writes to the live disk")
    eq(nbd_errno(hs.pwrite, b"x" * 512, 0), errno.EPERM, "write to a snapshot")
    hs.shutdown()
    h.shutdown()


@case("snapshot of a loop-attached, mounted ext4 disk: the mount carries on; clone; checksums",
      root=True)
def t_snapshot_mounted(d):
    if not os.path.exists("/dev/loop-control") or not os.path.exists("/dev/fuse"):
        raise Exception("no loop or fuse here")
    img = os.path.join(d.data_dir, "disk.img")
    d.plug("file", img, "--create", "--size", "64M", "--name", "fs", "--attach", "loop")
    dev = d.disk("fs")["device"]
    mnt = os.path.join(d.base, "mnt")
    os.makedirs(mnt)
    run(["mkfs.ext4", "-q", "-F", dev], check_rc=0)
    run(["mount", dev, mnt], check_rc=0)
    try:
        with open(os.path.join(mnt, "a"), "wb") as f:
            f.write(pattern(9, 3 * MiB))
        run(["sync"], check_rc=0)
        run(["fsfreeze", "--freeze", mnt], check_rc=0)
        rc, out, err = d.cli("snapshot", "fs", "--as", "fs-s1")
        run(["fsfreeze", "--unfreeze", mnt], check_rc=0)
        eq(rc, 0, "snapshot of a mounted disk: %s" % err)
        # the mounted filesystem carries on over the overlay
        with open(os.path.join(mnt, "b"), "wb") as f:
            f.write(pattern(10, 2 * MiB))
        os.unlink(os.path.join(mnt, "a"))
        run(["sync"], check_rc=0)
        # the snapshot, cloned and attached, has the old files
        d.cli_ok("clone", "fs-s1", "--as", "fs-c1", "--attach", "loop")
        cdev = d.disk("fs-c1")["device"]
        cm = os.path.join(d.base, "cmnt")
        os.makedirs(cm)
        run(["mount", "-o", "noload", cdev, cm], check_rc=0)
        try:
            with open(os.path.join(cm, "a"), "rb") as f:
                eq(hashlib.sha256(f.read()).hexdigest(),
                   hashlib.sha256(pattern(9, 3 * MiB)).hexdigest(), "file a in the clone")
            check(not os.path.exists(os.path.join(cm, "b")), "file b is not in the clone")
        finally:
            run(["umount", cm])
        run(["fsck.ext4", "-fn", cdev], check_rc=0)
    finally:
        run(["umount", mnt])
    run(["fsck.ext4", "-fn", dev], check_rc=0)
    d.cli_ok("unplug", "fs-c1")


@case("commit writes an overlay's changes (data, zeroes, trims) into its base")
def t_commit(d):
    img = os.path.join(d.data_dir, "base.img")
    d.plug("file", img, "--create", "--size", "8M", "--name", "b", "--attach", "none")
    hb = d.nbd("b")
    base_data = pattern(11, 8 * MiB)
    hb.pwrite(base_data, 0)
    hb.flush()
    hb.shutdown()
    store = os.path.join(d.data_dir, "ov.cow")
    d.plug("cow", "--base", "b", "--name", "o", "--store", "file:" + store, "--attach", "none")
    h = d.nbd("o")
    want = bytearray(base_data)
    for i, (off, n) in enumerate([(0, 4096), (100000, 70000), (3 * MiB, 1 * MiB), (8 * MiB - 10, 10)]):
        data = pattern(20 + i, n)
        h.pwrite(data, off)
        want[off:off + n] = data
    h.trim(256 * KiB, 5 * MiB)
    want[5 * MiB:5 * MiB + 256 * KiB] = bytes(256 * KiB)
    h.zero(1000, 6 * MiB + 10)
    want[6 * MiB + 10:6 * MiB + 1010] = bytes(1000)
    h.flush()
    eq(read_all(h, 8 * MiB), bytes(want), "overlay before commit")
    # a commit with a client connected
    rc, out, err = d.cli("commit", "o")
    eq(rc, 0, "commit: %s" % err)
    check("bytes committed" in out, "commit prints the bytes: %r" % out)
    eq(read_all(h, 8 * MiB), bytes(want), "overlay after commit")
    h.shutdown()
    d.cli_ok("unplug", "o")
    hb = d.nbd("b")
    eq(read_all(hb, 8 * MiB), bytes(want), "base after commit")
    hb.shutdown()
    d.cli_ok("unplug", "b")
    with open(img, "rb") as f:
        eq(hashlib.sha256(f.read()).hexdigest(), hashlib.sha256(bytes(want)).hexdigest(),
           "the image file after commit")
    # the store was emptied: re-plugging the overlay shows the base as is
    d.plug("file", img, "--name", "b", "--attach", "none")
    d.plug("cow", "--base", "b", "--name", "o", "--store", "file:" + store, "--attach", "none")
    st = os.stat(store)
    check(st.st_blocks * 512 < 2 * MiB, "store space given back after commit (%d KiB)" % (st.st_blocks // 2))
    h = d.nbd("o")
    eq(read_all(h, 8 * MiB), bytes(want), "reopened empty overlay")
    h.shutdown()


@case("commit under concurrent writes to the overlay: nothing lost")
def t_commit_concurrent(d):
    d.plug("ram", "--size", "32M", "--name", "b", "--attach", "none")
    d.plug("cow", "--base", "b", "--name", "o", "--attach", "none")
    h = d.nbd("o")
    initial = b"".join(pattern(i, MiB) for i in range(0, 32 * MiB, MiB))
    h.pwrite(initial, 0)
    want = {}
    stop = threading.Event()
    errs = []

    def writer():
        hw = d.nbd("o")
        import random
        rnd = random.Random(5)
        try:
            while not stop.is_set():
                blk = rnd.randrange(32 * MiB // 4096)
                data = (b"%d:%d:" % (blk, rnd.randrange(1 << 30))).ljust(4096, b"v")
                hw.pwrite(data, blk * 4096)
                want[blk] = data
        except Exception as e:  # noqa: BLE001
            errs.append(e)
        hw.shutdown()

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.3)
    rc, out, err = d.cli("commit", "o")
    time.sleep(0.3)
    stop.set()
    t.join()
    eq(rc, 0, "commit: %s" % err)
    eq(errs, [], "writer errors")
    data = read_all(h, 32 * MiB)
    for i in range(0, 32 * MiB, 4096):
        blk = i // 4096
        exp = want.get(blk, initial[i:i + 4096])
        if data[i:i + 4096] != exp:
            fail("block %d differs after a commit under load" % blk)
    h.shutdown()


@case("commit refusals: not an overlay, base a snapshot, base shared; snapshot refusals")
def t_refusals(d):
    d.plug("ram", "--size", "1M", "--name", "r", "--attach", "none")
    rc, err = cli_err(d, "commit", "r")
    check("not an overlay" in err, err)
    d.cli_ok("snapshot", "r", "--as", "r-s")
    rc, err = cli_err(d, "commit", "r")
    check("snapshot" in err and "never changes" in err, err)
    rc, err = cli_err(d, "snapshot", "r-s")
    check("already" in err, err)
    rc, err = cli_err(d, "unplug", "r-s")
    check("base of r" in err, err)
    d.plug("ram", "--size", "1M", "--name", "x", "--attach", "none")
    d.plug("cow", "--base", "x", "--name", "x1", "--attach", "none")
    d.plug("cow", "--base", "x", "--name", "x2", "--attach", "none")
    rc, err = cli_err(d, "commit", "x1")
    check("also the base" in err and "x2" in err, err)
    rc, err = cli_err(d, "snapshot", "x")
    check("base of" in err, err)
    rc, err = cli_err(d, "snapshot", "nosuch")
    rc, err = cli_err(d, "snapshot", "r", "--as", "x")       # name taken
    rc, err = cli_err(d, "snapshot", "r", "--as", "bad/name")
    rc, err = cli_err(d, "plug", "cow", "--base", "nosuch", "--attach", "none")
    check("no disk named 'nosuch'" in err, err)
    rc, err = cli_err(d, "plug", "cow", "--attach", "none")
    check("--base" in err, err)
    rc, err = cli_err(d, "plug", "cow", "--base", "x", "--store", "disk:/tmp/x", "--attach", "none")
    rc, err = cli_err(d, "plug", "cow", "--base", "x", "--chunk-size", "3000", "--attach", "none")
    check("chunk-size" in err, err)
    store = os.path.join(d.data_dir, "s.cow")
    d.plug("cow", "--base", "x", "--name", "x3", "--store", "file:" + store, "--attach", "none")
    rc, err = cli_err(d, "plug", "cow", "--base", "x", "--store", "file:" + store, "--attach", "none")
    check("in use" in err, err)
    d.cli_ok("unplug", "x3")
    rc, err = cli_err(d, "plug", "cow", "--base", "r", "--store", "file:" + store, "--attach", "none")
    check("belongs to an overlay of 'x'" in err, err)
    with open(os.path.join(d.data_dir, "junk.cow"), "wb") as f:
        f.write(b"not a store" * 1000)
    rc, err = cli_err(d, "plug", "cow", "--base", "x", "--store",
                      "file:" + os.path.join(d.data_dir, "junk.cow"), "--attach", "none")
    check("not a vdbus overlay store" in err, err)
    # unplug --all takes overlays before their bases
    d.cli_ok("unplug", "--all")
    eq(d.list(), [], "all unplugged")


@case("snapshots and file-store overlays come back after a restart (and after kill -9)")
def t_restart(d):
    img = os.path.join(d.data_dir, "p.img")
    d.plug("file", img, "--create", "--size", "8M", "--name", "p", "--attach", "none")
    h = d.nbd("p")
    v1 = pattern(30, 8 * MiB)
    h.pwrite(v1, 0)
    h.shutdown()
    d.cli_ok("snapshot", "p", "--as", "p1")
    h = d.nbd("p")
    v2 = bytearray(v1)
    v2[MiB:2 * MiB] = pattern(31, MiB)
    h.pwrite(bytes(v2[MiB:2 * MiB]), MiB)
    h.shutdown()
    d.cli_ok("snapshot", "p", "--as", "p2")
    h = d.nbd("p")
    v3 = bytearray(v2)
    v3[5000:9000] = pattern(32, 4000)
    h.pwrite(bytes(v3[5000:9000]), 5000)
    h.flush()
    h.shutdown()
    d.cli_ok("clone", "p1", "--as", "c1")
    h = d.nbd("c1")
    c1 = bytearray(v1)
    c1[7 * MiB:7 * MiB + 100] = b"c" * 100
    h.pwrite(b"c" * 100, 7 * MiB)
    h.flush()
    h.shutdown()
    # a RAM overlay is volatile: it does not come back
    d.plug("cow", "--base", "p1", "--name", "vol", "--attach", "none")

    def check_all(when):
        names = sorted(x["name"] for x in d.list())
        eq(names, ["c1", "p", "p1", "p2"], "disks %s" % when)
        for name, want in (("p1", v1), ("p2", v2), ("p", v3), ("c1", c1)):
            hh = d.nbd(name)
            eq(read_all(hh, 8 * MiB), bytes(want), "%s %s" % (name, when))
            hh.shutdown()
        check(d.info("p1")["snapshot"] and d.info("p2")["readonly"], "snapshots stay read-only")
    d.restart()
    check_all("after a restart")
    d.restart(kill=True)
    check_all("after kill -9")
    # the chain unplugs top-down
    rc, err = cli_err(d, "unplug", "p1")
    d.cli_ok("unplug", "--all")


@case("unplug SNAP --merge: the live disk's changes go back into the snapshot's storage (the image file)")
def t_merge(d):
    img = os.path.join(d.data_dir, "m.img")
    d.plug("file", img, "--create", "--size", "8M", "--name", "m", "--attach", "none")
    h = d.nbd("m")
    v = bytearray(pattern(40, 8 * MiB))
    h.pwrite(bytes(v), 0)
    h.shutdown()
    d.cli_ok("snapshot", "m", "--as", "m1")
    hs = d.nbd("m1")
    rc, err = cli_err(d, "unplug", "m1", "--merge")   # a client on the snapshot
    check("NBD clients" in err, err)
    hs.shutdown()
    rc, err = cli_err(d, "unplug", "m1")
    check("--merge" in err, "the refusal points at --merge: %r" % err)
    # a restart in between: the snapshot's storage is reopened, still mergeable
    d.restart()
    h = d.nbd("m")
    for i, (off, n) in enumerate([(0, 4096), (70000, 200000), (5 * MiB, MiB)]):
        data = pattern(41 + i, n)
        h.pwrite(data, off)
        v[off:off + n] = data
    h.zero(128 * KiB, 3 * MiB)
    v[3 * MiB:3 * MiB + 128 * KiB] = bytes(128 * KiB)
    h.flush()
    # merge with a client connected to the live disk, which keeps working
    rc, out, err = d.cli("unplug", "m1", "--merge")
    eq(rc, 0, "unplug --merge: %s" % err)
    check("merged" in out, out)
    eq(read_all(h, 8 * MiB), bytes(v), "live disk after the merge")
    h.pwrite(b"after" * 100, 7 * MiB)
    v[7 * MiB:7 * MiB + 500] = b"after" * 100
    h.flush()
    h.shutdown()
    info = d.info("m")
    eq((info["backend"], info["base"], info["params"].get("path")), ("file", None, img),
       "the disk is a plain file disk again")
    eq(sorted(x["name"] for x in d.list()), ["m"], "the snapshot is gone")
    check(not os.listdir(os.path.join(d.state_dir, "overlays")), "the merged store was removed")
    d.restart()
    h = d.nbd("m")
    eq(read_all(h, 8 * MiB), bytes(v), "after a restart")
    h.shutdown()
    d.cli_ok("unplug", "m")
    with open(img, "rb") as f:
        eq(hashlib.sha256(f.read()).hexdigest(), hashlib.sha256(bytes(v)).hexdigest(),
           "the image file holds the live data")
    # refusals: not a snapshot; two overlays
    d.plug("ram", "--size", "1M", "--name", "q", "--attach", "none")
    rc, err = cli_err(d, "unplug", "q", "--merge")
    check("not a snapshot" in err, err)
    d.cli_ok("snapshot", "q", "--as", "q1")
    d.cli_ok("clone", "q1", "--as", "q2")
    rc, err = cli_err(d, "unplug", "q1", "--merge")
    check("exactly one" in err, err)
    d.cli_ok("unplug", "q2")
    d.cli_ok("unplug", "q1", "--merge")
    eq(sorted(x["name"] for x in d.list()), ["q"], "RAM snapshot merged")
    eq(d.info("q")["backend"], "ram", "q is a RAM disk again")


@case("default names: NAME.snapN for snapshots, the free vdN for clones")
def t_default_names(d):
    d.plug("ram", "--size", "1M", "--name", "n", "--attach", "none")
    eq(d.cli_ok("snapshot", "n").strip(), "n.snap1", "first snapshot")
    eq(d.cli_ok("snapshot", "n").strip(), "n.snap2", "second snapshot")
    d.plug("ram", "--size", "1M", "--name", "vd0", "--attach", "none")
    eq(d.cli_ok("clone", "n.snap1", "--attach", "none").strip(), "vd1", "clone name")
    eq(d.info("vd1")["base"], "n.snap1", "the clone's base")


main()
