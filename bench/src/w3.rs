//! W3, the price of broadcast fanout: the same total load, with G = 1, 2, 4, 8 gateways on
//! one NATS server. Every user connects to gateway 0, so gateways 1..G hold nobody: they
//! receive every stored copy from the stream and drop it, which is exactly the waste the
//! design trades for having no registry. Reports, per G and per gateway, copies received,
//! delivered and dropped, CPU µs per dropped copy, and bus bytes; writes a Markdown table and
//! an SVG plot of CPU per gateway and bus bytes against G.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgate_client::{Client, Event};
use imgate_proto::Send;
use plotters::prelude::*;
use rand::Rng;
use serde_json::{json, Value};

use crate::common::{cluster, connect_users, now_us, pace, round};
use crate::Setup;
use imgate_harness::{Gateway, Usage};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Gateway counts to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    gateways: Vec<usize>,
    /// Users, all on gateway 0.
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Messages per second, in total, whatever G is.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Where to write the Markdown table and the SVG plot (`w3.md`, `w3.svg`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[command(flatten)]
    setup: Setup,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &g in &a.gateways {
        eprintln!("w3: G = {g}");
        rows.push(one(&a, g).await?);
    }
    std::fs::create_dir_all(&a.out)?;
    let md = table(&a, &rows);
    std::fs::write(a.out.join("w3.md"), &md)?;
    plot(&rows, &a.out.join("w3.svg"))?;
    let report = json!({"scenario": "W3", "fanout": crate::common::fanout(), "rate": a.rate, "users": a.users, "duration_s": a.duration.as_secs_f64(), "runs": rows});
    if a.setup.json {
        crate::print(&a.setup, &report);
    } else {
        print!("{md}");
        eprintln!(
            "w3: wrote {} and {}",
            a.out.join("w3.md").display(),
            a.out.join("w3.svg").display()
        );
    }
    Ok(())
}

/// One run with `g` gateways: what each gateway received, delivered and dropped, and its CPU.
async fn one(a: &Args, g: usize) -> anyhow::Result<Value> {
    let (nats, gws) = cluster(&a.setup, g).await?;
    let (clients, received) = connect_counting(&gws[..1], a.users).await?;
    let before: Vec<Usage> = gws.iter().map(|x| x.usage()).collect::<Result<_, _>>()?;
    let nats_before = nats.usage()?;
    let base = tail_counters(&gws).await;
    let sent = offer(a, &clients).await;
    await_copies(&gws, &base, sent).await;
    let after: Vec<Usage> = gws.iter().map(|x| x.usage()).collect::<Result<_, _>>()?;
    let nats_after = nats.usage()?;
    let per = per_gateway(&gws, &base, &before, &after).await;
    drop(clients);
    Ok(json!({
        "g": g,
        "sent": sent,
        "delivered_to_clients": received.load(Ordering::Relaxed),
        "nats_cpu_seconds": round(nats_after.cpu_seconds - nats_before.cpu_seconds),
        "gateways": per,
    }))
}

