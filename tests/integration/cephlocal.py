"""cephlocal — a throwaway single-node Ceph cluster for tests.

One mon and one memstore OSD (no mgr), on loopback, everything (config,
keyrings, mon and OSD data, logs, sockets, pid files) in one temporary
directory, cephx on, private ports per cluster.  The mon commands go
through one python3-rados client (much faster than `ceph` CLI calls).

    c = Cluster().start()       # ~3-8 s
    c.conf, c.keyring           # for clients (client.admin)
    c.create_image("img", 64 << 20)
    c.stop_osd(); c.start_osd() # SIGTERM keeps memstore's data
    c.destroy()                 # SIGKILL everything, remove the directory

Facts this follows: ../shared/notes/ceph-local.md (the project's notes).
Needs Debian's ceph-mon, ceph-osd, ceph-common, python3-rados, python3-rbd
(and /usr/bin/python3).  Any failure to start is an exception (a test
failure, not a skip).
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

CEPH_BINS = ("ceph-mon", "ceph-osd", "ceph-authtool", "monmaptool", "rbd")


class CephError(Exception):
    pass


def available():
    """None when the Ceph packages are there, else what is missing."""
    missing = [b for b in CEPH_BINS if not shutil.which(b)]
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        missing.append("python3-rados/python3-rbd")
    return ", ".join(missing) if missing else None


def _port_free(p):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _pick_ports(n=48):
    """A base port with n free ports after it (mon v2, v1, then the OSD's)."""
    rnd = random.Random(os.getpid() ^ int(time.time() * 1000))
    for _ in range(200):
        base = rnd.randrange(20000, 60000 - n)
        if all(_port_free(base + i) for i in range(0, n, 4)) and _port_free(base + 1):
            return base
    raise CephError("no free port range found")


def _run(cmd, timeout=30):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise CephError("%s: exit %d: %s" % (" ".join(cmd), p.returncode,
                                             (p.stderr or p.stdout)[-1500:]))
    return p.stdout


class Cluster:
    def __init__(self, memstore_bytes=1 << 30, op_timeout=20):
        self.dir = tempfile.mkdtemp(prefix="vdbt-ceph-", dir="/tmp")
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.keyring = os.path.join(self.dir, "client.admin.keyring")
        self.fsid = str(uuid.uuid4())
        self.osd_uuid = str(uuid.uuid4())
        self.port = _pick_ports()
        self.memstore_bytes = memstore_bytes
        self.op_timeout = op_timeout
        self.procs = {}   # "mon" / "osd" -> Popen
        self._client = None

    # ---- set-up
    def _write_conf(self):
        d, p = self.dir, self.port
        for sub in ("run", "log", "crash", "mon", "osd/ceph-0"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write("""[global]
fsid = %(fsid)s
mon host = [v2:127.0.0.1:%(p0)d,v1:127.0.0.1:%(p1)d]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind port min = %(p2)d
ms bind port max = %(p3)d
ms bind retry delay = 1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = %(d)s/client.admin.keyring
run dir = %(d)s/run
admin socket = %(d)s/run/$cluster-$name.$pid.asok
pid file = %(d)s/run/$name.pid
log file = %(d)s/log/$name.log
mon cluster log file = %(d)s/log/cluster.log
crash dir = %(d)s/crash
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon mgr mkfs grace = 1000000
mon warn on pool no redundancy = false
paxos propose interval = 0.05
paxos min wait = 0.01

[mon]
mon data = %(d)s/mon/$cluster-$id
keyring = %(d)s/mon/$cluster-$id/keyring

[osd]
osd data = %(d)s/osd/$cluster-$id
keyring = %(d)s/osd/$cluster-$id/keyring
osd objectstore = memstore
osd fast shutdown = false
memstore device bytes = %(mem)d
osd max object name len = 256
osd max object namespace len = 64
""" % dict(fsid=self.fsid, p0=p, p1=p + 1, p2=p + 2, p3=p + 47, d=d, mem=self.memstore_bytes))

    def _keys(self):
        d = self.dir
        monkr = os.path.join(d, "mon.keyring")
        _run(["ceph-authtool", "--create-keyring", monkr, "--gen-key", "-n", "mon.",
              "--cap", "mon", "allow *"])
        _run(["ceph-authtool", "--create-keyring", self.keyring, "--gen-key", "-n", "client.admin",
              "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mds", "allow *",
              "--cap", "mgr", "allow *"])
        _run(["ceph-authtool", monkr, "--import-keyring", self.keyring])
        self.osd_key = _run(["ceph-authtool", "--gen-print-key"]).strip()
        with open(os.path.join(d, "osd/ceph-0/keyring"), "w") as f:
            f.write("[osd.0]\n\tkey = %s\n" % self.osd_key)
        _run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
              "[v2:127.0.0.1:%d,v1:127.0.0.1:%d]" % (self.port, self.port + 1),
              os.path.join(d, "monmap")])
        return monkr

    def _spawn(self, what, cmd):
        log = open(os.path.join(self.dir, "log", what + ".out"), "a")
        self.procs[what] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start(self, timeout=60):
        try:
            self._start(timeout)
        except BaseException:
            self.destroy()
            raise
        return self

    def _start(self, timeout):
        t0 = time.time()
        self._write_conf()
        self._start_watchdog()
        monkr = self._keys()
        osd_mkfs = subprocess.Popen(
            ["ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid,
             "--no-mon-config"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        _run(["ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap",
              os.path.join(self.dir, "monmap"), "--keyring", monkr])
        try:
            out, _ = osd_mkfs.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            osd_mkfs.kill()
            raise CephError("ceph-osd --mkfs did not finish in 60 s")
        if osd_mkfs.returncode != 0:
            raise CephError("ceph-osd --mkfs: exit %d: %s" % (osd_mkfs.returncode, out[-1500:]))
        self._spawn("mon", ["ceph-mon", "-f", "-c", self.conf, "-i", "a"])
        c = self.client()
        self.mon_command({"prefix": "osd new", "uuid": self.osd_uuid, "id": 0},
                         inbuf=json.dumps({"cephx_secret": self.osd_key}).encode())
        self.start_osd(wait=False)
        self.mon_command({"prefix": "osd pool create", "pool": "rbd", "pg_num": 8, "pgp_num": 8})
        self.wait_osd_up(True, timeout - (time.time() - t0))
        self.mon_command({"prefix": "osd pool application enable", "pool": "rbd", "app": "rbd"})
        import rbd
        with c.open_ioctx("rbd") as io:
            try:
                rbd.RBD().pool_init(io, True)
            except AttributeError:
                pass
        self.start_seconds = time.time() - t0

    def _start_watchdog(self):
        """A process that SIGKILLs this cluster's daemons (found by their
        command line naming our config file) and removes the directory if
        the test process dies without destroy()."""
        code = r"""
import os, shutil, signal, sys, time
parent, conf, d = int(sys.argv[1]), sys.argv[2], sys.argv[3]
while os.path.exists(d):
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    time.sleep(1)
else:
    sys.exit(0)
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if conf.encode() in args and args[0].split(b"/")[-1] in (b"ceph-mon", b"ceph-osd"):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
time.sleep(1)
shutil.rmtree(d, ignore_errors=True)
"""
        self.watchdog = subprocess.Popen(["/usr/bin/python3", "-c", code, str(os.getpid()),
                                          self.conf, self.dir], stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    # ---- the admin client
    def client(self):
        if self._client is None:
            import rados
            c = rados.Rados(conffile=self.conf, conf={
                "keyring": self.keyring, "client_mount_timeout": "30",
                "rados_mon_op_timeout": str(self.op_timeout),
                "rados_osd_op_timeout": str(self.op_timeout),
                "log_file": os.path.join(self.dir, "log", "client.test.log")})
            deadline = time.time() + 30
            while True:
                try:
                    c.connect(timeout=10)
                    break
                except Exception as e:  # the mon may still be starting
                    if time.time() > deadline:
                        raise CephError("cannot connect to the test cluster's mon: %s\n%s" %
                                        (e, self.log_tail("mon")))
                    time.sleep(0.2)
            self._client = c
        return self._client

    def mon_command(self, cmd, inbuf=b"", timeout=None):
        ret, out, err = self.client().mon_command(json.dumps(cmd), inbuf,
                                                  timeout=timeout or self.op_timeout)
        if ret < 0:
            raise CephError("mon command %s: %d %s" % (cmd.get("prefix"), ret, err))
        return out

    def osd_up(self):
        out = self.mon_command({"prefix": "osd stat", "format": "json"})
        st = json.loads(out)
        st = st.get("osdmap", st)
        return st.get("num_up_osds", 0) >= 1

    def wait_osd_up(self, up=True, timeout=60):
        deadline = time.time() + max(timeout, 5)
        while time.time() < deadline:
            if self.osd_up() == up:
                return
            if up and self.procs.get("osd") and self.procs["osd"].poll() is not None:
                raise CephError("ceph-osd exited with %d:\n%s" %
                                (self.procs["osd"].returncode, self.log_tail("osd.0")))
            time.sleep(0.2)
        raise CephError("the OSD is not %s after %ds:\n%s" % ("up" if up else "down", timeout,
                                                            self.log_tail("osd.0")))

    # ---- images
    def ioctx(self, pool="rbd"):
        return self.client().open_ioctx(pool)

    def create_image(self, name, size, pool="rbd"):
        import rbd
        with self.ioctx(pool) as io:
            rbd.RBD().create(io, name, size, old_format=False,
                             features=rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK |
                             rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)

    def image_size(self, name, pool="rbd"):
        import rbd
        with self.ioctx(pool) as io:
            with rbd.Image(io, name, read_only=True) as im:
                return im.size()

    def snaps(self, name, pool="rbd"):
        import rbd
        with self.ioctx(pool) as io:
            with rbd.Image(io, name, read_only=True) as im:
                return [s["name"] for s in im.list_snaps()]

    def rbd_cli(self, *args, timeout=60):
        """The rbd command line tool against this cluster."""
        return _run(["rbd", "-c", self.conf, "--keyring", self.keyring] + list(args),
                    timeout=timeout)

    # ---- daemons
    def start_osd(self, wait=True):
        self._spawn("osd", ["ceph-osd", "-f", "-c", self.conf, "-i", "0"])
        if wait:
            self.wait_osd_up(True)

    def stop_osd(self, timeout=60):
        """SIGTERM (memstore writes its store, so a restart has the data)."""
        p = self.procs.get("osd")
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                raise CephError("ceph-osd did not stop within %ds of SIGTERM" % timeout)

    def kill_osd(self):
        p = self.procs.get("osd")
        if p and p.poll() is None:
            p.kill()
            p.wait(10)

    def log_tail(self, name, n=30):
        for path in (os.path.join(self.dir, "log", name + ".log"),
                     os.path.join(self.dir, "log", name.split(".")[0] + ".out")):
            try:
                with open(path, errors="replace") as f:
                    return "".join("    | " + l for l in f.readlines()[-n:])
            except OSError:
                continue
        return "    (no log)"

    def destroy(self):
        """SIGKILL the daemons (by their Popen objects: our own children),
        check they are gone, remove the directory."""
        if self._client is not None:
            try:
                self._client.shutdown()
            except Exception:
                pass
            self._client = None
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = {}
        shutil.rmtree(self.dir, ignore_errors=True)
        if getattr(self, "watchdog", None):
            try:
                self.watchdog.wait(5)  # it sees the directory gone
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
            self.watchdog = None
