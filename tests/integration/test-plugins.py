#!/usr/bin/python3
"""Backend plugins: vdbusd --plugin-dir loads the example plugin
(examples/pattern, built by meson into BUILD/examples), which real clients
then read and write (libnbd, nbdcopy, qemu-img against nbdkit's pattern
plugin); bad plugins (built here with cc) are skipped with a clear log line
and the daemon keeps running; the example builds out of tree against
include/ alone."""
import errno
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vdbtest import nbd_errno  # noqa: E402
from vdbtest import (BUILD, ROOT, Daemon, case, check, eq, fail, main, run,  # noqa: E402
                     run_ok)
import nbd  # noqa: E402

MiB = 1 << 20
PLUGINS = os.path.join(BUILD, "examples")
PATTERN_SO = os.path.join(PLUGINS, "pattern.so")
INCLUDE = os.path.join(ROOT, "include")
with open(os.path.join(INCLUDE, "vdbus", "backend.h")) as _h:
    API = int(re.search(r"#define VDB_BACKEND_API_VERSION (\d+)", _h.read()).group(1))
EXAMPLE_C = os.path.join(ROOT, "examples", "pattern", "pattern.c")


def pattern(off, n):
    """What the pattern backend (and nbdkit's pattern plugin) reads at off."""
    start = off & ~7
    words = (off + n - start + 7) // 8
    raw = b"".join(struct.pack(">Q", start + 8 * i) for i in range(words))
    return raw[off - start:off - start + n]


def extents(h, length, offset):
    """[(length, flags)] of base:allocation for [offset, offset + length)."""
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext == "base:allocation":
            out.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, offset, cb)
    return out


def state_at(ext, offset, pos):
    """The extent flags covering byte pos, from extents starting at offset."""
    for length, flags in ext:
        if pos < offset + length:
            return flags
        offset += length
    fail("byte %d not covered by extents %r" % (pos, ext))


# ---------------------------------------------------------------- the example

@case("vdbus backends lists the plugin with its path; --json has origin and positional",
      extra=["--plugin-dir", PLUGINS])
def t_list(d):
    out = d.cli_ok("backends")
    lines = out.splitlines()
    names = [l.split()[0] for l in lines if not l.startswith(" ")]
    for b in ["ram", "file", "error", "delay", "trace", "pattern"]:
        check(b in names, "backend %s not listed: %r" % (b, out))
    i = next(i for i, l in enumerate(lines) if l.startswith("pattern "))
    check(i + 1 < len(lines) and lines[i + 1].split() == ["plugin", os.path.realpath(PATTERN_SO)],
          "the line after pattern's is not 'plugin PATH': %r" % out)
    bj = {b["name"]: b for b in json.loads(d.cli_ok("backends", "--json"))}
    eq(bj["pattern"]["origin"], os.path.realpath(PATTERN_SO), "origin of pattern")
    eq(bj["pattern"]["positional"], "size", "positional of pattern")
    eq(bj["pattern"]["volatile"], True, "pattern is volatile")
    eq(bj["ram"]["origin"], "built-in", "origin of ram")
    eq(bj["ram"]["positional"], None, "positional of ram")
    eq(bj["file"]["positional"], "path", "positional of file")
    out = d.cli_ok("help", "backend", "pattern")
    check(out.startswith("pattern: every 8-byte word"), "help backend pattern: %r" % out)
    check("Plugin: " + os.path.realpath(PATTERN_SO) in out, "help shows no plugin path: %r" % out)
    check("size=SIZE" in out and "sets size=ARG" in out, "help backend pattern: %r" % out)
    check("Plugin:" not in d.cli_ok("help", "backend", "ram"), "help backend ram names a plugin")
    check("plugin %s: backend 'pattern' (API version %d)" % (os.path.realpath(PATTERN_SO), API) in d.log(),
          "no load line in the daemon log")


@case("pattern: libnbd reads the pattern (aligned, unaligned, last byte); writes read back",
      extra=["--plugin-dir", PLUGINS])
