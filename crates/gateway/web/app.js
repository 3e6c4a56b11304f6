// imgate chat page, built on the browser SDK (/v1/sdk/imgate.js): log in, chat with a user
// or a group, join a live room, and pick the transport ("automatic" lets the SDK choose and
// fall back; the others force one) to see each at work. Everything that touches the
// messaging protocol (resume, dedupe, acks, retries, fallback) is the SDK's; this file only
// draws, and creates groups with one plain REST call. Scrolling to the top of the
// conversation loads older messages through the SDK's history. The unread count is the
// gateway's (the user's, across devices and tabs): asked again when a message from
// someone else arrives or the read position rises elsewhere, and cleared by "Mark all read".
import { Imgate } from "/v1/sdk/imgate.js";

const $ = (id) => document.getElementById(id);
const LABELS = { ws: "WebSocket", sse: "SSE", longpoll: "long poll", poll: "short poll" };
const stats = Object.fromEntries(Object.keys(LABELS).map((t) => [t, { requests: 0, bytes: 0, messages: 0 }]));

let token = null, uid = null, device = null;
let im = null;             // the SDK client; a new one when the transport choice changes
let resume = null;         // where the next client resumes: {lastSeq, epoch} of the last one
let oldestSeq = null;      // lowest seq shown; history loads below it
let newestSeq = 0;         // highest seq shown: "Mark all read" reads up to it
let historyDone = false;   // the oldest retained message is shown
let room = null;           // the live room this page is in

function setStatus(text, up) {
  $("status").textContent = text;
  $("dot").classList.toggle("up", !!up);
}

function renderStats() {
  $("stats").tBodies[0].innerHTML = Object.entries(stats).map(([t, s]) =>
    `<tr class="${t === im?.transport ? "active" : ""}"><td>${LABELS[t]}</td><td>${s.requests}</td><td>${s.bytes}</td><td>${s.messages}</td></tr>`
  ).join("");
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
    ? `${msg.from} → ${target} · seq ${msg.seq} · ${latency} ms via ${LABELS[via]}`
    : `${msg.from} → ${target} · seq ${msg.seq} · history`;
  return li;
}

// The count is asked of the gateway, once for a burst of events.
let unreadTimer = null;
function refreshUnread() {
  clearTimeout(unreadTimer);
  unreadTimer = setTimeout(async () => {
    try { $("unread").textContent = (await im.readState()).unread; } catch { /* next event asks again */ }
  }, 100);
}

async function markRead() {
  if (!im || !newestSeq) return;
  try {
    await im.read(newestSeq);
    refreshUnread();
  } catch (e) { setStatus(`not marked read: ${e.message}`); }
}

function show(msg) {
  if (oldestSeq === null) oldestSeq = msg.seq;
  newestSeq = Math.max(newestSeq, msg.seq);
  if (msg.group) addGroup(msg.group);
  if (stats[im.transport]) stats[im.transport].messages++;
  const li = messageItem(msg, im.transport);
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  renderStats();
  if (msg.from !== uid) refreshUnread();
}

// Older messages, newest first from history, go above the oldest shown.
let loadingHistory = false;
async function loadOlder() {
  if (loadingHistory || historyDone || !im) return;
  loadingHistory = true;
  try {
    const before = oldestSeq ?? (im.lastSeq === null ? undefined : im.lastSeq + 1);
    const page = await im.history({ before, limit: 50 });
    if (im.epoch !== null && page.epoch !== im.epoch) return; // a reset came in between
    const list = $("messages");
    const height = list.scrollHeight;
    for (const m of page.messages) {
      if (oldestSeq !== null && m.seq >= oldestSeq) continue;
      list.prepend(messageItem(m, null));
      oldestSeq = m.seq;
      newestSeq = Math.max(newestSeq, m.seq);
    }
    if (page.next === undefined) historyDone = true;
    list.scrollTop += list.scrollHeight - height; // keep the view where it was
  } catch (e) {
    setStatus(`history: ${e.message}`);
  } finally { loadingHistory = false; }
}

