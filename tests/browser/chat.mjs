// Drives the chat page in headless Chromium: alice (desktop window) and bob (phone-sized
// window) exchange messages over each transport the page offers, and each side sees both
// messages exactly once; then a group, a room, history, and unread counts across two of
// bob's tabs. Saves a screenshot of bob's page.
//
// Usage: node tests/browser/chat.mjs <base-url> <screenshot.png>
// Chromium comes from CHROMIUM or /usr/bin/chromium (Debian's package).
import { chromium } from "playwright-core";

const [base, screenshot] = process.argv.slice(2);
if (!base || !screenshot) {
  console.error("usage: chat.mjs <base-url> <screenshot.png>");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const TIMEOUT = 15_000;

async function open(uid, peer, viewport) {
  const ctx = await browser.newContext({ viewport });
  const page = await ctx.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (e) => { console.error(`${uid}: page error: ${e.message}`); process.exitCode = 1; });
  await page.goto(base);
  await page.fill("[data-testid=uid]", uid);
  await page.click("[data-testid=login]");
  await page.fill("[data-testid=peer]", peer);
  await page.waitForSelector("[data-testid=status]:has-text('connected via WebSocket')");
  return page;
}

async function use(page, mode, label) {
  await page.selectOption("[data-testid=transport]", mode);
  await page.waitForSelector(`[data-testid=status]:has-text('connected via ${label}')`);
}

async function say(page, text) {
  await page.fill("[data-testid=text]", text);
  await page.click("[data-testid=send]");
}

async function sees(page, text) {
  await page.locator("#messages li .text", { hasText: text }).first().waitFor({ timeout: TIMEOUT });
}

async function seqsAreUnique(page) {
  const seqs = await page.$$eval("#messages li", (lis) => lis.map((li) => li.dataset.seq));
  if (new Set(seqs).size !== seqs.length) throw new Error(`duplicate messages shown: ${seqs}`);
  return seqs.length;
}

const pages = {};
try {
  const alice = await open("alice", "bob", { width: 900, height: 800 });
  const bob = await open("bob", "alice", { width: 390, height: 844 });
  Object.assign(pages, { alice, bob });
  const modes = [["ws", "WebSocket"], ["sse", "SSE"], ["longpoll", "long poll"], ["poll", "short poll"]];
  for (const [mode, label] of modes) {
    await use(alice, mode, label);
    await use(bob, mode, label);
    await say(alice, `hi bob, over ${label}`);
    await sees(bob, `hi bob, over ${label}`);
    await sees(alice, `hi bob, over ${label}`); // her own copy
    await say(bob, `hi alice, over ${label}`);
    await sees(alice, `hi alice, over ${label}`);
    await sees(bob, `hi alice, over ${label}`);
    console.log(`ok: ${label}`);
  }
  const a = await seqsAreUnique(alice);
  const b = await seqsAreUnique(bob);
  if (a !== 8 || b !== 8) throw new Error(`expected 8 messages on each page, alice has ${a}, bob ${b}`);

  // A group: alice creates it with bob in it and writes to it; bob's page lists it.
  await use(alice, "ws", "WebSocket");
  await use(bob, "sse", "SSE");
  await alice.click("[data-testid=groups-panel] summary");
  await alice.fill("[data-testid=group-id]", "crew");
  await alice.fill("[data-testid=group-members]", "bob");
  await alice.click("[data-testid=group-create]");
  await alice.waitForFunction(() => document.querySelector("[data-testid=kind]").value === "group");
  await say(alice, "hello crew");
  await sees(bob, "hello crew");
  await bob.locator("#messages li .meta", { hasText: "alice → #crew" }).first().waitFor();
  await bob.locator("[data-testid=groups] button", { hasText: "#crew" }).waitFor({ state: "attached" });
  console.log("ok: group");

  // A live room: bob (SSE, joined over HTTP) and alice (WebSocket frames).
  for (const p of [alice, bob]) {
    await p.click("[data-testid=room-panel] summary");
    await p.fill("[data-testid=room-id]", "lobby");
    await p.click("[data-testid=room-join]");
    await p.waitForSelector("[data-testid=room-panel] summary:has-text('Live room: lobby')");
  }
  await alice.fill("[data-testid=room-text]", "live from the lobby");
  await alice.click("[data-testid=room-send]");
  await bob.locator("#room-messages li", { hasText: "live from the lobby" }).waitFor();
  console.log("ok: room");

  // History: 60 more messages, then a new page of bob's (a new device, which starts at the
  // live tail) shows the newest 50 from history and, scrolled to the top, the older ones.
  await alice.evaluate(async () => {
    const r = await fetch("/v1/dev/token", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ uid: "alice" }) });
    const t = (await r.json()).token;
    for (let i = 0; i < 60; i++) {
      await fetch("/v1/messages", { method: "POST", headers: { "content-type": "application/json", Authorization: `Bearer ${t}` },
        body: JSON.stringify({ to: "bob", body: { text: `backlog ${i}` } }) });
    }
  });
  const bob2 = await open("bob", "alice", { width: 390, height: 844 });
  pages.bob2 = bob2;
  await sees(bob2, "backlog 59");
  await bob2.locator("#messages li .meta", { hasText: "history" }).first().waitFor();
  if (await bob2.locator("#messages li .text", { hasText: "hi bob, over WebSocket" }).count() !== 0) {
    throw new Error("the first history page holds only the newest 50");
  }
  await bob2.evaluate(() => { const m = document.getElementById("messages"); m.scrollTop = 1; m.scrollTop = 0; });
  await sees(bob2, "hi bob, over WebSocket");
  await seqsAreUnique(bob2);
  console.log("ok: history");

  // Unread counts: bob's two tabs show the gateway's count for bob; reading in one
  // clears it in the other, and a new message counts in both.
  const unreadIs = (p, want) => p.waitForFunction((w) => document.querySelector("[data-testid=unread]").textContent === w, want);
  await bob.waitForFunction(() => Number(document.querySelector("[data-testid=unread]").textContent) > 0);
  await bob2.click("[data-testid=mark-read]");
  await unreadIs(bob, "0");
  await unreadIs(bob2, "0");
  await say(alice, "one more for the crew");
  await sees(bob, "one more for the crew");
  await unreadIs(bob, "1");
  await unreadIs(bob2, "1");
  await bob.click("[data-testid=mark-read]");
  await unreadIs(bob2, "0");
  console.log("ok: unread counts across tabs");

  await bob.screenshot({ path: screenshot, fullPage: true });
  console.log(`browser test passed: 4 transports, 8 messages on each page, a group, a room, history, unread counts, screenshot ${screenshot}`);
} catch (e) {
  console.error(`browser test failed: ${e.stack || e}`);
  for (const [who, p] of Object.entries(pages)) {
    const status = await p.textContent("[data-testid=status]").catch(() => "?");
    console.error(`${who}'s status: ${status}`);
    await p.screenshot({ path: screenshot.replace(/\.png$/, `-failed-${who}.png`), fullPage: true }).catch(() => {});
  }
  process.exitCode = 1;
} finally {
  await browser.close();
}