def t_rw(d):
    size = 5 * MiB + 13  # not a multiple of anything
    eq(d.plug("pattern", str(size), "--name", "p", "--attach", "none"), "p", "name")
    eq(d.disk("p")["size"], size, "size from the positional argument")
    eq(d.disk("p")["backend"], "pattern", "backend")
    h = d.nbd("p")
    eq(h.get_size(), size, "NBD size")
    for off, n in [(0, 4096), (8, 8), (3, 5), (4093, 11), (MiB - 7, 4096 + 9), (size - 1, 1),
                   (size - 4096, 4096), (size - 5, 5), (2 * MiB, 2 * MiB)]:
        eq(h.pread(n, off), pattern(off, n), "read %d bytes at %d" % (n, off))
    eq(h.pread(8, 8 * 1000), struct.pack(">Q", 8000), "the word at 8000 reads as 8000")
    # a write across a chunk boundary, one inside a chunk, one at the very end
    h.pwrite(b"A" * 6000, 4000)
    h.pwrite(b"bc", 3 * MiB + 1)
    h.pwrite(b"Z", size - 1)
    eq(h.pread(6000, 4000), b"A" * 6000, "write read back")
    eq(h.pread(100, 3900), pattern(3900, 100), "pattern before a write")
    eq(h.pread(20, 10000), pattern(10000, 20), "pattern after a write (same chunk)")
    eq(h.pread(4, 3 * MiB), pattern(3 * MiB, 1) + b"bc" + pattern(3 * MiB + 3, 1), "small write")
    eq(h.pread(2, size - 2), pattern(size - 2, 1) + b"Z", "last byte written")
    # a second connection sees the same data
    h2 = d.nbd("p", tcp=True)
    eq(h2.pread(6000, 4000), b"A" * 6000, "data seen from a second (TCP) connection")
    h2.shutdown()
    h.shutdown()
    # past the end (libnbd would refuse to send it in strict mode)
    h = d.nbd("p", strict=False)
    eq(nbd_errno(h.pwrite, b"x", size), errno.ENOSPC, "write past the end")
    h.shutdown()
    st = d.info("p")["stats"]
    check(st["writes"] >= 3 and st["reads"] >= 10, "counters %r" % st)


@case("pattern: write-zeroes, trim and block status (base:allocation)",
      extra=["--plugin-dir", PLUGINS])
def t_zero_extents(d):
    d.plug("pattern", "8M", "--name", "z", "--attach", "none")
    h = d.nbd("z")
    check(h.can_zero() and h.can_trim() and h.can_meta_context("base:allocation"), "capabilities")
    h.flush()  # no flush callback: the bus answers it
    eq(extents(h, 8 * MiB, 0), [(8 * MiB, 0)], "a fresh disk is one data extent")
    h.zero(MiB, MiB)             # whole chunks: ZEROED
    h.zero(10, 100)              # inside a chunk: cleared in a buffer
    eq(h.pread(MiB, MiB), bytes(MiB), "zeroed megabyte")
    eq(h.pread(120, 0), pattern(0, 100) + bytes(10) + pattern(110, 10), "partial zero")
    ext = extents(h, 8 * MiB, 0)
    eq(state_at(ext, 0, MiB - 1), 0, "before the zeroed range")
    eq(state_at(ext, 0, MiB) & 2, 2, "zeroed range reads as zero (ZERO flag)")
    eq(state_at(ext, 0, 2 * MiB - 1) & 2, 2, "end of the zeroed range")
    eq(state_at(ext, 0, 2 * MiB), 0, "after the zeroed range")
    eq(sum(l for l, f in ext), 8 * MiB, "extents cover the disk")
    eq(extents(h, 4096, MiB + 4096), [(4096, 2)], "block status inside the zeroed range")
    # REQ_ONE: libnbd's flag
    one = []
    h.block_status(8 * MiB - MiB, MiB,
                   lambda m, o, e, err: one.extend(e) or 0, flags=nbd.CMD_FLAG_REQ_ONE)
    eq(one, [MiB, 2], "REQ_ONE: one extent")
    # writing into a zeroed chunk
    h.pwrite(b"q" * 10, MiB + 5)
    eq(h.pread(20, MiB), bytes(5) + b"q" * 10 + bytes(5), "write into a zeroed chunk")
    # trim of whole chunks brings the pattern back (allowed: trimmed data is unspecified)
    h.pwrite(b"t" * 8192, 4 * MiB)
    h.trim(8192, 4 * MiB)
    eq(h.pread(8192, 4 * MiB), pattern(4 * MiB, 8192), "trimmed chunks read as the pattern")
    h.shutdown()
    # a read-only plug: writes refused
    d.plug("pattern", "1M", "--name", "ro", "--readonly", "--attach", "none")
    h = d.nbd("ro")
    check(h.is_read_only(), "read-only export")
    eq(h.pread(16, 1 << 19), pattern(1 << 19, 16), "read-only read")
    eq(nbd_errno(h.pwrite, b"x", 0), errno.EPERM, "write on a read-only pattern disk")
    h.shutdown()


