// imgate chat page: log in, chat, and switch transport (WebSocket, SSE, long poll, short
// poll) to see each at work. Every transport resumes after the last seq this page has shown,
// so switching loses nothing; messages are deduplicated by seq. The page keeps the store's
// epoch beside that seq: after a store reset the gateway answers with a new epoch and a gap,
// and the page starts over from what the store retains. Scrolling to the top of the
// conversation loads older messages from the history endpoint.
"use strict";

const $ = (id) => document.getElementById(id);
const MODES = { ws: "WebSocket", sse: "SSE", long: "long poll", short: "short poll" };
const stats = Object.fromEntries(Object.keys(MODES).map((m) => [m, { requests: 0, bytes: 0, messages: 0 }]));

let token = null, uid = null, device = null;
let lastSeq = null;        // highest seq shown; transports resume after it
let epoch = null;          // the store epoch lastSeq belongs to
let oldestSeq = null;      // lowest seq shown; history loads below it
let historyDone = false;   // the oldest retained message is shown
let mode = "ws";
let stop = () => {};       // closes the current transport
let wsConn = null;         // the open WebSocket, used for sending in ws mode
let room = null;           // the live room this page is in
const pending = new Map(); // ws send id -> resolve

function setStatus(text, up) {
  $("status").textContent = text;
  $("dot").classList.toggle("up", !!up);
}

function renderStats() {
  $("stats").tBodies[0].innerHTML = Object.entries(stats).map(([m, s]) =>
    `<tr class="${m === mode ? "active" : ""}"><td>${MODES[m]}</td><td>${s.requests}</td><td>${s.bytes}</td><td>${s.messages}</td></tr>`
  ).join("");
}

// The epoch of a welcome or poll answer: another one means the store was reset, so seqs
// start over (the gateway resumed this page from the start of the retained inbox).
function sawEpoch(e) {
  // A page that shows nothing yet (a new device starts at the live tail) fills its view
  // with the newest history.
  if (!$("messages").children.length) setTimeout(loadOlder, 0);
  if (!e || e === epoch) return;
  if (epoch !== null) {
    lastSeq = null; oldestSeq = null; historyDone = false;
    $("messages").replaceChildren();
    setStatus("the store was reset: showing what it retains");
  }
  epoch = e;
}

function messageItem(msg, via) {
  const li = document.createElement("li");
  li.className = msg.from === uid ? "mine" : "";
  li.dataset.seq = msg.seq;
  const text = typeof msg.body === "object" && msg.body && "text" in msg.body ? String(msg.body.text) : JSON.stringify(msg.body);
  const latency = Math.max(0, Date.now() - msg.ts);
  li.innerHTML = `<span class="text"></span><span class="meta"></span>`;
  li.querySelector(".text").textContent = text;
  const target = msg.group ? `#${msg.group}` : msg.to;
  li.querySelector(".meta").textContent = via
    ? `${msg.from} → ${target} · seq ${msg.seq} · ${latency} ms via ${MODES[via]}`
    : `${msg.from} → ${target} · seq ${msg.seq} · history`;
  return li;
}

function show(msg, via) {
  if (lastSeq !== null && msg.seq <= lastSeq) return; // already shown
  lastSeq = msg.seq;
  if (oldestSeq === null) oldestSeq = msg.seq;
  if (msg.group) addGroup(msg.group);
  stats[via].messages++;
  const li = messageItem(msg, via);
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  renderStats();
}

// Older messages, newest first from the history endpoint, go above the oldest shown.
let loadingHistory = false;
async function loadOlder() {
  if (loadingHistory || historyDone || !token) return;
  loadingHistory = true;
  try {
    const before = oldestSeq === null ? (lastSeq === null ? "" : lastSeq + 1) : oldestSeq;
    const r = await fetch(api(`/v1/messages?before=${before}&limit=50`), authed());
    if (!r.ok) return;
    const page = await r.json();
    if (page.epoch !== epoch && epoch !== null) return; // a reset came in between
    const list = $("messages");
    const height = list.scrollHeight;
    for (const m of page.messages) {
      if (oldestSeq !== null && m.seq >= oldestSeq) continue;
      list.prepend(messageItem(m, null));
      oldestSeq = m.seq;
      if (lastSeq === null) lastSeq = m.seq;
    }
    if (page.next === undefined) historyDone = true;
    list.scrollTop += list.scrollHeight - height; // keep the view where it was
  } finally { loadingHistory = false; }
}

const api = (path) => `${location.origin}${path}`;
const authed = (extra = {}) => ({ ...extra, headers: { ...(extra.headers || {}), Authorization: `Bearer ${token}` } });
const epochParam = () => (epoch === null ? "" : `&epoch=${encodeURIComponent(epoch)}`);
const afterParam = () => (lastSeq === null ? "" : `&after=${lastSeq}${epochParam()}`);

