//! A group message to M members: the time from the send call to `sent` (every copy stored)
//! and to the last member's receipt, over N messages sent one after another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgate_client::{Client, Event, Events};
use imgate_proto::Send;
use serde_json::json;

use crate::common::{cluster, connect_users, histogram, percentiles_ms, round};
use crate::Setup;
use imgate_harness::Gateway;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// Members, the sender included, each connected over TCP.
    #[arg(long, default_value_t = 500)]
    members: usize,
    /// Messages, sent one after another.
    #[arg(long, default_value_t = 100)]
    messages: usize,
    #[command(flatten)]
    setup: Setup,
}

async fn create_group(gw: &Gateway, owner_token: &str, members: &[String]) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = json!({"id": "bench", "members": members}).to_string();
    let mut s = tokio::net::TcpStream::connect(gw.http).await?;
    s.write_all(
        format!(
            "POST /v1/groups HTTP/1.0\r\nHost: bench\r\nAuthorization: Bearer {owner_token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    anyhow::ensure!(
        answer.starts_with("HTTP/1.0 201") || answer.starts_with("HTTP/1.1 201"),
        "creating the group: {answer}"
    );
    Ok(())
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let (nats, gws) = cluster(&a.setup, a.gateways).await?;
    let names: Vec<String> = (0..a.members).map(|i| format!("g{i}")).collect();
    let owner = imgate_gateway::auth::Auth::new(None).mint("g0", Duration::from_secs(3600), false);
    create_group(&gws[0], &owner, &names[1..]).await?;
    eprintln!("group: connecting {} members", a.members);
    let members = connect_users(&gws, "g", a.members).await?;
    let (clients, arrivals) = record_arrivals(members);
    let sender = clients[0].clone();
    let mut to_sent = histogram();
    let mut to_last = histogram();
    let nats_before = nats.usage()?;
    for k in 0..a.messages {
        let id = format!("gm-{k}");
        let started = Instant::now();
        sender
            .send(Send {
                id: Some(id.clone()),
                to: None,
                group: Some("bench".into()),
                body: json!({"k": k}),
            })
            .await?;
        to_sent.record(started.elapsed().as_micros().max(1) as u64)?;
        let last = last_arrival(&arrivals, &id, a.members, k).await?;
        to_last.record(last.duration_since(started).as_micros().max(1) as u64)?;
    }
    let nats_after = nats.usage()?;
    let report = json!({
        "scenario": "group",
        "gateways": a.gateways,
        "members": a.members,
        "messages": a.messages,
        "send_to_sent_ms": percentiles_ms(&to_sent),
        "send_to_last_member_ms": percentiles_ms(&to_last),
        "nats_cpu_seconds": round(nats_after.cpu_seconds - nats_before.cpu_seconds),
    });
    crate::print(&a.setup, &report);
    Ok(())
}

/// Per message id: (members that got it, time the last one did).
type Arrivals = Arc<Mutex<HashMap<String, (usize, Instant)>>>;

/// Records in a task per member when each message reaches it; returns the members' clients.
fn record_arrivals(members: Vec<(Client, Events)>) -> (Vec<Client>, Arrivals) {
    let arrivals: Arrivals = Arc::default();
    let mut clients = Vec::new();
    for (client, mut events) in members {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if let Event::Msg(m) = ev {
                    let mut a = arrivals.lock().unwrap();
                    let e = a.entry(m.id).or_insert((0, Instant::now()));
                    e.0 += 1;
                    e.1 = Instant::now();
                }
            }
        });
        clients.push(client);
    }
    (clients, arrivals)
}

/// Waits (up to 30 s) until every member has message `id`; returns when the last one got it.
async fn last_arrival(
    arrivals: &Arrivals,
    id: &str,
    members: usize,
    k: usize,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((n, at)) = arrivals.lock().unwrap().get(id) {
            if *n >= members {
                return Ok(*at);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "message {k} did not reach every member"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}
