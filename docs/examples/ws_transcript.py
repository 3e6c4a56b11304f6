"""Prints a real WebSocket transcript of every client frame and the server's answers, for
docs/protocol.md. Usage: ws_transcript.py <http-host:port>  (needs `websockets`)."""
import asyncio
import json
import sys
import urllib.request

import websockets


def dev_token(base, uid):
    req = urllib.request.Request(f"http://{base}/v1/dev/token", data=json.dumps({"uid": uid}).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))["token"]


async def main(base):
    alice, bob = dev_token(base, "alice"), dev_token(base, "bob")
    async with websockets.connect(f"ws://{base}/v1/ws?token={bob}&device=phone", subprotocols=["imgate.json"]) as b:
        print("bob   <", await b.recv())
        async with websockets.connect(f"ws://{base}/v1/ws", subprotocols=["imgate.json"]) as a:
            async def send(frame):
                print("alice >", json.dumps(frame))
                await a.send(json.dumps(frame))
                print("alice <", await a.recv())
            # Without the token in the URL, the first frame is login.
            login = {"type": "login", "token": alice, "device": "laptop"}
            print("alice >", json.dumps({**login, "token": "<jwt>"}))
            await a.send(json.dumps(login))
            print("alice <", await a.recv())
            await send({"type": "send", "id": "c-17", "to": "bob", "body": {"text": "hi"}})
            print("alice <", await a.recv(), "  (her own copy)")
            await send({"type": "send", "id": "c-17", "to": "bob", "body": {"text": "hi"}})
            await send({"type": "ping"})
            # A newer token for the same uid keeps the connection open past the first's exp.
            refresh = {"type": "refresh", "token": dev_token(base, "alice")}
            print("alice >", json.dumps({**refresh, "token": "<jwt>"}))
            await a.send(json.dumps(refresh))
            print("alice <", await a.recv())
            await send({"type": "send", "id": "c-18", "to": "not a uid", "body": {}})
            await send({"type": "ack", "seq": 99})
            await send({"type": "dance"})
        msg = json.loads(await b.recv())
        print("bob   <", json.dumps(msg))
        ack = {"type": "ack", "seq": msg["seq"]}
        print("bob   >", json.dumps(ack), "  (no answer: acks are silent)")
        await b.send(json.dumps(ack))
        # Bob's second device is welcomed with his read position and unread count; reading
        # on the phone tells it.
        async with websockets.connect(f"ws://{base}/v1/ws?token={bob}&device=laptop", subprotocols=["imgate.json"]) as b2:
            print("bob2  <", await b2.recv())
            read = {"type": "read", "seq": msg["seq"]}
            print("bob   >", json.dumps(read), "  (no answer: his other connections are told)")
            await b.send(json.dumps(read))
            print("bob2  <", await b2.recv())
            read = {"type": "read", "seq": 99}
            print("bob   >", json.dumps(read))
            await b.send(json.dumps(read))
            print("bob   <", await b.recv())


asyncio.run(main(sys.argv[1]))
