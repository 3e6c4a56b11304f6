"""imgate over raw TCP with the third-party `msgpack` library: 4-byte big-endian length,
then a msgpack map per frame.

Usage: tcp_msgpack_client.py <host:port> <token> <peer> [<ca.pem>]
With a CA file it speaks TLS (Python's `ssl`), checking the gateway's certificate. Logs in with a login frame, prints the welcome frame as JSON, sends one message to <peer>,
waits for `sent`, then prints the first message received from <peer> and acks it.
"""
import json
import socket
import ssl
import struct
import sys

import msgpack


def send(sock, frame):
    payload = msgpack.packb(frame)
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise SystemExit("connection closed")
        buf += chunk
    return buf


def recv(sock):
    (length,) = struct.unpack(">I", recv_exact(sock, 4))
    return msgpack.unpackb(recv_exact(sock, length))


def main(addr, token, peer, ca=None):
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=15)
    if ca:
        sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname=host)
    send(sock, {"type": "login", "token": token, "device": "pytcp"})
    welcome = recv(sock)
    assert welcome["type"] == "welcome", welcome
    print(json.dumps(welcome), flush=True)
    send(sock, {"type": "send", "id": "py-tcp-1", "to": peer, "body": {"text": "hello from python"}})
    while True:
        frame = recv(sock)
        if frame["type"] == "sent":
            assert frame["id"] == "py-tcp-1", frame
        elif frame["type"] == "msg" and frame["from"] == peer:
            send(sock, {"type": "ack", "seq": frame["seq"]})
            print(json.dumps(frame), flush=True)
            return
        elif frame["type"] in ("error", "bye"):
            raise SystemExit(f"unexpected frame: {frame}")


main(*sys.argv[1:5])
