//! Wires the gateway together and runs it until the shutdown future resolves.
//!
//! `run(listeners, config, shutdown)` takes bound listeners (so tests bind port 0) and a
//! shutdown future (so the binary passes signals and tests pass whatever they like). On
//! shutdown: stop accepting, tell every session (they send `bye shutdown`), wait for them
//! up to `--drain-timeout`, then flush cursors.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::cursors::Cursors;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::session::{send_quota, Shared};
use crate::store::memory::{Limits, MemoryStore};
use crate::store::Store;
use governor::RateLimiter;

/// The gateway's bound sockets.
pub struct Listeners {
    pub http: TcpListener,
    pub tcp: TcpListener,
}

impl Listeners {
    pub async fn bind(cfg: &Config) -> std::io::Result<Self> {
        Ok(Listeners {
            http: TcpListener::bind(cfg.http).await?,
            tcp: TcpListener::bind(cfg.tcp).await?,
        })
    }

    /// `(http, tcp)` local addresses, for port 0.
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.http.local_addr()?, self.tcp.local_addr()?))
    }
}

/// Runs the gateway until `shutdown` resolves, then drains.
pub async fn run(
    listeners: Listeners,
    cfg: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let auth = Auth::new(cfg.secret()?.as_ref());
    if auth.dev_mode() {
        tracing::warn!(
            "DEVELOPMENT MODE: no JWT secret configured (IMGATE_JWT_SECRET or \
             --jwt-secret-file); tokens are signed with a public development secret, \
             POST /v1/dev/token hands them to anyone, and only loopback addresses are served"
        );
    }
    let hub = Hub::new();
    let limits = Limits {
        retention: cfg.retention,
        max_inbox: cfg.max_inbox,
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(limits, hub.clone()));
    let cursors = Cursors::new(store.clone());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let drain_timeout = cfg.drain_timeout;
    let cfg_for_limits = cfg.clone();
    let shared = Arc::new(Shared {
        permits: Arc::new(Semaphore::new(cfg.max_connections)),
        cfg,
        auth,
        store,
        hub,
        cursors: cursors.clone(),
        shutdown: stop.clone(),
        tracker: tracker.clone(),
        metrics: Metrics::new(),
        http_limiter: send_quota(&cfg_for_limits).map(RateLimiter::keyed),
    });

    let flusher_stop = CancellationToken::new();
    let flusher = tokio::spawn(cursors.run_flusher(flusher_stop.clone()));
    let tcp = tokio::spawn(crate::tcp::serve(
        listeners.tcp,
        shared.clone(),
        shared.permits.clone(),
        tracker.clone(),
    ));
    let app = crate::http::router(shared.clone());
    let http = tokio::spawn(
        axum::serve(listeners.http, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );

    shutdown.await;
    tracing::info!("shutting down: saying bye to every connection");
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed with connections still open");
    }
    let _ = tokio::time::timeout(drain_timeout, http).await;
    let _ = tcp.await;
    flusher_stop.cancel();
    let _ = flusher.await;
    tracing::info!("stopped");
    Ok(())
}
