#!/usr/bin/env python3
"""What clients that never log in can make a gateway hold: RSS before and after 200 HTTP
connections each trickling 400 KB of one request header that never ends, then 150 TCP
connections each sending 200 KB of a 256 KB frame before any login.

    python3 bench/pre_login_memory.py target/release/imgate

Starts its own gateway (memory store, ports 18090 and 17090, --header-timeout 60s so the
header timeout does not end the test first, no per-address limit) and prints one line."""
import socket
import subprocess
import sys
import time


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def push(sock, total, chunk):
    """Sends up to `total` bytes within 3 s, stopping when the server closes."""
    sent, deadline = 0, time.time() + 3
    while sent < total and time.time() < deadline:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            break


def main(binary):
    gw = subprocess.Popen(
        [binary, "serve", "--store", "memory", "--http", "127.0.0.1:18090", "--tcp", "127.0.0.1:17090",
         "--header-timeout", "60s", "--max-connections-per-ip", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        start = rss_mb(gw.pid)
        held = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", 18090))
            s.setblocking(False)
            s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            push(s, 400 * 1024, b"a" * 16384)
            held.append(s)
        time.sleep(1)
        headers = rss_mb(gw.pid)
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", 17090))
            s.setblocking(False)
            s.send((256 * 1024).to_bytes(4, "big"))
            push(s, 200 * 1024, b"\x00" * 16384)
            held.append(s)
        time.sleep(1)
        frames = rss_mb(gw.pid)
        print(f"{binary}: RSS {start} MB at start, {headers} MB with 200 unfinished 400 KB headers, "
              f"{frames} MB with 150 unfinished 200 KB pre-login TCP frames as well")
    finally:
        gw.kill()


if __name__ == "__main__":
    main(sys.argv[1])
