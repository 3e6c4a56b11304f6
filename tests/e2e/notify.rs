//! Offline notifications (`--notify-url`) of a standalone gateway, received by a webhook
//! inside each test: one signed notification per user per window listing every due message
//! in order; nothing for the user's own sends, for what a device acked, or for what the
//! user read; retries under one delivery id on 5xx, none on other 4xx; windows pending
//! at SIGTERM or SIGKILL sent after the restart. In a cluster of two: each notification
//! sent once (and published on NATS), one whose gateway was SIGKILLed sent by the other,
//! and ones due while NATS was stopped sent once it is back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use futures::StreamExt;
use imgate_harness::NatsServer;

use crate::support::*;

/// One POST the webhook received.
#[derive(Debug, Clone)]
struct Got {
    at: std::time::Instant,
    delivery: String,
    signature: Option<String>,
    raw: Bytes,
    body: Value,
}

/// A webhook on a free loopback port: answers the statuses of `script` in turn, then 200.
#[derive(Clone)]
struct Hook {
    url: String,
    got: Arc<Mutex<Vec<Got>>>,
}

type HookState = (Arc<Mutex<Vec<Got>>>, Arc<Mutex<VecDeque<u16>>>);

async fn take(State((got, script)): State<HookState>, h: HeaderMap, raw: Bytes) -> StatusCode {
    let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    got.lock().unwrap().push(Got {
        at: std::time::Instant::now(),
        delivery: header("x-imgate-delivery").unwrap_or_default(),
        signature: header("x-imgate-signature"),
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
    });
    let status = script.lock().unwrap().pop_front().unwrap_or(200);
    StatusCode::from_u16(status).unwrap()
}

async fn hook(script: &[u16]) -> Hook {
    let got = Arc::new(Mutex::new(Vec::new()));
    let state: HookState = (
        got.clone(),
        Arc::new(Mutex::new(script.iter().copied().collect())),
    );
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(take))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Hook { url, got }
}

