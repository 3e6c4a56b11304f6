//! [`Shared`]: the one state every connection and handler of a gateway holds, built once by
//! [`crate::server`].
//!
//! It only gathers what the layers below provide; it decides nothing. Delivery functions
//! take the parts they use (`&dyn Store`, `&Hub`, `&dyn Bus`, a config group or one
//! value of it), never the whole, so only sessions and transports import this module.

use std::sync::Arc;

use governor::DefaultKeyedRateLimiter;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::bus::Bus;
use crate::config::Config;
use crate::delivery::cursors::Cursors;
use crate::delivery::hub::Hub;
use crate::delivery::notify::Notifier;
use crate::delivery::polls::ParkedPolls;
use crate::metrics::Metrics;
use crate::per_ip::PerIp;
use crate::store::Store;
use crate::tls::Tls;

/// Everything sessions and handlers share: configuration, auth, store, bus, registry,
/// cursors, shutdown. A session uses most of it (the config, auth, store, bus, cursors,
/// notifier, metrics and shutdown signal), which is why it holds the whole; what admits a
/// connection, and what only the HTTP handlers keep, is grouped apart ([`Admission`],
/// [`HttpState`]).
pub struct Shared {
    pub cfg: Config,
    pub auth: Auth,
    pub store: Arc<dyn Store>,
    /// Rooms and presence across gateways (in-process when standalone).
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub cursors: Arc<Cursors>,
    /// Cancelled when the gateway starts draining.
    pub shutdown: CancellationToken,
    pub admission: Admission,
    pub http: HttpState,
    /// Shared further by each connection, which counts what it writes.
    pub metrics: Arc<Metrics>,
    /// Offline notifications (`--notify-url`); `None` when off.
    pub notifier: Option<Arc<Notifier>>,
}

/// What admits and tracks a connection: used by the listeners, the WebSocket and SSE
/// handlers (permits, tracker) and the server (tracker, TLS reload), not by sessions.
pub struct Admission {
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Connection permits (`--max-connections`), taken before a connection is served.
    pub permits: Arc<Semaphore>,
    /// Connections per address (`--max-connections-per-ip`), counted at accept.
    pub per_ip: Arc<PerIp>,
    /// The listeners' TLS (`--tls-cert`, `--tls-key`); `None` serves plain sockets.
    pub tls: Option<Arc<Tls>>,
}

/// What only the HTTP handlers keep between requests.
pub struct HttpState {
    /// Long-poll waiters kept between a device's polls.
    pub polls: ParkedPolls,
    /// Sends per second per uid over `POST /v1/messages` (`--send-rate`, `None` = unlimited).
    pub limiter: Option<DefaultKeyedRateLimiter<String>>,
}
