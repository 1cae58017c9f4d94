#!/usr/bin/python3
"""Helper for bench/run: one measured fio run, and the final report.

  benchlib.py measure --tsv FILE --pid PID --rep N --workload W --pair P --side S
                      --unit iops|MiB/s -- fio ARGS...
      Runs fio (adding --output-format=json --output=TMP), samples the
      server's utime+stime from /proc/PID/stat before and after, takes the
      client's CPU from wait4() rusage (fio and its job processes), and
      appends one TSV row to FILE.

  benchlib.py report --tsv FILE [--title T] [--pair-label L]
      Prints the markdown table (medians of the interleaved reps).
      (measure takes --pid more than once to sum several server processes.)

  benchlib.py mem-fill --tsv FILE --pid PID --side S --phase P -- fio ARGS...
  benchlib.py mem-trim --tsv FILE --pid PID --side S --phase P --uri URI --length L [--offset O]
      RSS (smaps_rollup Rss/Anonymous) of PID before and after a fio write run
      (bytes from fio's io_bytes) or a trim (python3-libnbd); one TSV row each.
  benchlib.py mem-plug --tsv FILE --pid PID --side S --phase P --rss0 B --anon0 B
      a row for a plug: RSS sampled earlier (rss subcommand) vs now
  benchlib.py mem-report --tsv FILE      the memory table
  benchlib.py rss --pid PID              prints "RSS ANON" in bytes
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TCK = os.sysconf("SC_CLK_TCK")
COLS = ["rep", "workload", "pair", "side", "value", "unit", "ios", "wall_s",
        "server_cpu_s", "client_cpu_s", "fio_usr_pct", "fio_sys_pct"]


def proc_cpu(pid):
    """utime+stime of a whole process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / TCK


def measure(a, fio_args):
    fd, out = tempfile.mkstemp(prefix="fio-", suffix=".json")
    os.close(fd)
    try:
        cmd = ["fio"] + fio_args + ["--output-format=json", f"--output={out}"]
        c0 = sum(proc_cpu(x) for x in a.pid)
        t0 = time.monotonic()
        p = subprocess.Popen(cmd)
        _, status, ru = os.wait4(p.pid, 0)
        t1 = time.monotonic()
        c1 = sum(proc_cpu(x) for x in a.pid)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            sys.stderr.write(f"benchlib: fio failed ({p.returncode}): {' '.join(cmd)}\n")
            try:
                sys.stderr.write(open(out).read()[-2000:])
            except OSError:
                pass
            return 1
        with open(out) as f:
            txt = f.read()
        # fio may print notes before the JSON object
        d = json.loads(txt[txt.index("{"):])
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass
    j = d["jobs"][0]
    if j.get("error"):
        sys.stderr.write(f"benchlib: fio job error {j['error']}\n")
        return 1
    ios = j["read"]["total_ios"] + j["write"]["total_ios"]
    if a.unit == "iops":
        value = j["read"]["iops"] + j["write"]["iops"]
    else:  # MiB/s; fio's bw is KiB/s
        value = (j["read"]["bw"] + j["write"]["bw"]) / 1024.0
    row = [a.rep, a.workload, a.pair, a.side, f"{value:.1f}", a.unit, ios,
           f"{t1 - t0:.3f}", f"{c1 - c0:.3f}",
           f"{ru.ru_utime + ru.ru_stime:.3f}",
           f"{j.get('usr_cpu', 0):.2f}", f"{j.get('sys_cpu', 0):.2f}"]
    new = not os.path.exists(a.tsv) or os.path.getsize(a.tsv) == 0
    with open(a.tsv, "a") as f:
        if new:
            f.write("\t".join(COLS) + "\n")
        f.write("\t".join(str(x) for x in row) + "\n")
    srv_us = (c1 - c0) * 1e6 / ios if ios else float("nan")
    cli_us = (ru.ru_utime + ru.ru_stime) * 1e6 / ios if ios else float("nan")
    print(f"  {a.workload:<16} {a.pair:<10} {a.side:<6} {value:>10.1f} {a.unit:<6}"
          f" server {srv_us:6.1f} us/req  client {cli_us:6.1f} us/req", flush=True)
    return 0


def fmt(v, unit):
    return f"{v:,.0f}" if unit == "iops" else f"{v:,.0f}"