@case("pattern: qemu-img compare against nbdkit's pattern plugin; nbdcopy; parallel writers",
      extra=["--plugin-dir", PLUGINS])
def t_peers(d):
    size = 16 * MiB
    d.plug("pattern", str(size), "--name", "c", "--attach", "none")
    ours = d.uri("c")
    cmd = "qemu-img compare -f raw -F raw \"$uri\" '%s'" % ours
    rc, out, err = run(["nbdkit", "--threads=1", "-U", "-", "pattern", "size=%d" % size,
                        "--run", cmd])
    eq(rc, 0, "qemu-img compare with nbdkit pattern: %s %s" % (out, err))
    # nbdcopy the whole disk and check it byte for byte
    dst = os.path.join(d.data_dir, "copy.img")
    run_ok(["nbdcopy", ours, dst])
    with open(dst, "rb") as f:
        got = f.read()
    eq(len(got), size, "copied size")
    check(got == pattern(0, size), "nbdcopy's copy is not the pattern")
    # four writers at once on their own connections, then everything checked
    errs = []

    def writer(k):
        try:
            h = d.nbd("c")
            for i in range(64):
                off = (k * 64 + i) * 65536 + 512 * k
                h.pwrite(bytes([k + 1]) * 3000, off)
            h.shutdown()
        except Exception as e:  # noqa: B902 — reported below
            errs.append(e)
    ts = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    check(not errs, "writers failed: %r" % errs)
    model = bytearray(pattern(0, size))
    for k in range(4):
        for i in range(64):
            off = (k * 64 + i) * 65536 + 512 * k
            model[off:off + 3000] = bytes([k + 1]) * 3000
    run_ok(["nbdcopy", ours, dst])
    with open(dst, "rb") as f:
        check(hashlib.sha256(f.read()).digest() == hashlib.sha256(model).digest(),
              "data after parallel writes differs from the model")
    cmd = "qemu-img compare -q -f raw -F raw \"$uri\" '%s'" % ours
    rc, out, err = run(["nbdkit", "--threads=1", "-U", "-", "pattern", "size=%d" % size,
                        "--run", cmd])
    eq(rc, 1, "qemu-img compare after writes must see a difference (%s)" % err)


@case("plug pattern: positional and --size; errors: no size, bad size, two positionals, "
      "unknown backend", extra=["--plugin-dir", PLUGINS])
def t_plug_errors(d):
    d.plug("pattern", "--size", "2M", "--name", "s", "--attach", "none")
    eq(d.disk("s")["size"], 2 * MiB, "--size")
    rc, out, err = d.cli("plug", "pattern", "--attach", "none")
    eq(rc, 1, "plug pattern without a size")
    check("pattern backend: a size is required" in err, "message %r" % err)
    rc, out, err = d.cli("plug", "pattern", "1Q", "--attach", "none")
    eq(rc, 1, "plug pattern 1Q")
    check("bad size '1Q'" in err, "message %r" % err)
    rc, out, err = d.cli("plug", "pattern", "65T", "--attach", "none")
    eq(rc, 1, "plug pattern 65T")
    rc, out, err = d.cli("plug", "pattern", "1M", "2M", "--attach", "none")
    eq(rc, 2, "two positionals")
    check("only one size" in err, "message %r" % err)
    rc, out, err = d.cli("plug", "ram", "1M", "--attach", "none")
    eq(rc, 2, "a positional for ram")
    check("unexpected argument '1M'" in err, "message %r" % err)
    rc, out, err = d.cli("plug", "nosuch", "x", "--attach", "none")
    eq(rc, 1, "plug nosuch x")
    check("no backend named 'nosuch'" in err, "message %r" % err)
    eq([x["name"] for x in d.list()], ["s"], "only the good disk is plugged")
    # volatile: not kept across a restart
    d.restart()
    eq(d.list(), [], "a pattern disk is not restored (volatile)")


