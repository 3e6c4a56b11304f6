//! Offline notifications at their busiest: every recipient is offline, so each of their
//! windows sends one. One standalone gateway with `--notify-url` pointing at a receiver in
//! this process (it answers 200 and counts), `--senders` TCP senders writing to
//! `--recipients` users who never connect, at `--rate` messages per second in total. The
//! same load runs first without `--notify-url`, so the gateway CPU a notification costs is
//! the difference of the two runs over the notifications received.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgate_proto::Send;
use serde_json::json;

use crate::common::{connect_users, pace, round};
use crate::Setup;

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

/// One run: gateway CPU seconds over the load and the windows after it, messages offered,
/// and messages stored.
async fn one(a: &Args, notify_url: Option<&str>) -> anyhow::Result<(f64, u64, u64)> {
    let mut args = match a.setup.store.as_str() {
        "disk" => vec!["--fsync".to_owned(), a.setup.fsync.clone()],
        store => vec!["--store".to_owned(), store.to_owned()],
    };
    if let Some(url) = notify_url {
        args.extend([
            "--notify-url".into(),
            url.to_owned(),
            "--notify-after".into(),
            format!("{}ms", a.after.as_millis()),
        ]);
    }
    let gw = a.setup.gateway(&args).await?;
    let senders: Vec<_> = connect_users(std::slice::from_ref(&gw), "s", a.senders)
        .await?
        .into_iter()
        .map(|(c, _events)| c)
        .collect();
    let before = gw.usage()?;
    let stored = Arc::new(AtomicU64::new(0));
    let recipients = a.recipients;
    let sent = pace(a.rate, a.duration, |n| {
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
    .await;
    // The windows opened last fall due one `after` later.
    tokio::time::sleep(a.after * 2 + Duration::from_secs(1)).await;
    let after = gw.usage()?;
    Ok((
        after.cpu_seconds - before.cpu_seconds,
        sent,
        stored.load(Ordering::Relaxed),
    ))
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
        "store": a.setup.store,
        "sent": [sent_off, sent_on],
        "stored": [stored_off, stored_on],
        "notifications": notifications,
        "messages_listed": listed,
        "notifications_per_second": round(notifications as f64 / a.duration.as_secs_f64()),
        "gateway_cpu_seconds_off_on": [round(cpu_off), round(cpu_on)],
        "gateway_cpu_us_per_notification": per(cpu_on - cpu_off),
        "gateway_cpu_us_per_notification_all": per(cpu_on),
        "run_with_notifications_s": round(elapsed),
    });
    if a.setup.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