def report(a):
    rows = []
    with open(a.tsv) as f:
        hdr = f.readline().rstrip("\n").split("\t")
        for line in f:
            if line.strip():
                rows.append(dict(zip(hdr, line.rstrip("\n").split("\t"))))
    order_w, order_p = [], []
    for r in rows:
        if r["workload"] not in order_w:
            order_w.append(r["workload"])
        if r["pair"] not in order_p:
            order_p.append(r["pair"])
    out = []
    if a.title:
        out.append(a.title)
        out.append("")
    out.append(f"| workload | {a.pair_label} | vdbus (median, min–max) | peer (median, min–max) "
               "| ratio of medians | vdbus CPU µs/req | peer CPU µs/req "
               "| client CPU µs/req (vdbus / peer) |")
    out.append("|---|---|---|---|---|---|---|---|")
    for w in order_w:
        for p in order_p:
            sel = [r for r in rows if r["workload"] == w and r["pair"] == p]
            if not sel:
                continue
            unit = sel[0]["unit"]
            cell, med, cpu, cli = {}, {}, {}, {}
            for side in ("vdbus", "peer"):
                s = [r for r in sel if r["side"] == side]
                if not s:
                    cell[side], med[side], cpu[side], cli[side] = "–", None, "–", "–"
                    continue
                vals = [float(r["value"]) for r in s]
                med[side] = statistics.median(vals)
                cell[side] = (f"{fmt(med[side], unit)} {unit} "
                              f"({fmt(min(vals), unit)}–{fmt(max(vals), unit)})")
                per = [float(r["server_cpu_s"]) * 1e6 / int(r["ios"]) for r in s if int(r["ios"])]
                cpu[side] = f"{statistics.median(per):.1f}" if per else "–"
                per = [float(r["client_cpu_s"]) * 1e6 / int(r["ios"]) for r in s if int(r["ios"])]
                cli[side] = f"{statistics.median(per):.1f}" if per else "–"
            ratio = (f"{med['vdbus'] / med['peer']:.2f}"
                     if med["vdbus"] is not None and med["peer"] else "–")
            out.append(f"| {w} | {p} | {cell['vdbus']} | {cell['peer']} | {ratio} "
                       f"| {cpu['vdbus']} | {cpu['peer']} | {cli['vdbus']} / {cli['peer']} |")
    print("\n".join(out))
    return 0


# ---------------------------------------------------------------- memory (bench/memory)
MEM_COLS = ["side", "phase", "op", "bytes", "rss0", "rss1", "anon0", "anon1", "secs"]
MiB = 1024 * 1024


def proc_rss(pid):
    """(Rss, Anonymous) of a process in bytes, from smaps_rollup (VmRSS fallback)."""
    rss = anon = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == "Rss":
                    rss = int(v.split()[0]) * 1024
                elif k == "Anonymous":
                    anon = int(v.split()[0]) * 1024
    except OSError:
        pass
    if rss is None:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    return rss, anon if anon is not None else 0


def mem_row(a, op, nbytes, r0, r1, secs):
    new = not os.path.exists(a.tsv) or os.path.getsize(a.tsv) == 0
    row = [a.side, a.phase, op, nbytes, r0[0], r1[0], r0[1], r1[1], f"{secs:.2f}"]
    with open(a.tsv, "a") as f:
        if new:
            f.write("\t".join(MEM_COLS) + "\n")
        f.write("\t".join(str(x) for x in row) + "\n")
    print(f"  {a.side:<8} {a.phase:<22} {op:<5} {nbytes / MiB:9.1f} MiB  "
          f"RSS {r0[0] / MiB:9.1f} -> {r1[0] / MiB:9.1f} MiB  ({secs:.1f} s)", flush=True)


def run_fio_json(fio_args):
    """Run fio with JSON output; returns (parsed json, rusage) or None on failure."""
    fd, out = tempfile.mkstemp(prefix="fio-", suffix=".json")
    os.close(fd)
    try:
        cmd = ["fio"] + fio_args + ["--output-format=json", f"--output={out}"]
        p = subprocess.Popen(cmd)
        _, status, ru = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.stderr.write(f"benchlib: fio failed: {' '.join(cmd)}\n")
            try:
                sys.stderr.write(open(out).read()[-2000:])
            except OSError:
                pass
            return None
        with open(out) as f:
            txt = f.read()
        return json.loads(txt[txt.index("{"):]), ru
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass


def mem_fill(a, fio_args):
    r0 = proc_rss(a.pid)
    t0 = time.monotonic()
    res = run_fio_json(fio_args)
    t1 = time.monotonic()
    if res is None:
        return 1
    d, _ = res
    if any(j.get("error") for j in d["jobs"]):
        sys.stderr.write("benchlib: fio job error\n")
        return 1
    nbytes = sum(j["write"]["io_bytes"] for j in d["jobs"])
    time.sleep(a.settle)
    mem_row(a, "write", nbytes, r0, proc_rss(a.pid), t1 - t0)
    return 0


