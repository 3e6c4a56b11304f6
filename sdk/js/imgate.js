// imgate browser client: one dependency-free ES module (served by every gateway at
// /v1/sdk/imgate.js, published to npm as imgate-client).
//
// It keeps the delivery guarantees on the client side: it resumes after the last seq it
// handed over (with that seq's store epoch), never hands a seq over twice, acks
// cumulatively, and re-sends a send whose answer was lost with the same id (the gateway's
// dedupe answers with the original seq). Transports are tried in order: a WebSocket, then
// Server-Sent Events (sends and room calls over POST), then long polls, then short polls. A
// transport that does not say `welcome` within `openTimeout` (blocked, or behind a proxy
// that buffers the stream) is skipped; one that was open and drops is tried again with
// jittered exponential backoff (0.5 s to 30 s) before the others. This file is the whole
// client: it knows the wire formats of docs/protocol.md and nothing of any page.

const BACKOFF_MIN = 500;
const BACKOFF_MAX = 30_000;
const ACK_EVERY = 64; // received messages before an ack goes out at once
const ACK_DELAY = 200; // ms a received message waits for its ack at most
const LONG_POLL_WAIT = 25; // s a long poll is held
const SHORT_POLL_EVERY = 2_000; // ms between short polls
const ROOM_RENEW = 5 * 60_000; // rooms joined over HTTP last 10 minutes: renew at 5
const REFRESH_AT = 0.8; // of a token's remaining life, when a new one is asked for
const RETRY_SEND = 1_000; // ms before a send answered `unavailable` is tried again

/** Seconds since the epoch of a JWT's `exp` (0 when it has none or does not parse). */
function tokenExp(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(b64)).exp || 0;
  } catch {
    return 0;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const jitter = (ms) => ms / 2 + Math.random() * (ms / 2);

/** An error answered by the gateway: `code` is one of docs/protocol.md's error codes. */
export class ImgateError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = "ImgateError";
    this.code = code;
  }
}

// Errors a send waits out and tries again with the same id.
const RETRIABLE = new Set(["unavailable", "rate_limited", "internal"]);

export class Imgate {
  constructor(options) {
    const o = { device: "web", transports: ["ws", "sse", "longpoll", "poll"], openTimeout: 5_000, ...options };
    if (!o.url) throw new Error("Imgate: url (the gateway's HTTP origin) is required");
    if (!o.token && !o.getToken) throw new Error("Imgate: token or getToken is required");
    this.url = o.url.replace(/\/+$/, "");
    this.device = o.device;
    this.transports = o.transports;
    this.openTimeout = o.openTimeout;
    this._token = o.token || null;
    this._getToken = o.getToken || null;
    this._handlers = new Map();
    this.state = "closed";
    this.transport = null;
    this.lastSeq = o.lastSeq ?? null; // the highest seq handed over; resumes go after it
    this.epoch = o.epoch ?? null; // the store epoch lastSeq belongs to
    this._sends = new Map(); // id -> {send, resolve, reject}, in the order they were made
    this._rooms = new Set();
    this._conn = null; // the open transport
    this._closed = true;
    this._run_id = 0; // a connection loop runs while its id is the latest
    this._wake = null; // ends a backoff pause early (close)
    this.readSeq = 0; // the user's read position, as last heard
    this.unread = 0; // unread messages when the connection opened (counted up to 1,000)
  }

