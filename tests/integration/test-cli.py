#!/usr/bin/python3
"""The vdbus CLI: every verb and every error, against a real vdbusd."""
import errno
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vdbtest import (Daemon, Skip, case, check, eq, fail, main, VDBUS, run)  # noqa: E402

VERSION = "0.1.0"


def one_line_error(err, prefix):
    """An error is one line 'vdbus: what: why'."""
    lines = err.strip().splitlines()
    eq(len(lines), 1, "number of stderr lines in %r" % err)
    check(lines[0].startswith(prefix), "stderr %r does not start with %r" % (lines[0], prefix))
    return lines[0]


def usage_error(d, *args):
    rc, out, err = d.cli(*args)
    eq(rc, 2, "exit code of vdbus %s (stderr %r)" % (" ".join(args), err))
    lines = err.strip().splitlines()
    check(lines and lines[0].startswith("vdbus: "), "usage error text %r" % err)
    check("vdbus --help" in err, "usage error does not point to --help: %r" % err)
    eq(out, "", "stdout of a usage error")
    return lines[0]


def names(d):
    return [x["name"] for x in d.list()]


@case("plug ram: default names vd0, vd1, ... (smallest free)")
def t_default_names(d):
    eq([d.plug("ram", "--size", "1M", "--attach", "none") for _ in range(3)], ["vd0", "vd1", "vd2"], "names")
    d.cli_ok("unplug", "vd1")
    eq(names(d), ["vd0", "vd2"], "after unplug vd1")
    eq(d.plug("ram", "--size", "1M", "--attach", "none"), "vd1", "smallest free name")
    eq(d.plug("ram", "--size", "1M", "--attach", "none"), "vd3", "next name")
    eq(sorted(names(d)), ["vd0", "vd1", "vd2", "vd3"], "list")


@case("plug ram --size --name: sizes in bytes and with suffixes")
def t_plug_ram_sizes(d):
    for name, size, want in [("k", "64K", 64 << 10), ("m", "4M", 4 << 20), ("g", "2G", 2 << 30),
                             ("t", "1T", 1 << 40), ("bytes", "1000001", 1000001)]:
        eq(d.plug("ram", "--size", size, "--name", name, "--attach", "none"), name, "printed name")
        disk = d.disk(name)
        check(disk is not None, "disk %s not listed" % name)
        eq(disk["size"], want, "size of %s (--size %s)" % (name, size))
        eq(disk["backend"], "ram", "backend")
    eq(d.plug("ram", "--param", "size=2M", "--name", "viaparam", "--attach", "none"), "viaparam", "name")
    eq(d.disk("viaparam")["size"], 2 << 20, "size from --param size=2M")


@case("plug: duplicate name refused (EEXIST), existing disk untouched")
def t_duplicate(d):
    d.plug("ram", "--size", "1M", "--name", "dup", "--attach", "none")
    rc, out, err = d.cli("plug", "ram", "--size", "2M", "--name", "dup", "--attach", "none")
    eq(rc, 1, "exit code")
    line = one_line_error(err, "vdbus: plug: ")
    check("dup" in line and "already" in line, "message %r" % line)
    eq(d.disk("dup")["size"], 1 << 20, "size of the existing disk")
    r = d.control("plug", {"backend": "ram", "name": "dup", "params": {"size": "1M"}, "attach": "none"})
    eq(r.get("errno"), errno.EEXIST, "control errno for a duplicate name (%r)" % r)
    # the default name skips taken names
    d.plug("ram", "--size", "1M", "--name", "vd0", "--attach", "none")
    eq(d.plug("ram", "--size", "1M", "--attach", "none"), "vd1", "default name after vd0 was taken")


