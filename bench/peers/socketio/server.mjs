// A Socket.IO chat server with a Redis adapter: the peer of an imgate gateway in W1, W2
// and W4. Each user's socket joins a room named by its uid; a send is
// `socket.emit("send", {to, id, body}, ack)`.
// - ADAPTER=pubsub (default): every server sees every message through Redis pub/sub
//   (broadcast, like imgate over NATS). Nothing is stored.
// - ADAPTER=streams: @socket.io/redis-streams-adapter, every packet appended to one Redis
//   stream that every server reads, with connection state recovery on: the same broadcast
//   shape as imgate's, and it keeps messages (Redis runs with AOF every second, peer.py).
// Usage: PORT=3001 REDIS_URL=redis://127.0.0.1:6390 [ADAPTER=streams] node server.mjs
import { createServer } from "node:http";
import { Server } from "socket.io";
import { createAdapter as pubsubAdapter } from "@socket.io/redis-adapter";
import { createAdapter as streamsAdapter } from "@socket.io/redis-streams-adapter";
import { createClient } from "redis";

const port = Number(process.env.PORT || 3001);
const pub = createClient({ url: process.env.REDIS_URL });
let options;
if (process.env.ADAPTER === "streams") {
  await pub.connect();
  options = { adapter: streamsAdapter(pub), connectionStateRecovery: {} };
} else {
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  options = { adapter: pubsubAdapter(pub, sub) };
}

const http = createServer();
const io = new Server(http, { ...options, transports: ["websocket"] });
io.on("connection", (socket) => {
  const uid = socket.handshake.auth.uid;
  socket.join(uid);
  socket.on("send", (m, ack) => {
    io.to(m.to).emit("msg", { id: m.id, from: uid, to: m.to, ts: Date.now(), body: m.body });
    if (typeof ack === "function") ack({ ok: true });
  });
  // W4: a live room, like imgate's join/publish (nothing stored).
  socket.on("join", (room) => socket.join(`room:${room}`));
  socket.on("publish", (m) => io.to(`room:${m.room}`).emit("room", { room: m.room, from: uid, body: m.body }));
});
http.listen(port, "127.0.0.1", () => console.log(`socket.io listening port=${port}`));
