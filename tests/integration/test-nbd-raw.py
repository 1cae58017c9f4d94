#!/usr/bin/python3
"""The NBD protocol byte by byte (a raw socket client): what libnbd cannot send."""
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vdbtest import *  # noqa: E402,F403
from vdbtest import case, check, eq, fail, main, connect_raw_go  # noqa: E402

MiB = 1 << 20


def setup(d, name="r", size="1M", *extra):
    d.plug("ram", "--size", size, "--name", name, "--attach", "none", *extra)


def alive(d, name="r"):
    """The daemon still serves a normal client."""
    r = connect_raw_go(d, name)
    err, data, _ = r.cmd(CMD_READ, 77, 0, 512)
    eq(err, 0, "read by a fresh client")
    r.disconnect()
    eq(d.control("hello")["result"]["protocol"], 1, "control socket answers")


@case("greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES (unix and TCP)")
def t_greeting(d):
    setup(d)
    for tcp in (False, True):
        r = d.raw(tcp=tcp)
        f = r.greeting()
        eq(f & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, "handshake flags")
        r.client_flags()
        eq(r.go("r"), REP_ACK, "GO")
        eq(r.size, MiB, "size in NBD_INFO_EXPORT")
        check(r.tflags & TFLAG_HAS_FLAGS, "HAS_FLAGS")
        check(r.tflags & TFLAG_SEND_TRIM and r.tflags & TFLAG_SEND_WRITE_ZEROES, "trim/zeroes flags %#x" % r.tflags)
        check(not r.tflags & TFLAG_READ_ONLY, "READ_ONLY set on a writable disk")
        r.disconnect()


@case("unknown client flags: the server drops the connection")
def t_bad_client_flags(d):
    setup(d)
    r = d.raw()
    r.greeting()
    r.client_flags(FLAG_C_FIXED_NEWSTYLE | (1 << 20))
    check(r.closed_by_server(5), "connection kept after unknown client flags")
    alive(d)


@case("NBD_OPT_EXPORT_NAME (old way into transmission) with NO_ZEROES")
def t_export_name(d):
    setup(d, "r", "2M")
    r = d.raw()
    r.handshake()
    size, tflags = r.export_name("r")
    eq(size, 2 * MiB, "size")
    err, data, _ = r.cmd(CMD_WRITE, 1, 4096, 4, data=b"abcd")
    eq(err, 0, "write")
    err, data, _ = r.cmd(CMD_READ, 2, 4096, 4)
    eq((err, data), (0, b"abcd"), "read")
    r.disconnect()
    r = d.raw()
    r.handshake()
    r.send_option(OPT_EXPORT_NAME, b"nosuch")
    check(r.closed_by_server(5), "EXPORT_NAME of a missing export did not close the connection")


@case("unknown option → NBD_REP_ERR_UNSUP and negotiation continues")
def t_unknown_option(d):
    setup(d)
    r = d.raw()
    r.handshake()
    for opt in (42, 0x7FFF, 4):
        t, _ = r.option(opt, b"some data")
        eq(t, REP_ERR_UNSUP, "reply to option %d" % opt)
    eq(r.go("r"), REP_ACK, "GO after unknown options")
    r.disconnect()


@case("malformed option lengths → NBD_REP_ERR_INVALID, negotiation continues")
def t_malformed(d):
    setup(d)
    r = d.raw()
    r.handshake()
    # GO whose name length points past the payload
    t, _ = r.option(OPT_GO, struct.pack(">I", 100) + b"r")
    eq(t, REP_ERR_INVALID, "GO with name length > payload")
    t, _ = r.option(OPT_GO, b"\x00\x00")
    eq(t, REP_ERR_INVALID, "GO with a 2-byte payload")
    # GO with the info-request count too large for the payload
    t, _ = r.option(OPT_GO, struct.pack(">I", 1) + b"r" + struct.pack(">H", 5) + b"\x00\x00")
    eq(t, REP_ERR_INVALID, "GO with a short info-request list")
    t, _ = r.option(OPT_LIST, b"junk")
    eq(t, REP_ERR_INVALID, "LIST with a payload")
    t, _ = r.option(OPT_STRUCTURED_REPLY, b"x")
    eq(t, REP_ERR_INVALID, "STRUCTURED_REPLY with a payload")
    t, _ = r.option(OPT_INFO, b"")
    eq(t, REP_ERR_INVALID, "INFO with an empty payload")
    eq(r.go("r"), REP_ACK, "GO after malformed options")
    r.disconnect()


