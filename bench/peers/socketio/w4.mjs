// W4 against Socket.IO, the way imgate-bench w4 drives imgate: C viewers spread over the
// servers join one room, one publisher sends R room messages per second for a fixed time,
// and every viewer should get every message. Latency runs from the publish call (a
// microsecond timestamp in the body) to each viewer's handler. Prints one JSON line.
// Usage: node w4.mjs <url1,url2> <connections> <rate> <seconds>
import { io } from "socket.io-client";

const [urlsArg, connArg, rateArg, secsArg] = process.argv.slice(2);
const urls = urlsArg.split(",");
const conns = Number(connArg), rate = Number(rateArg), secs = Number(secsArg);
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

const latencies = [];
let received = 0, probes = 0;
const viewers = [];
for (let i = 0; i < conns; i++) {
  const s = io(urls[i % urls.length], { transports: ["websocket"], auth: { uid: `v${i}` }, forceNew: true });
  let probed = false;
  s.on("room", (m) => {
    const at = nowUs();
    if (typeof m.body.t === "number") {
      received++;
      latencies.push(at - m.body.t);
    } else if (!probed) {
      probed = true;
      probes++;
    }
  });
  viewers.push(s);
  if (i % 500 === 499) await new Promise((r) => setTimeout(r, 20));
}
await Promise.all(viewers.map((s) => (s.connected ? null : new Promise((r) => s.once("connect", r)))));
viewers.forEach((s) => s.emit("join", "live"));
const host = io(urls[0], { transports: ["websocket"], auth: { uid: "host" }, forceNew: true });
await new Promise((r) => host.once("connect", r));
// Joins travel asynchronously: probe until every viewer has seen one, as imgate-bench does.
const joinDeadline = performance.now() + 60_000;
while (probes < conns) {
  if (performance.now() > joinDeadline) throw new Error(`only ${probes} viewers joined`);
  host.emit("publish", { room: "live", body: { probe: true } });
  await new Promise((r) => setTimeout(r, 200));
}
await new Promise((r) => setTimeout(r, 500));
console.error(`socketio-w4: ${conns} viewers joined; offering ${rate} msg/s for ${secs} s`);

let published = 0;
const started = performance.now();
await new Promise((done) => {
  const timer = setInterval(() => {
    if ((performance.now() - started) / 1000 >= secs) { clearInterval(timer); done(); return; }
    host.emit("publish", { room: "live", body: { t: nowUs(), n: published } });
    published++;
  }, 1000 / rate);
});
const expected = published * conns;
const deadline = performance.now() + 10_000;
while (received < expected && performance.now() < deadline) await new Promise((r) => setTimeout(r, 50));
latencies.sort((a, b) => a - b);
const pct = (p) => latencies.length ? Math.round(latencies[Math.min(latencies.length - 1, Math.round((p / 100) * (latencies.length - 1)))]) / 1000 : null;
console.log(JSON.stringify({
  scenario: "W4", peer: "socket.io+redis-adapter", gateways: urls.length, connections: conns, rate,
  published, expected_deliveries: expected, deliveries: received,
  deliveries_per_second: Math.round((received / secs) * 1000) / 1000,
  missing: expected - received,
  latency_ms: { samples: latencies.length, p50: pct(50), p90: pct(90), p99: pct(99), p999: pct(99.9), max: latencies.length ? latencies[latencies.length - 1] / 1000 : null },
}));
viewers.forEach((s) => s.close());
host.close();
process.exit(0);