@case("plug: bad sizes (4X, 0, -1, empty, 1.5G, 99999T) refused by CLI and daemon (EINVAL)")
def t_bad_size(d):
    for size in ["4X", "0", "-1", "", "1.5G", "G", "99999999T"]:
        rc, out, err = d.cli("plug", "ram", "--size", size, "--attach", "none")
        eq(rc, 1, "exit code for --size %r (stderr %r)" % (size, err))
        line = one_line_error(err, "vdbus: plug: ")
        check("size" in line, "message for --size %r: %r" % (size, line))
    for size in ["4X", "0", "-1", "", "1.5G", "99999999T"]:
        r = d.control("plug", {"backend": "ram", "params": {"size": size}, "attach": "none"})
        eq(r.get("errno"), errno.EINVAL, "control errno for size %r (%r)" % (size, r))
        check(r.get("error"), "error message for size %r" % size)
    rc, out, err = d.cli("plug", "ram", "--attach", "none")
    eq(rc, 1, "plug ram without --size")
    one_line_error(err, "vdbus: plug: ")
    eq(d.list(), [], "no disk plugged by failed plugs")


@case("plug: bad names refused (EINVAL); 63 characters accepted")
def t_bad_names(d):
    for name in [".hidden", "-dash", "a/b", "x" * 64, "sp ace", "tab\t", "semi;colon"]:
        rc, out, err = d.cli("plug", "ram", "--size", "1M", "--name", name, "--attach", "none")
        eq(rc, 1, "exit code for name %r (stderr %r)" % (name, err))
        one_line_error(err, "vdbus: plug: ")
        r = d.control("plug", {"backend": "ram", "name": name, "params": {"size": "1M"}, "attach": "none"})
        eq(r.get("errno"), errno.EINVAL, "control errno for name %r" % name)
    r = d.control("plug", {"backend": "ram", "name": "", "params": {"size": "1M"}, "attach": "none"})
    check(r.get("errno") == errno.EINVAL or r.get("result", {}).get("name") == "vd0",
          "empty name: EINVAL or a default name, got %r" % r)
    d.cli_ok("unplug", "--all")
    long = "a" * 63
    eq(d.plug("ram", "--size", "1M", "--name", long, "--attach", "none"), long, "63-char name")
    eq(d.plug("ram", "--size", "1M", "--name", "A.b_c-d+9", "--attach", "none"), "A.b_c-d+9", "name with . _ - +")


@case("plug: unknown backend → ENOENT; bad --block-size/--attach values")
def t_bad_backend(d):
    rc, out, err = d.cli("plug", "frob", "--size", "1M")
    eq(rc, 1, "exit code")
    line = one_line_error(err, "vdbus: plug: ")
    check("frob" in line, "message names the backend: %r" % line)
    r = d.control("plug", {"backend": "frob", "params": {"size": "1M"}})
    eq(r.get("errno"), errno.ENOENT, "control errno (%r)" % r)
    for args in (["--block-size", "1000"], ["--attach", "bogus"]):
        rc, out, err = d.cli("plug", "ram", "--size", "1M", *args)
        check(rc in (1, 2), "exit code for %r: %d" % (args, rc))
        check(err.startswith("vdbus: "), "message %r" % err)
    r = d.control("plug", {"backend": "ram", "params": {"size": "1M"}, "block_size": 1000})
    eq(r.get("errno"), errno.EINVAL, "control errno for block_size 1000")
    r = d.control("plug", {"backend": "ram", "params": {"size": "1M"}, "bogus_key": 1})
    eq(r.get("errno"), errno.EINVAL, "control errno for an unknown key in args")
    eq(d.list(), [], "nothing plugged")


