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
import json
import struct
import time

import msgpack

from gwbench import Gateway, default_binary, token


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
    with Gateway(args.binary, "--idle-timeout", "1h", "--max-connections", str(args.connections + 100)) as gw:
        time.sleep(0.3)
        before = gw.rss_kib()
        done = 0
        stop = asyncio.Event()

        def ready():
            nonlocal done
            done += 1

        tasks = []
        started = time.monotonic()
        for i in range(args.connections):
            # One user per connection.
            tasks.append(asyncio.create_task(hold(*gw.tcp, token(f"u{i}"), ready, stop)))
            if i % 500 == 499:
                await asyncio.sleep(0.05)
        while done < args.connections:
            await asyncio.sleep(0.1)
            if time.monotonic() - started > 120:
                raise SystemExit(f"only {done} of {args.connections} connections logged in")
        await asyncio.sleep(2)
        after = gw.rss_kib()
        peak = gw.rss_kib("VmHWM")
        print(json.dumps({
            "connections": args.connections,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "peak_rss_kib": peak,
            "kib_per_connection": round((after - before) / args.connections, 2),
            "peak_kib_per_connection": round((peak - before) / args.connections, 2),
        }))
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--binary", default=default_binary())
    asyncio.run(main(p.parse_args()))