@case("NBD_OPT_LIST: one NBD_REP_SERVER per exported disk, then ACK")
def t_list(d):
    setup(d, "a")
    setup(d, "bb")
    setup(d, "hidden", "1M", "--no-export")
    r = d.raw()
    r.handshake()
    t, replies = r.option(OPT_LIST)
    eq(t, REP_ACK, "final reply")
    names = []
    for rt, data in replies[:-1]:
        eq(rt, REP_SERVER, "reply type")
        n = struct.unpack(">I", data[:4])[0]
        names.append(data[4:4 + n].decode())
    eq(sorted(names), ["a", "bb"], "exports")
    eq(r.go("a"), REP_ACK, "GO after LIST")
    r.disconnect()


@case("NBD_OPT_INFO: a missing export → NBD_REP_ERR_UNKNOWN; INFO then GO")
def t_info(d):
    setup(d, "r", "3M")
    r = d.raw()
    r.handshake()
    eq(r.go("nosuch", opt=OPT_INFO), REP_ERR_UNKNOWN, "INFO of a missing export")
    eq(r.go("nosuch"), REP_ERR_UNKNOWN, "GO of a missing export")
    eq(r.go("r", infos=(INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE), opt=OPT_INFO), REP_ACK, "INFO r")
    eq(r.size, 3 * MiB, "size from INFO")
    if INFO_BLOCK_SIZE in r.infos:
        mn, pref, mx = struct.unpack(">III", r.infos[INFO_BLOCK_SIZE])
        check(mn >= 1 and mn <= pref <= mx, "block sizes %d %d %d" % (mn, pref, mx))
    if INFO_NAME in r.infos:
        eq(r.infos[INFO_NAME], b"r", "INFO_NAME")
    eq(r.go("r"), REP_ACK, "GO after INFO")
    err, data, _ = r.cmd(CMD_READ, 1, 0, 512)
    eq(err, 0, "read")
    r.disconnect()


@case("NBD_OPT_EXTENDED_HEADERS, GO, 32-byte requests and extended replies")
def t_extended(d):
    setup(d, "r", "4M")
    r = connect_raw_go(d, "r", extended=True)
    eq(r.size, 4 * MiB, "size")
    payload = os.urandom(8192)
    r.request(CMD_WRITE, 0x1122334455667788, 4096, len(payload), data=payload)
    rep = r.recv_reply()
    eq(rep.kind, "extended", "reply kind for a write")
    eq(rep.handle, 0x1122334455667788, "cookie")
    check(rep.done, "write reply without DONE")
    eq(rep.error, 0, "write error")
    err, data, chunks = r.cmd(CMD_READ, 5, 4096, 8192)
    eq(err, 0, "read error")
    eq(data, payload, "read data")
    check(all(c.kind == "extended" for c in chunks), "non-extended reply chunk: %r" % chunks)
    # errors also come as extended chunks
    err, _, chunks = r.cmd(CMD_READ, 6, 4 * MiB, 512)
    eq(err, NBD_EINVAL, "read past the end")
    check(all(c.kind == "extended" for c in chunks), "error reply not extended: %r" % chunks)
    # a length over 32 bits is representable only with extended headers: rejected, not truncated
    r.request(CMD_READ, 7, 0, (1 << 32) + 512)
    chunks = r.recv_all_chunks()
    check(any(c.error for c in chunks), "4 GiB+ read of a 4 MiB disk succeeded")
    err, _, _ = r.cmd(CMD_FLUSH, 8)
    check(err in (0, NBD_EINVAL), "flush: %d" % err)
    # a simple request magic after extended headers is a protocol error
    # (28 bytes plus 4 so that the server has a whole 32-byte header to look at)
    r.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 9, 0, 512) + bytes(4))
    try:
        reps = r.recv_all_chunks()
        check(any(c.error for c in reps), "a compact request accepted after extended headers")
    except (EOFError, ConnectionResetError, TestFailure):
        pass
    r.close()
    alive(d)