@case("plug --block-size 4096, --readonly, --no-export appear in list")
def t_plug_options(d):
    d.plug("ram", "--size", "1M", "--name", "bs", "--block-size", "4096", "--attach", "none")
    d.plug("ram", "--size", "1M", "--name", "ro", "--readonly", "--attach", "none")
    d.plug("ram", "--size", "1M", "--name", "hidden", "--no-export", "--attach", "none")
    ls = {x["name"]: x for x in d.list()}
    eq(ls["bs"]["block_size"], 4096, "block_size")
    eq(ls["ro"]["readonly"], True, "readonly")
    eq(ls["bs"]["readonly"], False, "readonly default")
    eq(ls["hidden"]["nbd_uri"], None, "nbd_uri of a --no-export disk")
    eq(ls["hidden"]["export"], False, "export of a --no-export disk")
    eq(ls["ro"]["export"], True, "export default")
    rows = {l.split()[0]: l.split() for l in d.cli_ok("list").splitlines()[1:]}
    eq(rows["ro"][3], "yes", "RO column of ro")
    eq(rows["bs"][3], "no", "RO column of bs")
    eq(rows["hidden"][-1], "-", "NBD URI column of a --no-export disk")


@case("plug file: missing file → ENOENT with the path in the message")
def t_missing_file(d):
    path = os.path.join(d.data_dir, "missing.img")
    rc, out, err = d.cli("plug", "file", path, "--attach", "none")
    eq(rc, 1, "exit code")
    line = one_line_error(err, "vdbus: plug: ")
    check(path in line, "message names the file: %r" % line)
    r = d.control("plug", {"backend": "file", "params": {"path": path}, "attach": "none"})
    eq(r.get("errno"), errno.ENOENT, "control errno (%r)" % r)
    check(not os.path.exists(path), "the file was created by a plug without --create")
    rc, out, err = d.cli("plug", "file", "--size", "1M", "--attach", "none")
    eq(rc, 2, "plug file without PATH is a usage error")


@case("plug file without --size: the size is the file's size; relative paths")
def t_file_size(d):
    path = os.path.join(d.data_dir, "existing.img")
    with open(path, "wb") as f:
        f.write(os.urandom(3 << 20))
    eq(d.plug("file", path, "--name", "ex", "--attach", "none"), "ex", "name")
    disk = d.disk("ex")
    eq(disk["size"], 3 << 20, "size")
    eq(disk["backend"], "file", "backend")
    eq(disk["params"].get("path"), path, "params.path")
    d.cli_ok("unplug", "ex")
    # a relative PATH is relative to the CLI's directory, not the daemon's
    rc, out, err = d.cli("plug", "file", "rel.img", "--create", "--size", "1M", "--name", "rel",
                         "--attach", "none", cwd=d.data_dir)
    eq(rc, 0, "plug with a relative path (stderr %r)" % err)
    check(os.path.exists(os.path.join(d.data_dir, "rel.img")), "rel.img not created in the CLI's cwd")
    eq(d.disk("rel")["params"].get("path"), os.path.join(d.data_dir, "rel.img"), "absolute path sent")
    # the same file twice: refused (EBUSY: locked by another disk)
    rc, out, err = d.cli("plug", "file", path, "--name", "ex2", "--attach", "none")
    eq(rc, 0, "plug again after unplug (stderr %r)" % err)
    rc, out, err = d.cli("plug", "file", path, "--name", "ex3", "--attach", "none")
    eq(rc, 1, "the same file plugged twice")
    one_line_error(err, "vdbus: plug: ")
    r = d.control("plug", {"backend": "file", "name": "ex4", "params": {"path": path}, "attach": "none"})
    eq(r.get("errno"), errno.EBUSY, "control errno for a file in use (%r)" % r)


@case("plug file --create on an existing file is refused and never truncates")
def t_create_existing(d):
    path = os.path.join(d.data_dir, "keep.img")
    data = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(data)
    st0 = os.stat(path)
    for size in ["1M", "2M", "4K"]:
        rc, out, err = d.cli("plug", "file", path, "--create", "--size", size, "--attach", "none")
        eq(rc, 1, "exit code with --size %s" % size)
        line = one_line_error(err, "vdbus: plug: ")
        check(path in line, "message names the file: %r" % line)
    r = d.control("plug", {"backend": "file", "params": {"path": path, "create": "1", "size": "512K"},
                           "attach": "none"})
    check(r.get("errno") == errno.EEXIST, "control errno for --create on an existing file (%r)" % r)
    st1 = os.stat(path)
    eq(st1.st_size, st0.st_size, "file size")
    eq(st1.st_mtime_ns, st0.st_mtime_ns, "file mtime")
    with open(path, "rb") as f:
        check(f.read() == data, "file content changed")
    eq(d.list(), [], "nothing plugged")