// --- transports -----------------------------------------------------------------------

function startWs() {
  let closed = false, ws;
  const open = () => {
    const url = `${location.origin.replace(/^http/, "ws")}/v1/ws?token=${encodeURIComponent(token)}&device=${device}` +
      (lastSeq === null ? "" : `&resume=${lastSeq}${epochParam()}`);
    ws = new WebSocket(url, "imgate.json");
    stats.ws.requests++; renderStats();
    ws.onmessage = (e) => {
      stats.ws.bytes += e.data.length;
      const f = JSON.parse(e.data);
      if (f.type === "welcome") {
        wsConn = ws;
        sawEpoch(f.epoch);
        setStatus(`connected via WebSocket, resumed after ${f.resume}`, true);
        if (room) ws.send(JSON.stringify({ type: "join", room }));
      }
      else if (f.type === "room") showRoom(f);
      else if (f.type === "msg") { show(f, "ws"); ws.send(JSON.stringify({ type: "ack", seq: f.seq })); }
      else if (f.type === "sent" || f.type === "error") { const r = pending.get(f.id); if (r) { pending.delete(f.id); r(f); } }
      renderStats();
    };
    ws.onclose = () => { wsConn = null; if (!closed) { setStatus("WebSocket closed, reconnecting…"); setTimeout(open, 1000); } };
  };
  open();
  return () => { closed = true; wsConn = null; ws.close(); };
}

function startSse() {
  const after = lastSeq === null ? "" : `&after=${encodeURIComponent(`${epoch}:${lastSeq}`)}`;
  const es = new EventSource(api(`/v1/events?token=${encodeURIComponent(token)}&device=${device}${after}`));
  stats.sse.requests++; renderStats();
  es.addEventListener("welcome", (e) => {
    stats.sse.bytes += e.data.length;
    const w = JSON.parse(e.data);
    sawEpoch(w.epoch);
    setStatus(`connected via SSE, resumed after ${w.resume}`, true);
  });
  es.addEventListener("msg", (e) => { stats.sse.bytes += e.data.length; show(JSON.parse(e.data), "sse"); });
  es.addEventListener("room", (e) => { stats.sse.bytes += e.data.length; showRoom(JSON.parse(e.data)); });
  // EventSource reconnects by itself and sends Last-Event-ID (`<epoch>:<seq>`): the stream
  // resumes with no gap, and a reset store is told by the welcome.
  es.onerror = () => { setStatus("SSE reconnecting…"); stats.sse.requests++; renderStats(); };
  return () => es.close();
}

async function poll(kind, ctl) {
  const wait = kind === "long" ? "&wait=25" : "";
  const r = await fetch(api(`/v1/messages?device=${device}${afterParam()}${wait}`), authed({ signal: ctl.signal }));
  stats[kind].requests++;
  const body = await r.text();
  stats[kind].bytes += body.length;
  if (!r.ok) throw new Error(body);
  const page = JSON.parse(body);
  sawEpoch(page.epoch);
  page.messages.forEach((m) => show(m, kind));
  (page.rooms || []).forEach(showRoom);
  if (lastSeq === null) lastSeq = page.cursor;
  renderStats();
}

function startLongPoll() {
  const ctl = new AbortController();
  (async () => {
    setStatus("connected via long poll (held up to 25 s)", true);
    while (!ctl.signal.aborted) {
      try { await poll("long", ctl); }
      catch (e) { if (!ctl.signal.aborted) { setStatus("long poll failed, retrying…"); await new Promise((r) => setTimeout(r, 1000)); } }
    }
  })();
  return () => ctl.abort();
}

function startShortPoll() {
  const ctl = new AbortController();
  const every = Math.max(200, Number($("interval").value) || 1000);
  setStatus(`connected via short poll every ${every} ms`, true);
  const tick = () => poll("short", ctl).catch(() => {});
  tick();
  const timer = setInterval(tick, every);
  return () => { clearInterval(timer); ctl.abort(); };
}

function connect() {
  stop();
  // A room joined over HTTP is rejoined by the new transport (WebSocket joins per connection).
  if (room && $("transport").value !== "ws") postJson(`/v1/rooms/${room}/join?device=${device}`, {}).catch(() => {});
  mode = $("transport").value;
  $("interval-label").hidden = mode !== "short";
  setStatus(`connecting via ${MODES[mode]}…`);
  stop = { ws: startWs, sse: startSse, long: startLongPoll, short: startShortPoll }[mode]();
  renderStats();
}

// --- sending ----------------------------------------------------------------------------

