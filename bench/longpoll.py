#!/usr/bin/env python3
"""Long polls: gateway CPU while they wait with no traffic, and how fast a message wakes one.

1. Starts a release gateway and holds N long polls (`wait=60`), one per user, each on its
   own HTTP/1.1 connection; then reads the gateway's CPU time (/proc, user + system) over
   `--idle` seconds with no traffic at all.
2. Sends M messages one at a time with `POST /v1/messages`, each to a user whose long poll
   is waiting, and times from just before the POST is written to the moment the waiting
   poll's answer has arrived. That interval holds the POST's parsing and the store write,
   so it is an upper bound of "stored -> long poll answered". The POST's own round trip is
   reported beside it.

Usage: bench/longpoll.py [--polls 1000] [--idle 30] [--messages 1000] [--binary PATH]
Standard library only. Prints one JSON line.
"""
import argparse
import asyncio
import json
import time

from gwbench import Gateway, default_binary, percentile, token


async def http(reader, writer, method, path, tok, body=b""):
    head = (f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {tok}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()
    return await read_response(reader)


async def read_raw(reader):
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        if k.lower() == "content-length":
            length = int(v)
    return status, await reader.readexactly(length)


async def read_response(reader):
    status, body = await read_raw(reader)
    return status, json.loads(body)


async def main(args):
    with Gateway(args.binary, "--send-rate", "0", "--max-connections", str(args.polls + 100)) as gw:
        host, port = gw.http
        users = [f"lp{i}" for i in range(args.polls)]
        tokens = {u: token(u) for u in users + ["sender"]}
        conns = {}
        for u in users:
            conns[u] = await asyncio.open_connection(host, port)

        async def start_poll(u):
            r, w = conns[u]
            path = f"/v1/messages?device=bench&after=0&wait=60"
            w.write((f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {tokens[u]}\r\n\r\n").encode())
            await w.drain()

        await asyncio.gather(*(start_poll(u) for u in users))
        # Wait until every poll is parked (the gateway reports it in /metrics).
        mr, mw = await asyncio.open_connection(host, port)
        for _ in range(200):
            mw.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            await mw.drain()
            _, raw = await read_raw(mr)
            text = raw.decode()
            waiting = next((float(l.split()[1]) for l in text.splitlines() if l.startswith("imgate_long_polls_waiting ")), 0)
            if waiting >= args.polls:
                break
            await asyncio.sleep(0.1)
        else:
            raise SystemExit(f"only {waiting} of {args.polls} long polls are waiting")

        cpu0, t0 = gw.cpu_seconds(), time.monotonic()
        await asyncio.sleep(args.idle)
        cpu_idle = gw.cpu_seconds() - cpu0
        wall = time.monotonic() - t0

        sr, sw = await asyncio.open_connection(host, port)
        wake, post_rtt = [], []
        for i in range(min(args.messages, args.polls)):
            u = users[i]
            body = json.dumps({"to": u, "id": f"m{i}", "body": {"text": "x" * 20}}).encode()
            pr, _ = conns[u]
            started = time.perf_counter()
            post = asyncio.create_task(http(sr, sw, "POST", "/v1/messages", tokens["sender"], body))
            status, page = await read_response(pr)
            woke = time.perf_counter()
            pstatus, _ = await post
            posted = time.perf_counter()
            assert status == 200 and pstatus == 200 and len(page["messages"]) == 1, (status, page)
            wake.append((woke - started) * 1000)
            post_rtt.append((posted - started) * 1000)
        wake.sort()
        post_rtt.sort()
        print(json.dumps({
            "long_polls": args.polls,
            "idle_seconds": round(wall, 1),
            "gateway_cpu_seconds_idle": round(cpu_idle, 3),
            "messages": len(wake),
            "post_to_poll_answer_ms": {"p50": round(percentile(wake, 50), 3), "p99": round(percentile(wake, 99), 3),
                                       "max": round(wake[-1], 3)},
            "post_round_trip_ms": {"p50": round(percentile(post_rtt, 50), 3), "p99": round(percentile(post_rtt, 99), 3)},
        }))
        for _, w in conns.values():
            w.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--polls", type=int, default=1000)
    p.add_argument("--idle", type=float, default=30)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--binary", default=default_binary())
    asyncio.run(main(p.parse_args()))
