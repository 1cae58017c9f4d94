#!/usr/bin/python3
"""The rbd backend against a real throwaway Ceph cluster (cephlocal.py: one
mon, one memstore OSD, cephx, in a temp dir): plug/create and bad input,
NBD conformance, fio verify, loop + ext4, RBD snapshots under load,
restart, resize, OSD outage (EIO within the timeout, other disks fine,
resume after), cluster-down plug.

Without the Ceph packages every case is skipped (77); with them, a cluster
that cannot start is a failure.  CI installs them (tests/deps.sh)."""
import errno
import hashlib
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cephlocal  # noqa: E402
import vdbtest  # noqa: E402
from vdbtest import nbd_errno, pattern  # noqa: E402
from vdbtest import case, check, eq, fail, have, run, run_ok, Skip  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
OBJ = 4 * MiB          # RBD's default object size

_cluster = None
_images = [0]


def cluster():
    """The module's cluster, started on first use (a failure if it cannot)."""
    global _cluster
    why = cephlocal.available()
    if why:
        raise Skip("Ceph packages missing: " + why)
    if _cluster is None:
        _cluster = cephlocal.Cluster().start()
        vdbtest._comment("ceph cluster in %s up in %.1fs" % (_cluster.dir, _cluster.start_seconds))
    return _cluster


def new_image_name():
    _images[0] += 1
    return "img%d-%d" % (os.getpid(), _images[0])


def creds(c, timeout=None):
    a = ["--conf", c.conf, "--keyring", c.keyring]
    return a + (["--timeout", str(timeout)] if timeout is not None else [])


def plug_new(d, name, size="64M", extra=(), timeout=None):
    """Create a new image and plug it as disk name; returns the image name."""
    c = cluster()
    img = new_image_name()
    d.plug("rbd", "rbd/" + img, "--create", "--size", size, "--name", name, "--attach", "none",
           *creds(c, timeout), *extra)
    return img


def extents(h, length, offset):
    """base:allocation extents [(offset, length, flags)] covering [offset, offset+length)."""
    out = []
    pos = offset
    while pos < offset + length:
        got = []

        def cb(meta, off, ents, err):
            if meta == "base:allocation":
                got.extend(ents)
        h.block_status(offset + length - pos, pos, cb)
        check(got, "block status returned no extents at %d" % pos)
        for i in range(0, len(got), 2):
            out.append((pos, got[i], got[i + 1]))
            pos += got[i]
    return out


def flags_at(ext, off, length):
    """The set of flags of the extents overlapping [off, off+length)."""
    return {f for (o, n, f) in ext if o < off + length and o + n > off}


# ---------------------------------------------------------------- plug, errors

