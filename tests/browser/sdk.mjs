// The browser SDK (sdk/js/imgate.js) in headless Chromium against real gateways: one
// scenario per run, each starting and stopping its own gateways (and NATS, and proxies).
//
// Usage: node tests/browser/sdk.mjs <scenario>
//   scenarios: normal, ws-blocked, ws-sse-blocked, buffering-proxy, restart, failover,
//              refresh, history, epoch
// Needs IMGATE_BIN (the imgate binary) and, for failover, NATS_SERVER; Chromium from
// CHROMIUM or /usr/bin/chromium. Prints one JSON line of what it measured, then
// "sdk scenario <name> passed"; exits non-zero on any failure.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const scenario = process.argv[2];
const IMGATE = process.env.IMGATE_BIN;
const TIMEOUT = 30_000;
const DEV_SECRET = "imgate-development-secret-do-not-use-in-production";
if (!IMGATE) throw new Error("IMGATE_BIN must name the imgate binary");

const cleanup = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fail(message) {
  throw new Error(`${scenario}: ${message}`);
}

async function until(what, check, ms = TIMEOUT) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) fail(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** `imgate serve` with `args`; resolves once it listens. */
async function gateway(args, ports) {
  const http_ = ports?.http ?? await freePort();
  const tcp = ports?.tcp ?? await freePort();
  const child = spawn(IMGATE, ["serve", "--http", `127.0.0.1:${http_}`, "--tcp", `127.0.0.1:${tcp}`,
    "--send-rate", "0", ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: "error" } });
  let log = "";
  child.stderr.on("data", (d) => { log += d; });
  await new Promise((resolve, reject) => {
    child.stdout.on("data", (d) => { if (String(d).includes("http=")) resolve(); });
    child.on("exit", (code) => reject(new Error(`imgate exited (${code}) before listening:\n${log}`)));
  });
  const gw = {
    child, ports: { http: http_, tcp }, origin: `http://127.0.0.1:${http_}`,
    stop: (signal = "SIGTERM") => new Promise((r) => {
      if (child.exitCode !== null || child.signalCode !== null) return r();
      child.once("exit", r);
      child.kill(signal);
    }),
  };
  cleanup.push(() => gw.stop("SIGKILL"));
  return gw;
}

async function natsServer() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "imgate-sdk-nats-"));
  const child = spawn(process.env.NATS_SERVER || "nats-server",
    ["-a", "127.0.0.1", "-p", String(port), "-js", "-sd", dir], { stdio: ["ignore", "ignore", "pipe"] });
  await new Promise((resolve, reject) => {
    let log = "";
    child.stderr.on("data", (d) => { log += d; if (log.includes("Server is ready")) resolve(); });
    child.on("exit", () => reject(new Error(`nats-server exited:\n${log}`)));
  });
  cleanup.push(() => { child.kill("SIGKILL"); rmSync(dir, { recursive: true, force: true }); });
  return `nats://127.0.0.1:${port}`;
}

/** An HS256 token signed with the development secret, expiring in `secs` seconds. */
function devToken(uid, secs) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: uid, exp: now + secs, iat: now })}`;
  return `${head}.${createHmac("sha256", DEV_SECRET).update(head).digest("base64url")}`;
}

/**
 * A TCP proxy on a port of its own in front of `backends` (origins' ports): each new
 * connection goes to the next backend that accepts it. `held()` says which backend holds
 * which open connections.
 */
async function roundRobin(backends) {
  let next = 0;
  const open = new Map();
  const sockets = new Set();
  const server = net.createServer((client) => {
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    const attempt = (tries) => {
      const i = next++ % backends.length;
      const up = net.connect(backends[i], "127.0.0.1");
      up.once("connect", () => {
        open.set(client, i);
        client.pipe(up).pipe(client);
        const done = () => { open.delete(client); client.destroy(); up.destroy(); };
        client.on("close", done); up.on("close", done); client.on("error", done); up.on("error", done);
      });
      up.once("error", () => (tries > 1 ? attempt(tries - 1) : client.destroy()));
    };
    attempt(backends.length);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  cleanup.push(() => { for (const s of sockets) s.destroy(); server.close(); });
  return { origin: `http://127.0.0.1:${server.address().port}`, held: () => [...open.values()] };
}

