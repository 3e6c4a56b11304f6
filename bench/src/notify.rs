//! Offline notifications at their busiest: every recipient is offline, so each of their
//! windows sends one. One standalone gateway (or `--gateways N` on one NATS server) with
//! `--notify-url` pointing at a receiver in this process (it answers 200 and counts),
//! `--senders` TCP senders writing to `--recipients` users who never connect, at `--rate`
//! messages per second in total. The same load runs first without `--notify-url`, so the
//! CPU a notification costs is the difference of the two runs over the notifications
//! received: the gateways', and in a cluster nats-server's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgate_client::Client;
use imgate_proto::Send;
use serde_json::json;

use crate::common::{connect_users, pace, round, Nats};
use crate::Setup;
use imgate_harness::Gateway;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Users who receive and are never connected.
    #[arg(long, default_value_t = 2_000)]
    recipients: usize,
    /// Connected users who send.
    #[arg(long, default_value_t = 100)]
    senders: usize,
    /// Messages per second, in total.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Gateways in cluster mode on one NATS server; 0 for one standalone gateway.
    #[arg(long, default_value_t = 0)]
    gateways: usize,
    /// The gateway's `--notify-after`.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    after: Duration,
    #[command(flatten)]
    setup: Setup,
}

/// What the receiver counts.
#[derive(Default)]
struct Received {
    notifications: AtomicU64,
    listed: AtomicU64,
}

async fn receiver() -> anyhow::Result<(String, Arc<Received>)> {
    let got = Arc::new(Received::default());
    let counted = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let got = counted.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let n = v["messages"].as_array().map_or(0, |m| m.len());
                got.notifications.fetch_add(1, Ordering::Relaxed);
                got.listed.fetch_add(n as u64, Ordering::Relaxed);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, got))
}

/// CPU seconds a run used.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    gateways: f64,
    nats: f64,
}

/// One run: CPU seconds over the load and the windows after it, messages offered, and
/// messages stored.
async fn one(a: &Args, notify_url: Option<&str>) -> anyhow::Result<(Cpu, u64, u64)> {
    let (nats, gws) = start_gateways(a, notify_url).await?;
    let senders: Vec<_> = connect_users(&gws, "s", a.senders)
        .await?
        .into_iter()
        .map(|(c, _events)| c)
        .collect();
    let before = cpu_used(&gws, nats.as_ref())?;
    let stored = Arc::new(AtomicU64::new(0));
    let sent = offer(a, &senders, &stored).await;
    // The windows opened last fall due one `after` later (in a cluster rounded up to a
    // whole second).
    tokio::time::sleep(a.after * 2 + Duration::from_secs(2)).await;
    let after = cpu_used(&gws, nats.as_ref())?;
    let cpu = Cpu {
        gateways: after.gateways - before.gateways,
        nats: after.nats - before.nats,
    };
    Ok((cpu, sent, stored.load(Ordering::Relaxed)))
}

/// The gateways of a run, with `--notify-url` when given: one standalone, or N on NATS.
async fn start_gateways(
    a: &Args,
    notify_url: Option<&str>,
) -> anyhow::Result<(Option<Nats>, Vec<Gateway>)> {
    let mut notify = Vec::new();
    if let Some(url) = notify_url {
        notify.extend([
            "--notify-url".to_owned(),
            url.to_owned(),
            "--notify-after".into(),
            format!("{}ms", a.after.as_millis()),
        ]);
    }
    if a.gateways == 0 {
        let mut args = match a.setup.store.as_str() {
            "disk" => vec!["--fsync".to_owned(), a.setup.fsync.clone()],
            store => vec!["--store".to_owned(), store.to_owned()],
        };
        args.extend(notify);
        Ok((None, vec![a.setup.gateway(&args).await?]))
    } else {
        let mut setup = a.setup.clone();
        setup.gateway_arg.extend(notify);
        let (nats, gws) = crate::common::cluster(&setup, a.gateways).await?;
        Ok((Some(nats), gws))
    }
}

/// CPU seconds the gateways and the NATS servers have used so far.
fn cpu_used(gws: &[Gateway], nats: Option<&Nats>) -> anyhow::Result<Cpu> {
    let mut cpu = Cpu::default();
    for gw in gws {
        cpu.gateways += gw.usage()?.cpu_seconds;
    }
    if let Some(n) = nats {
        cpu.nats = n.usage()?.cpu_seconds;
    }
    Ok(cpu)
}

/// Sends to the offline recipients at `a.rate` for `a.duration`, counting those stored.
async fn offer(a: &Args, senders: &[Client], stored: &Arc<AtomicU64>) -> u64 {
    let recipients = a.recipients;
    pace(a.rate, a.duration, |n| {
        let client = senders[n as usize % senders.len()].clone();
        let stored = stored.clone();
        let to = format!("r{}", (n as usize * 7919) % recipients);
        tokio::spawn(async move {
            let s = Send {
                id: Some(format!("n-{n}")),
                to: Some(to),
                group: None,
                body: json!({"n": n}),
            };
            if client.send(s).await.is_ok() {
                stored.fetch_add(1, Ordering::Relaxed);
            }
        });
    })
    .await
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let (url, got) = receiver().await?;
    eprintln!(
        "notify: {} msg/s to {} offline users, without notifications",
        a.rate, a.recipients
    );
    let (cpu_off, sent_off, stored_off) = one(&a, None).await?;
    eprintln!("notify: the same with --notify-url");
    let started = Instant::now();
    let (cpu_on, sent_on, stored_on) = one(&a, Some(&url)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let notifications = got.notifications.load(Ordering::Relaxed);
    let listed = got.listed.load(Ordering::Relaxed);
    let per = |cpu: f64| round(cpu / notifications.max(1) as f64 * 1e6);
    let report = json!({
        "cmd": std::env::args().collect::<Vec<_>>().join(" "),
        "recipients": a.recipients,
        "rate": a.rate,
        "duration_s": a.duration.as_secs_f64(),
        "notify_after_s": a.after.as_secs_f64(),
        "store": if a.gateways == 0 { a.setup.store.as_str() } else { "nats" },
        "gateways": a.gateways,
        "sent": [sent_off, sent_on],
        "stored": [stored_off, stored_on],
        "notifications": notifications,
        "messages_listed": listed,
        "notifications_per_second": round(notifications as f64 / a.duration.as_secs_f64()),
        "gateway_cpu_seconds_off_on": [round(cpu_off.gateways), round(cpu_on.gateways)],
        "gateway_cpu_us_per_notification": per(cpu_on.gateways - cpu_off.gateways),
        "gateway_cpu_us_per_notification_all": per(cpu_on.gateways),
        "nats_cpu_seconds_off_on": [round(cpu_off.nats), round(cpu_on.nats)],
        "nats_cpu_us_per_notification": per(cpu_on.nats - cpu_off.nats),
        "run_with_notifications_s": round(elapsed),
    });
    if a.setup.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
