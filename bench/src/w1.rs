//! W1, 1:1 chat across gateways: U users spread evenly over G gateways on one NATS server;
//! each message goes from a random user to a random user on another gateway; 200-byte
//! bodies; a fixed total offered rate for a fixed time.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use imgate_client::{Client, Event};
use imgate_proto::{Message, Send};
use rand::Rng;
use serde_json::{json, Value};

use crate::common::{
    connect_each, connect_many, histogram, now_us, pace, percentiles_ms, round, start, Addrs,
    Cluster, Transport,
};
use crate::http_user::{receive, HttpSender, Receive};
use crate::Setup;
use imgate_harness::usage::usage;
use imgate_harness::{Gateway, NatsCounts, Usage};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Gateways (users are spread evenly over them).
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// Users, one connection each.
    #[arg(long, default_value_t = 2_000)]
    users: usize,
    /// How users connect.
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    transport: Transport,
    /// One gateway with no NATS (the in-memory store): every message is local.
    #[arg(long)]
    standalone: bool,
    /// Offered messages per second, in total.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// How long to offer load.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Messages sent in the first part of the run are not in the latency histogram.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Size of each message body, JSON-encoded.
    #[arg(long, default_value_t = 200)]
    body: usize,
    /// Every sender on gateway 0 and every recipient on another gateway, so that gateway
    /// 0's costs are a message's sending side and the others' its receiving side.
    #[arg(long)]
    one_way: bool,
    #[command(flatten)]
    setup: Setup,
}

/// What the receivers record.
struct Tally {
    latency_us: Mutex<Histogram<u64>>,
    ids: Mutex<HashSet<u64>>,
    received: AtomicU64,
    duplicates: AtomicU64,
    /// Messages sent before this time (µs) are warm-up: counted, not timed.
    timed_after_us: AtomicU64,
}

impl Tally {
    /// A message a user received: counted once by id, timed unless sent during warm-up.
    fn record(&self, uid: &str, m: Message) {
        if m.from == uid {
            return; // the sender's own copy
        }
        let at = now_us();
        let n: u64 = m.id.trim_start_matches("w1-").parse().unwrap_or(0);
        if !self.ids.lock().unwrap().insert(n) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        let sent = m.body["t"].as_u64().unwrap_or(at);
        if sent >= self.timed_after_us.load(Ordering::Relaxed) {
            let _ = self
                .latency_us
                .lock()
                .unwrap()
                .record(at.saturating_sub(sent).max(1));
        }
    }
}

/// A user's way to send: the client crate (TCP, WebSocket) or HTTP POST.
#[derive(Clone)]
enum User {
    Client(Client),
    Http(Arc<HttpSender>),
}

impl User {
    async fn send(&self, s: Send) -> anyhow::Result<()> {
        match self {
            User::Client(c) => c.send(s).await.map(drop).map_err(Into::into),
            User::Http(h) => h.send(s).await,
        }
    }
}