@case("NBD_OPT_STRUCTURED_REPLY: reads come as OFFSET_DATA chunks")
def t_structured(d):
    setup(d)
    r = connect_raw_go(d, "r", structured=True)
    err, _, _ = r.cmd(CMD_WRITE, 1, 0, 1024, data=b"q" * 1024)
    eq(err, 0, "write")
    err, data, chunks = r.cmd(CMD_READ, 2, 0, 1024)
    eq((err, data), (0, b"q" * 1024), "read")
    check(all(c.kind == "structured" for c in chunks), "chunks %r" % chunks)
    err, _, chunks = r.cmd(CMD_READ, 3, MiB, 512)
    eq(err, NBD_EINVAL, "read past the end (structured error chunk)")
    r.disconnect()


@case("STARTTLS without TLS configured → ERR_POLICY or ERR_UNSUP")
def t_starttls(d):
    setup(d)
    r = d.raw()
    r.handshake()
    t, _ = r.option(OPT_STARTTLS)
    check(t in (REP_ERR_POLICY, REP_ERR_UNSUP), "STARTTLS reply %#x" % t)
    eq(r.go("r"), REP_ACK, "GO after refused STARTTLS")
    r.disconnect()


@case("unknown command → EINVAL reply, connection usable")
def t_unknown_cmd(d):
    setup(d)
    r = connect_raw_go(d, "r")
    for cmd in (42, 0xFFFF, 8):
        err, _, _ = r.cmd(cmd, 100 + cmd, 0, 0)
        eq(err, NBD_EINVAL, "error for command %d" % cmd)
    err, data, _ = r.cmd(CMD_READ, 3, 0, 16)
    eq((err, data), (0, bytes(16)), "read after unknown commands")
    err, _, _ = r.cmd(CMD_READ, 4, 0, 16, flags=1 << 12)
    eq(err, NBD_EINVAL, "read with an unknown flag")
    r.disconnect()


@case("garbage request magic → disconnect, daemon unharmed")
def t_garbage(d):
    setup(d)
    r = connect_raw_go(d, "r")
    r.send(b"\xde\xad\xbe\xef" * 7)
    check(r.closed_by_server(5), "connection kept after a garbage request")
    alive(d)
    r = d.raw()                       # garbage instead of client flags / options
    r.greeting()
    r.send(os.urandom(300))
    check(r.closed_by_server(5), "connection kept after garbage in the handshake")
    r = d.raw()
    r.handshake()
    r.send(b"NOTMAGIC" + os.urandom(64))
    check(r.closed_by_server(5), "connection kept after a bad option magic")
    alive(d)


@case("truncated write payload then close → daemon ok, nothing half-written visible as error")
def t_truncated_write(d):
    setup(d)
    for tcp in (False, True):
        r = connect_raw_go(d, "r", tcp=tcp)
        r.request(CMD_WRITE, 1, 0, 65536, data=b"w" * 1000)
        r.close()
    r = connect_raw_go(d, "r")
    r.request(CMD_WRITE, 1, 0, 4096)  # header only
    r.close()
    time.sleep(0.3)
    alive(d)
    wait_for(lambda: d.info("r")["stats"]["inflight"] == 0, what="inflight 0")


@case("NBD_OPT_ABORT → ACK and close")
def t_abort(d):
    setup(d)
    r = d.raw()
    r.handshake()
    r.send_option(OPT_ABORT)
    try:
        opt, t, _ = r.recv_option_reply()
        eq((opt, t), (OPT_ABORT, REP_ACK), "ABORT reply")
    except EOFError:
        fail("server closed without acknowledging NBD_OPT_ABORT")
    check(r.closed_by_server(5), "server kept the connection after ABORT")
    alive(d)


