//! What every scenario shares: starting a NATS server and gateways, connecting many users,
//! timestamps, and turning a histogram into a report.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use imgate_client::{Client, ClientBuilder, Encoding, Events};
use imgate_gateway::auth::Auth;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::Setup;
use imgate_harness::{Gateway, NatsCounts, NatsServer, Usage};

/// Microseconds since the Unix epoch (the timestamp carried in message bodies).
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("static template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Calls `send(n)` for n = 0, 1, 2, … at `rate` per second for `duration`, catching up in
/// bursts when a tick comes late; returns how many it sent.
pub(crate) async fn pace(rate: u64, duration: Duration, mut send: impl FnMut(u64)) -> u64 {
    let bar = progress(duration.as_secs(), "offering");
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0;
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            send(sent);
            sent += 1;
        }
        bar.set_position(started.elapsed().as_secs());
    }
    bar.finish_and_clear();
    sent
}

/// How the load generator's users connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Transport {
    /// Length-prefixed msgpack over TCP.
    Tcp,
    /// WebSocket, subprotocol imgate.json.
    WsJson,
    /// WebSocket, subprotocol imgate.msgpack.
    WsMsgpack,
    /// Server-Sent Events to receive, `POST /v1/messages` to send.
    Sse,
    /// Long polls to receive, `POST /v1/messages` to send.
    LongPoll,
}

impl Transport {
    /// How an HTTP user receives; None for the transports of the client crate.
    pub(crate) fn http_receive(self) -> Option<crate::http_user::Receive> {
        match self {
            Transport::Sse => Some(crate::http_user::Receive::Sse),
            Transport::LongPoll => Some(crate::http_user::Receive::LongPoll),
            _ => None,
        }
    }

    /// A client builder for a user on the gateway listening at `gw`.
    pub(crate) fn builder(self, gw: Addrs, token: String) -> ClientBuilder {
        let b = match self {
            Transport::Tcp => ClientBuilder::new(format!("tcp://{}", gw.tcp), token),
            Transport::WsJson | Transport::WsMsgpack => {
                ClientBuilder::new(format!("ws://{}/v1/ws", gw.http), token)
            }
            Transport::Sse | Transport::LongPoll => {
                unreachable!("HTTP users are connected by http_user, not the client crate")
            }
        };
        let enc = if self == Transport::WsJson {
            Encoding::Json
        } else {
            Encoding::Msgpack
        };
        b.device("bench").encoding(enc)
    }
}

/// The processes a scenario measures: gateways, and the NATS servers they share unless the
/// single gateway is standalone.
pub(crate) struct Cluster {
    pub(crate) nats: Option<Nats>,
    pub(crate) gateways: Vec<Gateway>,
}

impl Cluster {
    /// CPU and peak RSS of the NATS servers (zero when standalone).
    pub(crate) fn nats_usage(&self) -> anyhow::Result<Usage> {
        self.nats.as_ref().map_or(Ok(Usage::default()), Nats::usage)
    }

    /// The NATS servers' message and API counters (zero when standalone).
    pub(crate) async fn nats_counts(&self) -> anyhow::Result<NatsCounts> {
        match &self.nats {
            Some(n) => n.counts().await,
            None => Ok(Default::default()),
        }
    }
}

/// The NATS servers of a run: one, or three clustered with `--replicas 3`. Figures are
/// summed over the servers (peak RSS too: it is what the bus holds in all).
pub(crate) struct Nats {
    pub(crate) servers: Vec<NatsServer>,
}

impl Nats {
    /// The `--nats` value for a gateway.
    pub(crate) fn urls(&self) -> String {
        let urls: Vec<String> = self.servers.iter().map(NatsServer::url).collect();
        urls.join(",")
    }

    pub(crate) fn usage(&self) -> anyhow::Result<Usage> {
        let mut sum = Usage::default();
        for s in &self.servers {
            let u = s.usage()?;
            sum.cpu_seconds += u.cpu_seconds;
            sum.peak_rss_kib += u.peak_rss_kib;
        }
        Ok(sum)
    }

    pub(crate) async fn counts(&self) -> anyhow::Result<NatsCounts> {
        let mut sum = NatsCounts::default();
        for s in &self.servers {
            let c = s.counts().await?;
            sum.in_msgs += c.in_msgs;
            sum.out_msgs += c.out_msgs;
            sum.api_requests += c.api_requests;
        }
        Ok(sum)
    }
}

