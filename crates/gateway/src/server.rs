//! Wires the gateway together and runs it until the shutdown future resolves.
//!
//! `run(listeners, config, shutdown)` takes bound listeners (so tests bind port 0) and a
//! shutdown future (so the binary passes signals and tests pass whatever they like). On
//! shutdown: stop accepting, tell every session (they send `bye shutdown`), wait for them
//! up to `--drain-timeout`, then flush cursors.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use imgate_proto::ByeReason;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, KeySources};
use crate::bus::local::LocalBus;
use crate::bus::nats::NatsBus;
use crate::bus::Bus;
use crate::config::StoreKind;
use crate::config::{Config, Fanout};
use crate::delivery::cursors::Cursors;
use crate::delivery::hub::Hub;
use crate::delivery::notify::{cluster, standalone, Notifier, Reporter};
use crate::delivery::send::send_quota;
use crate::metrics::{Metrics, TailStats};
use crate::per_ip::PerIp;
use crate::state::{Admission, HttpState, Shared};
use crate::store::disk::{self, DiskStore};
use crate::store::memory::{Keep, MemoryStore};
use crate::store::nats::{NatsStore, NotifyWindows};
use crate::store::{NotifyState, Store};
use crate::tls::Tls;
use governor::RateLimiter;

/// The gateway's bound sockets.
pub struct Listeners {
    pub http: TcpListener,
    pub tcp: TcpListener,
    /// `--metrics-listen`.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(cfg: &Config) -> std::io::Result<Self> {
        let metrics = match cfg.listen.metrics_listen {
            Some(addr) => Some(bind(addr, "--metrics-listen").await?),
            None => None,
        };
        Ok(Listeners {
            http: bind(cfg.listen.http, "--http").await?,
            tcp: bind(cfg.listen.tcp, "--tcp").await?,
            metrics,
        })
    }

    /// `(http, tcp)` local addresses, for port 0.
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.http.local_addr()?, self.tcp.local_addr()?))
    }
}

/// Binds one listener; a failure names the flag and the address ("Address already in use"
/// alone does not say which of three).
async fn bind(addr: SocketAddr, flag: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({flag}): {e}"))
    })
}

/// A gateway with its store reachable and its tail running, ready to serve.
pub struct Gateway {
    shared: Arc<Shared>,
    tail_stop: CancellationToken,
    /// The disk store, closed (queued sends committed, fsynced) after the drain.
    disk: Option<Arc<DiskStore>>,
}

/// Builds a gateway from `cfg` and serves `listeners` until `shutdown` resolves.
pub async fn run(
    listeners: Listeners,
    cfg: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Gateway::new(cfg).await?.serve(listeners, shutdown).await
}