@case("rbd: plug --create makes a format-2 image; never overwrites; bad input gives one-line errors")
def t_plug_errors(d):
    c = cluster()
    img = plug_new(d, "r1", "32M")
    info = d.info("r1")
    eq(info["backend"], "rbd", "backend")
    eq(info["size"], 32 * MiB, "size")
    eq(c.image_size(img), 32 * MiB, "image size in the cluster")
    feats = c.rbd_cli("info", "rbd/" + img)
    check("format: 2" in feats and "object-map" in feats and "fast-diff" in feats and
          "exclusive-lock" in feats and "layering" in feats, "image features: %s" % feats)
    bad_keyring = os.path.join(d.data_dir, "bad.keyring")
    with open(bad_keyring, "w") as f:
        f.write("[client.admin]\n\tkey = AQBq1ZRjAAAAABAAZ2xvcmlvdXNseWJhZGtleTEyMzQ1Ng==\n")
    cases = [
        (["rbd/" + img, "--create", "--size", "32M"] + creds(c), "already exists"),
        (["rbd/" + img + "x", "--create"] + creds(c), "--create needs --size"),
        (["noslash"] + creds(c), "bad image 'noslash'"),
        (["rbd:rbd/a@b@c"] + creds(c), "bad image"),
        (["nopool/" + img] + creds(c), "no pool 'nopool'"),
        (["rbd/nosuchimage"] + creds(c), "no image 'nosuchimage' in pool 'rbd'"),
        (["rbd/" + img + "@nosnap"] + creds(c), "no image rbd/%s with a snapshot 'nosnap'" % img),
        (["rbd/" + img, "--conf", "/nonexistent/ceph.conf"], "cannot read Ceph config /nonexistent/ceph.conf"),
        (["rbd/" + img, "--conf", c.conf, "--keyring", bad_keyring, "--timeout", "5"],
         "cannot connect to the Ceph cluster as client.admin with %s: Permission denied "
         "(check --id and --keyring)" % c.conf),
        (["rbd/" + img, "--conf", c.conf, "--keyring", "/nonexistent.keyring", "--timeout", "5"],
         "(check --id and --keyring)"),
        (["rbd/" + img, "--conf", c.conf, "--keyring", c.keyring, "--id", "nobody", "--timeout", "5"],
         "cannot connect to the Ceph cluster as client.nobody"),
        (["rbd/" + img, "--timeout", "soon"] + creds(c), "bad timeout 'soon'"),
        ([], "an image is required"),
    ]
    for args, want in cases:
        t0 = time.time()
        rc, out, err = d.cli("plug", "rbd", *args, "--attach", "none")
        eq(rc, 1, "plug rbd %s: rc (stderr %r)" % (" ".join(args), err))
        check(want in err, "plug rbd %s: want %r in %r" % (" ".join(args), want, err))
        eq(len(err.strip().splitlines()), 1, "one line of error for %s: %r" % (args, err))
        check(time.time() - t0 < 20, "plug rbd %s took %.1fs" % (args, time.time() - t0))
    check(d.running(), "daemon alive")
    eq([x["name"] for x in d.list()], ["r1"], "only r1 plugged")
    usage = d.cli_ok("help", "backend", "rbd")
    check("image=[rbd:]POOL/IMAGE[@SNAP]" in usage and "timeout=SECS" in usage, usage)
    check(any(b["name"] == "rbd" and b["positional"] == "image"
              for b in json.loads(d.cli_ok("backends", "--json"))), "rbd in vdbus backends")
    h = d.nbd("r1")
    h.pwrite(b"still fine" * 100, 0)
    eq(h.pread(1000, 0), b"still fine" * 100, "r1 still serves I/O")
    h.shutdown()


@case("rbd: plug with the cluster unreachable fails within the timeout with a clear message")
def t_plug_down(d):
    c = cluster()
    port = vdbtest.free_port()
    conf = os.path.join(d.data_dir, "down.conf")
    with open(c.conf) as f:
        text = f.read()
    with open(conf, "w") as f:
        f.write("\n".join("mon host = [v2:127.0.0.1:%d]" % port if l.startswith("mon host") else l
                          for l in text.splitlines()) + "\n")
    t0 = time.time()
    rc, out, err = d.cli("plug", "rbd", "rbd/whatever", "--conf", conf, "--keyring", c.keyring,
                         "--timeout", "4", "--attach", "none")
    took = time.time() - t0
    eq(rc, 1, "plug with no cluster: rc (%r)" % err)
    check("cannot connect to the Ceph cluster" in err and "cluster unreachable" in err,
          "message: %r" % err)
    check(took < 4 + 6, "plug failed after %.1fs (timeout 4 s)" % took)
    eq(d.list(), [], "nothing plugged")


# ---------------------------------------------------------------- data path