/// NATS (one server, or three with `--replicas 3`) and `n` gateways in cluster mode on it.
pub(crate) async fn cluster(setup: &Setup, n: usize) -> anyhow::Result<(Nats, Vec<Gateway>)> {
    let servers = match setup.replicas {
        1 => vec![NatsServer::start_from(Some(setup.nats_config.clone()), &[]).await?],
        3 => NatsServer::cluster(3).await?,
        r => anyhow::bail!("--replicas is 1 or 3, not {r}"),
    };
    let nats = Nats { servers };
    let mut gws = Vec::new();
    for _ in 0..n {
        let args = [
            "--nats".into(),
            nats.urls(),
            "--replicas".into(),
            setup.replicas.to_string(),
        ];
        gws.push(setup.gateway(&args).await?);
    }
    Ok((nats, gws))
}

/// `n` gateways on one NATS server, or with `standalone` one gateway and no NATS.
pub(crate) async fn start(setup: &Setup, n: usize, standalone: bool) -> anyhow::Result<Cluster> {
    if standalone {
        anyhow::ensure!(n == 1, "a standalone run has exactly one gateway");
        // The disk store is the default: without a named directory the harness gives the
        // gateway a temporary one.
        let args = match (setup.store.as_str(), &setup.data_dir) {
            ("disk", None) => vec!["--fsync".into(), setup.fsync.clone()],
            ("disk", Some(d)) => vec![
                "--fsync".into(),
                setup.fsync.clone(),
                "--data-dir".into(),
                d.display().to_string(),
            ],
            (store, _) => vec!["--store".into(), store.to_owned()],
        };
        let gw = setup.gateway(&args).await?;
        return Ok(Cluster {
            nats: None,
            gateways: vec![gw],
        });
    }
    let (nats, gateways) = cluster(setup, n).await?;
    Ok(Cluster {
        nats: Some(nats),
        gateways,
    })
}

/// Where a gateway listens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Addrs {
    pub(crate) tcp: SocketAddr,
    pub(crate) http: SocketAddr,
}

impl From<&Gateway> for Addrs {
    fn from(gw: &Gateway) -> Addrs {
        Addrs {
            tcp: gw.tcp,
            http: gw.http,
        }
    }
}

/// Runs `connect(i, uid, token)` for the users `prefix<i>`, i in `users`, a hundred at a
/// time, with a progress bar; fails on the first user that fails.
pub(crate) async fn connect_many<T, Fut>(
    prefix: &str,
    users: std::ops::Range<usize>,
    connect: impl Fn(usize, String, String) -> Fut,
) -> anyhow::Result<Vec<T>>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let auth = Auth::new(None);
    let bar = progress(users.len() as u64, "connecting");
    let out = stream::iter(users)
        .map(|i| {
            let uid = format!("{prefix}{i}");
            let token = auth.mint(&uid, Duration::from_secs(3600), false);
            let connected = connect(i, uid, token);
            let bar = &bar;
            async move {
                let t = connected.await?;
                bar.inc(1);
                anyhow::Ok(t)
            }
        })
        .buffered(100)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect();
    bar.finish_and_clear();
    out
}

/// Connects users `prefix<i>` for i in `users` through the client crate, user `i` on
/// gateway `i % gateways`, from `source` when given, and hands each
/// `(index, uid, client, events)` to `each`, which returns what to keep.
pub(crate) async fn connect_each<T>(
    gws: &[Addrs],
    transport: Transport,
    prefix: &str,
    users: std::ops::Range<usize>,
    source: Option<IpAddr>,
    each: impl Fn(usize, String, Client, Events) -> T,
) -> anyhow::Result<Vec<T>> {
    let each = &each;
    connect_many(prefix, users, |i, uid, token| {
        let mut builder = transport.builder(gws[i % gws.len()], token);
        if let Some(ip) = source {
            builder = builder.local_addr(ip);
        }
        async move {
            let (client, events) = builder
                .connect()
                .await
                .with_context(|| format!("connecting {uid}"))?;
            Ok(each(i, uid, client, events))
        }
    })
    .await
}

/// Connects users `prefix0 .. prefix{n-1}` over TCP, user `i` on gateway `i % gateways`.
pub(crate) async fn connect_users(
    gws: &[Gateway],
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<(Client, Events)>> {
    let addrs: Vec<Addrs> = gws.iter().map(Addrs::from).collect();
    connect_each(&addrs, Transport::Tcp, prefix, 0..n, None, |_, _, c, e| {
        (c, e)
    })
    .await
}

/// A latency histogram in microseconds, 1 µs to 60 s, 3 significant figures.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

pub(crate) fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Percentiles of a microsecond histogram, in milliseconds.
pub(crate) fn percentiles_ms(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| round(us as f64 / 1000.0);
    json!({
        "samples": h.len(),
        "p50": ms(h.value_at_quantile(0.50)),
        "p90": ms(h.value_at_quantile(0.90)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

/// The gateways' `--fanout`, which they read from the `IMGATE_FANOUT` they inherit from
/// the generator (the default: broadcast).
pub(crate) fn fanout() -> String {
    std::env::var("IMGATE_FANOUT").unwrap_or_else(|_| "broadcast".into())
}
