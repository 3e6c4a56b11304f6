//! The imgate gateway as a library; the `imgate` binary is a thin CLI over it.
//!
//! Layers, from the wire inwards; each imports only the layers below it:
//!
//! ```text
//! transport  tcp, ws, sse, http/{messages, groups, rooms, presence}
//!     │      authenticate, encode and decode; hand each connection to a session
//!     ▼
//! session    one loop per long-lived connection: login, resume and backlog, live
//!     │      delivery, acks, sends, timeouts, bye
//!     ▼
//! delivery   hub (registry and fanout), outbox (what leaves, encoded once), send,
//!     │      cursors, resume, groups, rooms, polls
//!     ▼
//! store, bus inboxes, cursors and groups (disk, memory, NATS JetStream); rooms and
//!            presence between gateways (in-process or core NATS)
//! ```
//!
//! Beside them: [`state`] gathers what sessions and transports share; [`server`] builds it
//! and runs the listeners; [`config`], [`auth`], [`metrics`], [`refusal`] (the one shape of
//! an error answer), [`subjects`] (every NATS name), [`tls`] (certificates), [`per_ip`] (the
//! per-address connection limit both listeners apply at accept) and [`logging`] (which
//! connection a log line is from) are leaves any layer may use. [`fuzz`] holds the
//! entry points the fuzzers and the corpus replay test feed arbitrary bytes.

pub mod auth;
pub mod bus;
pub mod config;
pub mod delivery;
pub mod fuzz;
pub mod logging;
pub mod metrics;
pub mod per_ip;
pub mod refusal;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod subjects;
pub mod tls;
pub mod transport;

pub use config::Config;
pub use server::{run, Gateway, Listeners};
