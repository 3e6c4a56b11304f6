#!/usr/bin/env python3
"""The Socket.IO peer: a redis-server on a free port and Socket.IO servers with a Redis
adapter (server.mjs; --adapter pubsub, the default, or streams, the Redis Streams adapter
with connection state recovery, Redis keeping an AOF fsynced every second) on free ports, driven by the Node load generators here (w1.mjs, w4.mjs)
or held idle by bench/idle.py (W2). Prints one JSON line: the load generator's report plus
the CPU seconds (over the load phase) and peak RSS of every process it started.

Usage: peer.py w1 [--adapter pubsub|streams] [--users 2000] [--rate 5000] [--duration 20] [--body 200] [--warmup 3]
       peer.py w4 [--connections 5000] [--rate 10] [--duration 20]
Needs node, the npm packages here (npm ci), and Debian's redis-server.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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


class Peer:
    """redis-server and `servers` Socket.IO servers; a context manager."""

    def __init__(self, servers=2, adapter="pubsub"):
        self.procs = []
        rport = free_port()
        self.dir = tempfile.mkdtemp(prefix="imgate-peer-redis-")
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if adapter == "streams" else ["--appendonly", "no"]
        redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                  "--dir", self.dir, *aof, "--daemonize", "no"], stdout=subprocess.DEVNULL)
        self.procs.append(("redis-server", redis))
        wait_port(rport)
        self.ports = [free_port() for _ in range(servers)]
        for i, p in enumerate(self.ports):
            env = dict(os.environ, PORT=str(p), REDIS_URL=f"redis://127.0.0.1:{rport}", ADAPTER=adapter)
            srv = subprocess.Popen(["node", os.path.join(HERE, "server.mjs")], env=env, stdout=subprocess.DEVNULL)
            self.procs.append((f"socketio-server-{i}", srv))
        for p in self.ports:
            wait_port(p)
        self.urls = ",".join(f"http://127.0.0.1:{p}" for p in self.ports)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _, p in self.procs:
            p.terminate()
        for _, p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def cpu(self):
        return {name: cpu_seconds(p.pid) for name, p in self.procs}

    def server_pid(self, i=0):
        return dict(self.procs)[f"socketio-server-{i}"].pid

    def drive(self, script, args, timeout):
        """Runs a Node load generator; returns its report with every process's CPU seconds
        from the moment it says it is offering load, and peak RSS."""
        gen = subprocess.Popen(["node", os.path.join(HERE, script), self.urls, *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in gen.stderr:
            if "offering" in line:
                break
        before = self.cpu()
        out, err = gen.communicate(timeout=timeout)
        if gen.returncode != 0:
            raise SystemExit(f"{script} failed: {err[-2000:]}")
        report = json.loads(out.strip().splitlines()[-1])
        after = self.cpu()
        report["processes"] = {
            name: {"cpu_seconds": round(after[name] - before[name], 3), "peak_rss_kib": rss_kib(p.pid, "VmHWM")}
            for name, p in self.procs
        }
        return report


def main(a):
    with Peer(servers=2, adapter=a.adapter) as peer:
        if a.scenario == "w1":
            report = peer.drive("w1.mjs", [a.users, a.rate, a.duration, a.body, a.warmup], a.duration + 120)
        else:
            report = peer.drive("w4.mjs", [a.connections, a.rate, a.duration], a.duration + 120)
    report["adapter"] = a.adapter
    print(json.dumps(report))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["w1", "w4"])
    ap.add_argument("--adapter", choices=["pubsub", "streams"], default="pubsub")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--rate", type=int, default=None)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--body", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    if a.rate is None:
        a.rate = 5000 if a.scenario == "w1" else 10
    main(a)