/** An HTTP proxy that refuses WebSocket upgrades and buffers event streams until they end. */
async function bufferingProxy(target) {
  const server = http.createServer((req, res) => {
    const up = http.request({ host: "127.0.0.1", port: target, path: req.url, method: req.method, headers: req.headers }, (r) => {
      if ((r.headers["content-type"] || "").startsWith("text/event-stream")) {
        const chunks = [];
        r.on("data", (c) => chunks.push(c)); // held back, as a buffering proxy does
        r.on("end", () => { res.writeHead(r.statusCode, r.headers); res.end(Buffer.concat(chunks)); });
        return;
      }
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  server.on("upgrade", (_req, socket) => socket.destroy());
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  cleanup.push(() => { server.closeAllConnections?.(); server.close(); });
  return `http://127.0.0.1:${server.address().port}`;
}

// --- the page ---------------------------------------------------------------------------

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
cleanup.push(() => browser.close());

/** A page on `origin` with `window.clients` and `window.make(name, uid, options)`. */
async function openPage(origin, initScript) {
  const page = await (await browser.newContext()).newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (e) => { console.error(`page error: ${e.message}`); process.exitCode = 1; });
  if (initScript) await page.addInitScript(initScript);
  await page.goto(`${origin}/`);
  await page.evaluate(async () => {
    const { Imgate } = await import("/v1/sdk/imgate.js");
    window.clients = {};
    window.make = async (name, uid, options = {}) => {
      const token = options.token ?? (await (await fetch("/v1/dev/token", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ uid }),
      })).json()).token;
      const im = new Imgate({ url: location.origin, token, device: `${name}-dev`, ...options });
      const c = { im, messages: [], at: [], states: [], gaps: 0, rooms: [], started: performance.now(), firstAt: null };
      im.on("message", (m) => { c.messages.push(m); c.at.push(Date.now()); c.firstAt ??= performance.now(); });
      im.on("state", (s) => c.states.push({ ...s, at: performance.now() }));
      im.on("gap", () => { c.gaps++; });
      im.on("room", (r) => c.rooms.push(r));
      c.reads = [];
      im.on("read", (r) => c.reads.push(r.seq));
      window.clients[name] = c;
      await im.connect();
      return im.transport;
    };
  });
  return page;
}

const make = (page, name, uid, options) => page.evaluate(({ name, uid, options }) => window.make(name, uid, options), { name, uid, options });
const state = (page, name) => page.evaluate((n) => ({ state: window.clients[n].im.state, transport: window.clients[n].im.transport }), name);
const bodies = (page, name) => page.evaluate((n) => window.clients[n].messages.map((m) => m.body), name);

/** `from` sends `texts` (one after another) to `to`; resolves with the answers. */
const sendAll = (page, from, to, texts) => page.evaluate(async ({ from, to, texts }) => {
  const out = [];
  for (const t of texts) out.push(await window.clients[from].im.send({ to, body: { t } }));
  return out;
}, { from, to, texts });

/** Every message `name` got, from `from`, in order, once each (seqs increasing, unless
 * the store was reset in between, which starts seqs over). */
async function receivedInOrder(page, name, from, want, reset = false) {
  await until(`${name} to have ${want.length} messages from ${from}`, async () => {
    const got = await page.evaluate(({ name, from }) => window.clients[name].messages.filter((m) => m.from === from).length, { name, from });
    return got >= want.length;
  });
  const got = await page.evaluate(({ name, from }) => window.clients[name].messages.filter((m) => m.from === from).map((m) => ({ t: m.body.t, seq: m.seq })), { name, from });
  const texts = got.map((m) => m.t);
  if (JSON.stringify(texts) !== JSON.stringify(want)) fail(`${name} got ${JSON.stringify(texts)}, want ${JSON.stringify(want)}`);
  const seqs = got.map((m) => m.seq);
  if (!reset && seqs.some((s, i) => i > 0 && s <= seqs[i - 1])) fail(`${name}'s seqs are not increasing: ${seqs}`);
}

const texts = (prefix, n) => Array.from({ length: n }, (_, i) => `${prefix}${i}`);

