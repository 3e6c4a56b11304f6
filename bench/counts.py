#!/usr/bin/env python3
"""What a delivered message costs a gateway, counted per delivered 1:1 message for each
path: CPU time, system calls by kind (reads, writes, epoll waits, futexes), context
switches, the runtime's worker parks (each one a thread put to sleep and woken again),
the bytes the kernel carried through the gateway's TCP sockets (one copy each way), and,
with a counting build, allocations; from `perf stat` attached to the gateway
processes of a W1 run and from the gateways' /metrics.

  bench/counts.py [--rate 5000] [--window 10] [--runs 1] [--gateway-threads N] [--paths a,b]
                  [--gateway-arg=ARG ...]

Each path is one `imgate-bench w1` run (2,000 users): standalone in memory, standalone on
disk, a cluster of two gateways on one nats-server (every gateway both sends and
receives), and the same cluster one-way (`--one-way`: senders on gateway 0, recipients on
gateway 1), whose gateways are reported apart as the sending and the receiving side.
perf counts over `--window` seconds of the load phase, starting 3 s into it; the messages
in the window are the offered rate times the window (the runs sustain it: each report's
`delivered_per_second` is printed beside). Needs a release build and Debian's
linux-perf; IMGATE_BIN measures another imgate build, and IMGATE_BENCH_BIN names the load
generator (one built before a change, so that a before/after measures the gateway alone). With a build that counts its
allocations (`cargo build --release -p imgate --features alloc-stats`, copied aside and
named by IMGATE_BIN) it also reports allocations and allocated bytes per message; that
build allocates from the system allocator, so its CPU figures are not comparable.
Appends its rows to bench/results/counts-<date>.jsonl.
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
    # Senders all on gateway 0, recipients all on gateway 1: each gateway's figures are one
    # side of a message (the sending side also delivers the sender's own copy).
    "cluster one-way": ["--gateways", "2", "--one-way"],
}
# System calls by kind: reads (recvfrom, read), writes (writev, write, sendto), epoll
# waits and futexes (a thread put to sleep or woken), and all of them.
SYSCALLS = {
    "reads": ["syscalls:sys_enter_recvfrom", "syscalls:sys_enter_read"],
    "writes": ["syscalls:sys_enter_writev", "syscalls:sys_enter_write", "syscalls:sys_enter_sendto"],
    "epoll_waits": ["syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait"],
    "futexes": ["syscalls:sys_enter_futex"],
}
EVENTS = ["task-clock", "context-switches", "raw_syscalls:sys_enter"] + [e for es in SYSCALLS.values() for e in es]


def gateway_pids(parent):
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", "imgate[^ ]* serve"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


COUNTERS = ["imgate_allocations_total", "imgate_allocated_bytes_total", "imgate_runtime_worker_parks_total"]


def counters(pid):
    """The gateway's own counters (COUNTERS) from its /metrics; missing ones are absent."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ports = [line.split()[3].rsplit(":", 1)[1] for line in out.splitlines() if f"pid={pid}," in line]
    for port in ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except Exception:
            continue
        found = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in COUNTERS:
                found[name] = float(value)
        return found
    return {}


