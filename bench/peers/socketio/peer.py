#!/usr/bin/env python3
"""Runs W1 against Socket.IO with its Redis adapter: a redis-server on a free port, two
Socket.IO servers (server.mjs) on free ports, and the load generator (loadgen.mjs). Prints
one JSON line: the load generator's report plus the CPU seconds (over the load phase) and
peak RSS of every process it started.

Usage: run.py [--users 2000] [--rate 5000] [--duration 20] [--body 200] [--warmup 3]
Needs node, npm packages installed here (npm ci), and Debian's redis-server.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from gwbench import cpu_seconds, rss_kib  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, deadline=20):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def main(a):
    procs = []
    try:
        rport = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--daemonize", "no"], stdout=subprocess.DEVNULL)
        procs.append(("redis-server", redis))
        wait_port(rport)
        ports = [free_port(), free_port()]
        for i, p in enumerate(ports):
            env = dict(os.environ, PORT=str(p), REDIS_URL=f"redis://127.0.0.1:{rport}")
            srv = subprocess.Popen(["node", os.path.join(HERE, "server.mjs")], env=env, stdout=subprocess.DEVNULL)
            procs.append((f"socketio-server-{i}", srv))
        for p in ports:
            wait_port(p)
        urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)
        gen = subprocess.Popen(["node", os.path.join(HERE, "loadgen.mjs"), urls, str(a.users), str(a.rate),
                                str(a.duration), str(a.body), str(a.warmup)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The load phase starts when the generator says it is offering load.
        for line in gen.stderr:
            if "offering" in line:
                break
        before = {name: cpu_seconds(p.pid) for name, p in procs}
        out, _ = gen.communicate(timeout=a.duration + 120)
        report = json.loads(out.strip().splitlines()[-1])
        report["processes"] = {
            name: {"cpu_seconds": round(cpu_seconds(p.pid) - before[name], 3), "peak_rss_kib": rss_kib(p.pid, "VmHWM")}
            for name, p in procs
        }
        print(json.dumps(report))
    finally:
        for _, p in procs:
            p.terminate()
        for _, p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--body", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=3)
    main(ap.parse_args())
