//! W4, a live room: C connections spread over two gateways all join one room; one publisher
//! sends R room messages per second; every joined connection should get every message.
//! Latency runs from the publish call to each connection's receipt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgate_client::Event;
use imgate_proto::ClientFrame;
use serde_json::json;

use crate::common::{connect_users, histogram, now_us, percentiles_ms, round, start};
use crate::Setup;

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
    eprintln!("w4: connecting {} viewers", a.connections);
    let viewers = connect_users(gws, "v", a.connections).await?;
    let latency = Arc::new(Mutex::new(histogram()));
    let received = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for (client, mut events) in viewers {
        client
            .frame(ClientFrame::Join {
                room: "live".into(),
            })
            .await?;
        let (latency, received, probes) = (latency.clone(), received.clone(), probes.clone());
        tokio::spawn(async move {
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
        });
        clients.push(client);
    }
    let (host, _events) = connect_users(gws, "host", 1)
        .await?
        .pop()
        .expect("one host");
    host.frame(ClientFrame::Join {
        room: "live".into(),
    })
    .await?;
    // Joins travel asynchronously: probe until every viewer has seen one.
    let deadline = Instant::now() + Duration::from_secs(60);
    while probes.load(Ordering::Relaxed) < a.connections as u64 {
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
    eprintln!(
        "w4: {} viewers joined; {} msg/s for {:?}",
        a.connections, a.rate, a.duration
    );

    let before: Vec<_> = gws.iter().map(|g| g.usage()).collect::<Result<_, _>>()?;
    let nats_before = cluster.nats_usage()?;
    let me_before = imgate_harness::usage::usage(std::process::id())?;
    let started = Instant::now();
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
    let expected = published * a.connections as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let after: Vec<_> = gws.iter().map(|g| g.usage()).collect::<Result<_, _>>()?;
    let nats_after = cluster.nats_usage()?;
    let me_after = imgate_harness::usage::usage(std::process::id())?;
    let got = received.load(Ordering::Relaxed);
    let mut dropped = 0;
    for g in gws {
        dropped += g.metric("imgate_room_dropped_total").await;
    }
    let h = latency.lock().unwrap().clone();
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
        "gateway_cpu_seconds": after.iter().zip(&before).map(|(x, y)| round(x.cpu_seconds - y.cpu_seconds)).collect::<Vec<_>>(),
        "gateway_peak_rss_kib": after.iter().map(|u| u.peak_rss_kib).collect::<Vec<_>>(),
        "nats_cpu_seconds": round(nats_after.cpu_seconds - nats_before.cpu_seconds),
        "load_generator_cpu_seconds": round(me_after.cpu_seconds - me_before.cpu_seconds),
        "wall_seconds": round(secs),
    });
    drop(clients);
    crate::print(&a.setup, &report);
    Ok(())
}