# ---------------------------------------------------------------- bad plugins

GOOD_BODY = r"""
#include <errno.h>
#include <string.h>
#include <vdbus/backend.h>
static int t_open(const struct vdb_params *p, void **h, struct vdb_backend_info *info)
{ (void)p; info->size = 1 << 20; *h = info; return 0; }
static void t_close(void *h) { (void)h; }
static void t_read(void *h, struct vdb_req *r)
{ (void)h; memset(r->buf, 0xab, r->len); vdb_req_complete(r, 0); }
"""

OPS = """
%(decl)s = {
  .api_version = %(api)s, .struct_size = %(size)s,
  .name = "%(name)s", .summary = "test plugin %(name)s", .usage = "none\\n",
  .open = t_open, .close = t_close, .read = %(read)s,
};
"""

# name: (C source, expected reason in the log, or None if it must load)
BAD = {
    "noentry": (GOOD_BODY + OPS % dict(decl="const struct vdb_backend_ops ops", api=1,
                                       size="sizeof ops", name="noentry", read="t_read"),
                "no entry point vdb_backend_plugin_init()"),
    "api99": (GOOD_BODY + OPS % dict(decl="static const struct vdb_backend_ops ops", api=99,
                                     size="sizeof ops", name="api99", read="t_read")
              + "VDB_BACKEND_PLUGIN(ops)\n", "API version 99 (this vdbusd supports 1 to %d)" % API),
    "api0": (GOOD_BODY + OPS % dict(decl="static const struct vdb_backend_ops ops", api=0,
                                    size="sizeof ops", name="api0", read="t_read")
             + "VDB_BACKEND_PLUGIN(ops)\n", "API version 0 (this vdbusd supports 1 to %d)" % API),
    "clash": (GOOD_BODY + OPS % dict(decl="static const struct vdb_backend_ops ops", api=1,
                                     size="sizeof ops", name="ram", read="t_read")
              + "VDB_BACKEND_PLUGIN(ops)\n", "backend name 'ram' is taken by the built-in backend"),
    "noread": (GOOD_BODY + OPS % dict(decl="static const struct vdb_backend_ops ops", api=1,
                                      size="sizeof ops", name="noread", read="NULL")
               + "VDB_BACKEND_PLUGIN(ops)\n",
               "backend 'noread' has no read callback (open, close and read are required)"),
    "small": (GOOD_BODY + OPS % dict(decl="static const struct vdb_backend_ops ops", api=1,
                                     size="16", name="small", read="t_read")
              + "VDB_BACKEND_PLUGIN(ops)\n", "struct_size 16 is smaller than the API version 1"),
    "badname": (GOOD_BODY + OPS % dict(decl="static const struct vdb_backend_ops ops", api=1,
                                       size="sizeof ops", name="Bad Name", read="t_read")
                + "VDB_BACKEND_PLUGIN(ops)\n",
                "backend name 'Bad Name' has characters other than a-z, 0-9"),
    "declines": (GOOD_BODY + """
const struct vdb_backend_ops *vdb_backend_plugin_init(uint32_t v)
{ (void)v; vdb_set_error("no licence for this host"); return NULL; }
""", "vdb_backend_plugin_init() declined: no licence for this host"),
    "nullret": (GOOD_BODY + """
const struct vdb_backend_ops *vdb_backend_plugin_init(uint32_t v) { (void)v; return NULL; }
""", "vdb_backend_plugin_init() declined (returned NULL)"),
    "undef": (GOOD_BODY + """
void no_such_function_in_vdbusd(void);
static void u_read(void *h, struct vdb_req *r) { (void)h; no_such_function_in_vdbusd(); t_read(h, r); }
""" + OPS % dict(decl="static const struct vdb_backend_ops ops", api=1, size="sizeof ops",
                 name="undef", read="u_read") + "VDB_BACKEND_PLUGIN(ops)\n",
              "undefined symbol: no_such_function_in_vdbusd"),
    # a table from a newer header: fields this vdbusd does not know are set
    "newer": (GOOD_BODY + """
static const struct { struct vdb_backend_ops ops; void *future; } big = {
  { .api_version = 1, .struct_size = sizeof big, .name = "newer", .summary = "s", .usage = "u",
    .open = t_open, .close = t_close, .read = t_read }, (void *)t_read };
VDB_BACKEND_PLUGIN(big.ops)
""", "fields past byte"),
    # the same table with the unknown tail zero: accepted
    "newer-ok": (GOOD_BODY + """
static const struct { struct vdb_backend_ops ops; void *future; } big = {
  { .api_version = 1, .struct_size = sizeof big, .name = "newer-ok", .summary = "s",
    .usage = "u", .open = t_open, .close = t_close, .read = t_read }, NULL };
VDB_BACKEND_PLUGIN(big.ops)
""", None),
    # the smallest version-1 table (no tail padding): accepted and widened
    "v1min": (GOOD_BODY + OPS % dict(decl="static const struct vdb_backend_ops ops", api=1,
                                     size="offsetof(struct vdb_backend_ops, flags) + 4",
                                     name="v1min", read="t_read")
              + "VDB_BACKEND_PLUGIN(ops)\n", None),
}


