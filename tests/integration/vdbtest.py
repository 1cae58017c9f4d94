"""vdbtest — helpers for the vdbus integration tests.

* Daemon: a vdbusd in a fresh temporary run/state directory (foreground, -v,
  logging to a file, NBD on a Unix socket and on TCP 127.0.0.1:<free port>);
  start/stop/kill -9/restart; the CLI as (rc, stdout, stderr); a check that
  ASan/UBSan printed nothing.
* A tiny test-case registry printing TAP-like lines:
      ok N - name / not ok N - name / ok N - name # SKIP reason
  and a summary; exit 0 when nothing failed, 1 otherwise.
* RawNBD: a raw NBD protocol client (socket + struct) for what libnbd cannot
  send (unknown options and commands, extended headers, garbage).

Run with Debian's /usr/bin/python3 (the `nbd` module is python3-libnbd).
VDBUS_BUILD selects the build directory (default "build").
"""
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("VDBUS_BUILD", "build")
if not os.path.isabs(BUILD):
    BUILD = os.path.join(ROOT, BUILD)
VDBUSD = os.path.join(BUILD, "vdbusd")
VDBUS = os.path.join(BUILD, "vdbus")
PY = "/usr/bin/python3"

# Debian's python3 first: /usr/bin/nbdsh runs the first python3 on PATH.
os.environ["PATH"] = "/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", "")
os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
os.environ.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")

SANITIZER_PATTERNS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                      "AddressSanitizer:DEADLYSIGNAL", "ThreadSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


class Skip(Exception):
    """Raise to skip the current test case with a reason."""


class TestFailure(AssertionError):
    pass


def fail(msg):
    raise TestFailure(msg)


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def _short(v, n=300):
    r = repr(v)
    return r if len(r) <= n else r[:n] + "...(%d chars)" % len(r)


def eq(got, want, what=""):
    if got != want:
        raise TestFailure("%s: expected %s, got %s" % (what or "value", _short(want), _short(got)))


def is_root():
    return os.geteuid() == 0


def have(prog):
    return shutil.which(prog) is not None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run(cmd, timeout=120, check_rc=None, input=None, env=None, cwd=None):
    """Run a command; returns (rc, stdout, stderr) as text."""
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, input=input, env=env, cwd=cwd, text=True, errors="replace")
    if check_rc is not None and p.returncode != check_rc:
        fail("%s: exit %d (want %d)\nstdout: %s\nstderr: %s" %
             (" ".join(map(str, cmd)), p.returncode, check_rc, p.stdout[-2000:], p.stderr[-2000:]))
    return p.returncode, p.stdout, p.stderr


def run_ok(cmd, timeout=120, input=None):
    return run(cmd, timeout=timeout, check_rc=0, input=input)[1]


def sanitizer_errors(text):
    return [l for l in text.splitlines() if any(p in l for p in SANITIZER_PATTERNS)]


class DaemonError(Exception):
    pass


_live_daemons = []


