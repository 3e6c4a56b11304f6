//! The imgate gateway as a library; the `imgate` binary is a thin CLI over it.
//!
//! Layout, from the wire inwards:
//! - [`tcp`], [`ws`], [`sse`], [`poll`], [`http`]: transports. They authenticate, encode
//!   and decode, and hand each connection to a session (polls use the store and the hub's
//!   waiters directly). They never decide delivery order themselves.
//! - [`send`]: checks and stores a client's send, the same way for every transport.
//! - [`metrics`]: Prometheus handles, registered once.
//! - [`session`]: one loop for every long-lived connection: login, resume and backlog,
//!   live delivery, acks, sends, timeouts, `bye`.
//! - [`hub`]: the local registry (uid → this gateway's connections) and the fanout that
//!   `try_send`s each stored message into connection outboxes.
//! - [`cursors`]: batched persistence of device cursors from acks.
//! - [`store`]: the [`store::Store`] seam and the embedded standalone store.
//! - [`auth`], [`config`]: tokens and the configuration tree.
//! - [`server`]: wires it together; `run(listeners, config, shutdown)`.

pub mod auth;
pub mod config;
pub mod cursors;
pub mod groups;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod poll;
pub mod presence;
pub mod rooms;
pub mod send;
pub mod server;
pub mod session;
pub mod sse;
pub mod store;
pub mod tcp;
pub mod ws;

pub use config::Config;
pub use server::{run, Gateway, Listeners};