/// Users that send with POST and receive over SSE or long polls, user `i` on gateway
/// `i % gateways`.
async fn connect_http(
    gws: &[Gateway],
    how: Receive,
    n: usize,
    tally: &Arc<Tally>,
) -> anyhow::Result<Vec<User>> {
    connect_many("u", 0..n, |i, uid, token| {
        let addr = gws[i % gws.len()].http;
        let tally = tally.clone();
        async move {
            let sender = HttpSender::connect(addr, token.clone()).await?;
            receive(how, addr, token, move |m| tally.record(&uid, m))
                .await
                .with_context(|| format!("receiving for u{i}"))?;
            Ok(User::Http(Arc::new(sender)))
        }
    })
    .await
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let gateways = if a.standalone { 1 } else { a.gateways };
    anyhow::ensure!(gateways >= 1, "W1 needs a gateway");
    let cluster = start(&a.setup, gateways, a.standalone).await?;
    let gws = &cluster.gateways;
    eprintln!(
        "w1: {} gateway(s) up; connecting {} users over {:?}",
        gws.len(),
        a.users,
        a.transport
    );

    let tally = Arc::new(Tally {
        latency_us: Mutex::new(histogram()),
        ids: Mutex::new(HashSet::new()),
        received: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        timed_after_us: AtomicU64::new(u64::MAX),
    });
    let clients = connect_all(&a, gws, &tally).await?;
    eprintln!(
        "w1: {} users connected; offering {} msg/s for {:?}",
        clients.len(),
        a.rate,
        a.duration
    );

    let before = Snapshot::take(&cluster).await?;
    let offered = offer(&a, &clients, gws.len(), &tally).await;
    let after = Snapshot::take(&cluster).await?;
    let report = report(&a, gateways, gws, &tally, &offered, &before, &after).await;
    if a.setup.json {
        crate::print(&a.setup, &report);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Connects the users over `a.transport`, each recording in `tally` what it receives.
async fn connect_all(a: &Args, gws: &[Gateway], tally: &Arc<Tally>) -> anyhow::Result<Vec<User>> {
    let clients = match a.transport.http_receive() {
        None => {
            let addrs: Vec<Addrs> = gws.iter().map(Addrs::from).collect();
            connect_each(
                &addrs,
                a.transport,
                "u",
                0..a.users,
                None,
                |_, uid, client, mut events| {
                    let tally = tally.clone();
                    tokio::spawn(async move {
                        while let Some(ev) = events.recv().await {
                            if let Event::Msg(m) = ev {
                                tally.record(&uid, m);
                            }
                        }
                    });
                    User::Client(client)
                },
            )
            .await?
        }
        Some(how) => connect_http(gws, how, a.users, tally).await?,
    };
    Ok(clients)
}

/// CPU and memory of every process, and what NATS counted, at one moment.
struct Snapshot {
    gateways: Vec<Usage>,
    nats: Usage,
    counts: NatsCounts,
    me: Usage,
}

impl Snapshot {
    /// Reads the gateways' usage, the NATS servers' usage and counts, then this process's.
    async fn take(cluster: &Cluster) -> anyhow::Result<Snapshot> {
        let gws = &cluster.gateways;
        Ok(Snapshot {
            gateways: gws.iter().map(|g| g.usage()).collect::<Result<_, _>>()?,
            nats: cluster.nats_usage()?,
            counts: cluster.nats_counts().await?,
            me: usage(std::process::id())?,
        })
    }
}

/// What the load came to: messages sent, their answers, and how long it all took.
struct Offered {
    sent: u64,
    accepted: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// How long the load was offered.
    offered_for: Duration,
    /// The load and the wait for in-flight messages to land.
    elapsed: Duration,
}

/// Offers the load for `a.duration`, then lets in-flight messages land.
async fn offer(a: &Args, clients: &[User], g: usize, tally: &Tally) -> Offered {
    let accepted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // Pad the body so it is `a.body` bytes JSON-encoded.
    let overhead = json!({"t": now_us(), "pad": ""}).to_string().len();
    let pad = "x".repeat(a.body.saturating_sub(overhead));

    let started = Instant::now();
    tally
        .timed_after_us
        .store(now_us() + a.warmup.as_micros() as u64, Ordering::Relaxed);
    let sent = pace(a.rate, a.duration, |id| {
        let (from, to) = pick(a, g);
        let client = clients[from].clone();
        let body = json!({"t": now_us(), "pad": pad});
        spawn_send(client, id, to, body, &accepted, &failed);
    })
    .await;
    let offered_for = started.elapsed();
    drain(sent, &accepted, &failed, tally).await;
    Offered {
        sent,
        accepted,
        failed,
        offered_for,
        elapsed: started.elapsed(),
    }
}

/// A random sender (on gateway 0 with `--one-way`) and a random recipient on another gateway.
fn pick(a: &Args, g: usize) -> (usize, usize) {
    let mut rng = rand::rng();
    let from = if a.one_way && g > 1 {
        rng.random_range(0..a.users / g) * g
    } else {
        rng.random_range(0..a.users)
    };
    // A recipient on another gateway: same index modulo g is the same gateway.
    let to = if g == 1 {
        // One gateway: anyone else.
        (from + rng.random_range(1..a.users)) % a.users
    } else {
        let shift = rng.random_range(1..g);
        let to = rng.random_range(0..a.users / g) * g + (from % g + shift) % g;
        if to >= a.users {
            to - g
        } else {
            to
        }
    };
    (from, to)
}

/// Sends message `w1-<id>` to `u<to>` in a task, counting it as accepted or failed.
fn spawn_send(
    client: User,
    id: u64,
    to: usize,
    body: Value,
    accepted: &Arc<AtomicU64>,
    failed: &Arc<AtomicU64>,
) {
    let (accepted, failed) = (accepted.clone(), failed.clone());
    tokio::spawn(async move {
        let r = client
            .send(Send {
                id: Some(format!("w1-{id}")),
                to: Some(format!("u{to}")),
                group: None,
                body,
            })
            .await;
        match r {
            Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
        };
    });
}

/// Waits until every send has its answer and every accepted message has arrived.
async fn drain(sent: u64, accepted: &AtomicU64, failed: &AtomicU64, tally: &Tally) {
    // Let in-flight messages land (up to 10 s).
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drain_deadline {
        let done = accepted.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
        if done == sent
            && tally.received.load(Ordering::Relaxed) >= accepted.load(Ordering::Relaxed)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The run's report: what was offered, delivered and lost, latency, and each process's costs.
async fn report(
    a: &Args,
    gateways: usize,
    gws: &[Gateway],
    tally: &Tally,
    o: &Offered,
    before: &Snapshot,
    after: &Snapshot,
) -> Value {
    let accepted = o.accepted.load(Ordering::Relaxed);
    let received = tally.received.load(Ordering::Relaxed);
    let h = tally.latency_us.lock().unwrap().clone();
    let per_gateway = per_gateway(gws, &before.gateways, &after.gateways).await;
    json!({
        "scenario": "W1",
        "gateways": gateways,
        "standalone": a.standalone,
        "one_way": a.one_way,
        "fanout": crate::common::fanout(),
        "transport": format!("{:?}", a.transport),
        "users": a.users,
        "offered_rate": a.rate,
        "body_bytes": a.body,
        "offered_seconds": round(o.offered_for.as_secs_f64()),
        "sent": o.sent,
        "accepted": accepted,
        "send_errors": o.failed.load(Ordering::Relaxed),
        "delivered": received,
        "delivered_per_second": round(received as f64 / o.offered_for.as_secs_f64()),
        "lost": accepted.saturating_sub(received),
        "duplicates": tally.duplicates.load(Ordering::Relaxed),
        "latency_ms": percentiles_ms(&h),
        "gateway_processes": per_gateway,
        "nats_server": {
            "cpu_seconds": round(after.nats.cpu_seconds - before.nats.cpu_seconds),
            "peak_rss_kib": after.nats.peak_rss_kib,
            // Per delivered message.
            "counts": after.counts.per(&before.counts, received),
        },
        "load_generator_cpu_seconds": round(after.me.cpu_seconds - before.me.cpu_seconds),
        "wall_seconds": round(o.elapsed.as_secs_f64()),
    })
}

/// Each gateway's CPU and peak RSS over the run, and its tail and fanout counters.
async fn per_gateway(gws: &[Gateway], before: &[Usage], after: &[Usage]) -> Vec<Value> {
    let mut per_gateway = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        per_gateway.push(json!({
            "gateway": i,
            "cpu_seconds": round(after[i].cpu_seconds - before[i].cpu_seconds),
            "peak_rss_kib": after[i].peak_rss_kib,
            "tail_received": gw.metric("imgate_tail_received_total").await,
            "bus_bytes": gw.metric("imgate_tail_received_bytes_total").await,
            "tail_decoded": gw.metric("imgate_tail_decoded_total").await,
            "dropped_not_local": gw.metric("imgate_fanout_dropped_not_local_total").await,
            "live_gaps": gw.metric("imgate_live_gaps_total").await,
            "catch_ups": gw.metric("imgate_tail_catch_ups_total").await,
        }));
    }
    per_gateway
}

fn print_table(r: &serde_json::Value) {
    let l = &r["latency_ms"];
    println!(
        "W1 1:1 chat across {} gateways, {} users, {} msg/s offered for {} s, {}-byte bodies",
        r["gateways"], r["users"], r["offered_rate"], r["offered_seconds"], r["body_bytes"]
    );
    println!(
        "{:<34} {} / {} / {}",
        "sent / accepted / errors", r["sent"], r["accepted"], r["send_errors"]
    );
    println!(
        "{:<34} {} ({})",
        "delivered (per second)", r["delivered"], r["delivered_per_second"]
    );
    println!(
        "{:<34} {} / {}",
        "lost / duplicated", r["lost"], r["duplicates"]
    );
    println!(
        "{:<34} {} / {} / {} / {} / {}",
        "latency ms p50/p90/p99/p99.9/max", l["p50"], l["p90"], l["p99"], l["p999"], l["max"]
    );
    for g in r["gateway_processes"].as_array().into_iter().flatten() {
        let label = format!("gateway {} cpu s / peak RSS", g["gateway"]);
        println!(
            "{label:<34} {} / {} KiB (tail received {}, decoded {}, dropped {}, gaps {}, read back {})",
            g["cpu_seconds"],
            g["peak_rss_kib"],
            g["tail_received"],
            g["tail_decoded"],
            g["dropped_not_local"],
            g["live_gaps"],
            g["catch_ups"]
        );
    }
    println!(
        "{:<34} {} / {} KiB",
        "nats-server cpu s / peak RSS",
        r["nats_server"]["cpu_seconds"],
        r["nats_server"]["peak_rss_kib"]
    );
    let c = &r["nats_server"]["counts"];
    println!(
        "{:<34} {} / {} / {}",
        "nats msgs in / out / API, per msg", c["in_per"], c["out_per"], c["api_requests_per"]
    );
    println!(
        "{:<34} {} (same 2-core machine)",
        "load generator cpu s", r["load_generator_cpu_seconds"]
    );
}