function connect() {
  if (im) {
    resume = { lastSeq: im.lastSeq, epoch: im.epoch };
    im.close();
  }
  const choice = $("transport").value;
  // The new client goes on from where the old one was: nothing is shown twice.
  im = new Imgate({
    url: location.origin,
    token,
    device,
    ...(resume || {}),
    ...(choice === "auto" ? {} : { transports: [choice] }),
  });
  im.on("message", show);
  im.on("room", showRoom);
  im.on("read", refreshUnread);
  im.on("wire", ({ transport, requests, bytes }) => {
    stats[transport].requests += requests;
    stats[transport].bytes += bytes;
    renderStats();
  });
  im.on("state", ({ state, transport }) => {
    if (state === "open") {
      setStatus(`connected via ${LABELS[transport]}`, true);
      $("unread").textContent = im.unread;
      // A page that shows nothing yet (a new device starts at the live tail) fills its
      // view with the newest history.
      if (!$("messages").children.length) loadOlder();
    } else if (state === "connecting") setStatus(`connecting via ${LABELS[transport]}…`);
    else setStatus("closed");
    renderStats();
  });
  im.on("gap", () => {
    oldestSeq = null; historyDone = false;
    $("messages").replaceChildren();
    setStatus("the store was reset or trimmed: showing what it retains");
  });
  im.on("error", (e) => setStatus(`error: ${e.message}`));
  if (room) im.join(room);
  im.connect().catch(() => {});
}

// --- sending, groups and rooms -------------------------------------------------------------

async function send(text) {
  const peer = $("peer").value.trim();
  if (!peer) throw new Error("choose who to chat with");
  await im.send({ [$("kind").value]: peer, body: { text } }); // {to: "bob"} or {group: "g1"}
}

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

$("group-form").onsubmit = async (e) => {
  e.preventDefault();
  const id = $("group-id").value.trim();
  const members = $("group-members").value.split(",").map((m) => m.trim()).filter(Boolean);
  const r = await fetch("/v1/groups", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify({ id, members }),
  });
  if (r.ok || r.status === 409) { addGroup(id); $("kind").value = "group"; $("peer").value = id; }
  else setStatus(`group not created: ${(await r.json()).message}`);
};
$("room-form").onsubmit = async (e) => {
  e.preventDefault();
  room = $("room-id").value.trim();
  try {
    await im.join(room);
    $("room-panel").querySelector("summary").textContent = `Live room: ${room}`;
  } catch (err) { setStatus(`not joined: ${err.message}`); }
};
$("room-composer").onsubmit = async (e) => {
  e.preventDefault();
  try {
    if (!room) throw new Error("join a room first");
    await im.publish(room, { text: $("room-text").value });
    $("room-text").value = "";
  } catch (err) { setStatus(`not published: ${err.message}`); }
};

// --- login -----------------------------------------------------------------------------------

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
  const r = await fetch("/v1/dev/token", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ uid: $("uid").value.trim() }),
  });
  if (r.status === 404) { $("login-error").textContent = "This gateway has a real secret: paste a token instead."; return; }
  const j = await r.json();
  if (!r.ok) { $("login-error").textContent = j.message; return; }
  start(j.token);
};

$("token-form").onsubmit = (e) => { e.preventDefault(); start($("token").value.trim()); };
$("transport").onchange = connect;
$("mark-read").onclick = markRead;
$("composer").onsubmit = async (e) => {
  e.preventDefault();
  const input = $("text");
  const text = input.value;
  input.value = "";
  try { await send(text); }
  catch (err) { input.value = text; setStatus(`not sent: ${err.message}`); }
};
renderStats();

$("messages").addEventListener("scroll", () => { if ($("messages").scrollTop === 0) loadOlder(); });