/** Exchanges `n` messages each way between alice and bob, checking each side's order. */
async function exchange(page, n) {
  await Promise.all([sendAll(page, "alice", "bob", texts("a", n)), sendAll(page, "bob", "alice", texts("b", n))]);
  await receivedInOrder(page, "bob", "alice", texts("a", n));
  await receivedInOrder(page, "alice", "bob", texts("b", n));
}

/** ms from `connect()` to the first message handed over. */
const firstMessageMs = (page, name) => page.evaluate((n) => {
  const c = window.clients[n];
  return c.firstAt === null ? null : Math.round(c.firstAt - c.started);
}, name);

// --- scenarios ----------------------------------------------------------------------------

const BLOCK_WS = () => {
  window.WebSocket = class {
    constructor() { setTimeout(() => { this.onerror?.(new Event("error")); this.onclose?.(new Event("close")); }, 10); }
    send() {}
    close() {}
  };
};
const BLOCK_SSE = () => {
  window.EventSource = class {
    constructor() { setTimeout(() => this.onerror?.(new Event("error")), 10); }
    addEventListener() {}
    close() {}
  };
};

async function blocked(initScript, want) {
  const gw = await gateway(["--store", "memory"]);
  const page = await openPage(gw.origin, initScript);
  const t0 = Date.now();
  const [a, b] = [await make(page, "alice", "alice"), await make(page, "bob", "bob")];
  const opened = Date.now() - t0;
  if (a !== want || b !== want) fail(`opened on ${a}/${b}, want ${want}`);
  await exchange(page, 20);
  return { transport: want, open_ms_both: opened, first_message_ms: await firstMessageMs(page, "bob") };
}