impl Hook {
    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until the notifications received from index `from` on list `want` between
    /// them, and returns those notifications.
    async fn wait_listing(&self, from: usize, want: &[u64]) -> Vec<Got> {
        within(WAIT, &format!("notifications listing {want:?}"), async {
            loop {
                let got = self.got()[from..].to_vec();
                if got.iter().flat_map(listed_seqs).count() >= want.len() {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// Waits until `n` POSTs came, and returns them.
    async fn wait_for(&self, n: usize, d: Duration) -> Vec<Got> {
        within(d, &format!("{n} notification requests"), async {
            loop {
                let got = self.got();
                if got.len() >= n {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }
}

fn hex_hmac(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The seqs of `uid`'s inbox, oldest first, read as history (no cursor moves).
async fn inbox_seqs(gw: &Gateway, uid: &str) -> Vec<u64> {
    let page = curl(&["-H", &auth(uid), &url(gw, "/v1/messages?before=&limit=100")])
        .await
        .json();
    let mut seqs: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["from"] != uid)
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    seqs.reverse();
    seqs
}

fn listed_seqs(g: &Got) -> Vec<u64> {
    g.body["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {}", g.body))
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// Bob is offline; alice (online, her own copies acked) writes 3 messages, then 2 more.
/// Each message is listed once, in order, and bob gets at most one notification per
/// window: a message that falls due just after a notification went out (the three are
/// stored a few milliseconds apart) is listed in the next one.
#[tokio::test]
async fn an_offline_user_gets_one_signed_notification_per_window_listing_every_message() {
    let hook = hook(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("notify.key");
    std::fs::write(&secret, b"s3cret").unwrap();
    let secret_arg = secret.to_str().unwrap();
    let after = Duration::from_secs(1);
    let gw = Gateway::start(&[
        "--notify-url",
        &hook.url,
        "--notify-after",
        "1s",
        "--notify-secret-file",
        secret_arg,
    ])
    .await
    .unwrap();
    let (alice, _a) = connect(&gw, "alice", "desk", Via::Tcp).await;
    for i in 0..3 {
        alice.send_to("bob", json!({"text": i})).await.unwrap();
    }
    let all = inbox_seqs(&gw, "bob").await;
    assert_eq!(all.len(), 3);
    let first = hook.wait_listing(0, &all).await;
    // Nothing more, and nothing at all for alice's own sends.
    tokio::time::sleep(after * 2 + Duration::from_millis(500)).await;
    assert_eq!(hook.got().len(), first.len(), "{:?}", hook.got());
    let listed: Vec<u64> = first.iter().flat_map(listed_seqs).collect();
    assert_eq!(listed, all, "each once, in order");
    for (i, n) in first.iter().enumerate() {
        assert_eq!(n.body["uid"], "bob");
        assert_eq!(n.body["unread"], 3);
        for m in n.body["messages"].as_array().unwrap() {
            assert_eq!(m["from"], "alice");
            assert!(m.get("body").is_none(), "bodies stay out unless asked: {m}");
            assert!(m["id"].is_string() && m["ts"].is_u64(), "{m}");
        }
        assert!(!n.delivery.is_empty());
        let want = format!("sha256={}", hex_hmac(b"s3cret", &n.raw));
        assert_eq!(n.signature.as_deref(), Some(want.as_str()));
        if i > 0 {
            let gap = n.at - first[i - 1].at;
            assert!(gap >= after * 9 / 10, "two notifications {gap:?} apart");
        }
    }

    // Two more: listed in what follows, and nothing listed before is listed again.
    for i in 3..5 {
        alice.send_to("bob", json!({"text": i})).await.unwrap();
    }
    let all = inbox_seqs(&gw, "bob").await;
    let next = hook.wait_listing(first.len(), &all[3..]).await;
    let listed: Vec<u64> = next.iter().flat_map(listed_seqs).collect();
    assert_eq!(listed, all[3..]);
    assert_eq!(next[0].body["unread"], 5);
    let ids: std::collections::HashSet<_> = hook.got().iter().map(|g| g.delivery.clone()).collect();
    assert_eq!(
        ids.len(),
        hook.got().len(),
        "a delivery id per notification"
    );
    let sent = gw
        .metric("imgate_notifications_total{outcome=\"sent\"}")
        .await;
    assert_eq!(sent as usize, hook.got().len());
}

/// What a device acked, or the user read, before it fell due is not reported.
#[tokio::test]
async fn nothing_is_reported_that_a_device_acked_or_the_user_read() {
    let hook = hook(&[]).await;
    let gw = Gateway::start(&["--notify-url", &hook.url, "--notify-after", "1s"])
        .await
        .unwrap();
    let (alice, _a) = connect(&gw, "alice", "desk", Via::Tcp).await;
    // Bob's phone is online and acks (after 200 ms).
    let (phone, mut phone_ev) = connect(&gw, "bob", "phone", Via::Tcp).await;
    alice.send_to("bob", json!({"text": "seen"})).await.unwrap();
    messages(&mut phone_ev, 1).await;
    // The window fell due and found the message acked.
    until_metric(
        &gw,
        r#"imgate_notifications_suppressed_total{reason="acked"}"#,
        1,
    )
    .await;
    assert!(hook.got().is_empty(), "{:?}", hook.got());
    phone.close().await;

    // Offline now; read on another device before it falls due.
    let read = alice.send_to("bob", json!({"text": "read"})).await.unwrap();
    let seq = inbox_seqs(&gw, "bob").await.last().copied().unwrap();
    assert_ne!(seq, read.seq, "bob's copy has a seq of its own");
    let r = post_json(&gw, "/v1/read", &auth("bob"), json!({"seq": seq})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The window fell due and found the message read.
    until_metric(
        &gw,
        r#"imgate_notifications_suppressed_total{reason="read"}"#,
        1,
    )
    .await;
    assert!(hook.got().is_empty(), "{:?}", hook.got());

    // Neither: reported.
    alice
        .send_to("bob", json!({"text": "missed"}))
        .await
        .unwrap();
    let got = hook.wait_for(1, WAIT).await;
    assert_eq!(listed_seqs(&got[0]), [inbox_seqs(&gw, "bob").await[2]]);
    assert_eq!(got[0].body["unread"], 1);
    let suppressed = |r: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(&format!(
                "imgate_notifications_suppressed_total{{reason=\"{r}\"}}"
            ))
            .await
        }
    };
    assert_eq!(suppressed("acked").await, 1);
    assert_eq!(suppressed("read").await, 1);
}

/// 500 twice, then 200: three tries with one delivery id and one body; with
/// `--notify-body` the bodies are listed.
#[tokio::test]
async fn a_webhook_answering_500_twice_gets_the_same_delivery_again_until_it_takes_it() {
    let hook = hook(&[500, 500]).await;
    let gw = Gateway::start(&[
        "--notify-url",
        &hook.url,
        "--notify-after",
        "1s",
        "--notify-body",
    ])
    .await
    .unwrap();
    let (alice, _a) = connect(&gw, "alice", "desk", Via::Tcp).await;
    alice
        .send_to("bob", json!({"text": "knock"}))
        .await
        .unwrap();
    let got = hook.wait_for(3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        hook.got().len(),
        3,
        "one notification, taken on its third try"
    );
    assert!(got.iter().all(|g| g.delivery == got[0].delivery));
    assert!(got.iter().all(|g| g.raw == got[0].raw));
    assert_eq!(got[0].body["messages"][0]["body"], json!({"text": "knock"}));
    assert_eq!(gw.metric("imgate_notification_retries_total").await, 2);
    assert_eq!(
        gw.metric("imgate_notifications_total{outcome=\"sent\"}")
            .await,
        1
    );
}

/// A 4xx other than 429 ends the notification at once.
#[tokio::test]
async fn a_4xx_other_than_429_is_not_tried_again() {
    let hook = hook(&[410]).await;
    let gw = Gateway::start(&["--notify-url", &hook.url, "--notify-after", "1s"])
        .await
        .unwrap();
    let (alice, _a) = connect(&gw, "alice", "desk", Via::Tcp).await;
    alice.send_to("bob", json!({"text": "gone"})).await.unwrap();
    hook.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(hook.got().len(), 1, "{:?}", hook.got());
    assert_eq!(
        gw.metric("imgate_notifications_total{outcome=\"given_up\"}")
            .await,
        1
    );
    assert_eq!(gw.metric("imgate_notification_retries_total").await, 0);
}

/// A window still pending when the gateway stops (SIGTERM, then SIGKILL) is sent after
/// the restart on the same data directory.
#[tokio::test]
async fn a_notification_pending_at_sigterm_or_sigkill_is_sent_after_the_restart() {
    let hook = hook(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--notify-url",
        &hook.url,
        "--notify-after",
        "3s",
    ];
    for (signal, text) in [("TERM", "before the term"), ("KILL", "before the kill")] {
        let mut gw = Gateway::start(&args).await.unwrap();
        let (alice, _a) = connect(&gw, "alice", "desk", Via::Tcp).await;
        alice.send_to("bob", json!({"text": text})).await.unwrap();
        gw.signal(signal).unwrap();
        gw.wait(WAIT).await.unwrap();
        let before = hook.got().len();
        let gw = Gateway::start(&args).await.unwrap();
        let got = hook.wait_for(before + 1, WAIT).await;
        let seqs = inbox_seqs(&gw, "bob").await;
        assert_eq!(
            listed_seqs(&got[before]),
            [*seqs.last().unwrap()],
            "after SIG{signal}"
        );
        let mut gw = gw;
        gw.signal("TERM").unwrap();
        gw.wait(WAIT).await.unwrap();
    }
    assert_eq!(hook.got().len(), 2, "{:?}", hook.got());
}

/// What cannot work is refused at start, naming why: a secret file that cannot be read,
/// and `--notify-nats` without a cluster.
#[tokio::test]
async fn settings_that_cannot_work_stop_the_start() {
    let err = serve_fails(&[
        "--notify-url",
        "http://127.0.0.1:9/hook",
        "--notify-secret-file",
        "/nonexistent/notify.key",
    ])
    .await;
    assert!(
        err.contains("--notify-secret-file /nonexistent/notify.key"),
        "{err}"
    );
    let err = serve_fails(&["--notify-nats"]).await;
    assert!(
        err.contains("--notify-nats") && err.contains("--nats"),
        "{err}"
    );
}

/// Two gateways on one NATS, each with `--notify-url` and `--notify-nats`.
async fn cluster_of_two(nats: &NatsServer, hook: &Hook, after: &str) -> Vec<Gateway> {
    let url = nats.url();
    let args = [
        "--nats",
        &url,
        "--notify-url",
        &hook.url,
        "--notify-after",
        after,
        "--notify-nats",
    ];
    let mut gws = Vec::new();
    for _ in 0..2 {
        gws.push(Gateway::start(&args).await.unwrap());
    }
    gws
}

/// Every seq listed by the notifications so far, each user's in order.
fn listed_by_user(got: &[Got]) -> std::collections::BTreeMap<String, Vec<u64>> {
    let mut by = std::collections::BTreeMap::<String, Vec<u64>>::new();
    for g in got {
        let uid = g.body["uid"].as_str().unwrap().to_owned();
        by.entry(uid).or_default().extend(listed_seqs(g));
    }
    by
}

/// Senders on both gateways write to four offline users, in two rounds a window apart:
/// each message is listed once by one notification, not once per gateway; the ones
/// published on NATS (`--notify-nats`) are the same notifications.
#[tokio::test]
async fn in_a_cluster_each_notification_is_sent_once_not_once_per_gateway() {
    let hook = hook(&[]).await;
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut on_nats = client.subscribe("imgate.notify.*").await.unwrap();
    client.flush().await.unwrap();
    let gws = cluster_of_two(&nats, &hook, "1s").await;
    let (alice, _a) = connect(&gws[0], "alice", "desk", Via::Tcp).await;
    let (carol, _c) = connect(&gws[1], "carol", "desk", Via::Tcp).await;
    let users = ["bob", "dave", "erin", "frank"];
    for round in 0..2 {
        for u in users {
            alice.send_to(u, json!({"round": round})).await.unwrap();
            carol.send_to(u, json!({"round": round})).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let mut want = std::collections::BTreeMap::new();
    for u in users {
        want.insert(u.to_owned(), inbox_seqs(&gws[0], u).await);
    }
    let total: usize = want.values().map(Vec::len).sum();
    assert_eq!(total, 16);
    within(WAIT, "every message listed", async {
        while hook.got().iter().flat_map(listed_seqs).count() < total {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Two more windows' time for a second sender to show itself.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let got = hook.got();
    assert_eq!(listed_by_user(&got), want, "each message once: {got:?}");
    let ids: std::collections::HashSet<_> = got.iter().map(|g| g.delivery.clone()).collect();
    assert_eq!(ids.len(), got.len(), "a delivery id per notification");
    let mut sent = 0;
    for gw in &gws {
        sent += gw
            .metric("imgate_notifications_total{outcome=\"sent\"}")
            .await;
    }
    assert_eq!(sent as usize, got.len());
    let mut published = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), on_nats.next()).await {
        let uid = m.subject.as_str().rsplit('.').next().unwrap().to_owned();
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["uid"], uid.as_str());
        published.push(body);
    }
    let mut hooked: Vec<Value> = got.iter().map(|g| g.body.clone()).collect();
    let key = |v: &Value| v["messages"][0]["seq"].as_u64();
    hooked.sort_by_key(key);
    published.sort_by_key(key);
    assert_eq!(published, hooked, "the same notifications on NATS");
}

/// The gateway that took the message is SIGKILLed before its window falls due: the other
/// gateway sends the notification, once.
#[tokio::test]
async fn a_notification_comes_after_the_gateway_that_took_the_message_is_sigkilled() {
    let hook = hook(&[]).await;
    let nats = NatsServer::start().await.unwrap();
    let mut gws = cluster_of_two(&nats, &hook, "2s").await;
    let (alice, _a) = connect(&gws[0], "alice", "desk", Via::Tcp).await;
    alice.send_to("bob", json!({"text": "hi"})).await.unwrap();
    gws[0].signal("KILL").unwrap();
    gws[0].wait(WAIT).await.unwrap();
    let seqs = inbox_seqs(&gws[1], "bob").await;
    let got = hook.wait_listing(0, &seqs).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hook.got().len(), got.len(), "{:?}", hook.got());
    assert_eq!(listed_seqs(&got[0]), seqs);
    assert_eq!(
        gws[1]
            .metric("imgate_notifications_total{outcome=\"sent\"}")
            .await,
        1
    );
}

/// NATS stops for 5 s while a window is pending: the notification comes, once, when it
/// is back.
#[tokio::test]
async fn notifications_due_while_nats_is_stopped_come_once_it_is_back() {
    let hook = hook(&[]).await;
    let mut nats = NatsServer::start().await.unwrap();
    let gws = cluster_of_two(&nats, &hook, "2s").await;
    let (alice, _a) = connect(&gws[0], "alice", "desk", Via::Tcp).await;
    alice.send_to("bob", json!({"text": "one"})).await.unwrap();
    alice.send_to("bob", json!({"text": "two"})).await.unwrap();
    let seqs = inbox_seqs(&gws[1], "bob").await;
    assert_eq!(seqs.len(), 2);
    nats.stop(false).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(hook.got().is_empty(), "{:?}", hook.got());
    nats.restart().await.unwrap();
    let got = hook.wait_listing(0, &seqs).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hook.got().len(), got.len(), "{:?}", hook.got());
    let listed: Vec<u64> = got.iter().flat_map(listed_seqs).collect();
    assert_eq!(listed, seqs);
}

/// The gateway sending a notification is SIGKILLed while the webhook fails: once NATS's
/// ack wait passes, the other gateway sends the same notification, under the same
/// delivery id, listing the same message.
#[tokio::test]
async fn a_notification_whose_sender_is_sigkilled_mid_retry_is_sent_by_the_other_gateway() {
    let hook = hook(&[500, 500, 500]).await;
    let nats = NatsServer::start().await.unwrap();
    let mut gws = cluster_of_two(&nats, &hook, "1s").await;
    let (alice, _a) = connect(&gws[0], "alice", "desk", Via::Tcp).await;
    alice.send_to("bob", json!({"text": "hi"})).await.unwrap();
    let seqs = inbox_seqs(&gws[0], "bob").await;
    drop(alice);
    hook.wait_for(2, WAIT).await;
    let retries = "imgate_notification_retries_total";
    let sender = if gws[0].metric(retries).await > 0 {
        0
    } else {
        1
    };
    assert!(gws[sender].metric(retries).await > 0, "one gateway retries");
    gws[sender].signal("KILL").unwrap();
    gws[sender].wait(WAIT).await.unwrap();
    let other = &gws[1 - sender];
    within(
        Duration::from_secs(60),
        "the other gateway sends it",
        async {
            loop {
                let sent = other
                    .metric("imgate_notifications_total{outcome=\"sent\"}")
                    .await;
                if sent > 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await;
    let got = hook.got();
    assert!(got.iter().all(|g| g.delivery == got[0].delivery), "{got:?}");
    assert!(got.iter().all(|g| listed_seqs(g) == seqs), "{got:?}");
}