@case("plug file --create makes a sparse file of --size; needs --size")
def t_create_sparse(d):
    path = os.path.join(d.data_dir, "sparse.img")
    eq(d.plug("file", path, "--create", "--size", "1G", "--name", "sp", "--attach", "none"), "sp", "name")
    st = os.stat(path)
    eq(st.st_size, 1 << 30, "created file size")
    check(st.st_blocks * 512 < (1 << 20), "created file is not sparse: %d bytes allocated" % (st.st_blocks * 512))
    eq(d.disk("sp")["size"], 1 << 30, "disk size")
    path2 = os.path.join(d.data_dir, "nosize.img")
    rc, out, err = d.cli("plug", "file", path2, "--create", "--attach", "none")
    eq(rc, 1, "--create without --size")
    one_line_error(err, "vdbus: plug: ")
    check(not os.path.exists(path2), "file created although plug failed")
    path3 = os.path.join(d.data_dir, "nodir", "x.img")
    rc, out, err = d.cli("plug", "file", path3, "--create", "--size", "1M", "--attach", "none")
    eq(rc, 1, "--create in a missing directory")
    one_line_error(err, "vdbus: plug: ")


@case("unplug: unknown disk (ENOENT), usage errors, --all")
def t_unplug(d):
    rc, out, err = d.cli("unplug", "nope")
    eq(rc, 1, "exit code")
    line = one_line_error(err, "vdbus: nope: ")
    check("nope" in line.split(":", 2)[2], "message %r" % line)
    r = d.control("unplug", {"name": "nope"})
    eq(r.get("errno"), errno.ENOENT, "control errno (%r)" % r)
    usage_error(d, "unplug")
    usage_error(d, "unplug", "a", "b")
    usage_error(d, "unplug", "a", "--all")
    usage_error(d, "unplug", "--bogus", "a")
    for i in range(3):
        d.plug("ram", "--size", "1M", "--attach", "none")
    d.plug("file", os.path.join(d.data_dir, "f.img"), "--create", "--size", "1M", "--attach", "none")
    eq(len(d.list()), 4, "disks before unplug --all")
    eq(d.cli_ok("unplug", "--all"), "", "unplug --all output")
    eq(d.list(), [], "disks after unplug --all")
    eq(d.cli_ok("unplug", "--all"), "", "unplug --all on an empty bus")
    d.plug("ram", "--size", "1M", "--name", "x", "--attach", "none")
    d.cli_ok("unplug", "x", "--force")
    eq(d.list(), [], "after unplug --force")


@case("list and list --json: fields and types")
def t_list(d):
    eq(d.list(), [], "empty bus")
    out = d.cli_ok("list")
    eq(out.split(), ["NAME", "BACKEND", "SIZE", "RO", "DEVICE", "NBD", "URI"], "header of an empty list")
    d.plug("ram", "--size", "4M", "--name", "r", "--attach", "none")
    path = os.path.join(d.data_dir, "l.img")
    d.plug("file", path, "--create", "--size", "8M", "--name", "f", "--readonly", "--attach", "none")
    ls = {x["name"]: x for x in d.list()}
    eq(sorted(ls), ["f", "r"], "names")
    for name, backend, size, ro in [("r", "ram", 4 << 20, False), ("f", "file", 8 << 20, True)]:
        x = ls[name]
        for field in ["name", "backend", "size", "readonly", "device", "nbd_uri", "block_size",
                      "attach", "frontend", "export"]:
            check(field in x, "field %s missing in %r" % (field, x))
        eq(x["backend"], backend, "backend of " + name)
        check(isinstance(x["size"], int), "size is not an integer: %r" % x["size"])
        eq(x["size"], size, "size of " + name)
        eq(x["readonly"], ro, "readonly of " + name)
        eq(x["device"], None, "device of %s (attach none)" % name)
        eq(x["nbd_uri"], "nbd+unix:///%s?socket=%s" % (name, d.nbd_sock), "nbd_uri of " + name)
    lines = d.cli_ok("list").splitlines()
    eq(len(lines), 3, "lines of list")
    rows = {l.split()[0]: l.split() for l in lines[1:]}
    eq(rows["r"], ["r", "ram", "4M", "no", "-", "nbd+unix:///r?socket=%s" % d.nbd_sock], "row r")
    eq(rows["f"], ["f", "file", "8M", "yes", "-", "nbd+unix:///f?socket=%s" % d.nbd_sock], "row f")
    usage_error(d, "list", "extra")
    usage_error(d, "list", "--bogus")


