#!/usr/bin/env python3
"""Time for a standalone gateway to open a large disk store and serve its first login, and the
disk bytes per stored message.

Fill the store first with the W1 generator, keeping its directory (1,000 users, every
message stored twice: 500,000 sends make 1,000,000 stored messages):

    imgate-bench w1 --standalone --store disk --data-dir DIR --users 1000 --rate 25000 --duration 20s

then:

    bench/store_open.py --data-dir DIR --messages 1000000 [--runs 3]

Each run starts `imgate serve` on DIR and times, from the spawn, the listening line and the
first `welcome` plus the first backlog message of a TCP login with `resume: 0` (user u0), then
stops the gateway with SIGTERM. Prints one JSON object. Needs msgpack (the test venv has it).
"""
import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import time

import msgpack

from gwbench import default_binary, token


def frame(obj):
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


def read_frame(sock):
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("closed")
            buf += chunk
        return buf
    (n,) = struct.unpack(">I", exact(4))
    return msgpack.unpackb(exact(n))


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def one_run(binary, data_dir):
    started = time.monotonic()
    proc = subprocess.Popen([binary, "serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0",
                             "--data-dir", data_dir], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        listening = time.monotonic() - started
        tcp = line.split("tcp=")[1].split()[0]
        host, port = tcp.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.sendall(frame({"type": "login", "token": token("u0"), "device": "bench", "resume": 0}))
        welcome = read_frame(sock)
        assert welcome["type"] == "welcome", welcome
        first = read_frame(sock)
        served = time.monotonic() - started
        sock.close()
        return {"listening_ms": round(listening * 1000, 1), "first_login_ms": round(served * 1000, 1),
                "first_message": first.get("type")}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=default_binary())
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--messages", type=int, required=True, help="stored messages in the store")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    runs = [one_run(a.binary, a.data_dir) for _ in range(a.runs)]
    size = du(a.data_dir)
    firsts = sorted(r["first_login_ms"] for r in runs)
    print(json.dumps({
        "cmd": "bench/store_open.py --data-dir DIR --messages %d --runs %d" % (a.messages, a.runs),
        "stored_messages": a.messages, "disk_bytes": size,
        "bytes_per_message": round(size / a.messages, 1),
        "first_login_ms_median": firsts[len(firsts) // 2], "runs": runs,
    }))


if __name__ == "__main__":
    main()
