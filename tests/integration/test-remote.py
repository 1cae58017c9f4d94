#!/usr/bin/python3
"""Test the nbd backend (a disk on a remote NBD server) with real servers
(nbdkit, qemu-nbd) behind it and real clients (libnbd, fio, qemu-img) in front."""
import errno
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vdbtest import nbd_errno  # noqa: E402
from vdbtest import Skip, case, check, eq, fail, free_port, have, main, run, wait_for  # noqa: E402
import nbd  # noqa: E402

MiB = 1 << 20


class Server:
    """A remote NBD server (nbdkit or qemu-nbd) in the foreground on a Unix
    socket (or TCP port) in its own temporary directory."""

    def __init__(self, args, tcp=False, kind="nbdkit", start=True):
        self.dir = tempfile.mkdtemp(prefix="vdbt-srv-", dir="/tmp")
        self.sock = os.path.join(self.dir, "srv.sock")
        self.port = free_port() if tcp else None
        self.kind, self.args, self.tcp = kind, list(args), tcp
        self.proc = None
        self.log_path = os.path.join(self.dir, "server.log")
        if start:
            try:
                self.start()
            except BaseException:
                self.cleanup()
                raise

    def cmd(self):
        if self.kind == "nbdkit":
            where = ["-i", "127.0.0.1", "-p", str(self.port)] if self.tcp else ["-U", self.sock]
            return ["nbdkit", "-f", "--exit-with-parent"] + where + self.args
        where = ["-b", "127.0.0.1", "-p", str(self.port)] if self.tcp else ["-k", self.sock]
        return ["qemu-nbd"] + where + self.args

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd(), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()

        def up():
            if self.proc.poll() is not None:
                fail("%s exited with %d:\n%s" % (self.kind, self.proc.returncode, self.log()))
            if self.tcp:
                import socket
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return True
                except OSError:
                    return False
            return os.path.exists(self.sock)
        wait_for(up, timeout=15, what="%s to listen" % self.kind)
        return self

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def uri(self, export=""):
        if self.tcp:
            return "nbd://127.0.0.1:%d/%s" % (self.port, export)
        return "nbd+unix:///%s?socket=%s" % (export, self.sock)

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


FILE_SH = """#!/bin/sh
# nbdkit sh plugin: a file (DIR/disk.img) whose flush hangs while DIR/slow-flush exists.
DIR=%s
case "$1" in
  get_size) stat -c %%s $DIR/disk.img ;;
  pread) dd if=$DIR/disk.img iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none ;;
  pwrite) dd of=$DIR/disk.img oflag=seek_bytes conv=notrunc seek=$4 status=none ;;
  can_write|can_flush|can_multi_conn) exit 0 ;;
  thread_model) echo parallel ;;
  flush) while [ -e $DIR/slow-flush ]; do sleep 0.1; done ;;
  *) exit 2 ;;
esac
"""


def servers(fn):
    """Decorator: pass a list to keep servers in, clean them up after."""
    def wrapper(d):
        srv = []
        try:
            fn(d, srv)
        finally:
            for s in srv:
                s.cleanup()
    wrapper.__name__ = fn.__name__
    return wrapper


def extents(h, length, offset=0, flags=0):
    out = []
    h.block_status(length, offset, lambda m, o, e, err: out.extend(
        [(e[i], e[i + 1]) for i in range(0, len(e), 2)] if m == "base:allocation" else []), flags)
    return out


def flags_at(ext, pos):
    off = 0
    for length, fl in ext:
        if off <= pos < off + length:
            return fl
        off += length
    fail("no extent covers %d in %r" % (pos, ext))