def build_bad_plugins(dirpath):
    for name, (src, _) in BAD.items():
        c = os.path.join(dirpath, name + ".c")
        with open(c, "w") as f:
            f.write("#include <stddef.h>\n" + src)
        run_ok(["cc", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unused-function",
                "-I" + INCLUDE, c, "-o", os.path.join(dirpath, name + ".so")])
        os.unlink(c)
    with open(os.path.join(dirpath, "notelf.so"), "w") as f:
        f.write("this is not an ELF object\n" * 10)
    os.mkdir(os.path.join(dirpath, "adir.so"))
    with open(os.path.join(dirpath, "readme.txt"), "w") as f:
        f.write("not a plugin: ignored\n")
    # a second copy of the example: its name is taken by the first
    shutil.copy(PATTERN_SO, os.path.join(dirpath, "pattern.so"))
    shutil.copy(PATTERN_SO, os.path.join(dirpath, "pattern2.so"))


@case("bad plugins are skipped with their path and reason; the daemon runs; good ones load",
      daemon=False)
def t_bad_plugins():
    tmp = tempfile.mkdtemp(prefix="vdbt-plugins-", dir="/tmp")
    d = None
    try:
        build_bad_plugins(tmp)
        d = Daemon(extra=["--plugin-dir", tmp])
        log = d.log()
        for name, (src, why) in BAD.items():
            path = os.path.join(tmp, name + ".so")
            if why is None:
                check("plugin %s: backend '%s' (API version 1)" % (path, name) in log,
                      "%s did not load:\n%s" % (name, d.log_tail()))
                continue
            lines = [l for l in log.splitlines() if ("plugin %s: skipped: " % path) in l]
            eq(len(lines), 1, "log lines for %s" % name)
            check(why in lines[0], "reason for %s: want %r in %r" % (name, why, lines[0]))
            check("warning" in lines[0], "not a warning: %r" % lines[0])
        for name, why in [("notelf", "cannot load it: "), ("adir", "not a regular file"),
                          ("pattern2", "backend name 'pattern' is taken by the plugin %s" %
                           os.path.join(tmp, "pattern.so"))]:
            path = os.path.join(tmp, name + ".so")
            lines = [l for l in log.splitlines() if ("plugin %s: skipped: " % path) in l]
            check(len(lines) == 1 and why in lines[0], "%s: want %r in %r" % (name, why, lines))
        check("readme" not in log, "readme.txt was looked at")
        bj = {b["name"]: b for b in json.loads(d.cli_ok("backends", "--json"))}
        eq(sorted(n for n, b in bj.items() if b["origin"] != "built-in"),
           ["newer-ok", "pattern", "v1min"], "plugin backends loaded")
        # the daemon works, and the accepted test plugins serve I/O
        d.plug("ram", "--size", "1M", "--name", "r", "--attach", "none")
        for name in ["v1min", "newer-ok"]:
            d.plug(name, "--name", name, "--attach", "none")
            h = d.nbd(name)
            eq(h.pread(4096, 8192), b"\xab" * 4096, "read from %s" % name)
            check(h.is_read_only() and not h.can_trim() and not h.can_zero(),
                  "capabilities of %s" % name)
            eq(nbd_errno(h.pwrite, b"x", 0), errno.EPERM, "write to %s (no write callback)" % name)
            h.shutdown()
        d.plug("pattern", "1M", "--name", "p", "--attach", "none")
        h = d.nbd("p")
        eq(h.pread(16, 4096), pattern(4096, 16), "the copy of the example works")
        h.shutdown()
        d.stop()
    finally:
        if d:
            d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@case("a disk of a persistent plugin backend comes back at restart; without the plugin it "
      "waits in the bus state", daemon=False)
