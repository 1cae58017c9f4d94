#!/usr/bin/python3
"""Test backends (error, delay, trace) through real NBD clients."""
import errno
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vdbtest import case, check, eq, fail, main, nbd_errno, run  # noqa: E402
import nbd  # noqa: E402

MiB = 1 << 20


@case("error backend: error-rate=1 fails reads with EIO; counters count errors")
def t_error_all(d):
    d.plug("error", "--size", "1M", "--name", "e", "--error-rate", "1", "--attach", "none")
    h = d.nbd("e")
    for i in range(4):
        eq(nbd_errno(h.pread, 4096, i * 4096), errno.EIO, "read %d" % i)
    eq(nbd_errno(h.pwrite, b"x" * 4096, 0), errno.EIO, "write")
    h.shutdown()
    st = d.info("e")["stats"]
    eq(st["errors"], 5, "errors counter")
    rc, out, err = run(["nbdcopy", d.uri("e"), "/dev/null"])
    check(rc != 0, "nbdcopy from an always-failing disk succeeded")


@case("error backend: error-ops=write fails only writes; error-errno=ENOSPC; rate 0 never fails")
def t_error_ops(d):
    d.plug("error", "--size", "1M", "--name", "w", "--error-ops", "write", "--error-errno", "ENOSPC",
           "--attach", "none")
    h = d.nbd("w")
    eq(h.pread(4096, 0), bytes(4096), "read on a write-failing disk")
    eq(nbd_errno(h.pwrite, b"x" * 4096, 0), errno.ENOSPC, "write with error-errno ENOSPC")
    h.shutdown()
    d.plug("error", "--size", "1M", "--name", "z", "--error-rate", "0", "--attach", "none")
    h = d.nbd("z")
    h.pwrite(b"y" * 4096, 0)
    eq(h.pread(4096, 0), b"y" * 4096, "rate 0 disk works like RAM")
    h.shutdown()
    eq(d.info("z")["stats"]["errors"], 0, "errors counter of a rate-0 disk")
    # a rate in between fails some, not all (1000 reads at 0.5)
    d.plug("error", "--size", "1M", "--name", "half", "--error-rate", "0.5", "--attach", "none")
    h = d.nbd("half")
    nfail = 0
    for i in range(400):
        try:
            h.pread(512, (i % 100) * 512)
        except nbd.Error:
            nfail += 1
    h.shutdown()
    check(100 < nfail < 300, "error-rate 0.5 failed %d of 400 reads" % nfail)
    eq(d.info("half")["stats"]["errors"], nfail, "errors counter")
    rc, out, err = d.cli("plug", "error", "--size", "1M", "--error-rate", "2", "--attach", "none")
    eq(rc, 1, "error-rate 2 refused")


@case("delay backend: requests complete after the delay; data is kept")
def t_delay(d):
    d.plug("delay", "--size", "1M", "--name", "s", "--delay-read", "300", "--delay-write", "200",
           "--attach", "none")
    h = d.nbd("s")
    t0 = time.monotonic()
    h.pwrite(b"d" * 4096, 0)
    tw = time.monotonic() - t0
    t0 = time.monotonic()
    eq(h.pread(4096, 0), b"d" * 4096, "read back")
    tr = time.monotonic() - t0
    check(tw >= 0.18, "write took %.3fs, delay-write is 200 ms" % tw)
    check(tr >= 0.28, "read took %.3fs, delay-read is 300 ms" % tr)
    check(tr < 5, "read took %.3fs" % tr)
    # delayed requests run concurrently: 8 parallel reads take ~1 delay, not 8
    bufs = [nbd.Buffer(512) for _ in range(8)]
    t0 = time.monotonic()
    cookies = [h.aio_pread(b, i * 512) for i, b in enumerate(bufs)]
    for c in cookies:
        while not h.aio_command_completed(c):
            h.poll(-1)
    tp = time.monotonic() - t0
    check(tp < 8 * 0.3 * 0.75, "8 parallel delayed reads took %.2fs (serialized?)" % tp)
    h.shutdown()
    # a client disconnecting with delayed requests in flight
    h = d.nbd("s")
    for i in range(4):
        h.aio_pread(nbd.Buffer(512), i * 512)
    h.close() if hasattr(h, "close") else None
    del h
    time.sleep(0.8)
    h = d.nbd("s", tcp=True)
    eq(h.pread(512, 0), b"d" * 512, "after a client left with delayed requests in flight")
    h.shutdown()


@case("trace backend: one line per backend call (OP OFFSET LENGTH FLAGS)")
def t_trace(d):
    path = os.path.join(d.data_dir, "trace.log")
    d.plug("trace", "--size", "1M", "--name", "t", "--trace-file", path, "--attach", "none")
    h = d.nbd("t")
    h.pwrite(b"x" * 4096, 8192)
    h.pread(512, 8192)
    if h.can_flush():
        h.flush()
    h.trim(4096, 65536)
    h.zero(4096, 131072)
    h.shutdown()
    lines = [l.split() for l in open(path).read().splitlines() if l.strip()]
    ops = [l[0] for l in lines]
    check(["write", "8192", "4096"] in [l[:3] for l in lines], "no write line: %r" % lines)
    check(["read", "8192", "512"] in [l[:3] for l in lines], "no read line: %r" % lines)
    check("trim" in ops, "no trim line: %r" % lines)
    check("zero" in ops, "no zero line: %r" % lines)
    eq(ops.index("write") < ops.index("read"), True, "order of calls")
    for l in lines:
        eq(len(l), 4, "fields of trace line %r" % l)
    # relative --trace-file is made absolute by the CLI
    rc, out, err = d.cli("plug", "trace", "--size", "1M", "--name", "t2", "--trace-file", "rel.log",
                         "--attach", "none", cwd=d.data_dir)
    eq(rc, 0, "plug trace with a relative path (stderr %r)" % err)
    h = d.nbd("t2")
    h.pread(512, 0)
    h.shutdown()
    check(os.path.exists(os.path.join(d.data_dir, "rel.log")), "relative trace file not in the CLI's cwd")


if __name__ == "__main__":
    main()