class Daemon:
    """A vdbusd in its own temporary directory.

    extra: more daemon options; tcp/unix: NBD listeners."""

    def __init__(self, extra=(), tcp=True, unix=True, start=True, base=None):
        self.base = base or tempfile.mkdtemp(prefix="vdbt-", dir="/tmp")
        self.run_dir = os.path.join(self.base, "run")
        self.state_dir = os.path.join(self.base, "state")
        self.data_dir = os.path.join(self.base, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        self.sock = os.path.join(self.run_dir, "vdbus.sock")
        self.nbd_sock = os.path.join(self.run_dir, "nbd.sock")
        self.port = free_port() if tcp else None
        self.tcp = tcp
        self.unix = unix
        self.extra = list(extra)
        self.log_path = os.path.join(self.base, "daemon.log")
        self.proc = None
        self.starts = 0
        self.log_checked = 0  # offset up to which the log was checked
        _live_daemons.append(self)
        if start:
            self.start()

    # -- life cycle
    def args(self):
        a = [VDBUSD, "-f", "-v", "--run-dir", self.run_dir, "--state-dir", self.state_dir]
        if self.unix:
            a += ["--nbd-listen", "unix:" + self.nbd_sock]
        if self.tcp:
            a += ["--nbd-listen", "tcp:127.0.0.1:%d" % self.port]
        if not self.unix and not self.tcp:
            a += ["--nbd-listen", "none"]
        return a + self.extra

    def spawn(self, extra=()):
        """Start a vdbusd process on this directory without waiting."""
        self.starts += 1
        with open(self.log_path, "a") as f:
            f.write("=== vdbtest: start #%d: %s\n" % (self.starts, " ".join(self.args() + list(extra))))
        log = open(self.log_path, "a")
        p = subprocess.Popen(self.args() + list(extra), stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, close_fds=True)
        log.close()
        return p

    def start(self, timeout=30):
        if self.proc and self.proc.poll() is None:
            raise DaemonError("daemon already running")
        self.proc = self.spawn()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise DaemonError("vdbusd exited with %d at start-up:\n%s" %
                                  (self.proc.returncode, self.log_tail()))
            try:
                self.control("hello")
                return self
            except (OSError, ValueError):
                time.sleep(0.05)
        raise DaemonError("vdbusd not ready after %ds:\n%s" % (timeout, self.log_tail()))

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=60, check_clean=True):
        """SIGTERM; wait; check exit code 0 and no sanitizer output."""
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                fail("vdbusd did not stop within %ds of SIGTERM:\n%s" % (timeout, self.log_tail()))
        rc = self.proc.returncode
        self.proc = None
        if check_clean:
            self.check_log()
            if rc != 0:
                fail("vdbusd exited with %d after SIGTERM (want 0)" % rc)
        return rc

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
        with open(self.log_path, "a") as f:
            f.write("=== vdbtest: killed with SIGKILL\n")

    def restart(self, kill=False):
        if kill:
            self.kill9()
        else:
            self.stop()
        return self.start()

    def check_log(self):
        """Fail if ASan/UBSan printed anything since the last check."""
        text = self.log()
        new = text[self.log_checked:]
        self.log_checked = len(text)
        errs = sanitizer_errors(new)
        if errs:
            fail("sanitizer errors in the daemon log %s:\n  %s" % (self.log_path, "\n  ".join(errs[:10])))

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, n=80):
        lines = self.log().splitlines()
        return "\n".join("    | " + l for l in lines[-n:])

    def cleanup(self):
        """Kill the daemon if needed; remove leftovers (mounts, loops) and the directory."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
        cleanup_leftovers(self.base)
        shutil.rmtree(self.base, ignore_errors=True)
        if self in _live_daemons:
            _live_daemons.remove(self)

    # -- control
    def control(self, op, args=None, timeout=30):
        """One request on the control socket; returns the decoded reply."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.sock)
            req = {"vdbus": 1, "op": op, "args": args or {}}
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ValueError("control socket closed without a reply")
                buf += chunk
        finally:
            s.close()
        return json.loads(buf)

    def cli(self, *args, env=None, timeout=45, socket_opt=True, cwd=None):
        """Run `vdbus --socket SOCK ARGS...`; returns (rc, stdout, stderr)."""
        cmd = [VDBUS] + (["--socket", self.sock] if socket_opt else []) + [str(a) for a in args]
        e = dict(os.environ)
        if env:
            e.update(env)
        rc, out, err = run(cmd, timeout=timeout, env=e, cwd=cwd)
        errs = sanitizer_errors(err)
        if errs:
            fail("sanitizer errors from %s:\n%s" % (" ".join(cmd), err[-3000:]))
        return rc, out, err

    def cli_ok(self, *args, **kw):
        rc, out, err = self.cli(*args, **kw)
        if rc != 0:
            fail("vdbus %s: exit %d\nstderr: %s" % (" ".join(map(str, args)), rc, err.strip()))
        return out

    def plug(self, *args):
        """vdbus plug ARGS; returns the disk name."""
        return self.cli_ok("plug", *args).strip()

    def list(self):
        return json.loads(self.cli_ok("list", "--json"))

    def disk(self, name):
        for d in self.list():
            if d["name"] == name:
                return d
        return None

    def info(self, name):
        return json.loads(self.cli_ok("info", name, "--json"))

    # -- NBD
    def uri(self, name, tcp=False):
        if tcp:
            return "nbd://127.0.0.1:%d/%s" % (self.port, name)
        return "nbd+unix:///%s?socket=%s" % (name, self.nbd_sock)

    def nbd(self, name, tcp=False, structured=True, strict=True):
        """A connected libnbd handle."""
        import nbd
        h = nbd.NBD()
        if not structured:
            h.set_request_structured_replies(False)
        h.set_export_name(name)
        h.add_meta_context("base:allocation")
        if tcp:
            h.connect_tcp("127.0.0.1", str(self.port))
        else:
            h.connect_unix(self.nbd_sock)
        if not strict:
            h.set_strict_mode(0)
        return h

    def raw(self, tcp=False, timeout=10):
        if tcp:
            return RawNBD(host="127.0.0.1", port=self.port, timeout=timeout)
        return RawNBD(path=self.nbd_sock, timeout=timeout)