@case("list: attach auto fills device with /dev/loopN or null")
def t_list_device(d):
    d.plug("ram", "--size", "4M", "--name", "a")
    x = d.disk("a")
    check(x["device"] is None or re.fullmatch(r"/dev/loop\d+", x["device"]),
          "device of an auto-attached disk: %r" % x["device"])
    if x["device"]:
        eq(x["frontend"], "loop", "frontend")
        check(os.path.exists(x["device"]), "%s does not exist" % x["device"])
    rc, out, err = d.cli("unplug", "a")
    eq(rc, 0, "unplug (stderr %r)" % err)


def nbd_io(d, name):
    import nbd
    h = d.nbd(name)
    h.pwrite(b"\xab" * 8192, 0)
    h.pwrite(b"\xcd" * 4096, 65536)
    eq(h.pread(4096, 0), b"\xab" * 4096, "read back")
    h.pread(512, 65536)
    h.shutdown()


@case("info and info --json: settings, capabilities, counters change after I/O")
def t_info(d):
    d.plug("ram", "--size", "1M", "--name", "i", "--attach", "none")
    info = d.info("i")
    for k in ["name", "backend", "size", "readonly", "device", "nbd_uri", "capabilities", "stats"]:
        check(k in info, "info has no %s: %r" % (k, info))
    for k in ["reads", "writes", "bytes_read", "bytes_written", "flushes", "trims", "zeroes", "errors", "inflight"]:
        eq(info["stats"].get(k), 0, "stats.%s of a fresh disk" % k)
    for k in ["write", "flush", "fua", "trim", "zero", "extents", "multi_conn"]:
        check(isinstance(info["capabilities"].get(k), bool), "capabilities.%s: %r" % (k, info["capabilities"]))
    eq(info["capabilities"]["write"], True, "capabilities.write")
    nbd_io(d, "i")
    st = d.info("i")["stats"]
    eq(st["writes"], 2, "stats.writes")
    eq(st["bytes_written"], 8192 + 4096, "stats.bytes_written")
    eq(st["reads"], 2, "stats.reads")
    eq(st["bytes_read"], 4096 + 512, "stats.bytes_read")
    eq(st["errors"], 0, "stats.errors")
    text = d.cli_ok("info", "i")
    check("stats.writes: 2" in text.splitlines(), "text info lacks 'stats.writes: 2':\n" + text)
    check("name: i" in text.splitlines(), "text info lacks 'name: i'")
    check("size: 1048576" in text.splitlines(), "text info lacks 'size: 1048576'")
    rc, out, err = d.cli("info", "nope")
    eq(rc, 1, "info of an unknown disk")
    one_line_error(err, "vdbus: nope: ")
    eq(d.control("info", {"name": "nope"}).get("errno"), errno.ENOENT, "control errno of info nope")
    usage_error(d, "info")
    usage_error(d, "info", "a", "b")
    usage_error(d, "info", "i", "--bogus")


