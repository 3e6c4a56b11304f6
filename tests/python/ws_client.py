"""imgate over WebSocket with the third-party `websockets` library (JSON subprotocol).

Usage: ws_client.py <ws-or-wss-url> <token> <peer> [<ca.pem>]
With a CA file, a wss:// URL's certificate is checked against it. Logs in with ?token= in the URL, prints the welcome frame, sends one message to <peer>,
waits for `sent`, then prints the first message received from <peer> and acks it.
"""
import asyncio
import json
import ssl
import sys

import websockets


async def main(url, token, peer, ca=None):
    tls = {"ssl": ssl.create_default_context(cafile=ca)} if ca else {}
    async with websockets.connect(
        f"{url}?token={token}&device=py", subprotocols=["imgate.json"], **tls
    ) as ws:
        assert ws.subprotocol == "imgate.json", ws.subprotocol
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        print(json.dumps(welcome), flush=True)
        await ws.send(json.dumps(
            {"type": "send", "id": "py-1", "to": peer, "body": {"text": "hello from python"}}
        ))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
            if frame["type"] == "sent":
                assert frame["id"] == "py-1", frame
            elif frame["type"] == "msg" and frame["from"] == peer:
                await ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
                print(json.dumps(frame), flush=True)
                return
            elif frame["type"] in ("error", "bye"):
                raise SystemExit(f"unexpected frame: {frame}")


asyncio.run(main(*sys.argv[1:5]))