def cleanup_leftovers(base):
    """Unmount FUSE mounts and detach loop devices under base (after kill -9)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [l.split()[1] for l in f]
    except OSError:
        mounts = []
    for m in reversed(mounts):
        m = m.replace("\\040", " ")
        if m.startswith(base):
            subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
    for dev, backing in loop_devices():
        if backing.startswith(base):
            subprocess.run(["losetup", "-d", dev], stderr=subprocess.DEVNULL)


def loop_devices():
    """[(device, backing file)] from losetup."""
    try:
        p = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    out = []
    for line in p.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            out.append((parts[0], parts[1].strip().replace(" (deleted)", "")))
    return out


def mounts_under(prefix):
    with open("/proc/mounts") as f:
        return [l for l in f if l.split()[1].startswith(prefix) or l.split()[0].startswith(prefix)]


# ---------------------------------------------------------------- registry

_cases = []


def case(name=None, daemon=True, extra=(), tcp=True, unix=True, timeout=180, root=False):
    """Register a test case.  The function gets a fresh Daemon (or None with
    daemon=False); after it returns, the daemon is stopped with SIGTERM and must
    exit 0 with a clean log."""
    def deco(fn):
        _cases.append(dict(name=name or fn.__name__, fn=fn, daemon=daemon, extra=extra,
                           tcp=tcp, unix=unix, timeout=timeout, root=root))
        return fn
    return deco


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("test case timed out")


def _comment(text):
    for line in str(text).splitlines():
        print("# " + line)


def main():
    """Run the registered cases (optionally only those whose names contain argv[1])."""
    only = sys.argv[1] if len(sys.argv) > 1 else None
    cases = [c for c in _cases if not only or only in c["name"]]
    if not os.path.exists(VDBUSD) or not os.path.exists(VDBUS):
        print("1..0 # SKIP no vdbusd/vdbus in %s (build first)" % BUILD)
        sys.exit(77)
    print("1..%d" % len(cases))
    sys.stdout.flush()
    nfail = nskip = 0
    signal.signal(signal.SIGALRM, _alarm)
    for i, c in enumerate(cases, 1):
        d = None
        status, reason = "ok", ""
        t0 = time.time()
        try:
            if c["root"] and not is_root():
                raise Skip("needs root")
            signal.alarm(c["timeout"])
            try:
                if c["daemon"]:
                    d = Daemon(extra=c["extra"], tcp=c["tcp"], unix=c["unix"])
                    c["fn"](d)
                    d.stop()
                else:
                    c["fn"]()
            finally:
                signal.alarm(0)
        except Skip as e:
            status, reason = "skip", str(e)
        except BaseException as e:  # noqa: B902 — report everything
            if isinstance(e, KeyboardInterrupt):
                raise
            status = "fail"
            _comment("case '%s' failed after %.1fs:" % (c["name"], time.time() - t0))
            _comment("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip())
            if d is not None:
                _comment("daemon log (%s):\n%s" % (d.log_path, d.log_tail(200)))
        finally:
            if d is not None:
                if status == "fail" and d.running():
                    try:
                        d.stop(timeout=20, check_clean=False)
                    except BaseException:
                        pass
                d.cleanup()
        if status == "ok":
            print("ok %d - %s" % (i, c["name"]))
        elif status == "skip":
            nskip += 1
            print("ok %d - %s # SKIP %s" % (i, c["name"], reason))
        else:
            nfail += 1
            print("not ok %d - %s" % (i, c["name"]))
        sys.stdout.flush()
    for d in list(_live_daemons):
        d.cleanup()
    print("# %s: %d passed, %d failed, %d skipped" %
          (os.path.basename(sys.argv[0]), len(cases) - nfail - nskip, nfail, nskip))
    sys.exit(1 if nfail else 0)


# ---------------------------------------------------------------- raw NBD

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9
REP_ERR_EXT_HEADER_REQD = REP_ERR | 10

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1
CMD_FLAG_NO_HOLE = 2
CMD_FLAG_DF = 4
CMD_FLAG_REQ_ONE = 8
CMD_FLAG_FAST_ZERO = 16

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

TFLAG_HAS_FLAGS = 1
TFLAG_READ_ONLY = 2
TFLAG_SEND_FLUSH = 4
TFLAG_SEND_FUA = 8
TFLAG_ROTATIONAL = 16
TFLAG_SEND_TRIM = 32
TFLAG_SEND_WRITE_ZEROES = 64
TFLAG_SEND_DF = 128
TFLAG_CAN_MULTI_CONN = 256

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108


class Reply:
    """A transmission reply (simple, structured chunk or extended chunk)."""

    def __init__(self, kind, handle, error=0, flags=0, type=0, offset=None, payload=b""):
        self.kind, self.handle, self.error = kind, handle, error
        self.flags, self.type, self.offset, self.payload = flags, type, offset, payload

    @property
    def done(self):
        return self.kind == "simple" or bool(self.flags & REPLY_FLAG_DONE)

    def chunk_error(self):
        if self.kind != "simple" and self.type & (1 << 15) and len(self.payload) >= 4:
            return struct.unpack(">I", self.payload[:4])[0]
        return self.error

    def __repr__(self):
        return "Reply(%s handle=%d error=%d flags=%d type=%d offset=%r len=%d)" % (
            self.kind, self.handle, self.error, self.flags, self.type, self.offset, len(self.payload))


class RawNBD:
    """A raw NBD client: builds every message by hand."""

    def __init__(self, path=None, host=None, port=None, timeout=10):
        if path:
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.s.settimeout(timeout)
            self.s.connect(path)
        else:
            self.s = socket.create_connection((host, port), timeout=timeout)
        self.extended = False
        self.structured = False
        self.size = None
        self.tflags = None

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def send(self, data):
        self.s.sendall(data)

    def recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError("server closed the connection after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return buf

    def closed_by_server(self, timeout=5):
        """True if the server closes the connection (EOF or reset) within timeout.
        Any bytes received before are discarded."""
        self.s.settimeout(timeout)
        try:
            while True:
                chunk = self.s.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    # -- handshake
    def greeting(self):
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            fail("bad greeting: %#x %#x" % (magic, opt))
        self.hflags = flags
        return flags

    def client_flags(self, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        self.send(struct.pack(">I", flags))

    def handshake(self, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        f = self.greeting()
        self.client_flags(flags)
        return f

    def send_option(self, opt, data=b"", length=None):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length) + data)

    def recv_option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != OPT_REPLY_MAGIC:
            fail("bad option reply magic %#x" % magic)
        data = self.recv_exact(length) if length else b""
        return opt, rtype, data

    def option(self, opt, data=b""):
        """Send an option and collect replies up to the final one (ACK or error).
        Returns (final reply type, [(type, data) of all replies])."""
        self.send_option(opt, data)
        replies = []
        while True:
            ropt, rtype, rdata = self.recv_option_reply()
            if ropt != opt:
                fail("option reply for option %d, sent %d" % (ropt, opt))
            replies.append((rtype, rdata))
            if rtype == REP_ACK or rtype & REP_ERR:
                return rtype, replies

    @staticmethod
    def go_payload(name, infos=()):
        n = name.encode()
        return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + \
            b"".join(struct.pack(">H", i) for i in infos)

    def go(self, name, infos=(), opt=OPT_GO):
        """NBD_OPT_GO (or INFO): returns the final reply type; sets size/tflags."""
        rtype, replies = self.option(opt, self.go_payload(name, infos))
        self.infos = {}
        for t, data in replies:
            if t == REP_INFO and len(data) >= 2:
                itype = struct.unpack(">H", data[:2])[0]
                self.infos[itype] = data[2:]
                if itype == INFO_EXPORT and len(data) == 12:
                    self.size, self.tflags = struct.unpack(">QH", data[2:])
        return rtype

    def export_name(self, name):
        """NBD_OPT_EXPORT_NAME (no reply header; size + flags [+ zeroes])."""
        self.send_option(OPT_EXPORT_NAME, name.encode())
        self.size, self.tflags = struct.unpack(">QH", self.recv_exact(10))
        return self.size, self.tflags

    # -- transmission
    def request(self, cmd, handle, offset=0, length=0, flags=0, data=b""):
        if self.extended:
            self.send(struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, flags, cmd, handle, offset, length) + data)
        else:
            self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + data)

    def recv_reply(self, read_len=0):
        """One reply message.  read_len: payload length of a simple read reply."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            payload = self.recv_exact(read_len) if (read_len and error == 0) else b""
            return Reply("simple", handle, error=error, payload=payload)
        if magic == STRUCTURED_REPLY_MAGIC:
            flags, rtype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length) if length else b""
            r = Reply("structured", handle, flags=flags, type=rtype, payload=payload)
            r.error = r.chunk_error()
            return r
        if magic == EXT_REPLY_MAGIC:
            flags, rtype, handle, offset, length = struct.unpack(">HHQQQ", self.recv_exact(28))
            payload = self.recv_exact(length) if length else b""
            r = Reply("extended", handle, flags=flags, type=rtype, offset=offset, payload=payload)
            r.error = r.chunk_error()
            return r
        fail("bad reply magic %#x" % magic)

    def recv_all_chunks(self, read_len=0):
        """Replies until the one with DONE (or a simple reply)."""
        out = []
        while True:
            r = self.recv_reply(read_len)
            out.append(r)
            if r.done:
                return out

    def cmd(self, cmd, handle=1, offset=0, length=0, flags=0, data=b""):
        """Send a request, return (error, data, chunks) once it is complete."""
        self.request(cmd, handle, offset, length, flags, data)
        chunks = self.recv_all_chunks(read_len=length if cmd == CMD_READ else 0)
        err = 0
        buf = bytearray()
        for c in chunks:
            if c.handle != handle:
                fail("reply for handle %d, expected %d" % (c.handle, handle))
            if c.error:
                err = c.error
            if c.kind == "simple":
                buf += c.payload
            elif c.type == REPLY_TYPE_OFFSET_DATA:
                off = struct.unpack(">Q", c.payload[:8])[0] - offset
                if len(buf) < off + len(c.payload) - 8:
                    buf += bytes(off + len(c.payload) - 8 - len(buf))
                buf[off:off + len(c.payload) - 8] = c.payload[8:]
            elif c.type == REPLY_TYPE_OFFSET_HOLE:
                off, hlen = struct.unpack(">QI", c.payload[:12])
                off -= offset
                if len(buf) < off + hlen:
                    buf += bytes(off + hlen - len(buf))
        return err, bytes(buf), chunks

    def disconnect(self):
        self.request(CMD_DISC, 0xD15C)
        self.close()


