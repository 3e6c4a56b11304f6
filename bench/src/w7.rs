//! W7, a reconnect storm: N TCP devices over two gateways, each with messages waiting,
//! all reconnecting at once (as when a gateway restarts and its devices move). Reports the
//! time from the first reconnect until every device has drained its backlog, messages lost
//! or duplicated, and what nats-server counted per login (JetStream API requests from
//! `/jsz`, messages in and out from `/varz`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use imgate_client::{Client, ClientBuilder, Event};
use imgate_proto::Send;
use serde_json::{json, Value};

use crate::common::{
    connect_users, histogram, percentiles_ms, round, start, Addrs, Cluster, Transport,
};
use crate::Setup;
use imgate_harness::{Gateway, NatsCounts, Usage};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Devices (one user each), half on each gateway.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Messages waiting for each device when it reconnects.
    #[arg(long, default_value_t = 10)]
    waiting: usize,
    /// Longest wait for every device to drain.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    deadline: Duration,
    #[command(flatten)]
    setup: Setup,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let cluster = start(&a.setup, 2, false).await?;
    let gws = &cluster.gateways;
    let addrs: Vec<Addrs> = gws.iter().map(Addrs::from).collect();
    first_login(gws, a.devices).await?;
    store_backlog(gws, a.devices, a.waiting).await?;

    let before = Snapshot::take(&cluster).await?;
    let storm = storm(&a, &addrs).await?;
    let after = Snapshot::take(&cluster).await?;
    let report = report(&a, &storm, &before, &after);
    if a.setup.json {
        crate::print(&a.setup, &report);
    } else {
        print_table(&a, &storm, &report);
    }
    drop(storm.clients);
    Ok(())
}

/// Logs every device in once and out again, so that each has a cursor.
async fn first_login(gws: &[Gateway], devices: usize) -> anyhow::Result<()> {
    // Every device is seen once, so it has a cursor, then goes away.
    eprintln!("w7: first login of {devices} devices");
    let first = connect_users(gws, "r", devices).await?;
    drop(first);
    // Cursors are written when a device disconnects.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// Stores `waiting` direct messages for each of the `devices` devices.
async fn store_backlog(gws: &[Gateway], devices: usize, waiting: usize) -> anyhow::Result<()> {
    // The backlog: `waiting` direct messages for each device from a few senders.
    let senders = connect_users(gws, "sender", 20).await?;
    let total = devices * waiting;
    eprintln!("w7: storing {total} messages");
    let stored = stream::iter(0..total)
        .map(|n| {
            let (client, _) = &senders[n % senders.len()];
            let client = client.clone();
            async move {
                client
                    .send(Send {
                        id: Some(format!("w7-{n}")),
                        to: Some(format!("r{}", n % devices)),
                        group: None,
                        body: json!({"n": n}),
                    })
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(512)
        .collect::<Vec<_>>()
        .await;
    anyhow::ensure!(
        stored.iter().all(Result::is_ok),
        "storing the backlog failed"
    );
    drop(senders);
    Ok(())
}

/// What NATS has counted and what the gateways and NATS have used, at one moment.
struct Snapshot {
    counts: NatsCounts,
    gateways: Vec<Usage>,
    nats: Usage,
}

impl Snapshot {
    /// Reads the NATS servers' counts, the gateways' usage, then the NATS servers' usage.
    async fn take(cluster: &Cluster) -> anyhow::Result<Snapshot> {
        let gws = &cluster.gateways;
        Ok(Snapshot {
            counts: cluster.nats_counts().await?,
            gateways: gws.iter().map(|g| g.usage()).collect::<Result<_, _>>()?,
            nats: cluster.nats_usage()?,
        })
    }
}

/// What the storm came to: which devices drained their backlog, when, and their clients.
struct Storm {
    /// When each device had its whole backlog, from the first reconnect.
    latency: Histogram<u64>,
    drained: usize,
    duplicates: u64,
    failed: usize,
    clients: Vec<Client>,
    /// From the first reconnect until every device has drained, failed or run out of time.
    all_drained: Duration,
}

/// Reconnects every device at once, each to the other gateway, and waits for them to drain.
async fn storm(a: &Args, addrs: &[Addrs]) -> anyhow::Result<Storm> {
    eprintln!("w7: {} devices reconnect at once", a.devices);
    let auth = imgate_gateway::auth::Auth::new(None);
    let started = Instant::now();
    let waiting = a.waiting;
    let tasks: Vec<_> = (0..a.devices)
        .map(|i| {
            let uid = format!("r{i}");
            let token = auth.mint(&uid, Duration::from_secs(3600), false);
            // Each device moves to the other gateway.
            let builder = Transport::Tcp.builder(addrs[(i + 1) % 2], token);
            tokio::spawn(reconnect(uid, builder, waiting, started))
        })
        .collect();
    let mut s = Storm {
        latency: histogram(),
        drained: 0,
        duplicates: 0,
        failed: 0,
        clients: Vec::with_capacity(a.devices),
        all_drained: Duration::ZERO,
    };
    let deadline = tokio::time::Instant::now() + a.deadline;
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Ok((at, dup, client)))) => {
                s.drained += 1;
                s.duplicates += dup;
                s.latency.record(at.as_micros().max(1) as u64)?;
                s.clients.push(client);
            }
            Ok(Ok(Err(e))) => {
                s.failed += 1;
                if s.failed <= 3 {
                    eprintln!("w7: {e:#}");
                }
            }
            _ => s.failed += 1,
        }
    }
    s.all_drained = started.elapsed();
    Ok(s)
}

