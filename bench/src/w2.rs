//! W2, idle connections: G standalone gateways, N connections spread evenly over them, each
//! logged in as its own user and then idle; the figure is the gateways' RSS growth per
//! connection. A process here may open at most 20,000 files, so the connections are held
//! by one child process per gateway (`imgate-bench hold`), each connecting from its own
//! loopback source address; this process only starts, waits and measures.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{connect_each, progress, round, Addrs, Transport};
use crate::Setup;
use imgate_harness::usage::{rss_kib, usage};
use imgate_harness::Gateway;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Connections in total.
    #[arg(long, default_value_t = 18_000)]
    connections: usize,
    /// Gateways (and holding processes): at most about 18,000 connections each.
    #[arg(long, default_value_t = 1)]
    gateways: usize,
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    transport: Transport,
    #[command(flatten)]
    setup: Setup,
}

/// What a holding process is told.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct HoldArgs {
    /// The gateway's TCP listener.
    #[arg(long)]
    tcp: SocketAddr,
    /// The gateway's HTTP (WebSocket) listener.
    #[arg(long)]
    http: SocketAddr,
    #[arg(long, value_enum)]
    transport: Transport,
    /// Users u<first> .. u<first + count - 1>.
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    /// Local address to connect from.
    #[arg(long)]
    source: IpAddr,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.transport.http_receive().is_none(),
        "W2 holds TCP or WebSocket connections"
    );
    let g = a.gateways.max(1);
    let counts: Vec<usize> = (0..g)
        .map(|k| a.connections / g + usize::from(k < a.connections % g))
        .collect();
    let gws = start_gateways(&a.setup, g).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(&gws)?;

    let me = std::env::current_exe()?;
    let net: u8 = rand::random_range(1..=254);
    let started = std::time::Instant::now();
    let mut children = start_holders(&me, net, a.transport, &gws, &counts)?;
    let held = await_held(&mut children, a.connections).await?;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss(&gws)?;
    let grown: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
    let holders_peak: Vec<u64> = children
        .iter()
        .filter_map(|c| c.id())
        .map(|p| usage(p).map_or(0, |u| u.peak_rss_kib))
        .collect();
    let report = json!({
        "scenario": "W2",
        "transport": format!("{:?}", a.transport),
        "gateways": g,
        "connections": held,
        "seconds_to_connect": round(took.as_secs_f64()),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": round(grown as f64 / held.max(1) as f64),
        "holding_process_peak_rss_kib": holders_peak,
    });
    crate::print(&a.setup, &report);
    Ok(())
}

/// Starts `g` gateways with the in-memory store, keeping idle connections for an hour.
async fn start_gateways(setup: &Setup, g: usize) -> anyhow::Result<Vec<Gateway>> {
    let mut gws = Vec::new();
    for _ in 0..g {
        let args = ["--idle-timeout", "1h", "--store", "memory"].map(String::from);
        gws.push(setup.gateway(&args).await?);
    }
    Ok(gws)
}

/// Each gateway's resident memory, in KiB.
fn rss(gws: &[Gateway]) -> anyhow::Result<Vec<u64>> {
    gws.iter().map(|gw| gw.pid().and_then(rss_kib)).collect()
}

/// Starts `me hold` for each gateway's share of users, the `k`th from 127.`net`.`k`.2.
fn start_holders(
    me: &Path,
    net: u8,
    transport: Transport,
    gws: &[Gateway],
    counts: &[usize],
) -> anyhow::Result<Vec<Child>> {
    let mut children = Vec::new();
    let mut first = 0;
    for (k, (gw, &count)) in gws.iter().zip(counts).enumerate() {
        let name = clap::ValueEnum::to_possible_value(&transport)
            .expect("every transport has a name")
            .get_name()
            .to_string();
        let child = Command::new(me)
            .args(["hold", "--transport", &name])
            .args(["--tcp", &gw.tcp.to_string(), "--http", &gw.http.to_string()])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--source", &format!("127.{net}.{k}.2")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a holding process")?;
        children.push(child);
        first += count;
    }
    Ok(children)
}

/// Reads each holding process's `held N`; returns the connections held in all.
async fn await_held(children: &mut [Child], connections: usize) -> anyhow::Result<usize> {
    let bar = progress(connections as u64, "connecting");
    let mut held = 0;
    for child in children {
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        match lines.next_line().await? {
            Some(l) if l.starts_with("held ") => held += l["held ".len()..].parse::<usize>()?,
            other => bail!("a holding process failed: {other:?}"),
        }
        bar.set_position(held as u64);
    }
    bar.finish_and_clear();
    Ok(held)
}

/// `imgate-bench hold`: connects the users it is given, says `held N` on stdout, and holds
/// them until its stdin closes (the parent is done or gone).
pub(crate) async fn hold(a: HoldArgs) -> anyhow::Result<()> {
    let gw = Addrs {
        tcp: a.tcp,
        http: a.http,
    };
    let range = a.first..a.first + a.count;
    let clients = connect_each(
        &[gw],
        a.transport,
        "u",
        range,
        Some(a.source),
        |_, _, c, e| (c, e),
    )
    .await?;
    println!("held {}", clients.len());
    let mut buf = [0u8; 1];
    let _ = tokio::io::stdin().read(&mut buf).await;
    drop(clients);
    Ok(())
}