def connect_raw_go(d, name, tcp=False, structured=False, extended=False):
    """A RawNBD in transmission phase on export name."""
    r = d.raw(tcp=tcp)
    r.handshake()
    if extended:
        t, _ = r.option(OPT_EXTENDED_HEADERS)
        eq(t, REP_ACK, "NBD_OPT_EXTENDED_HEADERS reply")
        r.extended = True
    elif structured:
        t, _ = r.option(OPT_STRUCTURED_REPLY)
        eq(t, REP_ACK, "NBD_OPT_STRUCTURED_REPLY reply")
        r.structured = True
    t = r.go(name)
    eq(t, REP_ACK, "NBD_OPT_GO reply for %r" % name)
    return r


def sha256_file(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wait_for(pred, timeout=10, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    fail("timed out after %ss waiting for %s" % (timeout, what))


def nbd_error_errno(e):
    """The errno of an nbd.Error, as a number (python3-libnbd 1.14 gives a
    name such as "EINVAL")."""
    return getattr(errno, e.errno, e.errno) if isinstance(e.errno, str) else e.errno


def nbd_errno(fn, *args, **kw):
    """Call fn; return the errno of the nbd.Error it raises (fail if it succeeds)."""
    import nbd
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        return nbd_error_errno(e)
    fail("%s%r succeeded, expected an error" % (getattr(fn, "__name__", fn), args))


def pattern(seed, n):
    """n deterministic bytes for seed (chained SHA-256)."""
    import hashlib
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])
