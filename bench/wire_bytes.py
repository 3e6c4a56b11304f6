#!/usr/bin/env python3
"""W6: bytes on the wire, per transport, to deliver one 1:1 message whose body is a 20-byte
text. Starts a release gateway, connects bob over each transport, sends alice's message over
TCP, and counts the bytes bob's connection receives for it (server -> client), and what the
client sends to ack or fetch it (client -> server). TCP, SSE and polls are read from raw
sockets; WebSocket sizes are the frame payload plus its 2-byte header (server frames are
unmasked and shorter than 126 bytes), and a client ack frame adds 4 bytes of mask.
Excludes TCP/IP headers. Prints a Markdown table and one JSON line.

Usage: bench/wire_bytes.py [--binary PATH]     (needs `websockets` and `msgpack`)
"""
import argparse
import asyncio
import json
import socket
import struct

import msgpack
import websockets

from gwbench import Gateway, default_binary, token

TEXT = "twenty bytes of text"  # 20 bytes
assert len(TEXT) == 20


def tcp_frame(obj):
    p = msgpack.packb(obj)
    return struct.pack(">I", len(p)) + p


def recv_frame(sock):
    head = recv_exact(sock, 4)
    (n,) = struct.unpack(">I", head)
    body = recv_exact(sock, n)
    return 4 + n, msgpack.unpackb(body)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise SystemExit("closed")
        buf += chunk
    return buf


def send_from_alice(gw, to, n):
    s = socket.create_connection(gw.tcp)
    s.sendall(tcp_frame({"type": "login", "token": token("alice"), "device": "a"}))
    recv_frame(s)
    s.sendall(tcp_frame({"type": "send", "id": f"w6-{n}", "to": to, "body": {"text": TEXT}}))
    while True:
        _, f = recv_frame(s)
        if f["type"] == "sent":
            s.close()
            return


def http_request(path, tok):
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tok}\r\n\r\n".encode()


def read_http_response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return len(head) + 4 + length, json.loads(rest[:length])


def measure_tcp(gw):
    s = socket.create_connection(gw.tcp)
    s.sendall(tcp_frame({"type": "login", "token": token("bob1"), "device": "tcp"}))
    recv_frame(s)
    send_from_alice(gw, "bob1", 1)
    down, f = recv_frame(s)
    assert f["type"] == "msg" and f["body"]["text"] == TEXT, f
    up = len(tcp_frame({"type": "ack", "seq": f["seq"]}))
    s.close()
    return down, up


async def measure_ws(gw, sub):
    url = f"ws://{gw.http[0]}:{gw.http[1]}/v1/ws?token={token('bob2')}&device=ws{sub}"
    async with websockets.connect(url, subprotocols=[f"imgate.{sub}"]) as ws:
        await ws.recv()
        await asyncio.get_running_loop().run_in_executor(None, send_from_alice, gw, "bob2", 2 if sub == "json" else 3)
        m = await ws.recv()
        payload = m if isinstance(m, bytes) else m.encode()
        f = msgpack.unpackb(payload) if sub == "msgpack" else json.loads(payload)
        assert f["type"] == "msg", f
        ack = {"type": "ack", "seq": f["seq"]}
        ack_payload = msgpack.packb(ack) if sub == "msgpack" else json.dumps(ack, separators=(",", ":")).encode()
        return 2 + len(payload), 2 + 4 + len(ack_payload)


def measure_sse(gw):
    s = socket.create_connection(gw.http)
    s.sendall(http_request("/v1/events?device=sse", token("bob3")))
    data = b""
    while b"event: welcome" not in data or not data.endswith(b"\r\n"):
        data += s.recv(65536)
    send_from_alice(gw, "bob3", 4)
    event = b""
    while TEXT.encode() not in event or not event.endswith(b"\r\n"):
        event += s.recv(65536)
    s.close()
    return len(event), 0


def measure_poll(gw, wait):
    tail_sock = socket.create_connection(gw.http)
    tail_sock.sendall(http_request("/v1/messages?device=poll", token("bob4")))
    _, page = read_http_response(tail_sock)
    after = page["cursor"]
    s = socket.create_connection(gw.http)
    path = f"/v1/messages?device=poll&after={after}" + ("&wait=10" if wait else "")
    req = http_request(path, token("bob4"))
    if wait:
        s.sendall(req)
        send_from_alice(gw, "bob4", 5)
    else:
        send_from_alice(gw, "bob4", 6)
        s.sendall(req)
    down, page = read_http_response(s)
    assert page["messages"][0]["body"]["text"] == TEXT, page
    return down, len(req)


async def main(a):
    with Gateway(a.binary, "--send-rate", "0") as gw:
        rows = [("TCP (msgpack)",) + measure_tcp(gw)]
        rows.append(("WebSocket msgpack",) + await measure_ws(gw, "msgpack"))
        rows.append(("WebSocket JSON",) + await measure_ws(gw, "json"))
        rows.append(("SSE",) + measure_sse(gw))
        rows.append(("long poll",) + measure_poll(gw, True))
        rows.append(("short poll",) + measure_poll(gw, False))
    print("| transport | server -> client bytes | client -> server bytes (ack or request) |")
    print("| --- | --- | --- |")
    for name, down, up in rows:
        print(f"| {name} | {down} | {up} |")
    print(json.dumps({name: {"down": d, "up": u} for name, d, u in rows}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=default_binary())
    asyncio.run(main(p.parse_args()))
