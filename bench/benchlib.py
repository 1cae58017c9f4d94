#!/usr/bin/python3
"""Helper for bench/run: one measured fio run, and the final report.

  benchlib.py measure --tsv FILE --pid PID --rep N --workload W --pair P --side S
                      --unit iops|MiB/s -- fio ARGS...
      Runs fio (adding --output-format=json --output=TMP), samples the
      server's utime+stime from /proc/PID/stat before and after, takes the
      client's CPU from wait4() rusage (fio and its job processes), and
      appends one TSV row to FILE.

  benchlib.py report --tsv FILE [--title T]
      Prints the markdown table (medians of the interleaved reps).
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
        c0 = proc_cpu(a.pid)
        t0 = time.monotonic()
        p = subprocess.Popen(cmd)
        _, status, ru = os.wait4(p.pid, 0)
        t1 = time.monotonic()
        c1 = proc_cpu(a.pid)
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
    out.append("| workload | pair | vdbus (median, min–max) | peer (median, min–max) "
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


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    for o in ("--tsv", "--workload", "--pair", "--side", "--unit"):
        m.add_argument(o, required=True)
    m.add_argument("--pid", type=int, required=True)
    m.add_argument("--rep", type=int, required=True)
    r = sub.add_parser("report")
    r.add_argument("--tsv", required=True)
    r.add_argument("--title", default="")
    argv = sys.argv[1:]
    fio_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, fio_args = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    if a.cmd == "measure":
        return measure(a, fio_args)
    return report(a)


if __name__ == "__main__":
    sys.exit(main())
