// W1 against Socket.IO, the same way imgate-bench w1 drives imgate: U users over WebSocket,
// half on each server, a fixed total offered rate for a fixed time, each message from a
// random user to a random user on the other server, bodies of the same size, latency from
// the send call (a microsecond timestamp in the body) to the recipient's handler. Prints one
// JSON line. Usage: node w1.mjs <url1,url2> <users> <rate> <seconds> <body bytes> <warmup s>
import { io } from "socket.io-client";

const [urlsArg, usersArg, rateArg, secsArg, bodyArg, warmArg] = process.argv.slice(2);
const urls = urlsArg.split(",");
const users = Number(usersArg), rate = Number(rateArg), secs = Number(secsArg);
const bodySize = Number(bodyArg), warmup = Number(warmArg || 3);
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

const latencies = [];
const seen = new Set();
let delivered = 0, duplicates = 0, timedAfter = Infinity;
const sockets = [];
for (let i = 0; i < users; i++) {
  const s = io(urls[i % urls.length], { transports: ["websocket"], auth: { uid: `u${i}` }, forceNew: true });
  s.on("msg", (m) => {
    const at = nowUs();
    if (seen.has(m.id)) { duplicates++; return; }
    seen.add(m.id);
    delivered++;
    if (m.body.t >= timedAfter) latencies.push(at - m.body.t);
  });
  sockets.push(s);
}
await Promise.all(sockets.map((s) => (s.connected ? null : new Promise((r) => s.once("connect", r)))));
console.error(`socketio-w1: ${users} users connected; offering ${rate} msg/s for ${secs} s`);

const pad = "x".repeat(Math.max(0, bodySize - JSON.stringify({ t: nowUs(), pad: "" }).length));
const g = urls.length;
let sent = 0, acked = 0;
const started = performance.now();
timedAfter = nowUs() + warmup * 1e6;
await new Promise((done) => {
  const timer = setInterval(() => {
    const elapsed = (performance.now() - started) / 1000;
    if (elapsed >= secs) { clearInterval(timer); done(); return; }
    const due = Math.floor(elapsed * rate);
    while (sent < due) {
      const from = Math.floor(Math.random() * users);
      const shift = 1 + Math.floor(Math.random() * (g - 1));
      let to = Math.floor(Math.random() * (users / g)) * g + ((from % g) + shift) % g;
      if (to >= users) to -= g;
      sockets[from].emit("send", { to: `u${to}`, id: `w1-${sent}`, body: { t: nowUs(), pad } }, () => acked++);
      sent++;
    }
  }, 1);
});
const offeredFor = (performance.now() - started) / 1000;
const deadline = performance.now() + 10_000;
while (delivered < sent && performance.now() < deadline) await new Promise((r) => setTimeout(r, 50));
latencies.sort((a, b) => a - b);
const pct = (p) => latencies.length ? Math.round(latencies[Math.min(latencies.length - 1, Math.round((p / 100) * (latencies.length - 1)))]) / 1000 : null;
console.log(JSON.stringify({
  scenario: "W1", peer: "socket.io+redis-adapter", gateways: g, users, offered_rate: rate, body_bytes: bodySize,
  offered_seconds: Math.round(offeredFor * 1000) / 1000, sent, acked, delivered,
  delivered_per_second: Math.round((delivered / offeredFor) * 1000) / 1000,
  lost: sent - delivered, duplicates,
  latency_ms: { samples: latencies.length, p50: pct(50), p90: pct(90), p99: pct(99), max: latencies.length ? latencies[latencies.length - 1] / 1000 : null },
}));
sockets.forEach((s) => s.close());
process.exit(0);