/// Connects `n` users, each counting in a task the messages it receives; returns the clients.
async fn connect_counting(
    gws: &[Gateway],
    n: usize,
) -> anyhow::Result<(Vec<Client>, Arc<AtomicU64>)> {
    let users = connect_users(gws, "w", n).await?;
    let received = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for (client, mut events) in users {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if matches!(ev, Event::Msg(_)) {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        clients.push(client);
    }
    Ok((clients, received))
}

/// Each gateway's copies and bytes received from the stream so far.
async fn tail_counters(gws: &[Gateway]) -> Vec<(u64, u64)> {
    let mut base = Vec::new();
    for gw in gws {
        base.push((
            gw.metric("imgate_tail_received_total").await,
            gw.metric("imgate_tail_received_bytes_total").await,
        ));
    }
    base
}

/// Sends from random users to random users at `a.rate` for `a.duration`; returns how many.
async fn offer(a: &Args, clients: &[Client]) -> u64 {
    pace(a.rate, a.duration, |id| {
        let (from, to) = {
            let mut rng = rand::rng();
            (rng.random_range(0..a.users), rng.random_range(0..a.users))
        };
        let c = clients[from].clone();
        tokio::spawn(async move {
            let _ = c
                .send(Send {
                    id: Some(format!("w3-{id}")),
                    to: Some(format!("w{to}")),
                    group: None,
                    body: json!({"t": now_us()}),
                })
                .await;
        });
    })
    .await
}

/// Waits for the copies of the `sent` messages to reach the gateways (up to 10 s).
async fn await_copies(gws: &[Gateway], base: &[(u64, u64)], sent: u64) {
    // Wait until every gateway has seen every copy (or 10 s); with interest routing only
    // gateway 0, which holds every user, gets any.
    let deadline = Instant::now() + Duration::from_secs(10);
    let expecting = if crate::common::fanout() == "interest" {
        1
    } else {
        gws.len()
    };
    loop {
        let mut done = true;
        for (gw, (r0, _)) in gws.iter().zip(base).take(expecting) {
            done &=
                gw.metric("imgate_tail_received_total").await - r0 >= sent * 2 - (sent * 2) / 100;
        }
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per gateway since `base`: copies received, delivered and dropped, CPU, and bus bytes.
async fn per_gateway(
    gws: &[Gateway],
    base: &[(u64, u64)],
    before: &[Usage],
    after: &[Usage],
) -> Vec<Value> {
    let mut per = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        let recv = gw.metric("imgate_tail_received_total").await - base[i].0;
        let bytes = gw.metric("imgate_tail_received_bytes_total").await - base[i].1;
        let decoded = gw.metric("imgate_tail_decoded_total").await;
        let cpu = after[i].cpu_seconds - before[i].cpu_seconds;
        per.push(json!({
            "gateway": i,
            "received": recv,
            "delivered": decoded,
            "dropped": recv.saturating_sub(decoded),
            "cpu_seconds": round(cpu),
            "bus_bytes": bytes,
            "cpu_us_per_received": if recv > 0 { json!(round(cpu * 1e6 / recv as f64)) } else { Value::Null },
        }));
    }
    per
}

/// CPU µs per dropped copy, measured on gateways that hold nobody (every copy dropped).
fn drop_cost(row: &Value) -> Option<f64> {
    let idle: Vec<f64> = row["gateways"]
        .as_array()?
        .iter()
        .skip(1)
        .filter_map(|g| g["cpu_us_per_received"].as_f64())
        .collect();
    (!idle.is_empty()).then(|| idle.iter().sum::<f64>() / idle.len() as f64)
}

fn table(a: &Args, rows: &[Value]) -> String {
    let mut s = format!(
        "W3 (--fanout {}): {} msg/s in total for {} s, {} users all on gateway 0 (gateways 1..G hold nobody)\n\n\
         | G | gateway 0 CPU s | other gateways' CPU s (mean) | copies received by the others (mean) | CPU µs per dropped copy | bus MB per gateway | bus MB in total | nats-server CPU s |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        crate::common::fanout(),
        a.rate,
        a.duration.as_secs(),
        a.users
    );
    for r in rows {
        let gw = r["gateways"].as_array().cloned().unwrap_or_default();
        let cpu0 = gw
            .first()
            .and_then(|g| g["cpu_seconds"].as_f64())
            .unwrap_or(0.0);
        let mean_other =
            mean_of_others(&gw, "cpu_seconds").map_or("–".into(), |m| format!("{m:.2}"));
        let bytes: Vec<u64> = gw.iter().filter_map(|g| g["bus_bytes"].as_u64()).collect();
        let per_gw = bytes.first().copied().unwrap_or(0) as f64 / 1e6;
        let total = bytes.iter().sum::<u64>() as f64 / 1e6;
        let cost = drop_cost(r).map_or("–".into(), |c| format!("{c:.1}"));
        let mean_received =
            mean_of_others(&gw, "received").map_or("–".into(), |m| format!("{m:.0}"));
        s += &format!(
            "| {} | {:.2} | {} | {} | {} | {:.1} | {:.1} | {} |\n",
            r["g"], cpu0, mean_other, mean_received, cost, per_gw, total, r["nats_cpu_seconds"]
        );
    }
    s
}

/// The mean of `field` over gateways 1..G (those that hold nobody), if there are any.
fn mean_of_others(gateways: &[Value], field: &str) -> Option<f64> {
    let values: Vec<f64> = gateways
        .iter()
        .skip(1)
        .filter_map(|g| g[field].as_f64())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn plot(rows: &[Value], path: &std::path::Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(400);
    let gs: Vec<f64> = rows.iter().filter_map(|r| r["g"].as_f64()).collect();
    let max_g = gs.iter().cloned().fold(1.0, f64::max);
    let cpu: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| {
            let gw = r["gateways"].as_array().cloned().unwrap_or_default();
            let total: f64 = gw.iter().filter_map(|g| g["cpu_seconds"].as_f64()).sum();
            (
                r["g"].as_f64().unwrap_or(0.0),
                total / gw.len().max(1) as f64,
            )
        })
        .collect();
    let bus: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| {
            let total: u64 = r["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g["bus_bytes"].as_u64())
                .sum();
            (r["g"].as_f64().unwrap_or(0.0), total as f64 / 1e6)
        })
        .collect();
    for (area, title, series, unit) in [
        (&left, "CPU seconds per gateway (mean)", &cpu, "CPU s"),
        (&right, "Bus bytes, all gateways (MB)", &bus, "MB"),
    ] {
        let max_y = series.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15 + 1e-9;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..max_g + 1.0, 0.0..max_y)?;
        chart
            .configure_mesh()
            .x_desc("gateways (G)")
            .y_desc(unit)
            .draw()?;
        chart.draw_series(LineSeries::new(series.iter().cloned(), &BLUE))?;
        chart.draw_series(series.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))?;
    }
    root.present()?;
    Ok(())
}
