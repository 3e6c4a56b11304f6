#!/usr/bin/env python3
"""Standalone store memory: what stored messages cost a gateway with no NATS. Starts a
release gateway, creates a group of --members (the owner included), sends --messages group
messages whose body is a --body-byte text over HTTP, checks that the last member's inbox
holds them all, and prints the gateway's RSS growth per message and per inbox copy. Each
group message is one copy per member's inbox (docs/protocol.md, "Messages, seqs and
guarantees"). With --read-passes N it then reads that member's whole inbox N more times
with short polls (1,000 a page) and reports the gateway's CPU per message read.

Usage: bench/store_memory.py [--binary PATH] [--members 1000] [--messages 300] [--body 1000]
                             [--read-passes 0]
Standard library only.
"""
import argparse
import http.client
import json

from gwbench import Gateway, default_binary, token


def call(gw, method, path, uid, body=None):
    conn = http.client.HTTPConnection(*gw.http, timeout=30)
    headers = {"Authorization": f"Bearer {token(uid)}", "Content-Type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status // 100 != 2:
        raise RuntimeError(f"{method} {path}: HTTP {resp.status} {data[:200]!r}")
    return json.loads(data)


def read_all(gw, uid):
    """Every message of uid's inbox, with short polls of 1,000."""
    got, after = [], 0
    while True:
        page = call(gw, "GET", f"/v1/messages?after={after}&limit=1000", uid)
        if not page["messages"]:
            return got
        got += page["messages"]
        after = page["cursor"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=default_binary())
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--body", type=int, default=1000)
    ap.add_argument("--read-passes", type=int, default=0)
    a = ap.parse_args()
    members = [f"m{i}" for i in range(a.members - 1)]
    with Gateway(a.binary, "--max-group", str(max(a.members, 1000)), "--send-rate", "0") as gw:
        call(gw, "POST", "/v1/groups", "owner", {"id": "g", "members": members})
        before = gw.rss_kib()
        text = "x" * a.body
        for i in range(a.messages):
            call(gw, "POST", "/v1/messages", "owner", {"group": "g", "id": f"s{i}", "body": {"text": text}})
        after = gw.rss_kib()
        last = members[-1]
        got = read_all(gw, last)
        if len(got) != a.messages or any(m["body"]["text"] != text for m in got):
            raise RuntimeError(f"{last} holds {len(got)} of {a.messages} messages")
        cpu = gw.cpu_seconds()
        read = sum(len(read_all(gw, last)) for _ in range(a.read_passes))
        read_cpu = gw.cpu_seconds() - cpu
    grown = after - before
    copies = a.messages * a.members
    report = {
        "scenario": "store-memory", "members": a.members, "messages": a.messages,
        "body_bytes": a.body, "rss_before_kib": before, "rss_after_kib": after,
        "kib_per_message": round(grown / a.messages, 2),
        "bytes_per_inbox_copy": round(grown * 1024 / copies, 1),
        "messages_read": read, "read_cpu_seconds": round(read_cpu, 2),
        "read_cpu_us_per_message": round(read_cpu * 1e6 / read, 2) if read else None,
    }
    print(f"group of {a.members}, {a.messages} messages of {a.body} bytes: RSS {before} -> {after} KiB, "
          f"{report['kib_per_message']} KiB per message, {report['bytes_per_inbox_copy']} bytes per inbox copy"
          + (f"; {read} messages read for {read_cpu:.2f} s of gateway CPU" if read else ""))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