const scenarios = {
  async normal() {
    const gw = await gateway(["--store", "memory"]);
    const page = await openPage(gw.origin);
    await make(page, "alice", "alice");
    await make(page, "bob", "bob");
    if ((await state(page, "alice")).transport !== "ws") fail("not on a WebSocket");
    await exchange(page, 20);
    return { transport: "ws" };
  },

  "ws-blocked": () => blocked(BLOCK_WS, "sse"),

  // An init script is sent to the page as source: the two blockers as one.
  "ws-sse-blocked": () => blocked(`(${BLOCK_WS})(); (${BLOCK_SSE})();`, "longpoll"),

  async "buffering-proxy"() {
    const gw = await gateway(["--store", "memory"]);
    const proxy = await bufferingProxy(gw.ports.http);
    const page = await openPage(proxy);
    const t0 = Date.now();
    const t = await make(page, "alice", "alice", { openTimeout: 3000 });
    const opened = Date.now() - t0;
    await make(page, "bob", "bob", { openTimeout: 3000 });
    if (t !== "longpoll") fail(`behind a buffering proxy the SDK opened on ${t}`);
    if (opened > 3000 + 2000) fail(`moving past the buffered stream took ${opened} ms`);
    const states = await page.evaluate(() => window.clients.alice.states.map((s) => s.transport));
    if (!states.includes("sse")) fail(`sse was never tried: ${states}`);
    await exchange(page, 10);
    return { transport: t, open_ms: opened };
  },

  async restart() {
    const dir = mkdtempSync(join(tmpdir(), "imgate-sdk-data-"));
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    let gw = await gateway(["--data-dir", dir]);
    const ports = gw.ports;
    const page = await openPage(gw.origin);
    await make(page, "alice", "alice");
    await make(page, "bob", "bob");
    // 50 sends in a stream, not awaited one by one; the gateway restarts in the middle.
    await page.evaluate(() => {
      window.sends = [];
      window.made = []; // the order the sends were made in, which delivery must keep
      window.sendOne = (t) => { window.made.push(t); return window.clients.alice.im.send({ to: "bob", body: { t } }); };
      for (let i = 0; i < 50; i++) {
        window.sends.push(new Promise((r) => setTimeout(r, i * 40)).then(() => window.sendOne(`r${i}`)));
      }
    });
    await sleep(800);
    await gw.stop("SIGTERM");
    await until("alice to see the gateway gone", async () => (await state(page, "alice")).state === "connecting");
    // 10 more while it is down: they wait.
    await page.evaluate(() => {
      for (let i = 50; i < 60; i++) window.sends.push(window.sendOne(`r${i}`));
    });
    await sleep(1500);
    const down = await page.evaluate(() => window.clients.bob.messages.length);
    const restartedAt = Date.now();
    gw = await gateway(["--data-dir", dir], ports);
    const answers = await page.evaluate(() => Promise.all(window.sends));
    if (new Set(answers.map((a) => a.seq)).size !== 60) fail("60 sends did not get 60 seqs");
    const made = await page.evaluate(() => window.made);
    await receivedInOrder(page, "bob", "alice", made);
    if ([...made].sort().join() !== texts("r", 60).sort().join()) fail(`made ${made}`);
    const back = await page.evaluate(({ down }) => window.clients.bob.at[down] ?? null, { down });
    const states = await page.evaluate(() => window.clients.alice.states.map((s) => s.state));
    const i = states.indexOf("connecting", states.indexOf("open"));
    if (i < 0 || !states.slice(i).includes("open")) fail(`states did not go connecting then open: ${states}`);
    return { delivered: 60, first_after_restart_ms: back ? Math.max(0, back - restartedAt) : null };
  },

  async failover() {
    const nats = await natsServer();
    const g0 = await gateway(["--nats", nats]);
    const g1 = await gateway(["--nats", nats]);
    const lb = await roundRobin([g0.ports.http, g1.ports.http]);
    const page = await openPage(lb.origin);
    await make(page, "alice", "alice");
    await make(page, "bob", "bob");
    await sendAll(page, "alice", "bob", texts("f", 10));
    await receivedInOrder(page, "bob", "alice", texts("f", 10));
    // Kill the gateway holding the most of this page's connections.
    const held = lb.held();
    const victim = held.filter((i) => i === 0).length >= held.filter((i) => i === 1).length ? g0 : g1;
    const killedAt = Date.now();
    await victim.stop("SIGKILL");
    const after = await sendAll(page, "alice", "bob", texts("g", 10));
    const firstAfter = Date.now() - killedAt;
    await receivedInOrder(page, "bob", "alice", [...texts("f", 10), ...texts("g", 10)]);
    if (after.length !== 10) fail("sends after the kill were not answered");
    return { first_send_answered_after_kill_ms: firstAfter };
  },

  async refresh() {
    const gw = await gateway(["--store", "memory"]);
    const page = await openPage(gw.origin);
    await page.exposeFunction("freshToken", () => devToken("alice", 5));
    await page.evaluate(() => { window.fetched = 0; });
    await page.evaluate(async ({ token }) => {
      await window.make("alice", "alice", { token, getToken: async () => { window.fetched++; return window.freshToken(); } });
    }, { token: devToken("alice", 5) });
    await make(page, "bob", "bob");
    await sleep(15_000); // the first token expired 10 s ago (with the 5 s leeway)
    const st = await page.evaluate(() => window.clients.alice.states.map((s) => s.state));
    if (st.filter((s) => s === "open").length !== 1) fail(`the connection did not stay up: ${st}`);
    const fetched = await page.evaluate(() => window.fetched);
    if (fetched < 2) fail(`getToken was asked ${fetched} times in 15 s`);
    await sendAll(page, "bob", "alice", ["after"]);
    await receivedInOrder(page, "alice", "bob", ["after"]);
    return { tokens_fetched: fetched };
  },

  async history() {
    const gw = await gateway(["--store", "memory"]);
    const page = await openPage(gw.origin);
    await make(page, "alice", "alice");
    await make(page, "bob", "bob");
    await sendAll(page, "alice", "bob", texts("h", 120));
    await receivedInOrder(page, "bob", "alice", texts("h", 120));
    const pages = await page.evaluate(async () => {
      const out = [];
      let before;
      for (;;) {
        const p = await window.clients.bob.im.history({ before, limit: 50 });
        out.push(p.messages.map((m) => m.body.t));
        if (p.next === undefined) return out;
        before = p.next;
      }
    });
    const all = pages.flat();
    if (pages[0].length !== 50) fail(`the first page has ${pages[0].length}`);
    if (JSON.stringify(all) !== JSON.stringify(texts("h", 120).reverse())) fail(`history: ${all}`);
    return { pages: pages.length };
  },

  // Two tabs of one user (separate browser contexts, each its own device) and a third
  // device that opens later on long polls: reading in one tab clears the unread count in
  // the other, and reaches the long-polling device too.
  async read() {
    const gw = await gateway(["--store", "memory"]);
    const [tab1, tab2] = [await openPage(gw.origin), await openPage(gw.origin)];
    await make(tab1, "alice", "alice");
    await make(tab1, "bob1", "bob");
    await make(tab2, "bob2", "bob", { transports: ["sse"] });
    await sendAll(tab1, "alice", "bob", texts("r", 3));
    await receivedInOrder(tab1, "bob1", "alice", texts("r", 3));
    await receivedInOrder(tab2, "bob2", "alice", texts("r", 3));
    // A device that opens now is told how much is unread.
    await make(tab2, "bob3", "bob", { transports: ["longpoll"] });
    const opened = await tab2.evaluate(() => ({ unread: window.clients.bob3.im.unread, read: window.clients.bob3.im.readSeq }));
    if (opened.unread !== 3 || opened.read !== 0) fail(`a new device opened with ${JSON.stringify(opened)}, want 3 unread above 0`);
    const unreadOf = (page, name) => page.evaluate(async (n) => (await window.clients[n].im.readState()).unread, name);
    if (await unreadOf(tab2, "bob2") !== 3) fail("bob2 does not count 3 unread");
    // Tab 1 reads the first two (over its WebSocket).
    const second = await tab1.evaluate(async () => { const c = window.clients.bob1; await c.im.read(c.messages[1].seq); return c.messages[1].seq; });
    await until("tab 2's read event", () => tab2.evaluate((s) => window.clients.bob2.reads.includes(s), second));
    await until("the long-polling device's read event", () => tab2.evaluate((s) => window.clients.bob3.reads.includes(s), second));
    if (await unreadOf(tab2, "bob2") !== 1) fail("after tab 1 read two, tab 2 does not count 1 unread");
    if (await tab1.evaluate(() => window.clients.bob1.reads.length) !== 0) fail("the tab that read was told of its own read");
    // Tab 2 reads the rest (over HTTP, as SSE has no frames upstream); tab 1 hears it.
    const third = await tab2.evaluate(async () => { const c = window.clients.bob2; await c.im.read(c.messages[2].seq); return c.messages[2].seq; });
    await until("tab 1's read event", () => tab1.evaluate((s) => window.clients.bob1.reads.includes(s), third));
    if (await unreadOf(tab1, "bob1") !== 0) fail("after both reads, tab 1 still counts unread");
    // A lower read changes nothing.
    await tab1.evaluate(async () => window.clients.bob1.im._post("/v1/read", { seq: 1 }));
    if ((await tab1.evaluate(async () => (await window.clients.bob1.im.readState()).read)) !== third) fail("the read position went down");
    return { unread_on_open: opened.unread };
  },

  async epoch() {
    let gw = await gateway(["--store", "memory"]);
    const ports = gw.ports;
    const page = await openPage(gw.origin);
    await make(page, "alice", "alice");
    await make(page, "bob", "bob");
    await sendAll(page, "alice", "bob", texts("e", 3));
    await receivedInOrder(page, "bob", "alice", texts("e", 3));
    // A memory store starts over: a new epoch, and seqs from 1 again.
    await gw.stop("SIGTERM");
    gw = await gateway(["--store", "memory"], ports);
    await until("bob's gap event", () => page.evaluate(() => window.clients.bob.gaps > 0));
    await until("alice back", async () => (await state(page, "alice")).state === "open");
    await sendAll(page, "alice", "bob", texts("n", 3));
    await receivedInOrder(page, "bob", "alice", [...texts("e", 3), ...texts("n", 3)], true);
    return { gaps: await page.evaluate(() => window.clients.bob.gaps) };
  },
};

try {
  if (!scenarios[scenario]) fail(`unknown scenario (one of ${Object.keys(scenarios).join(", ")})`);
  const measured = await scenarios[scenario]();
  console.log(JSON.stringify({ scenario, ...measured }));
  console.log(`sdk scenario ${scenario} passed`);
} catch (e) {
  console.error(e.stack || String(e));
  process.exitCode = 1;
} finally {
  for (const f of cleanup.reverse()) {
    try { await f(); } catch { /* already gone */ }
  }
  // Whatever a proxy or a child left open must not keep the test waiting.
  process.exit(process.exitCode ?? 0);
}
