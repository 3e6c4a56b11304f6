//! W7, a reconnect storm: N TCP devices over two gateways, each with messages waiting,
//! all reconnecting at once (as when a gateway restarts and its devices move). Reports the
//! time from the first reconnect until every device has drained its backlog, messages lost
//! or duplicated, and what nats-server counted per login (JetStream API requests from
//! `/jsz`, messages in and out from `/varz`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{self, StreamExt};
use imgate_client::Event;
use imgate_proto::Send;
use serde_json::json;

use crate::common::{connect_users, histogram, percentiles_ms, round, start, Addrs, Transport};
use crate::Setup;

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

    // Every device is seen once, so it has a cursor, then goes away.
    eprintln!("w7: first login of {} devices", a.devices);
    let first = connect_users(gws, "r", a.devices).await?;
    drop(first);
    // Cursors are written when a device disconnects.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The backlog: `waiting` direct messages for each device from a few senders.
    let senders = connect_users(gws, "sender", 20).await?;
    let total = a.devices * a.waiting;
    eprintln!("w7: storing {total} messages");
    let stored = stream::iter(0..total)
        .map(|n| {
            let (client, _) = &senders[n % senders.len()];
            let client = client.clone();
            async move {
                client
                    .send(Send {
                        id: Some(format!("w7-{n}")),
                        to: Some(format!("r{}", n % a.devices)),
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

    let counts_before = cluster.nats_counts().await?;
    let usage_before: Vec<_> = gws.iter().map(|g| g.usage()).collect::<Result<_, _>>()?;
    let nats_before = cluster.nats_usage()?;
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
            tokio::spawn(async move {
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
                anyhow::Ok((started.elapsed(), duplicates, client))
            })
        })
        .collect();
    let mut latency = histogram();
    let (mut drained, mut duplicates, mut failed) = (0usize, 0u64, 0usize);
    let mut clients = Vec::with_capacity(a.devices);
    let deadline = tokio::time::Instant::now() + a.deadline;
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Ok((at, dup, client)))) => {
                drained += 1;
                duplicates += dup;
                latency.record(at.as_micros().max(1) as u64)?;
                clients.push(client);
            }
            Ok(Ok(Err(e))) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("w7: {e:#}");
                }
            }
            _ => failed += 1,
        }
    }
    let all_drained = started.elapsed();
    let counts_after = cluster.nats_counts().await?;
    let usage_after: Vec<_> = gws.iter().map(|g| g.usage()).collect::<Result<_, _>>()?;
    let nats_after = cluster.nats_usage()?;
    let gateway_cpu: f64 = usage_after
        .iter()
        .zip(&usage_before)
        .map(|(a, b)| a.cpu_seconds - b.cpu_seconds)
        .sum();
    let report = json!({
        "scenario": "W7",
        "fanout": crate::common::fanout(),
        "devices": a.devices,
        "waiting_per_device": a.waiting,
        "drained": drained,
        "not_drained": failed,
        "duplicates": duplicates,
        "all_drained_seconds": round(all_drained.as_secs_f64()),
        "drained_at_ms": percentiles_ms(&latency),
        "per_login": counts_after.per(&counts_before, a.devices as u64),
        "gateway_cpu_seconds": round(gateway_cpu),
        "nats_cpu_seconds": round(nats_after.cpu_seconds - nats_before.cpu_seconds),
    });
    if a.setup.json {
        crate::print(&a.setup, &report);
    } else {
        let p = &report["per_login"];
        println!(
            "W7 reconnect storm: {} TCP devices on 2 gateways, {} messages waiting each",
            a.devices, a.waiting
        );
        println!(
            "{:<40} {drained} / {failed} / {duplicates}",
            "drained / not drained / duplicated"
        );
        println!(
            "{:<40} {}",
            "all drained after (s)", report["all_drained_seconds"]
        );
        println!(
            "{:<40} {} / {} / {}",
            "per login: JetStream API / msgs in / out",
            p["api_requests_per"],
            p["in_per"],
            p["out_per"]
        );
        println!(
            "{:<40} {} / {}",
            "gateways / nats-server CPU s",
            report["gateway_cpu_seconds"],
            report["nats_cpu_seconds"]
        );
    }
    drop(clients);
    Ok(())
}
