//! What every scenario shares: starting a NATS server and gateways, connecting many users,
//! timestamps, and turning a histogram into a report.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use imgate_client::{Client, ClientBuilder, Events};
use imgate_gateway::auth::Auth;
use serde_json::{json, Value};

use crate::procs::{Gateway, Nats};
use crate::Setup;

/// Microseconds since the Unix epoch (the timestamp carried in message bodies).
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Calls `send(n)` for n = 0, 1, 2, … at `rate` per second for `duration`, catching up in
/// bursts when a tick comes late; returns how many it sent.
pub(crate) async fn pace(rate: u64, duration: Duration, mut send: impl FnMut(u64)) -> u64 {
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
    }
    sent
}

/// A NATS server and `n` gateways in cluster mode on it.
pub(crate) async fn cluster(setup: &Setup, n: usize) -> anyhow::Result<(Nats, Vec<Gateway>)> {
    let nats = Nats::start(&setup.nats_config).await?;
    let mut gws = Vec::new();
    for _ in 0..n {
        gws.push(Gateway::start(&setup.imgate, &["--nats".into(), nats.url()]).await?);
    }
    Ok((nats, gws))
}

/// Connects users `prefix0 .. prefix{n-1}` over TCP, user `i` on gateway `i % gateways`.
pub(crate) async fn connect_users(
    gws: &[Gateway],
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<(Client, Events)>> {
    let auth = Auth::new(None);
    stream::iter(0..n)
        .map(|i| {
            let uid = format!("{prefix}{i}");
            let token = auth.mint(&uid, Duration::from_secs(3600), false);
            let url = format!("tcp://{}", gws[i % gws.len()].tcp);
            async move {
                ClientBuilder::new(url, token)
                    .device("bench")
                    .connect()
                    .await
                    .with_context(|| format!("connecting {uid}"))
            }
        })
        .buffered(100)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
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