  /**
   * `message`, `room`, `read` ({seq}: the user's read position rose, on another device or
   * tab), `state`, `gap`, `error`, or `wire` ({transport, requests, bytes}: what each
   * transport costs); returns a function that unsubscribes.
   */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._handlers.get(event)?.delete(fn);
  }

  _emit(event, value) {
    for (const fn of this._handlers.get(event) || []) {
      try {
        fn(value);
      } catch (e) {
        setTimeout(() => { throw e; });
      }
    }
  }

  /** Resolves once open on some transport; goes on reconnecting until `close()`. */
  connect() {
    if (!this._closed) return this._opened;
    this._closed = false;
    this._opened = new Promise((resolve, reject) => { this._openedNow = { resolve, reject }; });
    this._run(++this._run_id);
    return this._opened;
  }

  /** Closes the connection; sends still waiting are refused with code `closed`. */
  close() {
    this._closed = true;
    this._conn?.close();
    this._conn = null;
    this._wake?.();
    for (const [, s] of this._sends) s.reject(new ImgateError("closed", "the client was closed"));
    this._sends.clear();
    this._openedNow?.reject(new ImgateError("closed", "the client was closed"));
    this._setState("closed", null);
  }

  /**
   * Sends `{to | group, body, id?}`; resolves with `{seq, id, ts}` once the message is
   * stored. Made while disconnected, it waits and goes out in order once connected.
   */
  send(message) {
    const id = message.id || `web-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
    const send = { id, body: message.body ?? null };
    if (message.group !== undefined) send.group = message.group;
    else send.to = message.to;
    return new Promise((resolve, reject) => {
      this._sends.set(id, { send, resolve, reject, out: false });
      this._conn?.flush();
    });
  }

  /** Joins a live room: its messages arrive as `room` events until `leave`. */
  async join(room) {
    this._rooms.add(room);
    await this._conn?.room("join", room);
  }

  async leave(room) {
    this._rooms.delete(room);
    await this._conn?.room("leave", room);
  }

  /** Publishes to a room this client joined (nothing is stored). */
  async publish(room, body) {
    if (!this._conn) throw new ImgateError("unavailable", "not connected");
    await this._conn.room("publish", room, body);
  }

  /**
   * Marks everything up to `seq` (a seq this client handed over) as read by the user: the
   * user's other devices and tabs get a `read` event. A lower seq than the stored read
   * position changes nothing.
   */
  async read(seq) {
    if (seq <= this.readSeq) return;
    if (this._conn?.read) this._conn.read(seq);
    else await this._post("/v1/read", { seq });
    this.readSeq = Math.max(this.readSeq, seq);
  }

  /** The user's read position and unread count, asked of the gateway: `{read, unread}`. */
  async readState() {
    const r = await this._fetchJson("/v1/read");
    this._raiseRead(r.read);
    return r;
  }

  /** Older messages, newest first: `{messages, next, epoch}`; pass `next` as `before`. */
  async history({ before, limit = 50 } = {}) {
    const q = `before=${before ?? ""}&limit=${limit}`;
    return this._fetchJson(`/v1/messages?${q}`);
  }

  // --- the connection loop ---------------------------------------------------------

  async _run(id) {
    const live = () => !this._closed && id === this._run_id;
    let preferred = 0;
    let attempt = 0;
    while (live()) {
      // One round: the transport that last worked, then each other in order.
      const n = this.transports.length;
      for (let k = 0; k < n && live(); k++) {
        const i = (preferred + k) % n;
        const name = this.transports[i];
        this._setState("connecting", name);
        let conn;
        try {
          await this._freshToken();
          conn = this._start(name);
          await withTimeout(conn.opened, this.openTimeout);
        } catch (e) {
          conn?.close();
          if (e instanceof ImgateError && e.code === "unauthorized") {
            if (!this._getToken) {
              this._emit("error", e);
              this.close();
              return;
            }
            this._token = null; // ask getToken for another
          }
          continue; // cannot open: the next transport
        }
        if (!live()) {
          conn.close();
          return;
        }
        preferred = i;
        attempt = 0;
        this._conn = conn;
        this._setState("open", name);
        this._openedNow?.resolve();
        this._openedNow = null;
        for (const room of this._rooms) conn.room("join", room).catch(() => {});
        conn.flush();
        const why = await conn.ended;
        if (this._conn === conn) this._conn = null;
        if (why === "unauthorized" && this._getToken) this._token = null;
        break; // dropped after being open: back off, then this transport first
      }
      if (!live()) return;
      this._setState("connecting", this.transports[preferred]);
      await this._pause(jitter(Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** attempt)));
      attempt++;
    }
  }

  _pause(ms) {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done() { clearTimeout(t); resolve(); }
      this._wake = () => { this._wake = null; done(); };
    });
  }

  _setState(state, transport) {
    if (this.state === state && this.transport === transport) return;
    this.state = state;
    this.transport = transport;
    this._emit("state", { state, transport });
  }

  /** A token with life left: the one in hand, or one from getToken. */
  async _freshToken() {
    const exp = this._token ? tokenExp(this._token) : 0;
    if (this._token && (!this._getToken || !exp || exp * 1000 > Date.now() + 1000)) return this._token;
    this._token = await this._getToken();
    return this._token;
  }

  /** When the token nears its end, asks getToken for the next and hands it to `conn`. */
  _scheduleRefresh(conn) {
    if (!this._getToken) return;
    const exp = tokenExp(this._token);
    if (!exp) return;
    const left = Math.max(0, exp * 1000 - Date.now());
    conn.timer(async () => {
      try {
        this._token = await this._getToken();
        conn.refreshed(this._token);
        this._scheduleRefresh(conn);
      } catch (e) {
        this._emit("error", e);
        conn.timer(() => this._scheduleRefresh(conn), RETRY_SEND);
      }
    }, left * REFRESH_AT);
  }

  // --- what every transport shares -------------------------------------------------

  /** What a transport cost: `requests` made, `bytes` received. */
  _wire(transport, requests, bytes) {
    if (this._handlers.get("wire")?.size) this._emit("wire", { transport, requests, bytes });
  }

  /** A welcome (or the first poll answer): the epoch and gap of this resume. */
  _welcome(w) {
    if (w.epoch && w.epoch !== this.epoch) {
      // Another store: its seqs start over, so the dedupe by seq does too.
      if (this.epoch !== null) this.lastSeq = w.resume > 0 ? w.resume : null;
      this.epoch = w.epoch;
    }
    if (w.gap) this._emit("gap", w);
  }

  /** The read position from a welcome (with the unread count) or a `read` frame. */
  _raiseRead(seq, unread) {
    if (unread !== undefined) this.unread = unread;
    if (seq > this.readSeq) {
      this.readSeq = seq;
      this._emit("read", { seq });
    }
  }

  /** A stored message: handed over once, in seq order. */
  _message(m) {
    if (this.lastSeq !== null && m.seq <= this.lastSeq) return false;
    this.lastSeq = m.seq;
    this._emit("message", m);
    return true;
  }

  /** The answer to a send (a `sent` frame or a POST's body). */
  _answered(id, result, error) {
    const s = this._sends.get(id);
    if (!s) return;
    if (error && RETRIABLE.has(error.code)) {
      s.out = false; // tried again on the next flush
      setTimeout(() => this._conn?.flush(), RETRY_SEND);
      return;
    }
    this._sends.delete(id);
    if (error) s.reject(error);
    else s.resolve(result);
  }

  _resumeQuery(kind) {
    if (this.lastSeq === null) return "";
    const epoch = this.epoch === null ? "" : encodeURIComponent(this.epoch);
    if (kind === "sse") return `&after=${this.epoch === null ? "" : `${epoch}:`}${this.lastSeq}`;
    if (kind === "ws") return `&resume=${this.lastSeq}${epoch ? `&epoch=${epoch}` : ""}`;
    return `&after=${this.lastSeq}${epoch ? `&epoch=${epoch}` : ""}`;
  }

  async _fetchJson(path, init = {}, signal) {
    const r = await fetch(this.url + path, {
      ...init,
      signal,
      headers: { ...(init.headers || {}), Authorization: `Bearer ${await this._freshToken()}` },
    });
    const text = await r.text();
    let body = {};
    try { body = text ? JSON.parse(text) : {}; } catch { body = {}; }
    if (!r.ok) throw new ImgateError(body.code || (r.status === 401 ? "unauthorized" : "unavailable"), body.message || `HTTP ${r.status}`);
    return body;
  }

  _post(path, body, signal) {
    return this._fetchJson(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }, signal);
  }

  _start(name) {
    const start = { ws: wsTransport, sse: sseTransport, longpoll: pollTransport, poll: pollTransport }[name];
    if (!start) throw new Error(`Imgate: unknown transport ${name}`);
    return start(this, name);
  }
}

function withTimeout(promise, ms) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new ImgateError("timeout", `no welcome within ${ms} ms`)), ms);
    promise.then((v) => { clearTimeout(t); resolve(v); }, (e) => { clearTimeout(t); reject(e); });
  });
}

/** What every transport object has: `opened` (resolves on welcome), `ended` (resolves
 * with a reason once it is gone), `flush()` (sends what waits), `room(op, room, body)`,
 * `refreshed(token)`, `timer(fn, ms)` (cleared on close) and `close()`. */
function base() {
  const c = { timers: new Set(), done: false };
  c.opened = new Promise((resolve, reject) => { c.open = resolve; c.fail = reject; });
  c.ended = new Promise((resolve) => { c.end = resolve; });
  c.timer = (fn, ms) => {
    const t = setTimeout(() => { c.timers.delete(t); if (!c.done) fn(); }, ms);
    c.timers.add(t);
  };
  c.finish = (why) => {
    if (c.done) return;
    c.done = true;
    for (const t of c.timers) clearTimeout(t);
    c.fail(new ImgateError("closed", why));
    c.end(why);
  };
  return c;
}

// --- WebSocket: JSON frames both ways ----------------------------------------------

function wsTransport(im) {
  const c = base();
  const url = `${im.url.replace(/^http/, "ws")}/v1/ws?token=${encodeURIComponent(im._token)}` +
    `&device=${encodeURIComponent(im.device)}${im._resumeQuery("ws")}`;
  let ws;
  try {
    ws = new WebSocket(url, "imgate.json");
  } catch (e) {
    c.finish("blocked");
    return c;
  }
  im._wire("ws", 1, 0);
  let acked = im.lastSeq ?? 0;
  let ackTimer = null;
  const write = (f) => { if (ws.readyState === 1) ws.send(JSON.stringify(f)); };
  const ack = () => {
    ackTimer = null;
    if (im.lastSeq !== null && im.lastSeq > acked) {
      acked = im.lastSeq;
      write({ type: "ack", seq: acked });
    }
  };
  ws.onmessage = (e) => {
    im._wire("ws", 0, e.data.length);
    const f = JSON.parse(e.data);
    switch (f.type) {
      case "welcome":
        im._welcome(f);
        im._raiseRead(f.read ?? 0, f.unread ?? 0);
        acked = im.lastSeq ?? 0;
        c.open(f);
        im._scheduleRefresh(c);
        break;
      case "msg":
        if (im._message(f)) {
          if (im.lastSeq - acked >= ACK_EVERY) ack();
          else ackTimer ??= setTimeout(ack, ACK_DELAY);
        }
        break;
      case "sent":
        im._answered(f.id, { seq: f.seq, id: f.id, ts: f.ts });
        break;
      case "error":
        if (f.id) im._answered(f.id, null, new ImgateError(f.code, f.message));
        else im._emit("error", new ImgateError(f.code, f.message));
        break;
      case "room":
        im._emit("room", { room: f.room, from: f.from, ts: f.ts, body: f.body });
        break;
      case "read":
        im._raiseRead(f.seq);
        break;
      case "bye":
        c.finish(f.reason);
        ws.close();
        break;
      default:
        break; // pong, refreshed
    }
  };
  ws.onclose = () => c.finish("closed");
  ws.onerror = () => c.finish("error");
  c.flush = () => {
    for (const s of im._sends.values()) {
      if (!s.out && ws.readyState === 1) {
        s.out = true;
        write({ type: "send", ...s.send });
      }
    }
  };
  c.room = async (op, room, body) => write(op === "publish" ? { type: op, room, body } : { type: op, room });
  c.refreshed = (token) => write({ type: "refresh", token });
  c.read = (seq) => write({ type: "read", seq });
  c.close = () => {
    ack();
    if (ackTimer) clearTimeout(ackTimer);
    c.finish("closed");
    try { ws.close(); } catch { /* already closed */ }
  };
  // Sends in flight on a connection that ends are sent again on the next one.
  c.ended.then(() => { for (const s of im._sends.values()) s.out = false; });
  return c;
}

// --- HTTP: sends, rooms (and acks, for polls) are requests -----------------------------

/** Sends waiting in order, one request at a time, while `c` is open. */
function httpSender(im, c) {
  let busy = false;
  c.flush = async () => {
    if (busy) return;
    busy = true;
    try {
      for (;;) {
        const next = [...im._sends.values()].find((s) => !s.out);
        if (!next || c.done) break;
        next.out = true;
        try {
          const r = await im._post("/v1/messages", next.send);
          im._wire(c.name, 1, 0);
          im._answered(next.send.id, { seq: r.seq, id: r.id, ts: r.ts });
        } catch (e) {
          // The answer may be lost: the same id goes again.
          next.out = false;
          if (!(e instanceof ImgateError)) {
            c.close("error"); // the network: reconnect
            break;
          }
          if (e.code === "unauthorized") {
            c.close("unauthorized");
            break;
          }
          if (RETRIABLE.has(e.code)) {
            c.timer(() => c.flush(), RETRY_SEND);
            break;
          }
          im._answered(next.send.id, null, e);
        }
      }
    } finally {
      busy = false;
    }
  };
  c.room = async (op, room, body) => {
    const path = `/v1/rooms/${encodeURIComponent(room)}/${op}?device=${encodeURIComponent(im.device)}`;
    await im._post(path, op === "publish" ? { body } : {});
    if (op === "join") c.timer(() => im._rooms.has(room) && c.room("join", room).catch(() => {}), ROOM_RENEW);
  };
  c.refreshed = () => {}; // every request carries the token in hand
  c.ended.then(() => { for (const s of im._sends.values()) s.out = false; });
}

function sseTransport(im) {
  const c = base();
  c.name = "sse";
  let es = null;
  c.close = (why = "closed") => { es?.close(); c.finish(why); };
  httpSender(im, c);
  const url = `${im.url}/v1/events?token=${encodeURIComponent(im._token)}` +
    `&device=${encodeURIComponent(im.device)}${im._resumeQuery("sse")}`;
  try {
    es = new EventSource(url);
  } catch {
    c.finish("blocked");
    return c;
  }
  im._wire("sse", 1, 0);
  const on = (name, fn) => es.addEventListener(name, (e) => {
    im._wire("sse", 0, e.data.length);
    fn(JSON.parse(e.data));
  });
  on("welcome", (w) => { im._welcome(w); im._raiseRead(w.read ?? 0, w.unread ?? 0); c.open(w); im._scheduleRefresh(c); });
  on("read", (f) => im._raiseRead(f.seq));
  on("msg", (m) => im._message(m));
  on("room", (f) => im._emit("room", { room: f.room, from: f.from, ts: f.ts, body: f.body }));
  on("problem", (f) => im._emit("error", new ImgateError(f.code, f.message)));
  on("bye", (f) => c.close(f.reason));
  // The client reconnects by its own rules (backoff, fallback), not EventSource's.
  es.onerror = () => c.close("error");
  return c;
}

function pollTransport(im, name) {
  const c = base();
  c.name = name;
  const ctl = new AbortController();
  const wait = name === "longpoll" ? LONG_POLL_WAIT : 0;
  c.close = (why = "closed") => { ctl.abort(); c.finish(why); };
  httpSender(im, c);
  (async () => {
    let first = true;
    while (!c.done) {
      try {
        // The first poll answers at once: it is this transport's welcome.
        const held = first ? 0 : wait;
        const page = await im._fetchJson(
          `/v1/messages?device=${encodeURIComponent(im.device)}${im._resumeQuery("poll")}&wait=${held}`,
          {}, ctl.signal);
        im._wire(name, 1, JSON.stringify(page).length);
        // Another epoch's answer starts over from the oldest retained message.
        im._welcome({ epoch: page.epoch, gap: page.gap, resume: 0 });
        for (const m of page.messages) im._message(m);
        // A device's first poll resumes from its stored cursor; later ones go on from here.
        if (im.lastSeq === null && page.cursor) im.lastSeq = page.cursor;
        for (const r of page.rooms || []) im._emit("room", { room: r.room, from: r.from, ts: r.ts, body: r.body });
        if (page.read !== undefined) im._raiseRead(page.read);
        if (first) {
          first = false;
          // A poll carries no welcome: the read position and unread count are asked for.
          const r = await im._fetchJson("/v1/read", {}, ctl.signal);
          im._raiseRead(r.read, r.unread);
          c.open(page);
          im._scheduleRefresh(c);
        }
        if (!wait) await new Promise((r) => c.timer(r, SHORT_POLL_EVERY));
      } catch (e) {
        c.close(e instanceof ImgateError ? e.code : "error");
      }
    }
  })();
  return c;
}

export default Imgate;