def parse_size(v):
    v = v.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if v and v[-1] in mult:
        return int(float(v[:-1]) * mult[v[-1]])
    return int(v)


def mem_trim(a):
    import nbd  # python3-libnbd, only needed here
    off, length, chunk = parse_size(a.offset), parse_size(a.length), parse_size(a.chunk)
    h = nbd.NBD()
    h.connect_uri(a.uri)
    if not h.can_trim():
        sys.stderr.write(f"benchlib: {a.uri} does not advertise trim\n")
        return 1
    r0 = proc_rss(a.pid)
    t0 = time.monotonic()
    pos, end = off, off + length
    while pos < end:
        n = min(chunk, end - pos)
        h.trim(n, pos)
        pos += n
    h.flush() if h.can_flush() else None
    t1 = time.monotonic()
    h.shutdown()
    time.sleep(a.settle)
    mem_row(a, "trim", length, r0, proc_rss(a.pid), t1 - t0)
    return 0


def mem_plug(a):
    """A row for plugging a disk: RSS --rss0/--anon0 (sampled before) vs now."""
    time.sleep(a.settle)
    mem_row(a, "plug", 0, (a.rss0, a.anon0), proc_rss(a.pid), 0.0)
    return 0


def mem_report(a):
    rows = []
    with open(a.tsv) as f:
        hdr = f.readline().rstrip("\n").split("\t")
        for line in f:
            if line.strip():
                rows.append(dict(zip(hdr, line.rstrip("\n").split("\t"))))
    out = ["| server | phase | data written (+) / trimmed (−) MiB | RSS before MiB | RSS after MiB "
           "| RSS Δ MiB | anon Δ MiB | overhead MiB (RSS Δ − data Δ) | overhead % of data | time s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nb = int(r["bytes"])
        ideal = {"write": nb, "trim": -nb}.get(r["op"], 0)
        d = int(r["rss1"]) - int(r["rss0"])
        da = int(r["anon1"]) - int(r["anon0"])
        over = d - ideal
        pct = f"{over * 100.0 / nb:+.2f}%" if nb else "–"
        out.append(f"| {r['side']} | {r['phase']} | {ideal / MiB:+,.1f} | {int(r['rss0']) / MiB:,.1f} "
                   f"| {int(r['rss1']) / MiB:,.1f} | {d / MiB:+,.1f} | {da / MiB:+,.1f} "
                   f"| {over / MiB:+,.1f} | {pct} | {r['secs']} |")
    print("\n".join(out))
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    for o in ("--tsv", "--workload", "--pair", "--side", "--unit"):
        m.add_argument(o, required=True)
    m.add_argument("--pid", type=int, action="append", required=True,
                   help="server pid; repeat to sum several processes")
    m.add_argument("--rep", type=int, required=True)
    r = sub.add_parser("report")
    r.add_argument("--tsv", required=True)
    r.add_argument("--title", default="")
    r.add_argument("--pair-label", default="pair", help="header of the pair column")
    for name in ("mem-fill", "mem-trim", "mem-plug"):
        x = sub.add_parser(name)
        x.add_argument("--tsv", required=True)
        x.add_argument("--pid", type=int, required=True)
        x.add_argument("--side", required=True)
        x.add_argument("--phase", required=True)
        x.add_argument("--settle", type=float, default=1.0,
                       help="seconds to wait before the second RSS sample")
        if name == "mem-trim":
            x.add_argument("--uri", required=True)
            x.add_argument("--offset", default="0")
            x.add_argument("--length", required=True)
            x.add_argument("--chunk", default="64M")
        if name == "mem-plug":
            x.add_argument("--rss0", type=int, required=True)
            x.add_argument("--anon0", type=int, required=True)
    x = sub.add_parser("mem-report")
    x.add_argument("--tsv", required=True)
    x = sub.add_parser("rss")
    x.add_argument("--pid", type=int, required=True)
    argv = sys.argv[1:]
    fio_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, fio_args = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    if a.cmd == "measure":
        return measure(a, fio_args)
    if a.cmd == "mem-fill":
        return mem_fill(a, fio_args)
    if a.cmd == "mem-trim":
        return mem_trim(a)
    if a.cmd == "mem-plug":
        return mem_plug(a)
    if a.cmd == "mem-report":
        return mem_report(a)
    if a.cmd == "rss":
        print(*proc_rss(a.pid))
        return 0
    return report(a)


if __name__ == "__main__":
    sys.exit(main())