@case("oversized option (> 64 KiB) is refused or the connection dropped; daemon ok")
def t_oversized(d):
    setup(d)
    r = d.raw()
    r.handshake()
    big = 1 << 20
    r.send_option(OPT_GO, length=big)
    try:
        r.s.sendall(b"\x00" * big)
        opt, t, _ = r.recv_option_reply()
        check(t & REP_ERR, "oversized option accepted: reply %#x" % t)
        eq(r.go("r"), REP_ACK, "GO after an oversized option")
        r.disconnect()
    except (EOFError, ConnectionResetError, BrokenPipeError):
        pass  # dropping the client is allowed
    r = d.raw()
    r.handshake()
    r.send_option(OPT_LIST, length=0xFFFFFFFF)   # claims 4 GiB, sends nothing more
    r.s.settimeout(5)
    try:
        opt, t, _ = r.recv_option_reply()
        check(t & REP_ERR, "4 GiB option: reply %#x" % t)
    except (EOFError, ConnectionResetError, socket.timeout):
        pass
    r.close()
    alive(d)


@case("many requests in flight, pipelined; replies match handles")
def t_pipeline(d):
    setup(d, "r", "4M")
    r = connect_raw_go(d, "r", structured=True)
    for i in range(64):
        r.request(CMD_WRITE, 1000 + i, i * 4096, 4096, data=bytes([i]) * 4096)
    seen = set()
    while len(seen) < 64:
        rep = r.recv_reply()
        eq(rep.error, 0, "write %d" % rep.handle)
        if rep.done:
            seen.add(rep.handle)
    eq(seen, set(range(1000, 1064)), "handles")
    for i in range(64):
        err, data, _ = r.cmd(CMD_READ, 5000 + i, i * 4096, 4096)
        eq(data, bytes([i]) * 4096, "block %d" % i)
    r.disconnect()


def _pattern_disk(r, size):
    """Fill [0, size) through r with a position-dependent pattern; return it."""
    data = pattern(7, size)
    for off in range(0, size, 4 * MiB):
        err, _, _ = r.cmd(CMD_WRITE, 9, off, min(4 * MiB, size - off), data=data[off:off + 4 * MiB])
        eq(err, 0, "fill write at %d" % off)
    return data


@case("large reads of a RAM disk (spliced from its pages): simple, structured and extended replies, "
      "odd offsets and lengths, mixed with small replies", timeout=240)
def t_large_reads(d):
    size = 40 * MiB
    setup(d, "r", "40M")
    for mode in ("simple", "structured", "extended"):
        for tcp in (False, True):
            r = connect_raw_go(d, "r", tcp=tcp, structured=mode == "structured",
                               extended=mode == "extended")
            data = _pattern_disk(r, size) if mode == "simple" and not tcp else pattern(7, size)
            reqs = [(0, MiB), (12345, 64 * 1024), (3 * MiB + 1, 2 * MiB - 3), (0, 32 * MiB),
                    (size - 65537, 65537), (5 * MiB, 4096), (7 * MiB + 511, 777 * 1024)]
            # Pipelined, with small reads and writes of elsewhere in between:
            # headers, copied payloads and spliced payloads share one stream.
            h = 100
            want = {}
            for off, ln in reqs:
                r.request(CMD_READ, h, off, ln)
                want[h] = (off, ln)
                h += 1
                r.request(CMD_READ, h, off + 100, 100 if off + 200 < size else 10)
                want[h] = (off + 100, 100 if off + 200 < size else 10)
                h += 1
            got = {}
            while len(got) < len(want):
                rep = r.recv_reply(read_len=0)
                if rep.kind == "simple":
                    rep.payload = r.recv_exact(want[rep.handle][1]) if rep.error == 0 else b""
                eq(rep.error, 0, "%s read %d" % (mode, rep.handle))
                if rep.kind == "simple":
                    got[rep.handle] = rep.payload
                else:
                    eq(rep.type, REPLY_TYPE_OFFSET_DATA if rep.payload else rep.type, "chunk type")
                    if rep.payload:
                        off = struct.unpack(">Q", rep.payload[:8])[0]
                        eq(off, want[rep.handle][0], "OFFSET_DATA offset")
                        got[rep.handle] = got.get(rep.handle, b"") + rep.payload[8:]
            for hh, (off, ln) in want.items():
                if got[hh] != data[off:off + ln]:
                    fail("%s%s: read of %d at %d differs" % (mode, " tcp" if tcp else "", ln, off))
            r.disconnect()
    alive(d)