def data_ops(d, name, size):
    """Patterns, flush, FUA, trim, zero and block status through the vdbus export."""
    h = d.nbd(name)
    eq(h.get_size(), size, "size through vdbus")
    pat = bytes(range(256)) * (4 * MiB // 256)
    h.pwrite(pat, 0)
    h.pwrite(b"\xa5" * 65536, 5 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    eq(h.pread(4 * MiB, 0), pat, "4 MiB pattern read back")
    eq(h.pread(65536, 5 * MiB), b"\xa5" * 65536, "FUA write read back")
    eq(h.pread(4096, size - 4096), bytes(4096), "never-written end reads zeroes")
    check(h.can_trim() and h.can_zero() and h.can_flush() and h.can_fua(), "caps through vdbus")
    h.trim(MiB, 0)
    h.zero(MiB, MiB)
    h.zero(MiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
    eq(h.pread(MiB, MiB), bytes(MiB), "zeroed range")
    eq(h.pread(MiB, 2 * MiB), bytes(MiB), "zeroed (no hole) range")
    eq(h.pread(MiB, 3 * MiB), pat[3 * MiB:], "data after the zeroes is untouched")
    h.cache(MiB, 0)
    return h


def daemon_log_lines(d, pattern):
    return [l for l in d.log().splitlines() if re.search(pattern, l)]


@case("nbd over nbdkit memory (nbd+unix): data, flush, FUA, trim, zero, extents, read-only")
@servers
def t_memory_unix(d, srv):
    s = Server(["memory", "64M"])
    srv.append(s)
    name = d.plug("nbd", s.uri(), "--name", "r", "--attach", "none")
    h = data_ops(d, name, 64 * MiB)
    ext = extents(h, 8 * MiB)
    eq(sum(l for l, f in ext), 8 * MiB, "extents cover the request")
    check(flags_at(ext, 0) & 1, "trimmed range is a hole on nbdkit memory: %r" % ext)
    eq(flags_at(ext, 3 * MiB), 0, "data is data: %r" % ext)
    eq(flags_at(ext, 7 * MiB) & 3, 3, "never written is a zero hole: %r" % ext)
    one = extents(h, 8 * MiB, 0, nbd.CMD_FLAG_REQ_ONE)
    eq(len(one), 1, "REQ_ONE gives one extent")
    h.shutdown()
    info = d.info("r")
    check("NBD " + s.uri() in info["description"], "description: %r" % info["description"])
    eq(info["size"], 64 * MiB, "vdbus info size")
    check(info["stats"]["errors"] == 0, "no errors: %r" % info["stats"])

    ro = Server(["-r", "memory", "8M"])
    srv.append(ro)
    d.plug("nbd", ro.uri(), "--name", "ro", "--attach", "none")
    eq(d.info("ro")["readonly"], True, "read-only server gives a read-only disk")
    h = d.nbd("ro", strict=False)
    check(h.is_read_only(), "the export of a read-only nbd disk is read-only")
    eq(nbd_errno(h.pwrite, b"x" * 512, 0), errno.EPERM, "write to the read-only disk")
    eq(h.pread(512, 0), bytes(512), "read from the read-only disk")
    h.shutdown()


@case("nbd over TCP (nbd://) to nbdkit, and over qemu-nbd (qcow2): qemu-img compare")
@servers
def t_tcp_qemu(d, srv):
    s = Server(["memory", "32M"], tcp=True)
    srv.append(s)
    d.plug("nbd", s.uri(), "--name", "t", "--attach", "none")
    data_ops(d, "t", 32 * MiB).shutdown()

    q = Server([], kind="qemu-nbd", start=False)
    srv.append(q)
    img = os.path.join(q.dir, "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "48M"], check_rc=0)
    q.args = ["-f", "qcow2", "--shared=8", "-t", "-x", "q", "--cache=writeback", img]
    q.start()
    d.plug("nbd", q.uri("q"), "--name", "q", "--attach", "none")
    h = d.nbd("q")
    blob = os.urandom(3 * MiB)
    h.pwrite(blob, 7 * MiB + 512)
    h.zero(MiB, 20 * MiB)
    h.pwrite(b"\x5a" * 4096, 47 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    eq(h.pread(3 * MiB, 7 * MiB + 512), blob, "qemu-nbd read back")
    h.shutdown()
    run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", d.uri("q"), img], check_rc=0)
    rc, out, err = run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2",
                        d.uri("t"), img])
    eq(rc, 1, "qemu-img compare of different disks (exit 1 = differ): %s" % err)


@case("multi-conn: 4 connections when the server offers it; --connections 1; fallback to 1")
@servers
def t_multi_conn(d, srv):
    s = Server([], start=False)
    srv.append(s)
    logf = os.path.join(s.dir, "nbdkit-log.txt")
    s.args = ["--filter=log", "memory", "16M", "logfile=" + logf]
    s.start()

    def connects():
        with open(logf) as f:
            return len(re.findall(r"\bConnect export=", f.read()))
    d.plug("nbd", s.uri(), "--name", "m4", "--attach", "none")
    check("4 connections (multi-conn)" in d.info("m4")["description"], d.info("m4")["description"])
    wait_for(lambda: connects() >= 4, timeout=10, what="4 connections at nbdkit")
    # spread: concurrent readers reach several connections
    h = d.nbd("m4")
    for i in range(64):
        h.aio_pwrite(bytes([i]) * 65536, i * 65536)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    for i in range(64):
        eq(h.pread(16, i * 65536), bytes([i]) * 16, "block %d" % i)
    h.shutdown()
    with open(logf) as f:
        writers = set(re.findall(r"connection=(\d+) Write ", f.read()))
    check(len(writers) >= 2, "writes went over %d connection(s), expected several" % len(writers))
    n = connects()
    d.plug("nbd", s.uri(), "--name", "m1", "--connections", "1", "--attach", "none")
    check("1 connection" in d.info("m1")["description"], d.info("m1")["description"])
    time.sleep(0.5)
    eq(connects() - n, 1, "connections made by a --connections 1 disk")
    # More requests than one connection has slots (64), on a server that
    # answers them in bursts (64 threads, each write 200 ms): slots freed by a
    # burst must be refilled from the queue at once.
    slow = Server(["--threads=64", "--filter=delay", "memory", "16M", "wdelay=200ms"])
    srv.append(slow)
    d.plug("nbd", slow.uri(), "--name", "burst", "--connections", "1", "--attach", "none")
    h = d.nbd("burst")
    for i in range(320):
        h.aio_pwrite(bytes([i % 251]) * 4096, i * 4096)
    deadline = time.monotonic() + 20
    while h.aio_in_flight() > 0 and time.monotonic() < deadline:
        h.poll(1000)
    eq(h.aio_in_flight(), 0, "320 concurrent writes on one connection completed")
    for i in range(0, 320, 17):
        eq(h.pread(4096, i * 4096), bytes([i % 251]) * 4096, "block %d" % i)
    h.shutdown()

    nm = Server(["--filter=multi-conn", "memory", "16M", "multi-conn-mode=disable"])
    srv.append(nm)
    d.plug("nbd", nm.uri(), "--name", "nm", "--connections", "4", "--attach", "none")
    desc = d.info("nm")["description"]
    check("1 connection" in desc and "multi-conn" not in desc, desc)
    check(daemon_log_lines(d, r"does not offer multi-conn: using 1 connection"), "fallback warning")
    eq(d.info("nm")["capabilities"]["multi_conn"], True, "one connection is multi-conn safe")


@case("fio verify (2 jobs, randwrite, crc32c) through the nbd backend")
@servers
def t_fio(d, srv):
    if not have("fio"):
        raise Skip("no fio")
    s = Server(["memory", "64M"])
    srv.append(s)
    d.plug("nbd", s.uri(), "--name", "f", "--attach", "none")
    out = run(["fio", "--name=v", "--ioengine=nbd", "--uri=" + d.uri("f"), "--rw=randwrite",
               "--bs=4k", "--size=16M", "--offset_increment=16M", "--numjobs=2", "--iodepth=16",
               "--verify=crc32c", "--verify_state_save=0",
               "--verify_fatal=1", "--group_reporting"], check_rc=0,
              timeout=120)[1]
    check("err= 0" in out, "fio reported errors:\n" + out[-2000:])
    eq(d.info("f")["stats"]["errors"], 0, "vdbus errors counter")


@case("server errors pass through (EIO, ENOSPC) without retrying; ESHUTDOWN is retried with "
      "backoff until the timeout; a slow server is not a timeout")
@servers
def t_server_errors(d, srv):
    e = Server(["--filter=error", "memory", "8M", "error-pread=EIO", "error-pread-rate=1",
                "error-pwrite=ENOSPC", "error-pwrite-rate=1"])
    srv.append(e)
    d.plug("nbd", e.uri(), "--name", "e", "--attach", "none", "--timeout", "30")
    h = d.nbd("e")
    t0 = time.monotonic()
    for i in range(3):
        eq(nbd_errno(h.pread, 4096, i * 4096), errno.EIO, "read %d" % i)
    eq(nbd_errno(h.pwrite, b"x" * 4096, 0), errno.ENOSPC, "write")
    check(time.monotonic() - t0 < 5, "server errors took %.1fs (retried?)" % (time.monotonic() - t0))
    h.zero(4096, 0)  # what the filter lets through still works
    h.shutdown()
    eq(d.info("e")["stats"]["errors"], 4, "errors counter")

    # NBD_ESHUTDOWN is the server going away: reconnect and retry, within the timeout
    flag = os.path.join(e.dir, "shutting-down")
    sdlog = os.path.join(e.dir, "sd-log.txt")
    sd = Server(["--filter=log", "--filter=error", "memory", "8M", "logfile=" + sdlog,
                 "error-pread=ESHUTDOWN", "error-pread-rate=1", "error-pread-file=" + flag])
    srv.append(sd)
    d.plug("nbd", sd.uri(), "--name", "sd", "--attach", "none", "--timeout", "2")
    h = d.nbd("sd")
    h.pwrite(b"q" * 4096, 0)
    open(flag, "w").close()
    t0 = time.monotonic()
    eq(nbd_errno(h.pread, 4096, 0), errno.EIO, "read while the server answers ESHUTDOWN")
    check(1.5 <= time.monotonic() - t0 <= 4.5, "EIO after %.2fs, --timeout is 2" %
          (time.monotonic() - t0))
    with open(sdlog) as f:
        nconnect = f.read().count("Connect export=")
    # 4 connections, each backing off 100 ms doubling (to 500 ms): about 6 attempts each
    check(nconnect <= 4 + 4 * 9, "%d connections in 2 s of ESHUTDOWN: no backoff?" % nconnect)
    threading.Timer(1.0, os.unlink, [flag]).start()
    eq(h.pread(4096, 0), b"q" * 4096, "read retried until the server stops saying ESHUTDOWN")
    h.shutdown()

    slow = Server(["--filter=delay", "memory", "8M", "rdelay=2"])
    srv.append(slow)
    d.plug("nbd", slow.uri(), "--name", "slow", "--attach", "none", "--timeout", "1")
    h = d.nbd("slow")
    h.pwrite(b"s" * 4096, 0)
    t0 = time.monotonic()
    eq(h.pread(4096, 0), b"s" * 4096, "a read slower than --timeout still succeeds")
    check(time.monotonic() - t0 >= 1.9, "the read took %.2fs, the server delays 2s" %
          (time.monotonic() - t0))
    h.shutdown()


class Writer(threading.Thread):
    """Writes 64 KiB blocks with checksummed content through vdbus, flushing
    every 16 writes; remembers the last acknowledged content of each block."""

    BS = 65536

    def __init__(self, uri, nblocks, seconds):
        super().__init__(daemon=True)
        self.uri, self.nblocks, self.seconds = uri, nblocks, seconds
        self.acked = {}
        self.errors = []
        self.writes = 0

    def block(self, i, gen):
        head = struct.pack(">QQ", i, gen)
        return (head + hashlib.sha256(head).digest()) * (self.BS // 48) + bytes(self.BS % 48)

    def run(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        end = time.monotonic() + self.seconds
        gen = 0
        try:
            while time.monotonic() < end:
                gen += 1
                i = (gen * 7919) % self.nblocks
                buf = self.block(i, gen)
                h.pwrite(buf, i * self.BS)
                self.acked[i] = buf
                self.writes += 1
                if gen % 16 == 0:
                    h.flush()
            h.flush()
        except nbd.Error as e:
            self.errors.append(str(e))
        h.shutdown()


@case("server killed and restarted during verified writes: I/O resumes, data verifies; "
      "kept down past --timeout: EIO in time, other disks work, then recovery", timeout=150)
@servers
def t_server_restart(d, srv):
    s = Server([], start=False)
    srv.append(s)
    img = os.path.join(s.dir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    s.args = ["--threads=4", "file", img]
    s.start()
    d.plug("nbd", s.uri(), "--name", "w", "--attach", "none", "--timeout", "10")
    d.plug("ram", "--size", "4M", "--name", "other", "--attach", "none")
    w = Writer(d.uri("w"), 16 * MiB // Writer.BS, seconds=6)
    w.start()
    time.sleep(1.5)
    check(w.writes > 0, "the writer wrote nothing before the kill")
    s.kill()
    before = w.writes
    time.sleep(2)
    s.start()
    w.join(60)
    check(not w.is_alive(), "the writer hung")
    eq(w.errors, [], "writer errors across a 2 s server outage")
    check(daemon_log_lines(d, r"connection \d+ lost"), "the daemon saw the connection drop")
    check(daemon_log_lines(d, r"connection \d+ up again"), "the daemon reconnected")
    check(w.writes > before + 10, "the writer made %d writes before the kill and %d in all"
          % (before, w.writes))
    h = d.nbd("w")
    with open(img, "rb") as f:
        for i, buf in w.acked.items():
            eq(h.pread(Writer.BS, i * Writer.BS) == buf, True, "block %d through vdbus" % i)
            f.seek(i * Writer.BS)
            eq(f.read(Writer.BS) == buf, True, "block %d in the server's file" % i)
    h.shutdown()

    # Down past the timeout: a second disk with --timeout 3 on the same server.
    d.plug("nbd", s.uri(), "--name", "w3", "--attach", "none", "--timeout", "3")
    h = d.nbd("w3")
    h.pwrite(b"3" * 4096, 0)
    s.kill()
    t0 = time.monotonic()
    eq(nbd_errno(h.pwrite, b"4" * 4096, 4096), errno.EIO, "write with the server down")
    took = time.monotonic() - t0
    check(2.5 <= took <= 3 + 2.5, "EIO after %.2fs, --timeout is 3" % took)
    t0 = time.monotonic()
    eq(nbd_errno(h.flush), errno.EIO, "flush with the server down never succeeds")
    check(time.monotonic() - t0 <= 3 + 2.5, "flush failed after %.2fs" % (time.monotonic() - t0))
    o = d.nbd("other")
    o.pwrite(b"o" * 4096, 0)
    eq(o.pread(4096, 0), b"o" * 4096, "another disk works meanwhile")
    o.shutdown()
    check(d.running(), "the daemon is alive")
    s.start()

    def works():
        try:
            h.pwrite(b"5" * 4096, 8192)
            return True
        except nbd.Error:
            return False
    wait_for(works, timeout=15, interval=0.2, what="I/O to work again after the server is back")
    h.flush()
    eq(h.pread(4096, 0), b"3" * 4096, "data written before the outage")
    eq(h.pread(4096, 8192), b"5" * 4096, "data written after the outage")
    h.shutdown()


@case("capabilities follow the server: no zero, no cache, no FUA (emulated by a flush), "
      "no flush; extents all data")
@servers
def t_caps(d, srv):
    s = Server([], start=False)
    srv.append(s)
    logf = os.path.join(s.dir, "log.txt")
    s.args = ["--filter=log", "--filter=fua", "--filter=nozero", "--filter=noextents",
              "--filter=nocache", "memory", "8M", "logfile=" + logf,
              "zeromode=none", "cachemode=none"]
    # (fuamode=none is the fua filter's default and not accepted as a value here)
    s.start()
    d.plug("nbd", s.uri(), "--name", "c", "--attach", "none")
    caps = d.info("c")["capabilities"]
    eq((caps["zero"], caps["fast_zero"], caps["extents"], caps["trim"], caps["flush"], caps["fua"]),
       (False, False, True, True, True, True), "capabilities %r" % caps)
    h = d.nbd("c")
    check(not h.can_zero() and not h.can_fast_zero(), "the vdbus export offers no zero")
    h.pwrite(b"f" * 4096, 0, nbd.CMD_FLAG_FUA)
    eq(extents(h, 8 * MiB), [(8 * MiB, 0)], "noextents server: all data")
    h.cache(4096, 0)  # answered by vdbus: the server has no cache
    h.shutdown()
    with open(logf) as f:
        log = f.read()
    check(re.search(r"Write id=\d+ offset=0x0 count=0x1000 fua=0.*\n(.*\n)*.*Flush", log),
          "an emulated FUA write is a write then a flush:\n" + log[-1500:])
    check(not re.search(r"Zero|Cache", log), "no zero or cache sent:\n" + log[-1500:])

    z = Server(["--filter=nozero", "memory", "8M", "zeromode=plugin", "fastzeromode=none"])
    srv.append(z)
    d.plug("nbd", z.uri(), "--name", "z", "--attach", "none")
    caps = d.info("z")["capabilities"]
    eq((caps["zero"], caps["fast_zero"]), (True, False), "zero without fast zero: %r" % caps)
    h = d.nbd("z")
    check(h.can_zero() and not h.can_fast_zero(), "the vdbus export: zero, no fast zero")
    h.zero(MiB, 0)
    h.shutdown()

    # a server without flush (and so without FUA): writes are stable when acknowledged
    nf = Server([], start=False)
    srv.append(nf)
    with open(os.path.join(nf.dir, "disk.img"), "wb") as f:
        f.truncate(8 * MiB)
    script = os.path.join(nf.dir, "noflush.sh")
    with open(script, "w") as f:
        f.write(FILE_SH.replace("can_write|can_flush|can_multi_conn) exit 0",
                                      "can_write|can_multi_conn) exit 0 ;;\n  can_flush) exit 3")
                % nf.dir)
    os.chmod(script, 0o755)
    nflog = os.path.join(nf.dir, "log.txt")
    nf.args = ["--filter=log", "sh", script, "logfile=" + nflog]
    nf.start()
    d.plug("nbd", nf.uri(), "--name", "nf", "--attach", "none")
    caps = d.info("nf")["capabilities"]
    eq((caps["flush"], caps["fua"], caps["write"]), (False, False, True), "no flush: %r" % caps)
    h = d.nbd("nf")
    h.pwrite(b"n" * 4096, 0)
    h.flush()
    eq(h.pread(4096, 0), b"n" * 4096, "data on a server without flush")
    h.shutdown()
    with open(nflog) as f:
        log = f.read()
    check("Write" in log and "Flush" not in log, "no flush sent to a server without it:\n" + log)


@case("a flush in flight when the server dies is reissued on the next connection")
@servers
def t_flush_reissued(d, srv):
    s = Server([], start=False)
    srv.append(s)
    img = os.path.join(s.dir, "disk.img")
    script = os.path.join(s.dir, "slow-flush.sh")
    slow = os.path.join(s.dir, "slow-flush")
    logf = os.path.join(s.dir, "log.txt")
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    with open(script, "w") as f:
        f.write(FILE_SH % s.dir)
    os.chmod(script, 0o755)
    open(slow, "w").close()
    s.args = ["--filter=log", "sh", script, "logfile=" + logf]
    s.start()
    d.plug("nbd", s.uri(), "--name", "p", "--attach", "none", "--timeout", "20")
    h = d.nbd("p")
    h.pwrite(b"2" * 4096, 4096)
    fc = h.aio_flush()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.7:
        h.poll(100)
    check(not h.aio_command_completed(fc), "the flush completed while the server held it")
    with open(logf) as f:
        check("Flush" in f.read(), "the first server got the flush")
    s.kill()
    os.unlink(slow)
    os.unlink(logf)
    s.start()
    deadline = time.monotonic() + 15
    while h.aio_in_flight() > 0 and time.monotonic() < deadline:
        h.poll(1000)
    check(h.aio_command_completed(fc), "the flush completed (after being reissued)")

    def logged():
        with open(logf) as f:
            return "Flush" in f.read()
    wait_for(logged, timeout=5, what="the flush in the new server's log")
    eq(h.pread(4096, 4096), b"2" * 4096, "the data")
    h.shutdown()


@case("a reconnection to an export whose size changed is refused; I/O fails after the timeout")
@servers
def t_size_changed(d, srv):
    s = Server([], start=False)
    srv.append(s)
    img = os.path.join(s.dir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    s.args = ["file", img]
    s.start()
    d.plug("nbd", s.uri(), "--name", "sz", "--attach", "none", "--timeout", "2",
           "--connections", "1")
    h = d.nbd("sz")
    h.pwrite(b"a" * 4096, 0)
    s.kill()
    os.truncate(img, 16 * MiB)
    s.start()
    t0 = time.monotonic()
    eq(nbd_errno(h.pread, 4096, 0), errno.EIO, "read while the export has another size")
    took = time.monotonic() - t0
    check(took <= 2 + 2.5, "EIO after %.2fs, --timeout is 2" % took)
    check(daemon_log_lines(d, r"cannot reconnect: the export size changed"), "logged")
    s.kill()
    os.truncate(img, 8 * MiB)
    s.start()

    def works():
        try:
            return h.pread(4096, 0) == b"a" * 4096
        except nbd.Error:
            return False
    wait_for(works, timeout=15, interval=0.2, what="the original export to be used again")
    h.shutdown()


@case("block-size constraints pass through; requests above the server's maximum are split")
@servers
def t_block_size(d, srv):
    s = Server([], start=False)
    srv.append(s)
    logf = os.path.join(s.dir, "log.txt")
    s.args = ["--filter=blocksize-policy", "--filter=log", "memory", "8M", "logfile=" + logf,
              "blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=65536",
              "blocksize-error-policy=error"]
    s.start()
    d.plug("nbd", s.uri(), "--name", "bs", "--attach", "none")
    h = d.nbd("bs", strict=False)
    eq((h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
        h.get_block_size(nbd.SIZE_MAXIMUM)), (512, 4096, 65536), "block sizes through vdbus")
    blob = os.urandom(MiB + 4096)
    h.pwrite(blob, 512)   # larger than the maximum: vdbus splits it
    eq(h.pread(len(blob), 512), blob, "a split write and read")
    h.shutdown()
    with open(logf) as f:
        counts = [int(c, 16) for c in re.findall(r"Write id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+)",
                                                   f.read())]
    eq(sum(counts), len(blob), "bytes written at the server")
    check(max(counts) <= 65536 and len(counts) >= 17, "write commands at the server: %r" % counts)


@case("a filesystem on an nbd disk (--attach loop) over qemu-nbd; fsck of the server's image",
      timeout=240)
@servers
def t_filesystem(d, srv):
    from vdbtest import is_root, sha256_file
    if not is_root() or not os.path.exists("/dev/loop-control") or not os.path.exists("/dev/fuse"):
        raise Skip("needs root, /dev/loop-control and /dev/fuse")
    q = Server([], kind="qemu-nbd", start=False)
    srv.append(q)
    img = os.path.join(q.dir, "fs.raw")
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    q.args = ["-f", "raw", "--shared=8", "-t", "--cache=writeback", img]
    q.start()
    d.plug("nbd", q.uri(), "--name", "fs", "--attach", "loop")
    dev = d.disk("fs")["device"]
    check(dev and re.fullmatch(r"/dev/loop\d+", dev), "device %r" % dev)
    run(["mkfs.ext4", "-q", "-F", dev], timeout=120, check_rc=0)
    mnt = tempfile.mkdtemp(prefix="mnt-", dir=d.base)
    run(["mount", dev, mnt], check_rc=0)
    try:
        p = os.path.join(mnt, "blob")
        with open(p, "wb") as f:
            f.write(os.urandom(5 * MiB))
        want = sha256_file(p)
    finally:
        run(["umount", mnt], check_rc=0)
    d.cli_ok("unplug", "fs")
    q.kill()
    run(["fsck.ext4", "-n", "-f", img], timeout=120, check_rc=0)
    rc, out, err = run(["debugfs", "-R", "dump /blob " + os.path.join(q.dir, "blob.out"), img])
    eq(sha256_file(os.path.join(q.dir, "blob.out")), want, "the file, read from the server's image")


@case("bad input: URI, unreachable or mute server, missing export, --connections, --timeout")
@servers
def t_bad_input(d, srv):
    q = Server([], kind="qemu-nbd", start=False)
    srv.append(q)
    img = os.path.join(q.dir, "d.raw")
    with open(img, "wb") as f:
        f.truncate(MiB)
    q.args = ["-f", "raw", "-x", "there", "--shared=2", "-t", img]
    q.start()
    m = Server(["memory", "1M"])
    srv.append(m)
    cases = [
        (["nbd", "garbage"], r"nbd backend: cannot connect to garbage: .*scheme"),
        (["nbd", "http://x/y"], r"nbd backend: cannot connect to http://x/y"),
        (["nbd", "nbd://127.0.0.1:%d/x" % free_port()], r"cannot connect to nbd://127\.0\.0\.1:\d+/x: .*refused"),
        (["nbd", "nbd+unix:///x?socket=/nonexistent/s"], r"cannot connect to .*No such file"),
        (["nbd", q.uri("missing")], r"cannot connect to .*missing"),
        (["nbd", m.uri(), "--connections", "0"], r"connections must be a number from 1 to 16, not '0'"),
        (["nbd", m.uri(), "--connections", "abc"], r"connections must be a number"),
        (["nbd", m.uri(), "--connections", "17"], r"connections must be"),
        (["nbd", m.uri(), "--timeout", "-1"], r"timeout must be whole seconds from 1 to 3600, not '-1'"),
        (["nbd", m.uri(), "--timeout", "0"], r"timeout must be"),
        (["nbd", m.uri(), "--timeout", "3601"], r"timeout must be"),
        (["nbd"], r"needs a URI"),
    ]
    for args, pat in cases:
        rc, out, err = d.cli("plug", *args, "--attach", "none")
        check(rc in (1, 2), "plug %r: exit %d" % (args, rc))
        lines = err.strip().splitlines()
        check(len(lines) == 1 or (rc == 2 and len(lines) == 2 and "--help" in lines[1]),
              "one-line message for %r: %r" % (args, err))
        check(re.search(pat, lines[0]), "plug %r: message %r does not match %r" % (args, err, pat))
    # a socket that never answers the handshake: the plug gives up after --timeout
    import socket
    mute = socket.socket(socket.AF_UNIX)
    mute_path = os.path.join(m.dir, "mute.sock")
    mute.bind(mute_path)
    mute.listen(8)
    t0 = time.monotonic()
    rc, out, err = d.cli("plug", "nbd", "nbd+unix:///?socket=" + mute_path, "--timeout", "2",
                         "--attach", "none")
    took = time.monotonic() - t0
    mute.close()
    eq(rc, 1, "plug to a server that never answers")
    check("timed out connecting" in err, err)
    check(1.5 <= took <= 5, "gave up after %.2fs, --timeout is 2" % took)
    eq(d.list(), [], "no disk was plugged")
    d.plug("nbd", q.uri("there"), "--name", "ok", "--attach", "none")
    eq(d.info("ok")["size"], MiB, "a good URI after the bad ones")


@case("unplug while the server is down or stopped (with requests waiting) completes in seconds")
@servers
def t_unplug_down(d, srv):
    s = Server(["memory", "8M"])
    srv.append(s)
    d.plug("nbd", s.uri(), "--name", "u", "--attach", "none")   # default timeout 30
    h = d.nbd("u")
    h.pwrite(b"u" * 4096, 0)
    s.kill()
    h.aio_pread(nbd.Buffer(4096), 0)
    h.aio_flush()
    time.sleep(0.5)
    t0 = time.monotonic()
    rc, out, err = d.cli("unplug", "u", "--force", timeout=30)
    took = time.monotonic() - t0
    eq(rc, 0, "unplug: %s" % err)
    check(took < 5, "unplug took %.2fs with the server down" % took)
    eq(d.list(), [], "the disk is gone")
    check(h.aio_in_flight() >= 0, "the client handle is still usable")
    del h

    # a server that is alive but stopped answering (SIGSTOP): unplug gives up on it
    st = Server(["memory", "8M"])
    srv.append(st)
    d.plug("nbd", st.uri(), "--name", "st", "--attach", "none")
    h = d.nbd("st")
    h.pwrite(b"s" * 4096, 0)
    st.proc.send_signal(signal.SIGSTOP)
    try:
        h.aio_pread(nbd.Buffer(4096), 0)
        time.sleep(0.5)
        t0 = time.monotonic()
        rc, out, err = d.cli("unplug", "st", "--force", timeout=40)
        took = time.monotonic() - t0
        eq(rc, 0, "unplug: %s" % err)
        check(took < 8, "unplug took %.2fs with the server stopped" % took)
        check(daemon_log_lines(d, r"server not answering while unplugging"), "logged")
    finally:
        st.proc.send_signal(signal.SIGCONT)
    del h


@case("vdbusd restart with an nbd disk plugged: the disk comes back with its data; "
      "with the server down it is kept for the next start")
@servers
def t_restart(d, srv):
    s = Server(["memory", "8M"])
    srv.append(s)
    d.plug("nbd", s.uri(), "--name", "keep", "--attach", "none", "--connections", "2",
           "--timeout", "7")
    h = d.nbd("keep")
    blob = os.urandom(MiB)
    h.pwrite(blob, MiB)
    h.flush()
    h.shutdown()
    d.restart()
    info = d.info("keep")
    eq(info["backend"], "nbd", "restored backend")
    eq(info["params"].get("timeout"), "7", "restored timeout")
    check("2 connections" in info["description"], info["description"])
    h = d.nbd("keep")
    eq(h.pread(MiB, MiB), blob, "data after the daemon restart")
    h.shutdown()
    # the server down at start: not restored, but kept for the next start
    d.stop()
    s.kill()
    t0 = time.monotonic()
    d.start()
    check(time.monotonic() - t0 < 10, "start with the server down took %.1fs" % (time.monotonic() - t0))
    eq(d.disk("keep"), None, "not restored while the server is down")
    check(daemon_log_lines(d, r"not restored: nbd backend: cannot connect to"), "logged")
    s.start()
    d.restart()
    check(d.disk("keep") is not None, "restored once the server is back")
    eq(d.info("keep")["params"].get("timeout"), "7", "the kept entry's timeout")


@case("nbds:// with TLS-PSK to nbdkit --tls=require; plain nbd:// is refused")
@servers
def t_tls(d, srv):
    s = Server([], start=False)
    srv.append(s)
    psk = os.path.join(s.dir, "keys.psk")
    with open(psk, "w") as f:
        f.write("alice:%s\n" % os.urandom(32).hex())
    os.chmod(psk, 0o600)
    s.args = ["--tls=require", "--tls-psk=" + psk, "memory", "8M"]
    s.start()
    uri = "nbds+unix://alice@/?socket=%s&tls-psk-file=%s" % (s.sock, psk)
    d.plug("nbd", uri, "--name", "tls", "--attach", "none")
    h = data_ops(d, "tls", 8 * MiB)
    h.shutdown()
    rc, out, err = d.cli("plug", "nbd", s.uri(), "--attach", "none")
    eq(rc, 1, "plain NBD to a TLS-only server")
    check("cannot connect to" in err, err)


if __name__ == "__main__":
    main()
