#!/usr/bin/python3
"""Persistence: file disks come back after SIGTERM and kill -9; RAM disks do not;
no stale loop devices or FUSE mounts; corrupt bus.json; one daemon per run dir."""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vdbtest import (Skip, case, check, eq, fail, main, is_root, loop_devices, mounts_under,  # noqa: E402
                     free_port)

MiB = 1 << 20
KEYS = ["name", "backend", "size", "readonly", "block_size", "export", "attach"]


def settings(d):
    return {x["name"]: {k: x.get(k) for k in KEYS} for x in d.list()}


def setup(d):
    a = os.path.join(d.data_dir, "a.img")
    b = os.path.join(d.data_dir, "b.img")
    d.plug("file", a, "--create", "--size", "8M", "--name", "data", "--attach", "none")
    d.plug("file", b, "--create", "--size", "2M", "--name", "ro4k", "--readonly", "--block-size", "4096",
           "--attach", "none")
    d.plug("ram", "--size", "1M", "--name", "volatile", "--attach", "none")
    payload = os.urandom(MiB)
    h = d.nbd("data")
    h.pwrite(payload, 3 * MiB)
    h.flush()
    h.shutdown()
    return payload


def check_back(d, before, payload):
    after = settings(d)
    want = {k: v for k, v in before.items() if k != "volatile"}
    eq(after, want, "disks after restart (RAM disk gone, file disks with the same settings)")
    h = d.nbd("data", tcp=True)
    eq(h.pread(MiB, 3 * MiB) == payload, True, "data of the file disk after restart")
    h.shutdown()


@case("file disks come back after a SIGTERM restart; RAM disks do not")
def t_sigterm(d):
    payload = setup(d)
    before = settings(d)
    d.restart()
    check_back(d, before, payload)
    d.restart()
    check_back(d, before, payload)


@case("file disks come back after kill -9 with their data")
def t_kill9(d):
    payload = setup(d)
    before = settings(d)
    d.restart(kill=True)
    check_back(d, before, payload)


@case("no stale loop devices or FUSE mounts after kill -9 + restart", root=True)
def t_stale(d):
    if not os.path.exists("/dev/loop-control") or not os.path.exists("/dev/fuse"):
        raise Skip("no /dev/loop-control or /dev/fuse")
    f = os.path.join(d.data_dir, "f.img")
    d.plug("file", f, "--create", "--size", "8M", "--name", "f", "--attach", "loop")
    d.plug("ram", "--size", "8M", "--name", "r", "--attach", "loop")
    devs = {x["name"]: x["device"] for x in d.list()}
    check(devs["f"] and devs["r"], "devices: %r" % devs)
    d.restart(kill=True)
    ls = d.list()
    eq([x["name"] for x in ls], ["f"], "disks after kill -9 restart")
    current = {x["device"] for x in ls}
    ours = [(dev, back) for dev, back in loop_devices() if back.startswith(d.base)]
    eq(sorted(dev for dev, _ in ours), sorted(current), "loop devices over our FUSE files (losetup -a)")
    mounts = mounts_under(d.run_dir)
    check(len(mounts) <= 1, "FUSE mounts under the run dir after restart: %r" % mounts)
    d.cli_ok("unplug", "--all")
    eq([dev for dev, back in loop_devices() if back.startswith(d.base)], [], "loop devices after unplug --all")
    d.stop()
    eq(mounts_under(d.run_dir), [], "mounts after stop")


@case("a corrupt bus.json: the daemon refuses to start, says why, keeps the file")
def t_corrupt(d):
    setup(d)
    d.stop()
    path = os.path.join(d.state_dir, "bus.json")
    check(os.path.exists(path), "no bus.json in the state dir")
    for bad in [b"{ this is not json", b'{"version": 99, "disks": []}', b'{"version": 1, "disks": 5}']:
        with open(path, "wb") as f:
            f.write(bad)
        p = d.spawn()
        try:
            rc = p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            fail("vdbusd started with a corrupt bus.json (%r)" % bad)
        check(rc != 0, "vdbusd exited 0 with a corrupt bus.json")
        log = d.log()
        check("bus.json" in log.splitlines()[-1] or "bus.json" in log[-2000:], "the message does not name bus.json")
        with open(path, "rb") as f:
            eq(f.read(), bad, "bus.json after the refused start")
        check(not os.path.exists(d.sock), "control socket left by a refused start")
    d.log_checked = len(d.log())
    os.unlink(path)
    d.start()
    eq(d.list(), [], "empty bus after moving bus.json away")


@case("a second daemon on the same run dir is refused; the first keeps working")
def t_second(d):
    d.plug("ram", "--size", "1M", "--name", "one", "--attach", "none")
    port = free_port()
    args = [a if not a.startswith("tcp:") else "tcp:127.0.0.1:%d" % port for a in d.args()]
    args = [a if not a.startswith("unix:") else "unix:" + os.path.join(d.base, "nbd2.sock") for a in args]
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    check(p.returncode != 0, "a second vdbusd on the same run dir started")
    check("already running" in p.stdout, "message: %r" % p.stdout)
    eq([x["name"] for x in d.list()], ["one"], "first daemon still answers")
    check(os.path.exists(d.sock), "the first daemon's socket was removed")
    h = d.nbd("one")
    h.pread(512, 0)
    h.shutdown()


if __name__ == "__main__":
    main()