@case("rbd: NBD conformance through the export: read/write/FUA/flush/trim/zero/block status")
def t_nbd(d):
    import nbd
    plug_new(d, "r", "64M")
    h = d.nbd("r")
    size = h.get_size()
    eq(size, 64 * MiB, "export size")
    check(h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero(), "capabilities")
    check(h.can_meta_context("base:allocation"), "base:allocation offered")
    # a fresh image is all holes
    ext = extents(h, size, 0)
    eq(flags_at(ext, 0, size), {3}, "fresh image: all hole+zero (%r)" % ext[:4])
    eq(h.pread(64 * KiB, 10 * MiB), bytes(64 * KiB), "fresh image reads zeroes")
    # unaligned writes across an object boundary, FUA, flush
    data = pattern(1, 3 * MiB + 777)
    h.pwrite(data, OBJ - MiB - 123)
    h.pwrite(b"fua!" * 1024, 30 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    eq(h.pread(len(data), OBJ - MiB - 123), data, "unaligned write across objects")
    eq(h.pread(4096, 30 * MiB), b"fua!" * 1024, "FUA write")
    ext = extents(h, size, 0)
    eq(flags_at(ext, OBJ - MiB - 123, len(data)), {0}, "written range is data")
    eq(flags_at(ext, 30 * MiB, 4096), {0}, "FUA write is data")
    eq(flags_at(ext, 40 * MiB, OBJ), {3}, "never written object is a hole")
    # write zeroes inside data, and over a whole object
    h.pwrite(pattern(2, OBJ), 16 * MiB)
    h.pwrite(pattern(3, OBJ), 20 * MiB)
    h.zero(8192, 16 * MiB + 4096)
    got = h.pread(OBJ, 16 * MiB)
    eq(got[:4096], pattern(2, 4096), "before the zeroed range")
    eq(got[4096:12288], bytes(8192), "zeroed range")
    eq(got[12288:], pattern(2, OBJ)[12288:], "after the zeroed range")
    h.zero(OBJ, 20 * MiB)
    eq(h.pread(OBJ, 20 * MiB), bytes(OBJ), "zeroed object")
    eq(flags_at(extents(h, OBJ, 20 * MiB), 20 * MiB, OBJ) - {3}, set(),
       "a zeroed whole object is a hole")
    h.zero(4096, 24 * MiB, nbd.CMD_FLAG_NO_HOLE)
    eq(h.pread(4096, 24 * MiB), bytes(4096), "zero with NO_HOLE")
    # trim a whole object: reads zero afterwards (RBD removes the object)
    h.pwrite(pattern(4, OBJ), 44 * MiB)
    h.trim(OBJ, 44 * MiB)
    eq(h.pread(OBJ, 44 * MiB), bytes(OBJ), "trimmed object")
    ext = extents(h, size, 0)
    eq(flags_at(ext, 44 * MiB, OBJ), {3}, "trimmed object is a hole")
    eq(flags_at(ext, 16 * MiB, 4096), {0}, "data around still data")
    # block status with one extent asked (REQ_ONE) and a range in the middle
    got = []
    h.block_status(8 * MiB, 17 * MiB, lambda m, o, e, err: got.extend(e) if m == "base:allocation" else 0,
                   nbd.CMD_FLAG_REQ_ONE)
    eq(len(got), 2, "REQ_ONE: one extent (%r)" % got)
    check(0 < got[0] <= 8 * MiB and got[1] == 0, "REQ_ONE extent is data: %r" % got)
    # out of range requests
    eq(nbd_errno(h.pread, 4096, size - 2048), errno.EINVAL, "read past the end")
    h.shutdown()
    # a second connection sees the same data (multi-conn)
    h2 = d.nbd("r", tcp=True)
    eq(h2.pread(len(data), OBJ - MiB - 123), data, "second connection")
    h2.shutdown()
    st = d.info("r")["stats"]
    eq(st["errors"], 0, "no I/O errors counted")


@case("rbd: cache=1 (librbd writeback cache): FUA writes, flush, data after re-plug")
def t_cache(d):
    import nbd
    c = cluster()
    img = plug_new(d, "wc", "16M", extra=("--param", "cache=1"))
    h = d.nbd("wc")
    check(h.can_flush() and h.can_fua(), "flush and FUA offered")
    h.pwrite(pattern(30, MiB), 0)
    h.pwrite(pattern(31, 64 * KiB), 2 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    h.pwrite(pattern(32, 4096), 3 * MiB, nbd.CMD_FLAG_FUA)
    eq(h.pread(MiB, 0), pattern(30, MiB), "cached write reads back")
    # another client (no vdbus, no cache) sees what was flushed or written
    # with FUA, while the disk is still plugged (after the first flush the
    # cache is writeback: only the FUA flush puts pattern 32 on the OSD)
    import rbd
    with c.ioctx() as io:
        with rbd.Image(io, img, read_only=True) as im:
            eq(im.read(0, MiB), pattern(30, MiB), "flushed data in the cluster")
            eq(im.read(2 * MiB, 64 * KiB), pattern(31, 64 * KiB), "FUA data in the cluster")
            eq(im.read(3 * MiB, 4096), pattern(32, 4096), "FUA write after the flush")
    h.pwrite(pattern(33, 4096), 4 * MiB)
    # a cached, unflushed write into a new object is data for block status
    h.pwrite(pattern(34, 4096), 12 * MiB)
    eq(flags_at(extents(h, OBJ, 12 * MiB), 12 * MiB, 4096), {0}, "cached write is data")
    h.shutdown()
    d.cli_ok("unplug", "wc")   # flushes
    with c.ioctx() as io:
        with rbd.Image(io, img, read_only=True) as im:
            eq(im.read(4 * MiB, 4096), pattern(33, 4096), "unplug flushed the cache")


@case("rbd: fio verify (crc32c) through the NBD export, 4k random writes QD16", timeout=240)
def t_fio(d):
    check(have("fio"), "fio missing")
    plug_new(d, "f", "32M")
    rc, out, err = run(["fio", "--name=rbd", "--ioengine=nbd", "--uri=" + d.uri("f"),
                        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8M",
                        "--verify=crc32c", "--verify_state_save=0",
                        "--verify_fatal=1", "--do_verify=1",
                        "--randrepeat=0"], timeout=200)
    eq(rc, 0, "fio verify: %s %s" % (out[-2000:], err[-2000:]))
    rc, out, err = run(["fio", "--name=rbd2", "--ioengine=nbd", "--uri=" + d.uri("f", tcp=True),
                        "--rw=write", "--bs=64k", "--iodepth=8", "--size=8M", "--offset=16M",
                        "--verify=crc32c", "--verify_state_save=0",
                        "--verify_fatal=1", "--do_verify=1"], timeout=200)
    eq(rc, 0, "fio sequential verify: %s %s" % (out[-2000:], err[-2000:]))
    eq(d.info("f")["stats"]["errors"], 0, "no errors")


@case("rbd: --attach loop: mkfs.ext4, mount, files and checksums survive unplug and re-plug",
      root=True, timeout=300)
def t_loop(d):
    c = cluster()
    img = new_image_name()
    d.plug("rbd", "rbd:rbd/" + img, "--create", "--size", "64M", "--name", "fs",
           "--attach", "loop", *creds(c))
    dev = d.info("fs")["device"]
    check(dev.startswith("/dev/loop"), "device %r" % dev)
    run_ok(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev], timeout=120)
    mnt = os.path.join(d.base, "mnt")
    os.makedirs(mnt)
    sums = {}
    run_ok(["mount", dev, mnt])
    try:
        for i in range(6):
            blob = pattern(100 + i, random.Random(i).randrange(10 * KiB, 2 * MiB))
            p = os.path.join(mnt, "f%d" % i)
            with open(p, "wb") as f:
                f.write(blob)
            sums["f%d" % i] = hashlib.sha256(blob).hexdigest()
        run_ok(["sync"])
    finally:
        run_ok(["umount", mnt])
    d.cli_ok("unplug", "fs")
    d.plug("rbd", "rbd/" + img, "--name", "fs", "--attach", "loop", *creds(c))
    dev = d.info("fs")["device"]
    run_ok(["fsck.ext4", "-n", "-f", dev], timeout=120)
    run_ok(["mount", "-o", "ro", dev, mnt])
    try:
        for name, want in sums.items():
            with open(os.path.join(mnt, name), "rb") as f:
                eq(hashlib.sha256(f.read()).hexdigest(), want, "checksum of %s" % name)
    finally:
        run_ok(["umount", mnt])
    d.cli_ok("unplug", "fs")


# ---------------------------------------------------------------- snapshots

@case("rbd: snapshot under a write load is point-in-time exact and is an RBD snapshot", timeout=240)
def t_snapshot_load(d):
    c = cluster()
    size = 16 * MiB
    img = plug_new(d, "live", "16M")
    h = d.nbd("live")
    init = pattern(7, size)
    for o in range(0, size, 4 * MiB):
        h.pwrite(init[o:o + 4 * MiB], o)
    versions = {}
    stop = threading.Event()
    lock = threading.Lock()
    errors = []

    def block_data(blk, ver):
        return (b"%08d:%08d:" % (blk, ver)).ljust(4096, b"w")

    def writer(seed):
        try:
            hw = d.nbd("live")
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
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in ts:
        t.start()
    time.sleep(1.0)
    snap_start = time.time()
    rc, out, err = d.cli("snapshot", "live", "--as", "snap1")
    snap_end = time.time()
    time.sleep(0.7)
    stop.set()
    for t in ts:
        t.join()
    eq(errors, [], "writer errors")
    eq(rc, 0, "snapshot: %s" % err)
    eq(out.strip(), "snap1", "snapshot name printed")
    eq(c.snaps(img), ["snap1"], "RBD snapshots of the image")
    info = d.info("snap1")
    check(info["readonly"] and info["snapshot"], "snapshot is read-only: %r" % info)
    eq(info["backend"], "rbd", "the snapshot disk is an rbd disk")
    eq(info["params"]["image"], "rbd/%s@snap1" % img, "snapshot image spec")
    eq(d.info("live")["backend"], "rbd", "the live disk stays rbd (no overlay)")
    nw = sum(len(v) for v in versions.values())
    check(nw > 20, "the writers wrote (%d writes)" % nw)
    hs = d.nbd("snap1")
    snap = b"".join(hs.pread(MiB, o) for o in range(0, size, MiB))
    for blk in range(size // 4096):
        sblk = snap[blk * 4096:(blk + 1) * 4096]
        hist = versions.get(blk, [])
        if sblk == init[blk * 4096:(blk + 1) * 4096]:
            before = [v for v, t, _ in hist if t < snap_start]
            check(not before, "block %d: snapshot has the initial data but version %r completed "
                  "before the snapshot" % (blk, before[-1:]))
            continue
        tag = sblk[:18]
        check(tag[8:9] == b":" and sblk == block_data(blk, int(tag[9:17])),
              "block %d of the snapshot is torn or foreign: %r" % (blk, sblk[:40]))
        ver = int(tag[9:17])
        times = [t for v, t, _ in hist if v == ver]
        check(times and min(times) <= snap_end + 0.001,
              "block %d: snapshot has version %d, written after the snapshot" % (blk, ver))
        # A version sent after this one completed, and done before the
        # snapshot began, must win (writes in flight together have no order).
        later = [v for v, t, ts in hist if t < snap_start and times and ts > min(times)]
        check(not later, "block %d: snapshot has version %d but %r was written after it, "
              "before the snapshot" % (blk, ver, later))
    # the snapshot is read-only; the live disk is writable
    eq(nbd_errno(hs.pwrite, b"x" * 512, 0), errno.EPERM, "write to the snapshot")
    check(not hs.can_trim() or True, "")
    h.pwrite(b"after" * 100, 0)
    eq(hs.pread(500, 0), snap[:500], "snapshot unchanged by later writes")
    hs.shutdown()
    h.shutdown()
    # a snapshot of a snapshot is refused; a second snapshot name is a new RBD snap
    rc, out, err = d.cli("snapshot", "snap1", "--as", "x")
    eq(rc, 1, "snapshot of a snapshot")
    d.cli_ok("snapshot", "live", "--as", "snap2")
    eq(sorted(c.snaps(img)), ["snap1", "snap2"], "two RBD snapshots")


@case("rbd: --snap and @SNAP plug read-only; writes EPERM; rbd snaps made outside work")
def t_snap_plug(d):
    c = cluster()
    img = plug_new(d, "w", "16M")
    h = d.nbd("w")
    h.pwrite(pattern(9, MiB), 0)
    h.flush()
    h.shutdown()
    c.rbd_cli("snap", "create", "rbd/%s@outside" % img)
    d.plug("rbd", "rbd/" + img, "--snap", "outside", "--name", "s", "--attach", "none", *creds(c))
    d.plug("rbd", "rbd:rbd/%s@outside" % img, "--name", "s2", "--attach", "none", *creds(c))
    for name in ("s", "s2"):
        info = d.info(name)
        check(info["readonly"], "%s read-only: %r" % (name, info))
        hs = d.nbd(name)
        check(hs.is_read_only(), "%s export read-only" % name)
        eq(hs.pread(MiB, 0), pattern(9, MiB), "%s data" % name)
        eq(nbd_errno(hs.pwrite, b"x" * 512, 0), errno.EPERM, "write to %s" % name)
        hs.shutdown()
    rc, out, err = d.cli("plug", "rbd", "rbd/%s@a" % img, "--snap", "b", *creds(c))
    eq(rc, 1, "two snapshots named")
    check("two snapshots" in err, err)


# ---------------------------------------------------------------- life cycle

@case("rbd: a restart of vdbusd keeps the disk and its data; snapshots come back too")
def t_restart(d):
    img = plug_new(d, "keep", "16M")
    h = d.nbd("keep")
    h.pwrite(pattern(5, 2 * MiB), MiB)
    h.shutdown()
    d.cli_ok("snapshot", "keep", "--as", "keep.s")
    d.restart()
    names = sorted(x["name"] for x in d.list())
    eq(names, ["keep", "keep.s"], "disks after restart")
    eq(d.info("keep")["params"].get("create"), None, "create is not kept")
    h = d.nbd("keep")
    eq(h.pread(2 * MiB, MiB), pattern(5, 2 * MiB), "data after restart")
    h.pwrite(b"more" * 1024, 0)
    h.shutdown()
    hs = d.nbd("keep.s")
    eq(hs.pread(2 * MiB, MiB), pattern(5, 2 * MiB), "snapshot data after restart")
    eq(hs.pread(4096, 0), bytes(4096), "snapshot does not see later writes")
    hs.shutdown()
    check(img, "")


@case("rbd: after kill -9 of vdbusd the disk comes back; writes resume once the dead "
      "client's exclusive lock expires", timeout=200)
def t_kill9(d):
    import nbd
    plug_new(d, "k", "16M")
    h = d.nbd("k")
    h.pwrite(pattern(6, MiB), 0)   # takes the exclusive lock
    h.shutdown()
    d.restart(kill=True)
    eq([x["name"] for x in d.list()], ["k"], "disk back after kill -9")
    h = d.nbd("k")
    eq(h.pread(MiB, 0), pattern(6, MiB), "data after kill -9 (reads need no lock)")
    t0 = time.time()
    deadline = t0 + 90
    while True:
        try:
            h.pwrite(b"new!" * 1024, MiB)
            break
        except nbd.Error as e:
            check(time.time() < deadline, "writes did not resume: %s" % e)
            time.sleep(0.2)
    vdbtest._comment("kill -9: first write after %.1fs (the dead client's watch expires)" %
                     (time.time() - t0))
    eq(h.pread(4096, MiB), b"new!" * 1024, "write after kill -9")
    h.shutdown()


@case("rbd: an image resized with `rbd resize` shows its new size in vdbus info, NBD and "
      "the loop device")
def t_resize(d):
    c = cluster()
    loop = vdbtest.is_root() and os.path.exists("/dev/loop-control")
    img = new_image_name()
    d.plug("rbd", "rbd/" + img, "--create", "--size", "16M", "--name", "rs",
           "--attach", "loop" if loop else "none", *creds(c))
    dev = d.info("rs")["device"]
    vdbtest._comment("resize: device %r" % dev)

    def dev_size():
        return int(run_ok(["blockdev", "--getsize64", dev]).strip())
    if loop:
        eq(dev_size(), 16 * MiB, "loop device size before")
    h = d.nbd("rs")
    eq(h.get_size(), 16 * MiB, "size before")
    c.rbd_cli("resize", "--size", "48M", "rbd/" + img)
    deadline = time.time() + 10
    while d.info("rs")["size"] != 48 * MiB and time.time() < deadline:
        time.sleep(0.2)
    eq(d.info("rs")["size"], 48 * MiB, "vdbus info after the resize")
    if loop:
        eq(dev_size(), 48 * MiB, "the loop device follows the resize")
    h2 = d.nbd("rs")
    eq(h2.get_size(), 48 * MiB, "a new NBD connection sees the new size")
    h2.pwrite(b"grown" * 800, 40 * MiB)
    eq(h2.pread(4000, 40 * MiB), b"grown" * 800, "I/O in the grown part")
    h2.shutdown()
    eq(h.pread(4096, 0), bytes(4096), "the old connection still works")
    h.shutdown()
    c.rbd_cli("resize", "--size", "8M", "--allow-shrink", "rbd/" + img)
    deadline = time.time() + 10
    while d.info("rs")["size"] != 8 * MiB and time.time() < deadline:
        time.sleep(0.2)
    eq(d.info("rs")["size"], 8 * MiB, "vdbus info after shrinking")
    if loop:
        eq(dev_size(), 8 * MiB, "the loop device follows the shrink")
    h3 = d.nbd("rs")
    eq(h3.get_size(), 8 * MiB, "shrunk size over NBD")
    eq(nbd_errno(h3.pread, 4096, 40 * MiB), errno.EINVAL, "read past the new end")
    h3.shutdown()


# ---------------------------------------------------------------- failure

@case("rbd: OSD stopped mid-write: EIO within the timeout, a RAM disk unaffected; "
      "OSD back: I/O resumes, data intact", timeout=240)
def t_outage(d):
    import nbd
    c = cluster()
    tmo = 5
    plug_new(d, "o", "16M", timeout=tmo)
    plug_new(d, "o2", "16M", timeout=tmo)
    h2 = d.nbd("o2")
    h2.pwrite(b"o2" * 2048, 0)
    h2.shutdown()
    d.plug("ram", "--size", "16M", "--name", "ram", "--attach", "none")
    h = d.nbd("o")
    before = pattern(11, 2 * MiB)
    h.pwrite(before, 0)
    h.flush()
    hr = d.nbd("ram")
    # a writer that keeps writing until the outage shows
    results = []

    def writer():
        hw = d.nbd("o")
        i = 0
        while True:
            t0 = time.time()
            try:
                hw.pwrite(pattern(20 + i, 64 * KiB), 4 * MiB + (i % 64) * 64 * KiB)
                results.append(("ok", i, time.time() - t0))
            except nbd.Error as e:
                results.append(("err", e.errno, time.time() - t0))
                break
            i += 1
        hw.shutdown()
    t = threading.Thread(target=writer)
    t.start()
    time.sleep(1.0)
    t_stop = time.time()
    c.stop_osd()
    stopped = time.time() - t_stop
    # the RAM disk carries on at full speed meanwhile
    t0 = time.time()
    for i in range(200):
        hr.pwrite(b"r" * 4096, (i % 4096) * 4096)
    eq(hr.pread(4096, 0), b"r" * 4096, "RAM disk during the outage")
    check(time.time() - t0 < 3, "RAM disk I/O took %.1fs during the outage" % (time.time() - t0))
    t.join(tmo + stopped + 20)
    check(not t.is_alive(), "the writer is still blocked %ds after the OSD stopped" % (tmo + 20))
    check(results and results[-1][0] == "err", "the write load saw an error: %r" % results[-3:])
    eq(results[-1][1], "EIO", "the failed write's error")
    check(results[-1][2] < tmo + stopped + 6, "the failed write took %.1fs (timeout %ds)" %
          (results[-1][2], tmo))
    # a read of stored data now fails with EIO within the timeout too (not
    # a hang); a read of a never-written object needs no OSD (object map)
    eq(h.pread(4096, 12 * MiB), bytes(4096), "unwritten object during the outage")
    t0 = time.time()
    e = nbd_errno(h.pread, 4096, 0)
    eq(e, errno.EIO, "read during the outage")
    check(time.time() - t0 < tmo + 6, "read failed after %.1fs" % (time.time() - t0))
    check(d.running(), "daemon alive")
    eq(d.info("ram")["stats"]["errors"], 0, "RAM disk errors")
    # block status of stored data fails (or answers) within the timeout too
    t0 = time.time()
    try:
        extents(h, MiB, 0)
    except nbd.Error as e:
        eq(e.errno, "EIO", "block status during the outage")
    check(time.time() - t0 < tmo + 6, "block status took %.1fs" % (time.time() - t0))
    # a plug during the outage fails within the timeout with a message; an
    # unplug finishes (bounded by the timeout), the control socket answers
    t0 = time.time()
    rc, out, err = d.cli("plug", "rbd", "rbd/nosuch", "--attach", "none", *creds(c, tmo))
    eq(rc, 1, "plug during the outage")
    check(err.startswith("vdbus: plug: rbd backend: ") and len(err.strip().splitlines()) == 1,
          "plug message: %r" % err)
    check(time.time() - t0 < 3 * tmo + 6, "plug during the outage took %.1fs" % (time.time() - t0))
    t0 = time.time()
    d.cli_ok("unplug", "o2", timeout=60)
    check(time.time() - t0 < 3 * tmo + 6, "unplug during the outage took %.1fs" % (time.time() - t0))
    vdbtest._comment("outage: unplug took %.1fs" % (time.time() - t0))
    # the OSD comes back (SIGTERM kept memstore's data): I/O resumes
    c.start_osd()
    deadline = time.time() + 60
    while True:
        try:
            h.pwrite(b"back" * 1024, 8 * MiB)
            break
        except nbd.Error:
            check(time.time() < deadline, "I/O did not resume within 60 s of the OSD's return")
            time.sleep(0.5)
    eq(h.pread(4096, 8 * MiB), b"back" * 1024, "write after the outage")
    eq(h.pread(len(before), 0), before, "data written before the outage")
    # every write acknowledged before the outage is there
    oks = [r for r in results if r[0] == "ok"]
    last = {}
    for _, i, _ in oks:
        last[4 * MiB + (i % 64) * 64 * KiB] = i
    for off, i in last.items():
        got = h.pread(64 * KiB, off)
        if got != pattern(20 + i, 64 * KiB):
            # the failed write may have reached the OSD; it is the only other candidate
            failed_i = len(oks)
            check(failed_i % 64 == (off - 4 * MiB) // (64 * KiB) and got == pattern(20 + failed_i, 64 * KiB),
                  "acknowledged write %d at %d lost after the outage" % (i, off))
    h.shutdown()
    hr.shutdown()


if __name__ == "__main__":
    try:
        vdbtest.main()
    finally:
        if _cluster is not None:
            _cluster.destroy()