@case("info: errors counter counts failed requests (error backend)")
def t_info_errors(d):
    import nbd
    d.plug("error", "--size", "1M", "--name", "e", "--error-rate", "1", "--attach", "none")
    h = d.nbd("e")
    nfail = 0
    for i in range(3):
        try:
            h.pread(4096, i * 4096)
        except nbd.Error:
            nfail += 1
    h.shutdown()
    eq(nfail, 3, "failed reads")
    st = d.info("e")["stats"]
    eq(st["errors"], 3, "stats.errors")


@case("backends and backends --json; help backend NAME")
def t_backends(d):
    out = d.cli_ok("backends")
    got = [l.split()[0] for l in out.splitlines()]
    for b in ["ram", "file", "error", "delay", "trace"]:
        check(b in got, "backend %s not listed: %r" % (b, got))
    bj = {b["name"]: b for b in json.loads(d.cli_ok("backends", "--json"))}
    for b in bj.values():
        for k in ["name", "summary", "usage", "volatile"]:
            check(k in b, "backend %s has no %s" % (b.get("name"), k))
    eq(bj["ram"]["volatile"], True, "ram volatile")
    eq(bj["file"]["volatile"], False, "file volatile")
    out = d.cli_ok("help", "backend", "ram")
    check(out.startswith("ram: "), "help backend ram: %r" % out)
    check("size" in out, "help backend ram does not mention size: %r" % out)
    out = d.cli_ok("help", "backend", "file")
    check("path" in out.lower() and "create" in out, "help backend file: %r" % out)
    rc, out, err = d.cli("help", "backend", "nope")
    eq(rc, 1, "help backend nope")
    line = one_line_error(err, "vdbus: help: ")
    check("nope" in line, "message %r" % line)
    usage_error(d, "help", "frob")
    usage_error(d, "help", "backend")
    out = d.cli_ok("help")
    check(out.startswith("Usage: vdbus"), "help output %r" % out[:100])
    usage_error(d, "backends", "extra")


@case("version, --version, -V, --help")
def t_version(d):
    out = d.cli_ok("version")
    eq(out.splitlines(), ["vdbus " + VERSION, "vdbusd %s (control protocol 1)" % VERSION], "version output")
    for opt in ["--version", "-V"]:
        eq(d.cli_ok(opt), "vdbus %s\n" % VERSION, "vdbus " + opt)
    for opt in ["--help", "-h"]:
        out = d.cli_ok(opt)
        check(out.startswith("Usage: vdbus"), "vdbus %s: %r" % (opt, out[:80]))
        for verb in ["plug", "unplug", "list", "info", "backends", "help", "version"]:
            check(verb in out, "--help does not mention %s" % verb)
    r = d.control("hello")
    eq(r.get("result"), {"version": VERSION, "protocol": 1}, "hello")


@case("usage errors exit 2: unknown verb/option, missing arguments")
def t_usage_errors(d):
    usage_error(d, "frob")
    usage_error(d, "--frob", "list")
    usage_error(d)
    usage_error(d, "plug")
    usage_error(d, "plug", "ram", "--size", "1M", "--bogus")
    usage_error(d, "plug", "ram", "--size")
    usage_error(d, "plug", "ram", "--size", "1M", "extra")
    usage_error(d, "plug", "ram", "--size", "1M", "--param", "noequals")
    usage_error(d, "plug", "ram", "--size", "1M", "--param", "=x")
    usage_error(d, "plug", "file", "a.img", "b.img")
    usage_error(d, "plug", "file")
    usage_error(d, "list", "--frob")
    eq(d.list(), [], "nothing plugged by usage errors")


