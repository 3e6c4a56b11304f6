// Type-checked by tests/run (tsc --noEmit --strict): the README's example, against
// imgate.d.ts. It is not shipped.
import { Imgate, ImgateError, type Message } from "./imgate.js";

async function main(getToken: () => Promise<string>): Promise<void> {
  const im = new Imgate({ url: "https://chat.example.com", getToken, device: "web" });
  const off = im.on("message", (m: Message) => console.log(m.seq, m.from, m.body));
  im.on("state", (s) => console.log(s.state, s.transport));
  im.on("gap", (g) => console.log("reload from the backend since", g.epoch));
  im.on("error", (e: ImgateError) => console.log(e.code, e.message));
  im.on("read", (r) => console.log("read elsewhere up to", r.seq));
  await im.connect();
  console.log(im.unread, "unread above", im.readSeq);
  const { seq, id, ts } = await im.send({ to: "bob", body: { text: "hi" }, id: "c-17" });
  await im.send({ group: "g1", body: { text: "hi all" } });
  await im.join("lobby");
  await im.publish("lobby", { text: "hey" });
  await im.leave("lobby");
  const { messages, next } = await im.history({ before: seq, limit: 50 });
  await im.read(seq);
  const { read, unread } = await im.readState();
  console.log(read, unread);
  console.log(id, ts, messages.length, next, im.lastSeq, im.epoch, im.transport);
  off();
  im.close();
}

export { main };