def t_restore():
    tmp = tempfile.mkdtemp(prefix="vdbt-prest-", dir="/tmp")
    d = None
    try:
        run_ok(["cc", "-shared", "-fPIC", "-I" + INCLUDE, "-Wall", "-Werror", "-o",
                os.path.join(tmp, "keep.so"), "-x", "c", "-"],
               input="#include <stddef.h>\n" + GOOD_BODY +
               OPS % dict(decl="static const struct vdb_backend_ops ops", api=1, size="sizeof ops",
                          name="keep", read="t_read") + "VDB_BACKEND_PLUGIN(ops)\n")
        d = Daemon(extra=["--plugin-dir", tmp])
        d.plug("keep", "--name", "k", "--attach", "none")
        d.restart()
        eq([x["name"] for x in d.list()], ["k"], "restored with the plugin")
        d.extra = []
        d.restart()
        eq(d.list(), [], "no plugin: the disk cannot be plugged back")
        check("unknown backend 'keep'" in d.log(), "no log line for the missing backend")
        d.extra = ["--plugin-dir", tmp]
        d.restart()
        eq([x["name"] for x in d.list()], ["k"], "the plugin is back: so is the disk")
        h = d.nbd("k")
        eq(h.pread(512, 0), b"\xab" * 512, "read after the restore")
        h.shutdown()
        d.stop()
    finally:
        if d:
            d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@case("--plugin-dir: a missing or unreadable directory is an error at start; several dirs load",
      daemon=False)
def t_plugin_dir_errors():
    tmp = tempfile.mkdtemp(prefix="vdbt-pdir-", dir="/tmp")
    try:
        for bad, why in [("/nonexistent-vdbus-plugins", "No such file or directory"),
                         (PATTERN_SO, "Not a directory")]:
            d = Daemon(extra=["--plugin-dir", bad], start=False)
            try:
                p = d.spawn()
                rc = p.wait(30)
                eq(rc, 1, "vdbusd --plugin-dir %s exit code" % bad)
                want = "plugin directory %s: %s" % (bad, why)
                check(want in d.log(), "want %r in the log:\n%s" % (want, d.log_tail()))
                check(not os.path.exists(d.sock), "control socket left behind")
            finally:
                d.cleanup()
        # two directories: both loaded
        other = os.path.join(tmp, "other")
        os.mkdir(other)
        run_ok(["cc", "-shared", "-fPIC", "-I" + INCLUDE, "-Wall", "-Werror", "-o",
                os.path.join(other, "t.so"), "-x", "c", "-"],
               input="#include <stddef.h>\n" + GOOD_BODY +
               OPS % dict(decl="static const struct vdb_backend_ops ops", api=1, size="sizeof ops",
                          name="second", read="t_read") + "VDB_BACKEND_PLUGIN(ops)\n")
        d = Daemon(extra=["--plugin-dir", PLUGINS, "--plugin-dir", other])
        try:
            names = [b["name"] for b in json.loads(d.cli_ok("backends", "--json"))]
            check("pattern" in names and "second" in names, "backends %r" % names)
            d.stop()
        finally:
            d.cleanup()
        # usage errors
        rc, out, err = run([os.path.join(BUILD, "vdbusd"), "--plugin-dir"])
        eq(rc, 2, "--plugin-dir without a value")
        rc, out, err = run([os.path.join(BUILD, "vdbusd"), "--help"])
        check("--plugin-dir DIR" in out, "--help does not document --plugin-dir")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@case("no --plugin-dir: the default directory, absent or empty here, is silently skipped")