impl Gateway {
    #[cfg(test)]
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Checks the configuration, opens the store (connecting to NATS and starting the tail
    /// in cluster mode). Nothing is listening yet.
    pub async fn new(cfg: Config) -> anyhow::Result<Gateway> {
        cfg.validate()?;
        let auth = Auth::with_keys(cfg.auth.secret()?.as_ref(), KeySources::of(&cfg))?;
        if auth.dev_mode() {
            tracing::warn!(
                "DEVELOPMENT MODE: no JWT key configured (IMGATE_JWT_SECRET, \
                 --jwt-secret-file, --jwt-public-key-file or --jwt-jwks-file); tokens are signed with a public development secret, \
                 POST /v1/dev/token hands them to anyone, and only loopback addresses are served"
            );
        }
        let tls = match (&cfg.listen.tls_cert, &cfg.listen.tls_key) {
            (Some(cert), Some(key)) => {
                let tls = Tls::load(cert, key)?;
                tracing::info!(cert = %cert.display(), "TLS on the HTTP and TCP listeners");
                Some(Arc::new(tls))
            }
            _ => None,
        };
        let hub = Hub::new();
        let tail_stop = CancellationToken::new();
        let Opened {
            store,
            bus,
            disk,
            notify_state,
            notify_windows,
            tail_stats,
        } = if cfg.nats.nats.is_empty() {
            standalone(&cfg, &hub)?
        } else {
            cluster(&cfg, &hub, &auth, &tail_stop).await?
        };
        // Revoked tokens are refused from the first connection on.
        for (uid, before) in store.revocations().await? {
            auth.revocations().raise(&uid, before);
        }
        let http_limiter = send_quota(&cfg.limits).map(RateLimiter::keyed);
        let cursors = Cursors::new(store.clone(), cfg.timers.cursor_interval);
        let metrics = Metrics::new(tail_stats);
        let notifier = notifier(
            &cfg,
            &store,
            &cursors,
            &hub,
            &metrics,
            notify_state,
            notify_windows,
        )
        .await?;
        let admission = Admission {
            tracker: TaskTracker::new(),
            permits: Arc::new(Semaphore::new(cfg.limits.max_connections)),
            per_ip: PerIp::new(cfg.limits.max_connections_per_ip),
            tls,
        };
        let http = HttpState {
            polls: Default::default(),
            limiter: http_limiter,
        };
        let shared = Arc::new(Shared {
            cursors,
            cfg,
            auth,
            store,
            bus,
            hub,
            shutdown: CancellationToken::new(),
            metrics: Arc::new(metrics),
            admission,
            http,
            notifier,
        });
        Ok(Gateway {
            shared,
            tail_stop,
            disk,
        })
    }

    /// Serves until `shutdown` resolves, then drains: `bye shutdown` to every connection,
    /// wait up to `--drain-timeout`, flush cursors.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let shared = self.shared;
        let stop = shared.shutdown.clone();
        let tracker = shared.admission.tracker.clone();
        let drain_timeout = shared.cfg.timers.drain_timeout;
        let flusher_stop = CancellationToken::new();
        let flusher = tokio::spawn(shared.cursors.clone().run_flusher(flusher_stop.clone()));
        let sweeper = {
            let (shared, stop) = (shared.clone(), flusher_stop.clone());
            tokio::spawn(async move { shared.http.polls.run_sweeper(stop).await })
        };
        // Stopped with the connections: a notification the webhook has not taken stays
        // pending, in the store (sent after the next start) or in NATS (sent by another
        // gateway once its ack wait passes).
        if let Some(n) = shared.notifier.clone() {
            let stop = stop.clone();
            tokio::spawn(async move { n.run(stop).await });
        }
        let tcp = tokio::spawn(crate::transport::tcp::serve(listeners.tcp, shared.clone()));
        let app = crate::transport::http::router(shared.clone());
        let http = tokio::spawn(crate::transport::http::listener::serve(
            listeners.http,
            app,
            shared.clone(),
            shared.admission.tls.clone(),
        ));
        if let Some(metrics) = listeners.metrics {
            let app = crate::transport::http::metrics_router(shared.clone());
            // Plain HTTP even with TLS on: it is for a scraper on a private network.
            tokio::spawn(crate::transport::http::listener::serve(
                metrics,
                app,
                shared.clone(),
                None,
            ));
        }
        let reloads = tokio::spawn(reload_on_sighup(shared.clone(), flusher_stop.clone()));

        shutdown.await;
        tracing::info!("shutting down: saying bye to every connection");
        stop.cancel();
        shared.hub.kick_all(ByeReason::Shutdown);
        tracker.close();
        if tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout passed with connections still open");
        }
        if let Some(n) = &shared.notifier {
            n.stopped(drain_timeout).await;
        }
        let _ = tokio::time::timeout(drain_timeout, http).await;
        let _ = tcp.await;
        flusher_stop.cancel();
        let _ = reloads.await;
        let _ = sweeper.await;
        let _ = flusher.await;
        self.tail_stop.cancel();
        if let Some(d) = self.disk {
            d.close();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Re-reads the TLS certificate and key and the JWT key files on every SIGHUP until `stop`.
async fn reload_on_sighup(shared: Arc<Shared>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; nothing will be reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            _ = stop.cancelled() => return,
        }
        if let Some(tls) = &shared.admission.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: TLS reload failed; serving the previous certificate"
                ),
            }
        }
        if shared.auth.has_key_files() {
            match shared.auth.reload() {
                Ok(n) => tracing::info!(keys = n, "SIGHUP: JWT public keys reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: JWT key reload failed; checking tokens with the previous keys"
                ),
            }
        }
    }
}

/// The store and bus of one mode, and what notifications need of them.
struct Opened {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    /// The disk store, to close after the drain.
    disk: Option<Arc<DiskStore>>,
    /// Where a standalone store keeps notification windows.
    notify_state: Option<Arc<dyn NotifyState>>,
    /// The cluster's notification windows (only with notifications on).
    notify_windows: Option<Arc<NotifyWindows>>,
    /// The cluster tail's counters, for `/metrics`.
    tail_stats: Option<Arc<TailStats>>,
}