def socket_bytes(pid):
    """Bytes the kernel has carried out of and into `pid`'s TCP sockets so far (the sum of
    each socket's `bytes_sent` and `bytes_received`, from `ss -tinp`): one copy each way
    between the process and the kernel."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout
    sent = received = 0
    mine = False
    for line in out.splitlines():
        if not line[:1].isspace():
            mine = f"pid={pid}," in line
            continue
        if not mine:
            continue
        for field in line.split():
            name, _, value = field.partition(":")
            if name == "bytes_sent":
                sent += int(value)
            elif name == "bytes_received":
                received += int(value)
    return sent, received


def perf_stat(pid, window):
    """perf stat's EVENTS for `pid` over `window` seconds, started now (a Popen)."""
    return subprocess.Popen(["perf", "stat", "-x", ",", "-e", ",".join(EVENTS), "-p", str(pid), "--", "sleep",
                             str(window)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def parse_stat(text):
    counts = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2] in EVENTS:
            counts[parts[2]] = float(parts[0]) if parts[0] not in ("<not counted>", "<not supported>") else None
    return counts


def one(path, args, rate, window, extra):
    """One W1 run of `path`; rows for all its gateways together and, one-way, for each."""
    gen = os.environ.get("IMGATE_BENCH_BIN") or os.path.join(release_dir(), "imgate-bench")
    duration = window + 6
    cmd = [gen, "w1", "--json", "--users", "2000", "--rate", str(rate), "--duration", f"{duration}s", *args, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The load starts when the generator says so.
    for line in proc.stderr:
        if "offering" in line:
            break
    time.sleep(3)
    pids = sorted(gateway_pids(proc.pid))
    before = {pid: counters(pid) for pid in pids}
    bytes_before = {pid: socket_bytes(pid) for pid in pids}
    stats = {pid: perf_stat(pid, window) for pid in pids}
    counts = {pid: parse_stat(p.communicate()[1]) for pid, p in stats.items()}
    bytes_after = {pid: socket_bytes(pid) for pid in pids}
    after = {pid: counters(pid) for pid in pids}
    proc.stderr.read()
    report = json.loads(proc.stdout.read().strip().splitlines()[-1])
    proc.wait()
    messages = rate * window

    def row(label, group):
        def total(event):
            vals = [counts[p].get(event) for p in group]
            return None if any(v is None for v in vals) else sum(vals)

        def counter(name):
            if not all(name in before[p] and name in after[p] for p in group):
                return None
            return sum(after[p][name] - before[p][name] for p in group) / messages

        r = {
            "path": label,
            "gateways": len(group),
            "window_s": window,
            "rate": rate,
            "delivered_per_second": report["delivered_per_second"],
            "lost": report["lost"],
            "p99_ms": report["latency_ms"]["p99"],
            "extra": " ".join(extra),
            "imgate": os.environ.get("IMGATE_BIN", "release build"),
            "cpu_us_per_message": total("task-clock") * 1e3 / messages if total("task-clock") else None,
            "syscalls_per_message": total("raw_syscalls:sys_enter") / messages
            if total("raw_syscalls:sys_enter") is not None else None,
            "context_switches_per_message": total("context-switches") / messages
            if total("context-switches") is not None else None,
            "worker_parks_per_message": counter("imgate_runtime_worker_parks_total"),
            "allocations_per_message": counter("imgate_allocations_total"),
            "allocated_bytes_per_message": counter("imgate_allocated_bytes_total"),
            "socket_bytes_out_per_message": sum(bytes_after[p][0] - bytes_before[p][0] for p in group) / messages,
            "socket_bytes_in_per_message": sum(bytes_after[p][1] - bytes_before[p][1] for p in group) / messages,
        }
        for kind, events in SYSCALLS.items():
            vals = [total(e) for e in events]
            r[f"{kind}_per_message"] = sum(v for v in vals if v is not None) / messages
        return r

    if "--one-way" in args:
        return [row(f"{path}: sending gateway", pids[:1]), row(f"{path}: receiving gateway", pids[1:])]
    return [row(path, pids)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--gateway-threads", type=int, default=0,
                    help="the gateways' --worker-threads (0: their default, one per CPU)")
    ap.add_argument("--paths", default=",".join(PATHS), help="which paths, comma-separated")
    ap.add_argument("--gateway-arg", action="append", default=[],
                    help="one more argument for every gateway (repeatable, as --gateway-arg=--send-rate)")
    a = ap.parse_args()
    os.environ.setdefault("NATS_SERVER", os.path.expanduser("~/.cache/imgate/venv/bin/nats-server"))
    rows = []
    for run in range(a.runs):
        for path in a.paths.split(","):
            args = PATHS[path]
            print(f"[{time.strftime('%H:%M:%S')}] {path}, run {run + 1}", file=sys.stderr, flush=True)
            extra = ["--gateway-threads", str(a.gateway_threads)] if a.gateway_threads else []
            extra += [f"--gateway-arg={g}" for g in a.gateway_arg]
            rows.extend(one(path, args, a.rate, a.window, extra))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"counts-{datetime.date.today().isoformat()}.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"per delivered message, {a.rate} msg/s, {a.window} s window")
    print("| path | delivered msg/s | p99 ms | gateway CPU µs | system calls (reads / writes / epoll waits / futexes) "
          "| context switches | worker parks | allocations (bytes) | socket bytes out / in |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    for r in rows:
        print(f"| {r['path']} | {r['delivered_per_second']:,.0f} | {r['p99_ms']} | {num(r['cpu_us_per_message'], '.1f')} | "
              f"{num(r['syscalls_per_message'], '.2f')} ({r['reads_per_message']:.2f} / {r['writes_per_message']:.2f} / "
              f"{r['epoll_waits_per_message']:.2f} / {r['futexes_per_message']:.2f}) | "
              f"{num(r['context_switches_per_message'], '.2f')} | {num(r['worker_parks_per_message'], '.2f')} | "
              f"{num(r['allocations_per_message'], '.1f')} ({num(r['allocated_bytes_per_message'], ',.0f')} B) | "
              f"{r['socket_bytes_out_per_message']:,.0f} / {r['socket_bytes_in_per_message']:,.0f} |")


if __name__ == "__main__":
    main()