@case("daemon not running: a clear one-line error, exit 1", daemon=False)
def t_no_daemon():
    d = Daemon(start=False)
    try:
        for args in (["list"], ["plug", "ram", "--size", "1M"], ["unplug", "vd0"], ["info", "vd0"],
                     ["backends"], ["unplug", "--all"]):
            rc, out, err = d.cli(*args)
            eq(rc, 1, "exit code of %r without a daemon" % args)
            line = one_line_error(err, "vdbus: ")
            check(d.sock in line, "message does not name the socket: %r" % line)
            check("running" in line, "message does not suggest the daemon is not running: %r" % line)
        rc, out, err = d.cli("version")
        eq(rc, 1, "version without a daemon")
        eq(out, "vdbus %s\n" % VERSION, "version still prints the client version")
        # a daemon that stopped: its socket is gone, the CLI says so
        d.start()
        d.stop()
        check(not os.path.exists(d.sock), "control socket left behind after SIGTERM")
        rc, out, err = d.cli("list")
        eq(rc, 1, "list after the daemon stopped")
        one_line_error(err, "vdbus: connect: ")
        # a socket path that is too long
        rc, out, err = d.cli("--socket", "/tmp/" + "x" * 200, "list", socket_opt=False)
        eq(rc, 1, "too long socket path")
        one_line_error(err, "vdbus: ")
    finally:
        d.cleanup()


@case("VDBUS_SOCKET: used without --socket; --socket overrides it")
def t_env_socket(d):
    d.plug("ram", "--size", "1M", "--name", "envdisk", "--attach", "none")
    rc, out, err = d.cli("list", socket_opt=False, env={"VDBUS_SOCKET": d.sock})
    eq(rc, 0, "list with VDBUS_SOCKET (stderr %r)" % err)
    check("envdisk" in out, "list via VDBUS_SOCKET: %r" % out)
    bogus = os.path.join(d.base, "nosuch.sock")
    rc, out, err = d.cli("list", socket_opt=False, env={"VDBUS_SOCKET": bogus})
    eq(rc, 1, "list with a bogus VDBUS_SOCKET")
    check(bogus in err, "error does not name VDBUS_SOCKET's path: %r" % err)
    rc, out, err = d.cli("--socket", d.sock, "list", socket_opt=False, env={"VDBUS_SOCKET": bogus})
    eq(rc, 0, "--socket overrides VDBUS_SOCKET (stderr %r)" % err)
    check("envdisk" in out, "list via --socket: %r" % out)
    rc, out, err = d.cli("--socket=" + d.sock, "list", socket_opt=False, env={"VDBUS_SOCKET": bogus})
    eq(rc, 0, "--socket=PATH (stderr %r)" % err)


@case("control protocol: bad requests get an error, the daemon keeps serving")
def t_control_errors(d):
    import socket as sk
    r = d.control("frobnicate")
    check(r.get("errno") and r.get("error"), "unknown op: %r" % r)
    s = sk.socket(sk.AF_UNIX)
    s.connect(d.sock)
    s.sendall(b'{"vdbus": 2, "op": "hello", "args": {}}\n')
    r = json.loads(s.makefile().readline())
    eq(r.get("errno"), errno.EPROTO, "errno for protocol version 2 (%r)" % r)
    s.close()
    for garbage in [b"not json\n", b"[1,2,3]\n", b'{"op": 5}\n', b"\x00\xff\xfe\n"]:
        s = sk.socket(sk.AF_UNIX)
        s.settimeout(10)
        s.connect(d.sock)
        s.sendall(garbage)
        try:
            line = s.makefile("rb").readline()
            if line:
                r = json.loads(line)
                check("errno" in r, "reply to %r has no errno: %r" % (garbage, r))
        except (OSError, ValueError):
            pass
        s.close()
    # several requests on one connection, answered in order
    s = sk.socket(sk.AF_UNIX)
    s.connect(d.sock)
    s.sendall(b'{"op": "hello"}\n{"op": "list"}\n{"op": "backends"}\n')
    f = s.makefile()
    eq(json.loads(f.readline())["result"]["protocol"], 1, "first reply")
    eq(json.loads(f.readline())["result"], [], "second reply")
    check(isinstance(json.loads(f.readline())["result"], list), "third reply")
    s.close()
    eq(d.control("hello")["result"]["protocol"], 1, "daemon still answers")


if __name__ == "__main__":
    main()
