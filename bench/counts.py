#!/usr/bin/env python3
"""What a delivered message costs a gateway, counted: CPU time, system calls and context
switches per delivered 1:1 message, for each path (standalone in memory, standalone on
disk, cluster), from `perf stat` attached to the gateway processes of a W1 run.

  bench/counts.py [--rate 5000] [--window 10] [--runs 1] [--gateway-threads N]

Each path is one `imgate-bench w1` run (2,000 users; one gateway standalone, two on one
nats-server in cluster mode, where every gateway both sends and receives). perf counts
over `--window` seconds of the load phase, starting 3 s into it; the messages in the
window are the offered rate times the window (the runs sustain it: each report's
`delivered_per_second` is printed beside). Needs a release build and Debian's
linux-perf; IMGATE_BIN measures another imgate build. With a build that counts its
allocations (`cargo build --release -p imgate --features alloc-stats`, copied aside and
named by IMGATE_BIN) it also reports allocations and allocated bytes per message, from
the gateways' /metrics before and after the window; that build allocates from the system
allocator, so its CPU figures are not comparable. Appends its rows to
bench/results/counts-<date>.jsonl.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gwbench import release_dir  # noqa: E402

PATHS = {
    "standalone memory": ["--standalone", "--store", "memory"],
    "standalone disk": ["--standalone", "--store", "disk"],
    "cluster (2 gateways)": ["--gateways", "2"],
}
EVENTS = ["task-clock", "context-switches", "raw_syscalls:sys_enter"]


def gateway_pids(parent):
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", "imgate[^ ]* serve"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def allocations(pids):
    """(allocations, bytes) summed over the gateways' /metrics, or None if they count none."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    total, found = [0, 0], False
    for pid in pids:
        ports = [line.split()[3].rsplit(":", 1)[1] for line in out.splitlines() if f"pid={pid}," in line]
        for port in ports:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except Exception:
                continue
            for line in text.splitlines():
                if line.startswith("imgate_allocations_total "):
                    total[0] += int(float(line.split()[1]))
                    found = True
                elif line.startswith("imgate_allocated_bytes_total "):
                    total[1] += int(float(line.split()[1]))
            break
    return total if found else None


def one(path, args, rate, window, extra):
    gen = os.path.join(release_dir(), "imgate-bench")
    duration = window + 6
    cmd = [gen, "w1", "--json", "--users", "2000", "--rate", str(rate), "--duration", f"{duration}s", *args, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The load starts when the generator says so.
    for line in proc.stderr:
        if "offering" in line:
            break
    time.sleep(3)
    pids = gateway_pids(proc.pid)
    allocs_before = allocations(pids)
    stat = subprocess.run(["perf", "stat", "-x", ",", "-e", ",".join(EVENTS), "-p", ",".join(map(str, pids)),
                           "--", "sleep", str(window)], capture_output=True, text=True).stderr
    allocs_after = allocations(pids)
    counts = {}
    for line in stat.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2] in EVENTS:
            counts[parts[2]] = float(parts[0]) if parts[0] not in ("<not counted>", "<not supported>") else None
    proc.stderr.read()
    report = json.loads(proc.stdout.read().strip().splitlines()[-1])
    proc.wait()
    messages = rate * window
    row = {
        "path": path,
        "gateways": len(pids),
        "window_s": window,
        "rate": rate,
        "delivered_per_second": report["delivered_per_second"],
        "lost": report["lost"],
        "p99_ms": report["latency_ms"]["p99"],
        "extra": " ".join(extra),
        "cpu_us_per_message": counts["task-clock"] * 1e3 / messages if counts.get("task-clock") else None,
        "syscalls_per_message": counts["raw_syscalls:sys_enter"] / messages
        if counts.get("raw_syscalls:sys_enter") is not None else None,
        "context_switches_per_message": counts["context-switches"] / messages
        if counts.get("context-switches") is not None else None,
        "imgate": os.environ.get("IMGATE_BIN", "release build"),
        "allocations_per_message": (allocs_after[0] - allocs_before[0]) / messages
        if allocs_before and allocs_after else None,
        "allocated_bytes_per_message": (allocs_after[1] - allocs_before[1]) / messages
        if allocs_before and allocs_after else None,
    }
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--gateway-threads", type=int, default=0,
                    help="the gateways' --worker-threads (0: their default, one per CPU)")
    a = ap.parse_args()
    os.environ.setdefault("NATS_SERVER", os.path.expanduser("~/.cache/imgate/venv/bin/nats-server"))
    rows = []
    for run in range(a.runs):
        for path, args in PATHS.items():
            print(f"[{time.strftime('%H:%M:%S')}] {path}, run {run + 1}", file=sys.stderr, flush=True)
            extra = ["--gateway-threads", str(a.gateway_threads)] if a.gateway_threads else []
            rows.append(one(path, args, a.rate, a.window, extra))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"counts-{datetime.date.today().isoformat()}.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"| path | delivered msg/s | p99 ms | gateway CPU µs | system calls | context switches |  (per delivered "
          f"message, {a.rate} msg/s, {a.window} s window)")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        allocs = (f" {r['allocations_per_message']:.1f} allocations, {r['allocated_bytes_per_message']:,.0f} B |"
                  if r["allocations_per_message"] is not None else "")
        print(f"| {r['path']} | {r['delivered_per_second']:,.0f} | {r['p99_ms']} | {r['cpu_us_per_message']:.1f} | "
              f"{r['syscalls_per_message']:.2f} | {r['context_switches_per_message']:.2f} |{allocs}")


if __name__ == "__main__":
    main()