@case("a client that reads large replies slowly gets every byte right; one that leaves "
      "spliced replies unread and closes does not hurt the daemon", timeout=240)
def t_large_reads_slow(d):
    size = 32 * MiB
    setup(d, "r", "32M")
    r = connect_raw_go(d, "r", structured=True)
    data = _pattern_disk(r, size)
    # 24 MiB of replies queued while the client reads in small sips: the
    # server sees EAGAIN in the middle of spliced payloads many times.
    for i in range(24):
        r.request(CMD_READ, 500 + i, (i * 1337 * 1024) % (size - MiB), MiB)
    r.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    got = {}
    while len(got) < 24:
        magic = struct.unpack(">I", r.recv_exact(4))[0]
        eq(magic, STRUCTURED_REPLY_MAGIC, "reply magic")
        flags, rtype, handle, length = struct.unpack(">HHQI", r.recv_exact(16))
        payload = bytearray()
        while len(payload) < length:
            payload += r.s.recv(min(8192, length - len(payload)))
            if len(payload) % (256 * 1024) < 8192:
                time.sleep(0.002)
        eq(rtype, REPLY_TYPE_OFFSET_DATA, "chunk type")
        got[handle] = bytes(payload)
    for i in range(24):
        off = (i * 1337 * 1024) % (size - MiB)
        if got[500 + i][8:] != data[off:off + MiB]:
            fail("slow read %d differs" % i)
    r.disconnect()
    # Replies left unread: the server's pipe and socket hold spliced pages.
    for _ in range(5):
        r = connect_raw_go(d, "r", tcp=_ % 2 == 1)
        for i in range(40):
            r.request(CMD_READ, i, (i * MiB) % (size - MiB), MiB)
        time.sleep(0.05)
        r.close()
    alive(d)
    # The disk is unplugged while a client sits on unread spliced replies.
    r = connect_raw_go(d, "r")
    for i in range(20):
        r.request(CMD_READ, i, i * MiB, MiB)
    time.sleep(0.2)
    d.cli_ok("unplug", "r")
    r.close()
    d.plug("ram", "--size", "1M", "--name", "r", "--attach", "none")
    alive(d)


@case("large writes to a RAM disk (received straight into its pages): pipelined, odd offsets "
      "and lengths, FUA, read back; counters; over a Unix socket, over TCP (the rest of a "
      "payload awaited with SO_RCVLOWAT) and with extended headers (the next 32-byte header "
      "received with a payload's rest)", timeout=240)
def t_large_writes(d):
    size = 48 * MiB
    setup(d, "r", "48M")
    writes = [(0, MiB), (12345, 65536), (3 * MiB + 1, 2 * MiB - 3), (8 * MiB, 32 * MiB),
              (size - 65537, 65537), (5 * MiB, 65535), (44 * MiB + 7, 777 * 1024)]
    data = bytearray(size)
    for v, (tcp, ext) in enumerate([(False, False), (True, False), (True, True)]):
        how = "%s%s" % ("TCP" if tcp else "Unix", ", extended headers" if ext else "")
        r = connect_raw_go(d, "r", tcp=tcp, structured=not ext, extended=ext)
        st0 = d.info("r")["stats"]
        for i, (off, ln) in enumerate(writes):
            payload = pattern(100 + 10 * v + i, ln)
            data[off:off + ln] = payload
            r.request(CMD_WRITE, 10 + i, off, ln, flags=CMD_FLAG_FUA if i % 2 else 0, data=payload)
        done = set()
        while len(done) < len(writes):
            rep = r.recv_reply()
            eq(rep.error, 0, "write %d (%s)" % (rep.handle, how))
            done.add(rep.handle)
        for off in range(0, size, 4 * MiB):
            err, got, _ = r.cmd(CMD_READ, 99, off, 4 * MiB)
            eq(err, 0, "read back (%s)" % how)
            if got != bytes(data[off:off + 4 * MiB]):
                fail("data at %d..%d differs after large writes (%s)" % (off, off + 4 * MiB, how))
        st = d.info("r")["stats"]
        eq(st["writes"] - st0["writes"], len(writes), "write counter (%s)" % how)
        eq(st["bytes_written"] - st0["bytes_written"], sum(ln for _, ln in writes),
           "bytes counter (%s)" % how)
        r.disconnect()
    # A writer that dies in the middle of a large payload: the daemon is fine.
    r = connect_raw_go(d, "r")
    r.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 8 * MiB) + bytes(3 * MiB))
    r.close()
    alive(d)


