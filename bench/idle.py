#!/usr/bin/env python3
"""W2: server memory per idle connection, for imgate over TCP or WebSocket, or for the
Socket.IO peer.

Starts the server(s) on free ports, opens N connections that each log in as their own user
and wait for the server's answer (`welcome`; Socket.IO's connect packet), holds them idle,
and reads each server's RSS from /proc before and after. Prints one JSON line.

Usage: bench/idle.py [--transport tcp|tls|ws|socketio] [--connections 10000] [--gateways 1]
`tls` is the TCP protocol inside TLS (`--tls-cert`, a P-256 certificate `openssl` makes for
the run), so `seconds_to_connect` beside `tcp` shows what the handshakes cost.
Needs `msgpack` and `websockets` (tests/run's venv has both); for socketio, what
bench/peers/socketio needs. A process may hold at most 20,000 open files here, so the
connections are held by one client process per server, each from its own loopback source
address, spread evenly over G servers.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import random
import ssl
import subprocess
import tempfile
import struct
import sys
import time

import msgpack
import websockets

from gwbench import Gateway, default_binary, rss_kib, token

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "socketio"))


def tls_files():
    """A self-signed P-256 certificate for 127.0.0.1 and its key, made once per run."""
    d = tempfile.mkdtemp(prefix="imgate-tls-")
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


TLS = {}  # "cert", "key": set by main before the client processes fork


async def hold_tcp(addr, uid, source, stop, tls=False):
    ctx = ssl.create_default_context(cafile=TLS["cert"]) if tls else None
    reader, writer = await asyncio.open_connection(*addr, local_addr=(source, 0), ssl=ctx)
    payload = msgpack.packb({"type": "login", "token": token(uid), "device": "idle"})
    writer.write(struct.pack(">I", len(payload)) + payload)
    await writer.drain()
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    frame = msgpack.unpackb(await reader.readexactly(n))
    assert frame["type"] == "welcome", frame
    yield
    await stop.wait()
    writer.close()


async def hold_ws(addr, uid, source, stop):
    url = f"ws://{addr[0]}:{addr[1]}/v1/ws?token={token(uid)}&device=idle"
    async with websockets.connect(url, subprotocols=["imgate.json"], ping_interval=None,
                                  local_addr=(source, 0)) as ws:
        frame = json.loads(await ws.recv())
        assert frame["type"] == "welcome", frame
        yield
        await stop.wait()


async def hold_socketio(addr, uid, source, stop):
    # Engine.IO v4 over a raw WebSocket: "0{...}" open, "40{auth}" connect, "2"/"3" ping/pong.
    url = f"ws://{addr[0]}:{addr[1]}/socket.io/?EIO=4&transport=websocket"
    async with websockets.connect(url, ping_interval=None, local_addr=(source, 0)) as ws:
        opened = await ws.recv()
        assert opened.startswith("0{"), opened
        await ws.send("40" + json.dumps({"uid": uid}))
        connected = await ws.recv()
        assert connected.startswith("40"), connected
        yield

        async def pong():
            async for m in ws:
                if m == "2":
                    await ws.send("3")
        task = asyncio.create_task(pong())
        await stop.wait()
        task.cancel()


def hold_tls(addr, uid, source, stop):
    return hold_tcp(addr, uid, source, stop, tls=True)


HOLD = {"tcp": hold_tcp, "tls": hold_tls, "ws": hold_ws, "socketio": hold_socketio}


async def connect_all(transport, addr, first, count, source, stop, deadline=600):
    """Opens `count` logged-in connections as users u<first>..; returns their tasks, which
    hold the connections until `stop` is set."""
    done = 0
    # At most this many logins in flight per process: an overloaded client that opens sockets
    # faster than it can send their login frames gets `bye login_timeout` from the gateway.
    logins = asyncio.Semaphore(100)

    async def one(i):
        nonlocal done
        gen = HOLD[transport](addr, f"u{i}", source, stop)
        async with logins:
            await gen.__anext__()
        done += 1
        try:
            await gen.__anext__()
        except StopAsyncIteration:
            pass

    tasks = []
    started = time.monotonic()
    for i in range(first, first + count):
        tasks.append(asyncio.create_task(one(i)))
        if i % 500 == 499:
            await asyncio.sleep(0)
            failed = [t for t in tasks if t.done() and t.exception()]
            if failed:
                raise failed[0].exception()
    while done < count:
        await asyncio.sleep(0.1)
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            raise failed[0].exception()
        if time.monotonic() - started > deadline:
            raise SystemExit(f"only {done} of {count} connections logged in")
    return tasks


def worker(transport, addr, source, first, count, ready_q, stop_ev):
    """A client process holding `count` connections to one server until `stop_ev`."""
    async def run():
        stop = asyncio.Event()
        try:
            tasks = await connect_all(transport, addr, first, count, source, stop)
        except BaseException as e:  # report, do not leave the parent waiting
            ready_q.put(f"{source}: {e!r}")
            raise
        ready_q.put(count)
        while not stop_ev.is_set():
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


class Servers:
    """G imgate gateways, or one Socket.IO peer with G servers; pids and addresses."""

    def __init__(self, transport, g, per, binary):
        self.peer = None
        if transport == "socketio":
            from peer import Peer
            self.peer = Peer(servers=g)
            self.pids = [self.peer.server_pid(i) for i in range(g)]
            self.addrs = [("127.0.0.1", p) for p in self.peer.ports]
        else:
            tls = ["--tls-cert", TLS["cert"], "--tls-key", TLS["key"]] if transport == "tls" else []
            self.gws = [Gateway(binary, "--idle-timeout", "1h", "--max-connections", str(per + 100), *tls)
                        for _ in range(g)]
            self.pids = [gw.pid for gw in self.gws]
            self.addrs = [gw.http if transport == "ws" else gw.tcp for gw in self.gws]

    def close(self):
        if self.peer:
            self.peer.__exit__(None, None, None)
        else:
            for gw in self.gws:
                gw.__exit__(None, None, None)


def main(a):
    # Server k holds counts[k] connections, users u<firsts[k]>..; the remainder goes first.
    counts = [a.connections // a.gateways + (k < a.connections % a.gateways) for k in range(a.gateways)]
    firsts = [sum(counts[:k]) for k in range(a.gateways)]
    if a.transport == "tls":
        TLS["cert"], TLS["key"] = tls_files()
    servers = Servers(a.transport, a.gateways, counts[0], a.binary)
    stop_ev, procs = multiprocessing.Event(), []
    try:
        time.sleep(0.5)
        before = [rss_kib(p) for p in servers.pids]
        ready_q = multiprocessing.Queue()
        # Fresh source addresses each run, so sockets left in TIME_WAIT by an earlier run
        # cannot exhaust the ephemeral ports of the one we bind to.
        net = f"127.{random.randrange(1, 255)}.{random.randrange(0, 255)}"
        procs += [multiprocessing.Process(target=worker, args=(a.transport, addr, f"{net}.{k + 2}", firsts[k],
                                                               counts[k], ready_q, stop_ev))
                  for k, addr in enumerate(servers.addrs)]
        started = time.monotonic()
        for p in procs:
            p.start()
        answers = [ready_q.get(timeout=900) for _ in procs]
        errors = [x for x in answers if isinstance(x, str)]
        if errors:
            raise SystemExit(f"a client process failed: {errors}")
        took = time.monotonic() - started
        time.sleep(3)
        after = [rss_kib(p) for p in servers.pids]
        held = sum(answers)
        print(json.dumps({
            "scenario": "W2",
            "transport": a.transport,
            "servers": a.gateways,
            "connections": held,
            "seconds_to_connect": round(took, 1),
            "connections_per_second": round(held / took),
            "rss_before_kib": before,
            "rss_after_kib": after,
            "peak_rss_kib": [rss_kib(p, "VmHWM") for p in servers.pids],
            "total_rss_mib": round(sum(after) / 1024, 1),
            "kib_per_connection": round((sum(after) - sum(before)) / held, 2),
        }))
    finally:
        stop_ev.set()  # also on failure, so no client process is left waiting
        for p in procs:
            p.join(timeout=60)
        servers.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--transport", choices=sorted(HOLD), default="tcp")
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--binary", default=default_binary())
    main(p.parse_args())
