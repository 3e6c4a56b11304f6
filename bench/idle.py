#!/usr/bin/env python3
"""Gateway memory per idle TCP connection.

Starts a release `imgate serve` on free ports, opens N TCP connections that each log in
(length-prefixed msgpack, one uid per connection) and wait for `welcome`, holds them idle,
and reads the gateway's RSS from /proc before and after. Prints one JSON line.

Usage: bench/idle_tcp.py [--connections 10000] [--gateways 1] [--binary PATH]
Needs the `msgpack` package (tests/run's venv has it). A process may hold at most 20,000
open files here, so with --gateways G the connections are spread over G gateways and held
by G client processes (one per gateway, each from its own loopback source address).
"""
import argparse
import asyncio
import json
import multiprocessing
import struct
import time

import msgpack

from gwbench import Gateway, default_binary, token


async def hold(host, port, tok, ready, stop, source=None):
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)
    payload = msgpack.packb({"type": "login", "token": tok, "device": "idle"})
    writer.write(struct.pack(">I", len(payload)) + payload)
    await writer.drain()
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    frame = msgpack.unpackb(await reader.readexactly(n))
    assert frame["type"] == "welcome", frame
    ready()
    await stop.wait()
    writer.close()


async def connect_all(addr, first, count, stop, source=None, deadline=120):
    """Opens `count` connections as users u<first>.. (one user each), logged in; returns
    their tasks, which hold the connections until `stop` is set."""
    done = 0

    def ready():
        nonlocal done
        done += 1

    tasks = []
    started = time.monotonic()
    for i in range(first, first + count):
        tasks.append(asyncio.create_task(hold(*addr, token(f"u{i}"), ready, stop, source)))
        if i % 500 == 499:
            await asyncio.sleep(0.05)
    while done < count:
        await asyncio.sleep(0.1)
        if time.monotonic() - started > deadline:
            raise SystemExit(f"only {done} of {count} connections logged in")
    return tasks


async def main(args):
    with Gateway(args.binary, "--idle-timeout", "1h", "--max-connections", str(args.connections + 100)) as gw:
        time.sleep(0.3)
        before = gw.rss_kib()
        stop = asyncio.Event()
        tasks = await connect_all(gw.tcp, 0, args.connections, stop)
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


def worker(addr, source, first, count, ready_q, stop_ev):
    """A client process holding `count` connections to one gateway until `stop_ev`."""
    async def run():
        stop = asyncio.Event()
        tasks = await connect_all(addr, first, count, stop, source, deadline=600)
        ready_q.put(count)
        while not stop_ev.is_set():
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


def many(args):
    """--gateways G: G gateways, G client processes, total connections spread evenly."""
    per = args.connections // args.gateways
    gws = [Gateway(args.binary, "--idle-timeout", "1h", "--max-connections", str(per + 100)) for _ in range(args.gateways)]
    try:
        time.sleep(0.3)
        before = [g.rss_kib() for g in gws]
        ready_q, stop_ev = multiprocessing.Queue(), multiprocessing.Event()
        procs = [multiprocessing.Process(target=worker, args=(g.tcp, f"127.0.0.{k + 2}", k * per, per, ready_q, stop_ev))
                 for k, g in enumerate(gws)]
        started = time.monotonic()
        for p in procs:
            p.start()
        held = sum(ready_q.get(timeout=600) for _ in procs)
        took = time.monotonic() - started
        time.sleep(2)
        after = [g.rss_kib() for g in gws]
        print(json.dumps({
            "gateways": args.gateways,
            "connections": held,
            "seconds_to_connect": round(took, 1),
            "rss_kib_per_gateway": after,
            "total_rss_mib": round(sum(after) / 1024, 1),
            "kib_per_connection": round((sum(after) - sum(before)) / held, 2),
        }))
        stop_ev.set()
        for p in procs:
            p.join(timeout=60)
    finally:
        for g in gws:
            g.__exit__(None, None, None)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--binary", default=default_binary())
    a = p.parse_args()
    if a.gateways > 1:
        many(a)
    else:
        asyncio.run(main(a))