@case("a snapshot taken while a large write's payload is still arriving: the disk gets the whole "
      "write, the snapshot holds each block old or new", timeout=120)
def t_large_write_snapshot(d):
    setup(d, "r", "8M")
    r = connect_raw_go(d, "r", structured=True)
    old = pattern(1, 4 * MiB)
    err, _, _ = r.cmd(CMD_WRITE, 1, 0, 4 * MiB, data=old)
    eq(err, 0, "first write")
    new = pattern(2, 4 * MiB)
    r.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 2, 0, 4 * MiB) + new[:MiB])
    time.sleep(0.3)
    d.cli_ok("snapshot", "r", "--as", "s")
    for off in range(MiB, 4 * MiB, 256 * 1024):
        r.send(new[off:off + 256 * 1024])
        time.sleep(0.01)
    rep = r.recv_reply()
    eq((rep.handle, rep.error), (2, 0), "the write that straddled the snapshot")
    err, got, _ = r.cmd(CMD_READ, 3, 0, 4 * MiB)
    eq(got == new, True, "the disk has the whole write")
    r.disconnect()
    s = connect_raw_go(d, "s", structured=True)
    err, snap, _ = s.cmd(CMD_READ, 4, 0, 4 * MiB)
    eq(err, 0, "snapshot read")
    for off in range(0, 4 * MiB, 4096):
        blk = snap[off:off + 4096]
        if blk != old[off:off + 4096] and blk != new[off:off + 4096]:
            fail("snapshot block at %d is neither old nor new" % off)
    check(snap[3 * MiB:] == old[3 * MiB:], "payload sent after the snapshot is not in it")
    s.disconnect()
    alive(d)


@case("NBD_CMD_BLOCK_STATUS with base:allocation via SET_META_CONTEXT")
def t_block_status(d):
    setup(d, "r", "4M")
    r = d.raw()
    r.handshake()
    t, _ = r.option(OPT_STRUCTURED_REPLY)
    eq(t, REP_ACK, "STRUCTURED_REPLY")
    r.structured = True
    q = b"base:allocation"
    t, replies = r.option(OPT_SET_META_CONTEXT,
                          struct.pack(">I", 1) + b"r" + struct.pack(">I", 1) + struct.pack(">I", len(q)) + q)
    eq(t, REP_ACK, "SET_META_CONTEXT")
    ctx = [x for x in replies if x[0] == REP_META_CONTEXT]
    eq(len(ctx), 1, "one META_CONTEXT reply")
    ctx_id = struct.unpack(">I", ctx[0][1][:4])[0]
    eq(ctx[0][1][4:], q, "context name")
    eq(r.go("r"), REP_ACK, "GO")
    err, _, _ = r.cmd(CMD_WRITE, 1, MiB, 4096, data=b"d" * 4096)
    eq(err, 0, "write")
    err, _, chunks = r.cmd(CMD_BLOCK_STATUS, 2, 0, 4 * MiB)
    eq(err, 0, "block status")
    bs = [c for c in chunks if c.type == REPLY_TYPE_BLOCK_STATUS]
    eq(len(bs), 1, "block status chunks")
    eq(struct.unpack(">I", bs[0].payload[:4])[0], ctx_id, "context id")
    ents = [struct.unpack(">II", bs[0].payload[i:i + 8]) for i in range(4, len(bs[0].payload), 8)]
    pos, found_data = 0, False
    for ln, fl in ents:
        if pos <= MiB < pos + ln:
            eq(fl & 1, 0, "extent at 1 MiB is data")
            found_data = True
        pos += ln
    check(found_data or pos <= MiB, "extents %r" % ents)
    eq(ents[0][1] & 1, 1, "first extent is a hole")
    r.disconnect()


if __name__ == "__main__":
    main()