/// Reconnects `uid` and reads until `waiting` distinct messages came: when, duplicates, client.
async fn reconnect(
    uid: String,
    builder: ClientBuilder,
    waiting: usize,
    started: Instant,
) -> anyhow::Result<(Duration, u64, Client)> {
    let (client, mut events) = builder
        .connect()
        .await
        .with_context(|| format!("reconnecting {uid}"))?;
    let mut seen = HashSet::new();
    let mut duplicates = 0u64;
    while seen.len() < waiting {
        match events.recv().await {
            Some(Event::Msg(m)) => {
                if !seen.insert(m.seq) {
                    duplicates += 1;
                }
            }
            Some(_) => {}
            None => anyhow::bail!("{uid}'s connection ended"),
        }
    }
    Ok((started.elapsed(), duplicates, client))
}

/// The report: devices drained and not, when, and what NATS counted per login.
fn report(a: &Args, s: &Storm, before: &Snapshot, after: &Snapshot) -> Value {
    let gateway_cpu: f64 = after
        .gateways
        .iter()
        .zip(&before.gateways)
        .map(|(x, y)| x.cpu_seconds - y.cpu_seconds)
        .sum();
    json!({
        "scenario": "W7",
        "fanout": crate::common::fanout(),
        "devices": a.devices,
        "waiting_per_device": a.waiting,
        "drained": s.drained,
        "not_drained": s.failed,
        "duplicates": s.duplicates,
        "all_drained_seconds": round(s.all_drained.as_secs_f64()),
        "drained_at_ms": percentiles_ms(&s.latency),
        "per_login": after.counts.per(&before.counts, a.devices as u64),
        "gateway_cpu_seconds": round(gateway_cpu),
        "nats_cpu_seconds": round(after.nats.cpu_seconds - before.nats.cpu_seconds),
    })
}

/// Prints the report as a table.
fn print_table(a: &Args, s: &Storm, r: &Value) {
    let per = &r["per_login"];
    println!(
        "W7 reconnect storm: {} TCP devices on 2 gateways, {} messages waiting each",
        a.devices, a.waiting
    );
    println!(
        "{:<40} {} / {} / {}",
        "drained / not drained / duplicated", s.drained, s.failed, s.duplicates
    );
    println!(
        "{:<40} {}",
        "all drained after (s)", r["all_drained_seconds"]
    );
    println!(
        "{:<40} {} / {} / {}",
        "per login: JetStream API / msgs in / out",
        per["api_requests_per"],
        per["in_per"],
        per["out_per"]
    );
    println!(
        "{:<40} {} / {}",
        "gateways / nats-server CPU s", r["gateway_cpu_seconds"], r["nats_cpu_seconds"]
    );
}
