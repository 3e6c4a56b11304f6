#!/usr/bin/env python3
"""Gateway memory per idle TCP connection.

Starts a release `imgate serve` on free ports, opens N TCP connections that each log in
(length-prefixed msgpack, one uid per connection) and wait for `welcome`, holds them idle,
and reads the gateway's RSS from /proc before and after. Prints one JSON line.

Usage: bench/idle_tcp.py [--connections 10000] [--binary PATH]
Needs the `msgpack` package (tests/run's venv has it). Keep N under the 20,000 open files
a process may hold here: this script holds N sockets, the gateway N more.
"""
import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import struct
import subprocess
import sys
import time

import msgpack


def rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


# The gateway's public development secret (crates/gateway/src/auth.rs, DEV_SECRET).
DEV_SECRET = b"imgate-development-secret-do-not-use-in-production"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def token(uid, ttl=3600):
    """An HS256 JWT for uid, signed like `imgate token` does in development mode."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": uid, "exp": int(time.time()) + ttl}).encode())
    signing_input = header + b"." + claims
    sig = b64(hmac.new(DEV_SECRET, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + sig).decode()


async def hold(host, port, tok, ready, stop):
    reader, writer = await asyncio.open_connection(host, port)
    payload = msgpack.packb({"type": "login", "token": tok, "device": "idle"})
    writer.write(struct.pack(">I", len(payload)) + payload)
    await writer.drain()
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    frame = msgpack.unpackb(await reader.readexactly(n))
    assert frame["type"] == "welcome", frame
    ready()
    await stop.wait()
    writer.close()


async def main(args):
    gw = subprocess.Popen(
        [args.binary, "serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0",
         "--idle-timeout", "1h", "--max-connections", str(args.connections + 100)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = gw.stdout.readline()
        host, port = re.search(r"tcp=(\S+):(\d+)", line).groups()
        time.sleep(0.3)
        before = rss_kib(gw.pid, "VmRSS")
        done = 0
        stop = asyncio.Event()

        def ready():
            nonlocal done
            done += 1

        tasks = []
        started = time.monotonic()
        for i in range(args.connections):
            # One user per connection.
            tasks.append(asyncio.create_task(hold(host, int(port), token(f"u{i}"), ready, stop)))
            if i % 500 == 499:
                await asyncio.sleep(0.05)
        while done < args.connections:
            await asyncio.sleep(0.1)
            if time.monotonic() - started > 120:
                raise SystemExit(f"only {done} of {args.connections} connections logged in")
        await asyncio.sleep(2)
        after = rss_kib(gw.pid, "VmRSS")
        peak = rss_kib(gw.pid, "VmHWM")
        result = {
            "connections": args.connections,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "peak_rss_kib": peak,
            "kib_per_connection": round((after - before) / args.connections, 2),
            "peak_kib_per_connection": round((peak - before) / args.connections, 2),
        }
        print(json.dumps(result))
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        gw.terminate()
        gw.wait(timeout=15)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=10_000)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(__file__), "..", "target"))
    p.add_argument("--binary", default=os.path.join(target, "release", "imgate"))
    asyncio.run(main(p.parse_args()))
