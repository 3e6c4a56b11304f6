// Type declarations for imgate.js, the imgate browser client (docs/sdk.md).

/** A stored message, as the gateway delivers it. */
export interface Message {
  type: "msg";
  seq: number;
  id: string;
  from: string;
  /** Set for a direct message. */
  to?: string;
  /** Set for a group message. */
  group?: string;
  /** Server time the message was accepted, Unix milliseconds. */
  ts: number;
  body: unknown;
}

/** A live room message (nothing stored). */
export interface RoomMessage {
  room: string;
  from: string;
  ts: number;
  body: unknown;
}

export type TransportName = "ws" | "sse" | "longpoll" | "poll";

export interface StateEvent {
  state: "connecting" | "open" | "closed";
  transport: TransportName | null;
}

/** The welcome (or first poll answer) that said `gap: true`. */
export interface GapEvent {
  gap: true;
  epoch: string;
  resume?: number;
}

/** What a transport cost: requests made and bytes received since the last event. */
export interface WireEvent {
  transport: TransportName;
  requests: number;
  bytes: number;
}

export interface Sent {
  seq: number;
  id: string;
  ts: number;
}

export interface HistoryPage {
  /** Newest first. */
  messages: Message[];
  /** Pass as `before` for the page below; absent on the last page. */
  next?: number;
  epoch: string;
}

export interface ImgateOptions {
  /** The gateway's HTTP origin, e.g. "https://chat.example.com". */
  url: string;
  /** A JWT; give `getToken` instead (or too) to have it refreshed before it expires. */
  token?: string;
  /** Returns a fresh token for the same user; asked before the one in use expires. */
  getToken?: () => Promise<string>;
  /** The device id (default "web"): the gateway keeps one cursor per device. */
  device?: string;
  /** Transports in the order they are tried (default ["ws", "sse", "longpoll", "poll"]). */
  transports?: TransportName[];
  /** ms a transport has to say welcome before the next one is tried (default 5000). */
  openTimeout?: number;
  /** Resume after this seq (saved from an earlier session), of this store epoch. */
  lastSeq?: number | null;
  epoch?: string | null;
}

/** An error answered by the gateway; `code` is one of the protocol's error codes. */
export class ImgateError extends Error {
  code: string;
  constructor(code: string, message?: string);
}

/** The user's read position rose (on another device or tab, or over HTTP). */
export interface ReadEvent {
  seq: number;
}

export interface EventMap {
  message: Message;
  room: RoomMessage;
  read: ReadEvent;
  state: StateEvent;
  gap: GapEvent;
  error: ImgateError;
  wire: WireEvent;
}

export class Imgate {
  constructor(options: ImgateOptions);
  readonly url: string;
  readonly device: string;
  /** "connecting", "open" or "closed". */
  readonly state: StateEvent["state"];
  /** The transport in use (or being tried). */
  readonly transport: TransportName | null;
  /** The highest seq handed over, and its store epoch: where a resume goes on from. */
  readonly lastSeq: number | null;
  readonly epoch: string | null;
  /** The user's read position, as last heard. */
  readonly readSeq: number;
  /** Unread messages when the connection opened (counted up to 1,000). */
  readonly unread: number;

  /** Subscribes; returns a function that unsubscribes. */
  on<K extends keyof EventMap>(event: K, fn: (value: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(event: K, fn: (value: EventMap[K]) => void): void;
  /** Resolves once open on some transport; keeps reconnecting until close(). */
  connect(): Promise<void>;
  /** Resolves once stored; made while disconnected, it waits and goes out in order. */
  send(message: { to: string; body: unknown; id?: string } | { group: string; body: unknown; id?: string }): Promise<Sent>;
  join(room: string): Promise<void>;
  leave(room: string): Promise<void>;
  publish(room: string, body: unknown): Promise<void>;
  history(page?: { before?: number; limit?: number }): Promise<HistoryPage>;
  /** Marks everything up to `seq` read for the user, on every device. */
  read(seq: number): Promise<void>;
  /** The read position and unread count, asked of the gateway. */
  readState(): Promise<{ read: number; unread: number }>;
  close(): void;
}

export default Imgate;