async function send(text) {
  const peer = $("peer").value.trim();
  if (!peer) throw new Error("choose who to chat with");
  const id = `web-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  const target = { [$("kind").value]: peer };  // {to: "bob"} or {group: "g1"}
  const body = { text };
  if (mode === "ws" && wsConn) {
    const answer = new Promise((resolve) => pending.set(id, resolve));
    wsConn.send(JSON.stringify({ type: "send", id, ...target, body }));
    const f = await answer;
    if (f.type === "error") throw new Error(f.message);
    return;
  }
  const r = await fetch(api("/v1/messages"), authed({
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id, ...target, body }),
  }));
  if (!r.ok) throw new Error((await r.json()).message);
}

// --- groups and rooms -----------------------------------------------------------------

const postJson = (path, body) => fetch(api(path), authed({
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
}));

function addGroup(id) {
  if ([...$("groups").children].some((li) => li.dataset.id === id)) return;
  const li = document.createElement("li");
  li.dataset.id = id;
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = `#${id}`;
  b.onclick = () => { $("kind").value = "group"; $("peer").value = id; };
  li.append(b);
  $("groups").append(li);
}

function showRoom(f) {
  const li = document.createElement("li");
  li.innerHTML = `<span class="from"></span><span class="text"></span>`;
  li.querySelector(".from").textContent = f.from;
  li.querySelector(".text").textContent = typeof f.body === "object" && f.body && "text" in f.body ? String(f.body.text) : JSON.stringify(f.body);
  $("room-messages").append(li);
  li.scrollIntoView({ block: "end" });
}

async function joinRoom(id) {
  room = id;
  if (mode === "ws" && wsConn) wsConn.send(JSON.stringify({ type: "join", room }));
  else {
    // SSE and polling devices join over HTTP; the room's messages reach this device.
    const r = await postJson(`/v1/rooms/${room}/join?device=${device}`, {});
    if (!r.ok) throw new Error((await r.json()).message);
  }
  $("room-panel").querySelector("summary").textContent = `Live room: ${room}`;
}

async function publishRoom(text) {
  if (!room) throw new Error("join a room first");
  if (mode === "ws" && wsConn) { wsConn.send(JSON.stringify({ type: "publish", room, body: { text } })); return; }
  const r = await postJson(`/v1/rooms/${room}/publish?device=${device}`, { body: { text } });
  if (!r.ok) throw new Error((await r.json()).message);
}

$("group-form").onsubmit = async (e) => {
  e.preventDefault();
  const id = $("group-id").value.trim();
  const members = $("group-members").value.split(",").map((m) => m.trim()).filter(Boolean);
  const r = await postJson("/v1/groups", { id, members });
  if (r.ok || r.status === 409) { addGroup(id); $("kind").value = "group"; $("peer").value = id; }
  else setStatus(`group not created: ${(await r.json()).message}`);
};
$("room-form").onsubmit = (e) => { e.preventDefault(); joinRoom($("room-id").value.trim()).catch((err) => setStatus(err.message)); };
$("room-composer").onsubmit = async (e) => {
  e.preventDefault();
  try { await publishRoom($("room-text").value); $("room-text").value = ""; }
  catch (err) { setStatus(`not published: ${err.message}`); }
};

// --- login ------------------------------------------------------------------------------

function start(newToken) {
  token = newToken;
  uid = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).sub;
  const key = `imgate-device-${uid}`;
  device = sessionStorage.getItem(key) || `web-${Math.random().toString(36).slice(2, 10)}`;
  sessionStorage.setItem(key, device);
  $("who").textContent = `${uid} · device ${device}`;
  $("login").hidden = true;
  $("chat").hidden = false;
  connect();
}

$("dev-form").onsubmit = async (e) => {
  e.preventDefault();
  $("login-error").textContent = "";
  const r = await fetch(api("/v1/dev/token"), {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ uid: $("uid").value.trim() }),
  });
  if (r.status === 404) { $("login-error").textContent = "This gateway has a real secret: paste a token instead."; return; }
  const j = await r.json();
  if (!r.ok) { $("login-error").textContent = j.message; return; }
  start(j.token);
};

$("token-form").onsubmit = (e) => { e.preventDefault(); start($("token").value.trim()); };
$("transport").onchange = connect;
$("interval").onchange = () => mode === "short" && connect();
$("composer").onsubmit = async (e) => {
  e.preventDefault();
  const input = $("text");
  try { await send(input.value); input.value = ""; }
  catch (err) { setStatus(`not sent: ${err.message}`); }
};
renderStats();

$("messages").addEventListener("scroll", () => { if ($("messages").scrollTop === 0) loadOlder(); });