def t_default_dir(d):
    rc, out, err = run([os.path.join(BUILD, "vdbusd"), "--help"])
    default = out.split("--plugin-dir DIR", 1)[1].split("(default ", 1)[1].split(",", 1)[0]
    check(default.endswith("/vdbus/plugins"), "default plugin dir %r" % default)
    sos = [f for f in os.listdir(default) if f.endswith(".so")] if os.path.isdir(default) else []
    if sos:
        check(re.search(r"(info|warning): plugin ", d.log()),
              "the default dir has plugins but nothing was logged")
    else:
        check(not re.search(r"(info|warning|error): plugin", d.log()),
              "something about plugins was logged:\n%s" % d.log_tail())
    bj = json.loads(d.cli_ok("backends", "--json"))
    check(all(b["origin"] == "built-in" for b in bj) or sos, "origins %r" % bj)


# ---------------------------------------------------------------- out of tree

@case("the example builds out of tree against include/ alone (-Wall -Wextra -Werror) and loads",
      daemon=False)
def t_out_of_tree():
    tmp = tempfile.mkdtemp(prefix="vdbt-oot-", dir="/tmp")
    d = None
    try:
        so_dir = os.path.join(tmp, "plugins")
        os.mkdir(so_dir)
        so = os.path.join(so_dir, "x.so")
        run_ok(["cc", "-std=gnu17", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                "-I" + INCLUDE, EXAMPLE_C, "-o", so], timeout=120)
        # its Makefile, in a copy of examples/pattern (the source tree is not written)
        src = os.path.join(tmp, "pattern")
        shutil.copytree(os.path.dirname(EXAMPLE_C), src)
        run_ok(["make", "-C", src, "VDBUS_CFLAGS=-I" + INCLUDE, "CFLAGS=-O1 -Werror"], timeout=120)
        check(os.path.exists(os.path.join(src, "pattern.so")), "make built no pattern.so")
        # against an installed vdbus: meson install into a DESTDIR, then the Makefile
        # finds the header (and the plugin dir) through pkg-config vdbus-backend
        inst = os.path.join(tmp, "inst")
        run_ok(["meson", "install", "-C", BUILD, "--destdir", inst, "--quiet"], timeout=300)
        pcs = [os.path.join(r, f) for r, _, fs in os.walk(inst) for f in fs
               if f == "vdbus-backend.pc"]
        eq(len(pcs), 1, "installed vdbus-backend.pc files")
        env = dict(os.environ, PKG_CONFIG_PATH=os.path.dirname(pcs[0]), PKG_CONFIG_SYSROOT_DIR=inst)
        check(any(f == "backend.h" for r, _, fs in os.walk(inst) for f in fs), "no installed backend.h")
        check(any(f == "vdbus-backend.3" for r, _, fs in os.walk(inst) for f in fs),
              "no installed vdbus-backend.3")
        src2 = os.path.join(tmp, "pattern-pc")
        shutil.copytree(os.path.dirname(EXAMPLE_C), src2)
        rc, out, err = run(["make", "-C", src2, "CFLAGS=-O1 -Werror"], env=env, timeout=120)
        eq(rc, 0, "make with pkg-config: %s" % err)
        check("-I" + inst in out, "the include path does not come from the install: %s" % out)
        rc, out, err = run(["pkg-config", "--variable=plugindir", "vdbus-backend"], env=env)
        check(out.strip().endswith("/vdbus/plugins"), "plugindir %r" % out)
        # and C++ can include the header
        if shutil.which("g++") or shutil.which("c++"):
            run_ok([shutil.which("c++") or shutil.which("g++"), "-fsyntax-only", "-Wall", "-Werror",
                    "-I" + INCLUDE, "-x", "c++", "-"],
                   input="#include <vdbus/backend.h>\nstatic const struct vdb_backend_ops o = {};\n"
                         "VDB_BACKEND_PLUGIN(o)\n")
        d = Daemon(extra=["--plugin-dir", so_dir])
        eq(json.loads(d.cli_ok("backends", "--json"))[-1]["origin"], so, "origin of x.so")
        d.plug("pattern", "3M", "--name", "x", "--attach", "none")
        h = d.nbd("x")
        eq(h.pread(4096, 3 * MiB - 4096), pattern(3 * MiB - 4096, 4096), "read from x.so")
        h.pwrite(b"w" * 512, 512)
        eq(h.pread(512, 512), b"w" * 512, "write to x.so")
        h.shutdown()
        d.stop()
    finally:
        if d:
            d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if not os.path.exists(PATTERN_SO):
        print("1..0 # SKIP no %s (build first)" % PATTERN_SO)
        sys.exit(77)
    main()