/// Standalone mode: the disk or memory store and the in-process bus.
fn standalone(cfg: &Config, hub: &Arc<Hub>) -> anyhow::Result<Opened> {
    anyhow::ensure!(
        !cfg.notify.notify_nats,
        "--notify-nats publishes notifications on NATS: it needs --nats (cluster mode)"
    );
    let keep = Keep {
        retention: cfg.storage.retention,
        max_inbox: cfg.storage.max_inbox,
    };
    let (store, disk, notify_state): (Arc<dyn Store>, _, Arc<dyn NotifyState>) =
        match cfg.storage.kind {
            StoreKind::Memory => {
                tracing::info!(
                    "standalone mode: in-memory store (nothing survives a restart), in-process bus"
                );
                let m = Arc::new(MemoryStore::new(keep, hub.clone()));
                (m.clone(), None, m)
            }
            StoreKind::Disk => {
                let dir = cfg.storage.data_dir();
                let opened = std::time::Instant::now();
                let options = disk::Options {
                    fsync: cfg.storage.fsync,
                    repair: cfg.storage.repair,
                };
                let d = Arc::new(DiskStore::open(&dir, keep, options, hub.clone())?);
                tracing::info!(
                    data_dir = %dir.display(),
                    fsync = ?cfg.storage.fsync,
                    epoch = %d.epoch(),
                    open_ms = opened.elapsed().as_millis() as u64,
                    "standalone mode: disk store, in-process bus"
                );
                (d.clone(), Some(d.clone()), d)
            }
        };
    Ok(Opened {
        store,
        bus: Arc::new(LocalBus::new(hub.clone())),
        disk,
        notify_state: Some(notify_state),
        notify_windows: None,
        tail_stats: None,
    })
}

/// Cluster mode: connects to NATS, then starts the tail, the watches of groups, revocations
/// and read positions, and the bus, each until `stop`.
async fn cluster(
    cfg: &Config,
    hub: &Arc<Hub>,
    auth: &Auth,
    stop: &CancellationToken,
) -> anyhow::Result<Opened> {
    let nats = NatsStore::connect(cfg).await?;
    let notify_windows = if cfg.notify.notify_url.is_some() || cfg.notify.notify_nats {
        Some(Arc::new(nats.notify_windows(cfg.nats.replicas).await?))
    } else {
        None
    };
    // Deliver-new from an exact seq: everything stored from now on reaches us.
    let after = nats.stream_last_seq().await?;
    match cfg.nats.fanout {
        Fanout::Broadcast => {
            tokio::spawn(nats.clone().run_tail(hub.clone(), after, stop.clone()));
        }
        Fanout::Interest => {
            tokio::spawn(nats.clone().run_interest_tail(hub.clone(), stop.clone()));
        }
    }
    let (groups_ready, loaded) = tokio::sync::oneshot::channel();
    tokio::spawn(nats.clone().run_group_watch(groups_ready, stop.clone()));
    tokio::time::timeout(cfg.nats.nats_startup_timeout, loaded)
        .await
        .map_err(|_| anyhow::anyhow!("loading groups from NATS timed out"))??;
    let revocations = auth.revocations().clone();
    let bus = Arc::new(NatsBus::new(
        nats.client().clone(),
        nats.names().clone(),
        hub.clone(),
        revocations.clone(),
    ));
    tokio::spawn(nats.clone().run_revocation_watch(revocations, stop.clone()));
    tokio::spawn(nats.clone().run_read_watch(hub.clone(), stop.clone()));
    tokio::spawn({
        let (bus, stop) = (bus.clone(), stop.clone());
        async move { bus.serve(stop).await }
    });
    tracing::info!(
        servers = ?cfg.nats.nats,
        stream = %nats.names().stream,
        after,
        fanout = ?cfg.nats.fanout,
        "cluster mode: following the stream"
    );
    Ok(Opened {
        tail_stats: Some(nats.tail_stats.clone()),
        store: nats,
        bus,
        disk: None,
        notify_state: None,
        notify_windows,
    })
}

/// The notifier of this gateway's mode, if notifications are on.
async fn notifier(
    cfg: &Config,
    store: &Arc<dyn Store>,
    cursors: &Arc<Cursors>,
    hub: &Arc<Hub>,
    metrics: &Metrics,
    notify_state: Option<Arc<dyn NotifyState>>,
    notify_windows: Option<Arc<NotifyWindows>>,
) -> anyhow::Result<Option<Arc<Notifier>>> {
    if cfg.notify.notify_url.is_none() && !cfg.notify.notify_nats {
        return Ok(None);
    }
    let reporter = Reporter::new(
        &cfg.notify,
        store.clone(),
        cursors.clone(),
        hub.clone(),
        notify_windows.as_ref(),
        metrics.notify.clone(),
    )?;
    let notifier = match (notify_state, notify_windows) {
        (Some(state), _) => {
            Notifier::Standalone(standalone::Notifier::open(reporter, state).await?)
        }
        (None, Some(windows)) => Notifier::Cluster(cluster::Notifier::new(reporter, windows)),
        (None, None) => unreachable!("every store keeps notification windows"),
    };
    tracing::info!(
        url = ?cfg.notify.notify_url.as_ref().map(|u| u.as_str()),
        nats = cfg.notify.notify_nats,
        after = ?cfg.notify.notify_after,
        "offline notifications on"
    );
    Ok(Some(Arc::new(notifier)))
}
