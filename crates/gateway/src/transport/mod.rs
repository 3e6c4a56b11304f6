//! Transports: how clients reach the gateway. Each authenticates, encodes and decodes for
//! its wire, and hands every long-lived connection (TCP, WebSocket, SSE) to
//! [`crate::session::run`], which does the store work for it; none decides delivery order.
//! The HTTP handlers are the exception: a request has no session, so they call the store
//! themselves, for polls and history, read positions, groups, the revocation of an admin
//! kick and `/readyz` (a send goes through [`crate::delivery::send::commit`]). SSE asks it
//! only for the epoch.
//!
//! - [`tcp`]: length-prefixed msgpack frames on a plain socket.
//! - [`ws`]: WebSocket, JSON text or msgpack binary frames.
//! - [`sse`]: Server-Sent Events, a push-only session.
//! - [`http`]: the HTTP router, with sending, polling, history, groups, rooms and presence.
//! - [`extract`]: the caller's identity and query strings, shared by every HTTP handler.

pub mod extract;
pub mod http;
pub mod sse;
pub mod tcp;
pub mod ws;
