//! [`Shared`]: the one state every connection and handler of a gateway holds, built once by
//! [`crate::server`].
//!
//! It only gathers what the layers below provide; it decides nothing. Delivery functions
//! take the parts they use (`&dyn Store`, `&Hub`, `&dyn Bus`, `&Config`), never the whole,
//! so only sessions and transports import this module.

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
/// cursors, shutdown.
pub struct Shared {
    pub cfg: Config,
    pub auth: Auth,
    pub store: Arc<dyn Store>,
    /// Rooms and presence across gateways (in-process when standalone).
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub cursors: Arc<Cursors>,
    /// Long-poll waiters kept between a device's polls.
    pub polls: ParkedPolls,
    /// Cancelled when the gateway starts draining.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Connection permits (`--max-connections`), taken before a connection is served.
    pub permits: Arc<Semaphore>,
    /// Connections per address (`--max-connections-per-ip`), counted at accept.
    pub per_ip: Arc<PerIp>,
    pub metrics: Metrics,
    /// The listeners' TLS (`--tls-cert`, `--tls-key`); `None` serves plain sockets.
    pub tls: Option<Arc<Tls>>,
    /// Sends per second per uid over `POST /v1/messages` (`--send-rate`, `None` = unlimited).
    pub http_limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// Offline notifications (`--notify-url`); `None` when off.
    pub notifier: Option<Arc<Notifier>>,
}
