//! W4, a live room: C connections spread over two gateways all join one room; one publisher
//! sends R room messages per second; every joined connection should get every message.
//! Latency runs from the publish call to each connection's receipt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use imgate_client::{Client, Event, Events};
use imgate_proto::ClientFrame;
use serde_json::json;

use crate::common::{connect_users, histogram, now_us, percentiles_ms, round, start, Cluster};
use crate::Setup;
use imgate_harness::{Gateway, Usage};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// Connections in the room.
    #[arg(long, default_value_t = 5_000)]
    connections: usize,
    /// Room messages per second.
    #[arg(long, default_value_t = 10)]
    rate: u64,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// One gateway with no NATS (the in-memory store).
    #[arg(long)]
    standalone: bool,
    #[command(flatten)]
    setup: Setup,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let gateways = if a.standalone { 1 } else { a.gateways };
    let cluster = start(&a.setup, gateways, a.standalone).await?;
    let gws = &cluster.gateways;
    let viewers = join_viewers(gws, a.connections).await?;
    let (host, _events) = join_host(gws, &viewers.probes, a.connections).await?;
    eprintln!(
        "w4: {} viewers joined; {} msg/s for {:?}",
        a.connections, a.rate, a.duration
    );

    let before = Snapshot::take(&cluster)?;
    let started = Instant::now();
    let published = publish(&host, &a, started).await?;
    let expected = published * a.connections as u64;
    await_deliveries(&viewers.received, expected).await;
    let secs = started.elapsed().as_secs_f64();
    let after = Snapshot::take(&cluster)?;
    let got = viewers.received.load(Ordering::Relaxed);
    let mut dropped = 0;
    for g in gws {
        dropped += g.metric("imgate_room_dropped_total").await;
    }
    let h = viewers.latency.lock().unwrap().clone();
    let gateway_cpu: Vec<f64> = after
        .gateways
        .iter()
        .zip(&before.gateways)
        .map(|(x, y)| round(x.cpu_seconds - y.cpu_seconds))
        .collect();
    let report = json!({
        "scenario": "W4",
        "gateways": gateways,
        "standalone": a.standalone,
        "connections": a.connections,
        "rate": a.rate,
        "published": published,
        "expected_deliveries": expected,
        "deliveries": got,
        "deliveries_per_second": round(got as f64 / a.duration.as_secs_f64()),
        "missing": expected.saturating_sub(got),
        "room_dropped_by_gateways": dropped,
        "latency_ms": percentiles_ms(&h),
        "gateway_cpu_seconds": gateway_cpu,
        "gateway_peak_rss_kib": after.gateways.iter().map(|u| u.peak_rss_kib).collect::<Vec<_>>(),
        "nats_cpu_seconds": round(after.nats.cpu_seconds - before.nats.cpu_seconds),
        "load_generator_cpu_seconds": round(after.me.cpu_seconds - before.me.cpu_seconds),
        "wall_seconds": round(secs),
    });
    drop(viewers.clients);
    crate::print(&a.setup, &report);
    Ok(())
}

/// The viewers' clients, and what the tasks reading their events record.
struct Viewers {
    clients: Vec<Client>,
    latency: Arc<Mutex<Histogram<u64>>>,
    /// Timed room messages received, by all viewers together.
    received: Arc<AtomicU64>,
    /// Viewers that have seen a probe.
    probes: Arc<AtomicU64>,
}

/// Connects `n` viewers and joins each to the room, a task reading each one's events.
async fn join_viewers(gws: &[Gateway], n: usize) -> anyhow::Result<Viewers> {
    eprintln!("w4: connecting {n} viewers");
    let viewers = connect_users(gws, "v", n).await?;
    let latency = Arc::new(Mutex::new(histogram()));
    let received = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for (client, events) in viewers {
        client
            .frame(ClientFrame::Join {
                room: "live".into(),
            })
            .await?;
        let (latency, received, probes) = (latency.clone(), received.clone(), probes.clone());
        tokio::spawn(watch(events, latency, received, probes));
        clients.push(client);
    }
    Ok(Viewers {
        clients,
        latency,
        received,
        probes,
    })
}

/// A viewer's events: each timed room message counted and timed, its first probe counted.
async fn watch(
    mut events: Events,
    latency: Arc<Mutex<Histogram<u64>>>,
    received: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
) {
    let mut probed = false;
    while let Some(ev) = events.recv().await {
        if let Event::Room { body, .. } = ev {
            let at = now_us();
            match body["t"].as_u64() {
                Some(t) => {
                    received.fetch_add(1, Ordering::Relaxed);
                    let _ = latency.lock().unwrap().record(at.saturating_sub(t).max(1));
                }
                None if !probed => {
                    probed = true;
                    probes.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
        }
    }
}

/// Connects the host and joins it to the room; probes until every viewer has seen a probe.
async fn join_host(
    gws: &[Gateway],
    probes: &AtomicU64,
    viewers: usize,
) -> anyhow::Result<(Client, Events)> {
    let (host, events) = connect_users(gws, "host", 1)
        .await?
        .pop()
        .expect("one host");
    host.frame(ClientFrame::Join {
        room: "live".into(),
    })
    .await?;
    // Joins travel asynchronously: probe until every viewer has seen one.
    let deadline = Instant::now() + Duration::from_secs(60);
    while probes.load(Ordering::Relaxed) < viewers as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} viewers joined",
            probes.load(Ordering::Relaxed)
        );
        host.frame(ClientFrame::Publish {
            room: "live".into(),
            body: json!({"probe": true}),
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((host, events))
}

/// CPU and peak RSS of the gateways, the NATS servers and this process, at one moment.
struct Snapshot {
    gateways: Vec<Usage>,
    nats: Usage,
    me: Usage,
}

impl Snapshot {
    /// Reads the gateways' usage, then the NATS servers', then this process's.
    fn take(cluster: &Cluster) -> anyhow::Result<Snapshot> {
        let gws = &cluster.gateways;
        Ok(Snapshot {
            gateways: gws.iter().map(|g| g.usage()).collect::<Result<_, _>>()?,
            nats: cluster.nats_usage()?,
            me: imgate_harness::usage::usage(std::process::id())?,
        })
    }
}

/// Publishes a timed room message at `a.rate` a second from `started` for `a.duration`.
async fn publish(host: &Client, a: &Args, started: Instant) -> anyhow::Result<u64> {
    let mut published = 0u64;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / a.rate.max(1)));
    while started.elapsed() < a.duration {
        tick.tick().await;
        host.frame(ClientFrame::Publish {
            room: "live".into(),
            body: json!({"t": now_us(), "n": published}),
        })
        .await?;
        published += 1;
    }
    Ok(published)
}

/// Waits until the viewers have received `expected` messages in all, or 10 s.
async fn await_deliveries(received: &AtomicU64, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
