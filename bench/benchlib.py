#!/usr/bin/python3
"""Helper for bench/run: one measured fio run, and the final report.

  benchlib.py measure --tsv FILE --pid PID --rep N --workload W --pair P --side S
                      --unit iops|MiB/s -- fio ARGS...
      Runs fio (adding --output-format=json --output=TMP), samples the
      server's utime+stime from /proc/PID/stat before and after, takes the
      client's CPU from wait4() rusage (fio and its job processes), and
      appends one TSV row to FILE.

  benchlib.py report --tsv FILE [--title T] [--pair-label L]
      Prints the markdown table (medians of the interleaved reps, and the
      vdbus/peer ratio computed per rep: median, min-max).
      (measure takes --pid more than once to sum several server processes.)

  benchlib.py best --tsv FILE --pairs P1,P2
      vdbus against the better of several peers (pairs P1/TR, P2/TR that share
      one vdbus disk), per workload and transport.
  benchlib.py targets --tsv FILE --set run|loop
      The issue's targets for that bench (TARGETS below): measured ratios
      (of medians, and per rep), and whether each target is met.

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


class ServerGone(Exception):
    pass


def proc_cpu(pid):
    """utime+stime of a whole process (all threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except FileNotFoundError:
        raise ServerGone(pid) from None
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
    return f"{v:,.0f}"


def read_tsv(path):
    """Rows of a TSV written by measure (or mem-*), as dicts keyed by the header."""
    rows = []
    with open(path) as f:
        hdr = f.readline().rstrip("\n").split("\t")
        for line in f:
            if line.strip():
                rows.append(dict(zip(hdr, line.rstrip("\n").split("\t"))))
    return rows


def cpu_us(r):
    """Server CPU per request of one run, µs (None if the run did no I/O)."""
    return float(r["server_cpu_s"]) * 1e6 / int(r["ios"]) if int(r["ios"]) else None


def side_stats(rows, side):
    """For one side of one workload+pair: {rep: value}, {rep: server CPU µs/req}."""
    val, cpu = {}, {}
    for r in rows:
        if r["side"] != side:
            continue
        val.setdefault(r["rep"], []).append(float(r["value"]))
        c = cpu_us(r)
        if c is not None:
            cpu.setdefault(r["rep"], []).append(c)
    return ({k: statistics.median(v) for k, v in val.items()},
            {k: statistics.median(v) for k, v in cpu.items()})


def per_rep_ratios(num, den):
    """num[rep] / den[rep] for the reps both have (interleaved pairs of runs)."""
    return [num[k] / den[k] for k in num if k in den and den[k]]


def fmt_ratios(rs):
    """'median (min–max)' of per-rep ratios; just the value with one rep."""
    if not rs:
        return "–"
    if len(rs) == 1:
        return f"{rs[0]:.2f}"
    return f"{statistics.median(rs):.2f} ({min(rs):.2f}–{max(rs):.2f})"


def report(a):
    rows = read_tsv(a.tsv)
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
               "| ratio of medians | ratio per rep (median, min–max) "
               "| vdbus CPU µs/req | peer CPU µs/req "
               "| client CPU µs/req (vdbus / peer) |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for w in order_w:
        for p in order_p:
            sel = [r for r in rows if r["workload"] == w and r["pair"] == p]
            if not sel:
                continue
            unit = sel[0]["unit"]
            cell, med, cpu, cli, rep = {}, {}, {}, {}, {}
            for side in ("vdbus", "peer"):
                s = [r for r in sel if r["side"] == side]
                rep[side] = side_stats(sel, side)[0]
                if not s:
                    cell[side], med[side], cpu[side], cli[side] = "–", None, "–", "–"
                    continue
                vals = [float(r["value"]) for r in s]
                med[side] = statistics.median(vals)
                cell[side] = (f"{fmt(med[side], unit)} {unit} "
                              f"({fmt(min(vals), unit)}–{fmt(max(vals), unit)})")
                per = [cpu_us(r) for r in s if int(r["ios"])]
                cpu[side] = f"{statistics.median(per):.1f}" if per else "–"
                per = [float(r["client_cpu_s"]) * 1e6 / int(r["ios"]) for r in s if int(r["ios"])]
                cli[side] = f"{statistics.median(per):.1f}" if per else "–"
            ratio = (f"{med['vdbus'] / med['peer']:.2f}"
                     if med["vdbus"] is not None and med["peer"] else "–")
            pr = fmt_ratios(per_rep_ratios(rep["vdbus"], rep["peer"]))
            out.append(f"| {w} | {p} | {cell['vdbus']} | {cell['peer']} | {ratio} | {pr} "
                       f"| {cpu['vdbus']} | {cpu['peer']} | {cli['vdbus']} / {cli['peer']} |")
    print("\n".join(out))
    return 0


# ---------------------------------------------------------------- best-of and targets
def best_of(rows, workload, pairs):
    """vdbus against the better (higher median) of several peers, one workload.

    rows are measure rows; pairs are TSV pair names whose vdbus side is the
    same vdbus disk (e.g. file-qemu/unix and file-nbdkit/unix).  Returns None
    if nothing was measured, else a dict:
      vmed        median of all vdbus runs of those pairs
      peers       {pair: (median, server CPU µs/req median)} of each peer
      best        the pair whose peer has the higher median
      ratio       vmed / best peer's median
      reps        per interleaved rep: vdbus (median of its runs in that rep)
                  / the better of the peers' values in that rep
      vcpu        median server CPU µs/req of vdbus
      cpu_ratio   vcpu / the best peer's median CPU
      cpu_reps    per rep: vdbus CPU / the best peer's CPU in that rep
      cli_util    median CPU of fio (cores: CPU seconds / wall seconds) in vdbus's runs
    With one pair this is simply that pair's vdbus/peer."""
    sel = [r for r in rows if r["workload"] == workload and r["pair"] in pairs]
    vd = [r for r in sel if r["side"] == "vdbus"]
    if not vd:
        return None
    res = {"unit": sel[0]["unit"], "peers": {}}
    res["vmed"] = statistics.median(float(r["value"]) for r in vd)
    vc = [c for c in (cpu_us(r) for r in vd) if c is not None]
    res["vcpu"] = statistics.median(vc) if vc else None
    cu = [float(r["client_cpu_s"]) / float(r["wall_s"]) for r in vd if float(r["wall_s"]) > 0]
    res["cli_util"] = statistics.median(cu) if cu else None
    vrep, vcpurep = side_stats(sel, "vdbus")
    prep, pcpurep = {}, {}
    for p in pairs:
        ps = [r for r in sel if r["pair"] == p and r["side"] == "peer"]
        if not ps:
            continue
        pc = [c for c in (cpu_us(r) for r in ps) if c is not None]
        res["peers"][p] = (statistics.median(float(r["value"]) for r in ps),
                           statistics.median(pc) if pc else None)
        prep[p], pcpurep[p] = side_stats(ps, "peer")
    if not res["peers"]:
        return None
    res["best"] = max(res["peers"], key=lambda p: res["peers"][p][0])
    bmed, bcpu = res["peers"][res["best"]]
    res["ratio"] = res["vmed"] / bmed if bmed else None
    res["cpu_ratio"] = res["vcpu"] / bcpu if res["vcpu"] is not None and bcpu else None
    # per rep: the better peer of that rep (throughput), and that peer's CPU
    res["reps"], res["cpu_reps"] = [], []
    for k in sorted(vrep, key=int):
        cand = [(prep[p][k], p) for p in prep if k in prep[p]]
        if not cand:
            continue
        bv, bp = max(cand)
        if bv:
            res["reps"].append(vrep[k] / bv)
        if k in vcpurep and k in pcpurep[bp] and pcpurep[bp][k]:
            res["cpu_reps"].append(vcpurep[k] / pcpurep[bp][k])
    return res


def f1(v):
    return "–" if v is None else f"{v:.1f}"


def f2(v):
    return "–" if v is None else f"{v:.2f}"


def peer_name(pair):
    """'file-qemu/tcp' -> 'file-qemu'"""
    return pair.split("/")[0]


def best_report(a):
    """Markdown table: per workload and transport, vdbus vs the better peer."""
    rows = read_tsv(a.tsv)
    bases = a.pairs.split(",")
    trs = [t for t in ("unix", "tcp") if any(r["pair"] == f"{bases[0]}/{t}" for r in rows)]
    names = " / ".join(bases)
    out = [f"| workload | transport | vdbus (median) | {names} peer medians | better peer "
           "| ratio vs better (of medians) | ratio per rep (median, min–max) "
           f"| vdbus CPU µs/req | better peer CPU µs/req |",
           "|---|---|---|---|---|---|---|---|---|"]
    order_w = []
    for r in rows:
        if r["workload"] not in order_w:
            order_w.append(r["workload"])
    for w in order_w:
        for t in trs:
            res = best_of(rows, w, [f"{b}/{t}" for b in bases])
            if res is None:
                continue
            u = res["unit"]
            meds = " / ".join(fmt(res["peers"][f"{b}/{t}"][0], u) if f"{b}/{t}" in res["peers"] else "–"
                              for b in bases)
            bcpu = res["peers"][res["best"]][1]
            out.append(f"| {w} | {t} | {fmt(res['vmed'], u)} {u} | {meds} {u} | {peer_name(res['best'])} "
                       f"| {f2(res['ratio'])} | {fmt_ratios(res['reps'])} "
                       f"| {f1(res['vcpu'])} | {f1(bcpu)} |")
    print("\n".join(out))
    return 0


# The targets, per bench script.  Each group: a label, the TSV pair
# names (several = "vs the better of them", same vdbus disk), the transports
# (None: the pair name has no /transport), the minimum throughput ratio per
# workload, and the maximum server-CPU-per-request ratio (vdbus / peer) or None.
RAM_TPUT = {"4k-randread-qd32": 1.2, "4k-randwrite-qd32": 1.2,
            "4k-randread-qd32x2": 1.5, "4k-randwrite-qd32x2": 1.5,
            "1M-read-qd8": 1.5, "1M-write-qd8": 1.5}
TARGETS = {
    "run": [
        {"label": "ram: vdbus RAM disk vs nbdkit memory", "pairs": ["ram"],
         "transports": ["unix", "tcp"], "tput": RAM_TPUT, "cpu_max": 0.5},
        {"label": "file: vdbus file disk vs the better of qemu-nbd and nbdkit file",
         "pairs": ["file-qemu", "file-nbdkit"], "transports": ["unix", "tcp"],
         "tput": {w: 1.5 for w in RAM_TPUT}, "cpu_max": None},
    ],
    "loop": [
        {"label": "loop: vdbus --attach loop vs nbdfuse+nbdkit memory+losetup", "pairs": ["loop"],
         "transports": [None],
         "tput": {"4k-randread-qd32": 3, "4k-randwrite-qd32": 3, "1M-read-qd8": 2, "1M-write-qd8": 2},
         "cpu_max": None},
    ],
}


def verdict(value, reps, target, at_least):
    """'yes'/'NO' for the ratio of medians, and whether every rep meets it."""
    if value is None:
        return "–", "–"
    ok = value >= target if at_least else value <= target
    if not reps:
        return ("yes" if ok else "**NO**"), "–"
    every = all((x >= target) if at_least else (x <= target) for x in reps)
    return ("yes" if ok else "**NO**"), ("yes" if every else "no")


def f_vs(v, target, at_least):
    """A ratio to 2 decimals, or 3 where 2 would round a miss onto the target."""
    if v is None:
        return "–"
    ok = v >= target if at_least else v <= target
    return f"{v:.3f}" if not ok and round(v, 2) == target else f"{v:.2f}"


def f_reps(rs, target, at_least):
    """fmt_ratios with f_vs precision."""
    if not rs:
        return "–"
    f = [f_vs(x, target, at_least) for x in (statistics.median(rs), min(rs), max(rs))]
    return f[0] if len(rs) == 1 else f"{f[0]} ({f[1]}–{f[2]})"


def one_job_ceiling(res, workload):
    """For a one-job workload, the rate fio's one thread would reach at 100%
    of a core at the CPU it spent against vdbus (vdbus's median / fio's CPU
    fraction); None for workloads with more jobs ("x2": their clients share
    the two CPUs with the server) or without fio's CPU."""
    u = res.get("cli_util")
    if "x" in workload.rsplit("-", 1)[-1] or not u:
        return None
    return res["vmed"] / u


def client_ceiling(res, workload, need, missed, beyond, where):
    """The last cell of a target row: for a one-job workload, fio's CPU in
    vdbus's runs (% of a core) and the rate its one thread would reach at 100%
    of a core at that CPU per request, against the rate the target needs
    (need × the better peer's median).  A missed target above that ceiling is
    added to beyond.  Workloads without a one-thread ceiling get "–"."""
    ceil = one_job_ceiling(res, workload)
    if ceil is None:
        return "–"
    u = res["cli_util"]
    want = need * res["peers"][res["best"]][0]
    unit = res["unit"]
    cell = f"{u * 100:.0f}%, {fmt(ceil, unit)} vs {fmt(want, unit)} {unit}"
    if want > ceil:
        cell += ": beyond the client"
        if missed:
            beyond.append(f"{where} {workload}")
    return cell


def targets_report(a):
    """Markdown: each target row of the issue, its measured ratios, met or not."""
    rows = read_tsv(a.tsv)
    out = [f"- {g['label']}" for g in TARGETS[a.set]]
    out += ["",
            "| target | transport | workload | throughput ratio: of medians "
            "| per rep (median, min–max) | need | met | every rep "
            "| server CPU/req ratio: of medians | per rep (median, min–max) | need | met | every rep "
            "| one-job client: CPU, ceiling vs need |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    met = total = 0
    beyond = []    # missed throughput targets that ask for more than one fio thread can do
    missing = {}   # "target/transport" -> workloads not measured
    for g in TARGETS[a.set]:
        for t in g["transports"]:
            pairs = [p if t is None else f"{p}/{t}" for p in g["pairs"]]
            for w, need in g["tput"].items():
                res = best_of(rows, w, pairs)
                name = g["label"].split(":")[0]
                if res is None:
                    key = name if t is None else f"{name}/{t}"
                    missing.setdefault(key, ([], len(g["tput"])))[0].append(w)
                    continue
                v, e = verdict(res["ratio"], res["reps"], need, True)
                cells = [name, t or "–", w, f_vs(res["ratio"], need, True),
                         f_reps(res["reps"], need, True), f"≥ {need:g}", v, e]
                total += 1
                met += v == "yes"
                if g["cpu_max"] is not None:
                    cv, ce = verdict(res["cpu_ratio"], res["cpu_reps"], g["cpu_max"], False)
                    cells += [f_vs(res["cpu_ratio"], g["cpu_max"], False),
                              f_reps(res["cpu_reps"], g["cpu_max"], False), f"≤ {g['cpu_max']:g}", cv, ce]
                    total += 1
                    met += cv == "yes"
                else:   # no CPU target: the ratio for information
                    cells += [f2(res["cpu_ratio"]), fmt_ratios(res["cpu_reps"]), "–", "–", "–"]
                cells.append(client_ceiling(res, w, need, v != "yes", beyond,
                                            f"{name}/{t}" if t else name))
                out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(f"Targets met (judged on the ratio of medians): **{met} of {total}**"
               + (" measured" if missing else "") + ".")
    if beyond:
        out.append(f"Of the missed throughput targets, {len(beyond)} ask for more than fio's one "
                   "thread can issue at the CPU per request it spent against vdbus in this run "
                   "(the ceiling column: its rate at 100% of a core): " + ", ".join(beyond) + ".")
    if missing:
        out.append("Not measured in this run: " + "; ".join(
            f"{k} ({'all workloads' if len(ws) == n else ', '.join(ws)})"
            for k, (ws, n) in missing.items()) + ".")
    print("\n".join(out))
    return 0


def read_keyed(tsv, nkeys):
    """An instrument's TSV (rep, NKEYS key columns, numbers): {keys: [numbers
    of each rep]}, keys and numbers as tuples."""
    rows = {}
    with open(tsv) as f:
        for line in f:
            if line.strip():
                rep, *cols = line.split()
                rows.setdefault(tuple(cols[:nkeys]), []).append(tuple(float(x) for x in cols[nkeys:]))
    return rows


def read_xfer(tsv):
    """bench/run's xfer TSV: {(workload, transport, mode): [(MiB/s, sender µs/MiB,
    receiver µs/MiB, recv calls/MiB)]}; {} without a file."""
    return read_keyed(tsv, 3) if tsv and os.path.exists(tsv) else {}


XFER_HOW = {"send": "send()", "zerocopy": "send(MSG_ZEROCOPY)", "splice": "vmsplice + splice",
            "lowat": "send(), the receiver's SO_RCVLOWAT at 1 MiB"}


def xfer_table(a):
    """Markdown: the transport alone next to each 1M row (bench/xfer)."""
    rows = read_xfer(a.tsv)
    if not rows:
        print("No bench/xfer rows in this run.")
        return 0
    print("| workload | transport | sender | MiB/s | sender CPU µs/MiB | receiver CPU µs/MiB "
          "| recv() calls/MiB | the server's end |")
    print("|---|---|---|---|---|---|---|---|")
    for (w, tr, mode), v in rows.items():
        how = XFER_HOW[mode] + (", 4 MiB send buffer" if (mode, tr) == ("splice", "unix") else "")
        end = "sender" if w.startswith("1M-read") else "receiver"
        print(f"| {w} | {tr} | {how} | {med_range([x[0] for x in v], '{:,.0f}')} "
              f"| {med_range([x[1] for x in v], '{:.0f}')} | {med_range([x[2] for x in v], '{:.0f}')} "
              f"| {med_range([x[3] for x in v], '{:.1f}')} | {end} |")
    return 0


def xfer_limits(xf, w, tr):
    """For a 1M row: ((the fastest way's median MiB/s, its mode), (the server's
    end's cheapest median CPU µs/MiB, its mode)) from bench/xfer's rows of the
    same workload and transport, or (None, None).  The server's end is the
    sender for reads, the receiver for writes."""
    modes = {m: v for (xw, xt, m), v in xf.items() if xw == w and xt == tr}
    if not modes:
        return None, None
    col = 1 if w.startswith("1M-read") else 2
    rate = max((statistics.median(x[0] for x in v), m) for m, v in modes.items())
    cpu = min((statistics.median(x[col] for x in v), m) for m, v in modes.items())
    return rate, cpu


def floor_of(rows, workload, tr):
    """bench/minsrv's runs ("floor" side of ram/TR) for one workload: (median
    value, median server CPU µs/req, median client CPU µs/req, min value, max
    value), or None."""
    sel = [r for r in rows if r["workload"] == workload and r["pair"] == f"ram/{tr}"
           and r["side"] == "floor" and int(r["ios"])]
    if not sel:
        return None
    vals = [float(r["value"]) for r in sel]
    return (statistics.median(vals),
            statistics.median(cpu_us(r) for r in sel),
            statistics.median(float(r["client_cpu_s"]) * 1e6 / int(r["ios"]) for r in sel),
            min(vals), max(vals))


def floor_table(a):
    """Markdown: bench/minsrv (the least server) next to vdbus's RAM disk, per row."""
    rows = read_tsv(a.tsv)
    order_w, trs = [], []
    for r in rows:
        if r["side"] == "floor":
            if r["workload"] not in order_w:
                order_w.append(r["workload"])
            t = r["pair"].split("/")[1]
            if t not in trs:
                trs.append(t)
    if not order_w:
        print("No bench/minsrv runs in this run.")
        return 0
    print("| workload | transport | minsrv (median, min–max) | minsrv CPU µs/req | vdbus RAM disk "
          "| vdbus / minsrv: throughput | server CPU | client CPU µs/req (minsrv / vdbus) |")
    print("|---|---|---|---|---|---|---|---|")
    for w in order_w:
        for t in trs:
            fl = floor_of(rows, w, t)
            res = best_of(rows, w, [f"ram/{t}"])
            if fl is None or res is None:
                continue
            u = res["unit"]
            vd = [r for r in rows if r["workload"] == w and r["pair"] == f"ram/{t}"
                  and r["side"] == "vdbus" and int(r["ios"])]
            vcli = statistics.median(float(r["client_cpu_s"]) * 1e6 / int(r["ios"]) for r in vd)
            print(f"| {w} | {t} | {fmt(fl[0], u)} {u} ({fmt(fl[3], u)}–{fmt(fl[4], u)}) "
                  f"| {fl[1]:.1f} | {fmt(res['vmed'], u)} {u} | {res['vmed'] / fl[0]:.2f} "
                  f"| {res['vcpu'] / fl[1]:.2f} | {fl[2]:.1f} / {vcli:.1f} |")
    return 0


def mark_bounds(lims, vdbus, floor, past, word):
    """limits_report's limits [(value, text, floor_counts)] as [(value, text,
    reached)]: a note on each that vdbus, or else the least server (floor, may
    be None; only where floor_counts: the least server serves memory, so it
    says nothing about a limit of writing into a file), went beyond
    (past(x, limit): x is beyond it; word says how, in the note), and reached,
    the better of those two; a limit gone beyond bounds nothing."""
    out = []
    for c, txt, floor_counts in lims:
        fl = floor if floor_counts else None
        best = vdbus if fl is None or past(vdbus, fl) else fl
        out.append((c, txt + (f" ({'vdbus' if past(vdbus, c) else 'the least server'} {word} it: "
                              "not a bound)" if past(best, c) else ""), best))
    return out


def limits_report(a):
    """Markdown: each missed target of bench/run next to what bounds that row
    without vdbus: for one-job rows the rate of fio's one thread at 100% of a
    core (as client_ceiling); for the file disk's 1M write rows the fastest
    bench/filewrite run (1 MiB from a socket into a file, no protocol), if
    --filewrite is given; for its 1M read rows the fastest bench/fileread run
    on that transport (1 MiB from a cached file into a socket, no protocol),
    if --fileread is given; for every row, the least server (bench/minsrv, the
    "floor" side of the ram rows, same transport) with the same fio: its rate
    bounds the rate and its CPU per request the server CPU; for every 1M row,
    with --xfer, the transport alone (bench/xfer, run next to each of those
    rows): its fastest way of sending
    bounds the rate, and the server's end of the stream (the sender for
    reads, the receiver for writes), at the cheapest way, bounds the server
    CPU per 1 MiB request.  A limit that vdbus or the least server went
    past is shown and not counted."""
    rows = read_tsv(a.tsv)
    fw = read_filewrite(a.filewrite)
    fr = read_fileread(a.fileread)
    xf = read_xfer(a.xfer)
    out = ["| target | transport | workload | measure | vdbus | need | limit measured in this run | beyond it |",
           "|---|---|---|---|---|---|---|---|"]
    shown = beyond_n = 0
    for g in TARGETS["run"]:
        name = g["label"].split(":")[0]
        for t in g["transports"]:
            pairs = [f"{p}/{t}" for p in g["pairs"]]
            for w, need in g["tput"].items():
                res = best_of(rows, w, pairs)
                if res is None:
                    continue
                peer_v, peer_cpu = res["peers"][res["best"]]
                xrate, xcpu = xfer_limits(xf, w, t)
                fl = floor_of(rows, w, t)
                if res["ratio"] is not None and res["ratio"] < need:
                    want = need * peer_v
                    lims = []
                    ceil = one_job_ceiling(res, w)
                    if ceil is not None:
                        lims.append((ceil, f"fio's one thread at 100% of a core (it ran at "
                                     f"{res['cli_util'] * 100:.0f}%): {fmt(ceil, res['unit'])}", True))
                    if name == "file" and w.startswith("1M-write") and fw:
                        mode = max(fw, key=lambda m: max(fw[m]))
                        best = max(fw[mode])
                        lims.append((best, f"socket into a file, no protocol (bench/filewrite, fastest "
                                     f"run: {mode}): {fmt(best, 'MiB/s')}", False))
                    frt = {m: v for (k, m), v in fr.items() if k == t}
                    if name == "file" and w.startswith("1M-read") and frt:
                        mode = max(frt, key=lambda m: max(x[0] for x in frt[m]))
                        best = max(x[0] for x in frt[mode])
                        lims.append((best, f"a cached file into the socket, no protocol (bench/fileread, "
                                     f"fastest run: {mode}): {fmt(best, 'MiB/s')}", False))
                    if fl is not None:
                        lims.append((fl[0], f"the least server (bench/minsrv) with the same fio: "
                                     f"{fmt(fl[0], res['unit'])}", True))
                    if xrate is not None:
                        lims.append((xrate[0], f"the transport alone (bench/xfer, {XFER_HOW[xrate[1]]}, "
                                     f"median): {fmt(xrate[0], 'MiB/s')}", True))
                    lims = mark_bounds(lims, res["vmed"], fl and fl[0], lambda x, c: x > c, "went past")
                    over = [l for l in lims if want > l[0] >= l[2]]
                    beyond_n += bool(over)
                    out.append(f"| {name} | {t} | {w} | throughput | {fmt(res['vmed'], res['unit'])} "
                               f"{res['unit']} | {fmt(want, res['unit'])} ({need:g} × peer) "
                               f"| {'; '.join(l[1] for l in lims) or 'none'} | {'yes' if over else 'no'} |")
                    shown += 1
                cmax = g["cpu_max"]
                if cmax is not None and res["cpu_ratio"] is not None and res["cpu_ratio"] > cmax:
                    want = cmax * peer_cpu
                    lims = []
                    if fl is not None:
                        lims.append((fl[1], f"the least server (bench/minsrv) with the same fio: "
                                     f"{fl[1]:.1f} µs/req", True))
                    if xcpu is not None:
                        end = "sender" if w.startswith("1M-read") else "receiver"
                        lims.append((xcpu[0], f"the transport alone: its {end} (the server's end; "
                                     f"{XFER_HOW[xcpu[1]]}, median) {xcpu[0]:.0f} µs/MiB", True))
                    lims = mark_bounds(lims, res["vcpu"], fl and fl[1], lambda x, c: x < c, "went under")
                    over = any(want < c <= low for c, _, low in lims)
                    beyond_n += over
                    out.append(f"| {name} | {t} | {w} | server CPU µs/req | {res['vcpu']:.1f} "
                               f"| ≤ {want:.1f} ({cmax:g} × peer) | {'; '.join(l[1] for l in lims) or 'none'} "
                               f"| {'yes' if over else 'no'} |")
                    shown += 1
    if not shown:
        print("Every target of bench/run was met in this run.")
        return 0
    out.append("")
    out.append(f"{beyond_n} of the {shown} missed targets are beyond a limit measured in this run "
               "without vdbus: a rate above it, or less server CPU than the transport's own end spends. "
               "\"none\": nothing in this run bounds that row (docs/performance.md discusses each).")
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


def med_range(v, fmt_s):
    v = sorted(x for x in v if x is not None)
    if not v:
        return "–"
    return f"{fmt_s.format(statistics.median(v))} ({fmt_s.format(v[0])}–{fmt_s.format(v[-1])})"


def stream_table(tsv):
    rows = read_keyed(tsv, 5)   # (kind, mode, sndbuf, src, dst): bench/xfer's numbers
    what = {"8": "8 MiB of buffers", "region": "1 GiB of memory, front to back"}
    print("| transport | send buffer | sender reads | receiver writes into | MiB/s "
          "| sender CPU µs/MiB | receiver CPU µs/MiB | receiver recv() calls/MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, mode, sndbuf, src, dst), v in rows.items():
        sb = "default" if sndbuf == "0" else f"{int(sndbuf) >> 20} MiB"
        print(f"| {kind} | {sb} | {what.get(src, src)} | {what.get(dst, dst)} "
              f"| {med_range([x[0] for x in v], '{:,.0f}')} | {med_range([x[1] for x in v], '{:.0f}')} "
              f"| {med_range([x[2] for x in v], '{:.0f}')} | {med_range([x[3] for x in v], '{:.1f}')} |")
    return 0


def read_filewrite(tsv):
    """bench/stream's filewrite TSV: {mode: [MiB/s per rep]}; {} without a file."""
    if not (tsv and os.path.exists(tsv)):
        return {}
    return {k[0]: [v[0] for v in vs] for k, vs in read_keyed(tsv, 1).items()}


def filewrite_table(tsv):
    print("| method | MiB/s |")
    print("|---|---|")
    for mode, v in read_filewrite(tsv).items():
        print(f"| {mode} | {med_range(v, '{:,.0f}')} |")
    return 0


def read_fileread(tsv):
    """bench/stream's fileread TSV: {(transport, mode): [(MiB/s, server µs/MiB,
    receiver µs/MiB) per rep]}; {} without a file."""
    return read_keyed(tsv, 2) if tsv and os.path.exists(tsv) else {}


def fileread_table(tsv):
    print("| transport | method | MiB/s | server CPU µs/MiB | receiver CPU µs/MiB |")
    print("|---|---|---|---|---|")
    for (kind, mode), v in read_fileread(tsv).items():
        print(f"| {kind} | {mode} | {med_range([x[0] for x in v], '{:,.0f}')} "
              f"| {med_range([x[1] for x in v], '{:.0f}')} | {med_range([x[2] for x in v], '{:.0f}')} |")
    return 0


SYSCOST_DESC = {
    "syscall": "a bare system call (getppid)",
    "epoll-ready": "epoll_wait() returning at once",
    "recv-28": "recv() of one 28-byte request header",
    "send-4k": "send() of a 4 KiB read reply, receiver not waiting",
    "send-4k-wake-5us": "the same, receiver asleep in epoll_wait on the other CPU, 5 µs between sends",
    "wake-5us": "of which waking the receiver",
    "send-4k-wake-50us": "the same, 50 µs between sends",
    "wake-50us": "of which waking the receiver",
}


def syscost_table(tsv):
    rows = {}
    with open(tsv) as f:
        for line in f:
            rep, name, ns = line.split()
            rows.setdefault(name, []).append(float(ns))
    print("| cost | what | ns |")
    print("|---|---|---|")
    for name, v in rows.items():
        v.sort()
        print(f"| {name} | {SYSCOST_DESC.get(name, '')} | "
              f"{statistics.median(v):.0f} ({v[0]:.0f}–{v[-1]:.0f}) |")
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
    b = sub.add_parser("best")
    b.add_argument("--tsv", required=True)
    b.add_argument("--pairs", required=True,
                   help="comma-separated pair names (without /transport) sharing one vdbus disk")
    t = sub.add_parser("targets")
    t.add_argument("--tsv", required=True)
    t.add_argument("--set", required=True, choices=sorted(TARGETS))
    t = sub.add_parser("limits")
    t.add_argument("--tsv", required=True, help="bench/run's TSV")
    t.add_argument("--filewrite", help="bench/stream's filewrite TSV (optional)")
    t.add_argument("--fileread", help="bench/stream's fileread TSV (optional)")
    t.add_argument("--xfer", help="bench/run's xfer TSV (optional)")
    t = sub.add_parser("floor-table")
    t.add_argument("--tsv", required=True, help="bench/run's TSV")
    t = sub.add_parser("xfer-table")
    t.add_argument("--tsv", required=True, help="bench/run's xfer TSV")
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
    x = sub.add_parser("stream-table")
    x.add_argument("tsv")
    x = sub.add_parser("filewrite-table")
    x.add_argument("tsv")
    x = sub.add_parser("fileread-table")
    x.add_argument("tsv")
    x = sub.add_parser("syscost-table")
    x.add_argument("tsv")
    x = sub.add_parser("rss")
    x.add_argument("--pid", type=int, required=True)
    argv = sys.argv[1:]
    fio_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, fio_args = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    if a.cmd == "measure":
        try:
            return measure(a, fio_args)
        except ServerGone as e:
            sys.stderr.write(f"benchlib: server process {e} ({a.side} {a.pair}) is gone: "
                             "it crashed or something killed it\n")
            return 1
    if a.cmd == "mem-fill":
        return mem_fill(a, fio_args)
    if a.cmd == "mem-trim":
        return mem_trim(a)
    if a.cmd == "mem-plug":
        return mem_plug(a)
    if a.cmd == "mem-report":
        return mem_report(a)
    if a.cmd == "best":
        return best_report(a)
    if a.cmd == "targets":
        return targets_report(a)
    if a.cmd == "limits":
        return limits_report(a)
    if a.cmd == "floor-table":
        return floor_table(a)
    if a.cmd == "xfer-table":
        return xfer_table(a)
    if a.cmd == "filewrite-table":
        return filewrite_table(a.tsv)
    if a.cmd == "fileread-table":
        return fileread_table(a.tsv)
    if a.cmd == "syscost-table":
        return syscost_table(a.tsv)
    if a.cmd == "stream-table":
        return stream_table(a.tsv)
    if a.cmd == "rss":
        print(*proc_rss(a.pid))
        return 0
    return report(a)


if __name__ == "__main__":
    sys.exit(main())
