//! Cluster mode only: several gateways on real NATS servers, and failures on purpose
//! (SIGKILL a gateway, stop NATS, kill a NATS node). Behaviour that is the same in both
//! modes is tested by the `both_modes!` suites; these tests exist because a cluster can fail
//! in ways one process cannot.

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use imgate_client::{Client, ErrorKind, Events};
use imgate_proto::{ErrorCode, Send};
use serde_json::{json, Value};

use crate::support::*;
use imgate_harness::NatsServer;

/// Gateways sharing NATS servers.
struct Cluster {
    nats: Vec<NatsServer>,
    gws: Vec<Gateway>,
}

impl Cluster {
    /// `gateways` gateways on one NATS server.
    async fn start(gateways: usize, args: &[&str]) -> Cluster {
        let nats = vec![NatsServer::start().await.expect("nats-server starts")];
        Self::with_nats(nats, gateways, args).await
    }

    async fn with_nats(nats: Vec<NatsServer>, gateways: usize, args: &[&str]) -> Cluster {
        let urls = nats.iter().map(|n| n.url()).collect::<Vec<_>>().join(",");
        let mut a = args.to_vec();
        a.extend(["--nats", &urls]);
        let mut gws = Vec::new();
        for _ in 0..gateways {
            gws.push(Gateway::start(&a).await.expect("gateway starts"));
        }
        Cluster { nats, gws }
    }

    /// A client of `uid` on gateway `i`, falling back to the others in turn.
    async fn client(&self, i: usize, uid: &str, device: &str, via: Via) -> (Client, Events) {
        let mut b = builder(&self.gws[i], uid, device, via);
        for j in 1..self.gws.len() {
            let other = &self.gws[(i + j) % self.gws.len()];
            b = b.fallback(match via {
                Via::Tcp => other.tcp_url(),
                _ => other.ws_url(),
            });
        }
        within(WAIT, "cluster client", b.connect()).await.unwrap()
    }

    /// alice on gateway `from` sends `text` to bob on gateway `to`, who receives it.
    async fn delivers(&self, from: usize, to: usize, text: &str) {
        let (alice, _a) = self.client(from, "alice", "laptop", Via::Tcp).await;
        let (_b, mut bob) = self.client(to, "bob", "phone", Via::WsJson).await;
        alice.send_to("bob", json!({ "text": text })).await.unwrap();
        assert_eq!(messages(&mut bob, 1).await[0].body["text"], text);
    }

    async fn metric(&self, i: usize, name: &str) -> u64 {
        let m = curl(&[&format!("http://{}/metrics", self.gws[i].http)])
            .await
            .body;
        m.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_deliver_to_every_device_once() {
    let c = Cluster::start(3, &[]).await;
    let (alice, _a) = c.client(0, "alice", "laptop", Via::Tcp).await;
    let (_b1, mut bob_phone) = c.client(1, "bob", "phone", Via::Tcp).await;
    let (_b2, mut bob_web) = c.client(2, "bob", "web", Via::WsJson).await;
    let (_a2, mut alice_tablet) = c.client(2, "alice", "tablet", Via::WsMsgpack).await;
    for i in 0..10 {
        alice.send_to("bob", json!({"text": i})).await.unwrap();
    }
    for ev in [&mut bob_phone, &mut bob_web, &mut alice_tablet] {
        let got = messages(ev, 10).await;
        let texts: Vec<u64> = got
            .iter()
            .map(|m| m.body["text"].as_u64().unwrap())
            .collect();
        assert_eq!(texts, (0..10).collect::<Vec<_>>());
        no_message(ev, Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_resumes_on_any_gateway_from_its_cursor_in_kv() {
    let c = Cluster::start(3, &[]).await;
    let (bob, mut ev) = c.client(0, "bob", "phone", Via::Tcp).await;
    welcome(&mut ev).await;
    bob.close().await;
    let (alice, _a) = c.client(1, "alice", "laptop", Via::Tcp).await;
    for i in 0..20 {
        alice.send_to("bob", json!({"text": i})).await.unwrap();
    }
    // Back on another gateway, with no resume point of its own: the cursor comes from KV.
    let (_bob, mut ev) = c.client(2, "bob", "phone", Via::WsJson).await;
    let got = messages(&mut ev, 20).await;
    assert_eq!(got[0].body["text"], 0);
    assert_eq!(got[19].body["text"], 19);
    no_message(&mut ev, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_gateway_loses_nothing_for_its_users() {
    const N: u64 = 5_000;
    let mut c = Cluster::start(3, &[]).await;
    let (_b, mut bob) = c.client(0, "bob", "phone", Via::Tcp).await;
    let (_c, mut carol) = c.client(0, "carol", "web", Via::WsJson).await;
    let (alice, _a) = c.client(1, "alice", "laptop", Via::Tcp).await;
    let sender = tokio::spawn(async move {
        let mut inflight = FuturesUnordered::new();
        for i in 0..N {
            let alice = alice.clone();
            let to = if i % 2 == 0 { "bob" } else { "carol" };
            inflight
                .push(async move { send_until_accepted(&alice, to, format!("k-{i}"), i).await });
            if inflight.len() >= 64 {
                inflight.next().await;
            }
        }
        while inflight.next().await.is_some() {}
    });
    // Kill the gateway both receivers are on once some messages have flowed.
    let first = messages(&mut bob, 300).await;
    c.gws[0].signal("KILL").unwrap();
    let (rest, welcomes) =
        receive_all(&mut bob, (N / 2) as usize - 300, Duration::from_secs(120)).await;
    assert!(!welcomes.is_empty(), "bob reconnected to another gateway");
    assert!(
        first.last().unwrap().seq < rest[0],
        "resumed after the last seq seen"
    );
    let (_, welcomes) = receive_all(&mut carol, (N / 2) as usize, Duration::from_secs(120)).await;
    assert!(!welcomes.is_empty(), "carol reconnected to another gateway");
    sender.await.unwrap();
    c.gws[0].wait(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_for_5s_answers_unavailable_then_delivers_everything_once() {
    const N: u64 = 300;
    let mut c = Cluster::start(2, &["--nats-timeout", "1s"]).await;
    let (_b, mut bob) = c.client(1, "bob", "phone", Via::Tcp).await;
    let (alice, _a) = c.client(0, "alice", "laptop", Via::Tcp).await;
    let (probe, _p) = c.client(0, "dave", "d", Via::Tcp).await;
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut unavailable_seen = 0;
            for i in 0..N {
                loop {
                    let r = alice
                        .send(Send {
                            id: Some(format!("n-{i}")),
                            to: Some("bob".into()),
                            group: None,
                            body: json!({"text": i}),
                        })
                        .await;
                    match r {
                        Ok(_) => break,
                        Err(e) if e.kind() == ErrorKind::Server(ErrorCode::Unavailable) => {
                            unavailable_seen += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("send {i}: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            unavailable_seen
        })
    };
    let _ = messages(&mut bob, 50).await;
    c.nats[0].stop(false).await;
    let down_at = Instant::now();
    // While NATS is away: readiness fails, and a send answers at once, not after a timeout.
    let r = curl(&[&format!("http://{}/readyz", c.gws[0].http)]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let started = Instant::now();
    let err = probe
        .send_to("bob", json!({"text": "probe"}))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Server(ErrorCode::Unavailable),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "unavailable at once"
    );
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(down_at.elapsed())).await;
    c.nats[0].restart().await.unwrap();

    let unavailable_seen = within(Duration::from_secs(60), "sender", sender)
        .await
        .unwrap();
    assert!(unavailable_seen > 0, "the outage was seen by the sender");
    let (seqs, welcomes) = receive_all(&mut bob, (N - 50) as usize, Duration::from_secs(60)).await;
    assert!(
        welcomes.is_empty(),
        "bob's connection stayed open through the outage"
    );
    assert!(!seqs.is_empty());
    // No retried message was stored twice: bob's whole inbox holds exactly N messages.
    let (_f, mut fresh) =
        connect_retrying(builder(&c.gws[1], "bob", "audit", Via::Tcp).resume(Some(0))).await;
    let (_, _) = receive_all(&mut fresh, N as usize, Duration::from_secs(30)).await;
    no_message(&mut fresh, Duration::from_millis(500)).await;
    assert_eq!(
        curl(&[&format!("http://{}/readyz", c.gws[0].http)])
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_nats_nodes_loses_no_accepted_message() {
    const N: u64 = 400;
    let nats = NatsServer::cluster(3)
        .await
        .expect("a nats-server cluster starts");
    let mut c = Cluster::with_nats(nats, 2, &["--replicas", "3", "--nats-timeout", "1s"]).await;
    let (_b, mut bob) = c.client(1, "bob", "phone", Via::Tcp).await;
    let (alice, _a) = c.client(0, "alice", "laptop", Via::Tcp).await;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            send_until_accepted(&alice, "bob", format!("r-{i}"), i).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let _ = messages(&mut bob, 100).await;
    c.nats[0].stop(true).await;
    within(Duration::from_secs(90), "sender", sender)
        .await
        .unwrap();
    receive_all(&mut bob, (N - 100) as usize, Duration::from_secs(60)).await;
    let (_f, mut fresh) =
        connect_retrying(builder(&c.gws[0], "bob", "audit", Via::Tcp).resume(Some(0))).await;
    receive_all(&mut fresh, N as usize, Duration::from_secs(30)).await;
    no_message(&mut fresh, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_need_no_sticky_sessions() {
    const N: u64 = 60;
    let c = Cluster::start(3, &[]).await;
    let (alice, _a) = c.client(0, "alice", "laptop", Via::Tcp).await;
    let tail = curl(&[
        "-H",
        &auth("bob"),
        &format!("http://{}/v1/messages?device=web", c.gws[0].http),
    ])
    .await
    .json()["cursor"]
        .as_u64()
        .unwrap();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            alice.send_to("bob", json!({"text": i})).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut cursor = tail;
    let mut got: Vec<u64> = Vec::new();
    let mut turn = 0;
    within(Duration::from_secs(60), "polling every message", async {
        while (got.len() as u64) < N {
            let gw = &c.gws[turn % 3];
            turn += 1;
            let page = curl(&[
                "-H",
                &auth("bob"),
                &format!(
                    "http://{}/v1/messages?device=web&after={cursor}&wait=2",
                    gw.http
                ),
            ])
            .await
            .json();
            for m in page["messages"].as_array().unwrap() {
                let seq = m["seq"].as_u64().unwrap();
                assert!(seq > cursor, "no message twice, in order");
                got.push(m["body"]["text"].as_u64().unwrap());
                cursor = seq;
            }
            assert_eq!(page["cursor"].as_u64().unwrap(), cursor);
        }
    })
    .await;
    sender.await.unwrap();
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    assert!(turn >= 3, "polls went to every gateway");
}

/// A long poll that continues from the previous answer takes over the waiter that poll left
/// registered, so in cluster mode it reads nothing from JetStream; a device that falls
/// further behind than its waiter holds is served from the store. Nothing is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_long_polls_are_served_from_the_parked_waiter() {
    let c = Cluster::start(2, &[]).await;
    let (alice, _a) = c.client(1, "alice", "laptop", Via::Tcp).await;
    let gw = c.gws[0].http;
    let tail = curl(&[
        "-H",
        &auth("bob"),
        &format!("http://{gw}/v1/messages?device=web"),
    ])
    .await
    .json()["cursor"]
        .as_u64()
        .unwrap();
    let mut cursor = tail;
    let mut got: Vec<u64> = Vec::new();

    // Polling while messages arrive, 20 ms apart.
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                alice.send_to("bob", json!({"text": i})).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    within(
        WAIT,
        "20 messages polled as they arrive",
        poll_until(gw, 20, &mut got, &mut cursor),
    )
    .await;
    sender.await.unwrap();
    let resumed = c.metric(0, "imgate_long_polls_resumed_total").await;
    assert!(resumed >= 1, "consecutive polls took over the waiter");

    // Away while 12 arrive: more than the parked waiter holds (limit 5), so the store answers.
    for i in 20..32 {
        alice.send_to("bob", json!({"text": i})).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = c.metric(0, "imgate_long_polls_resumed_total").await;
    let (bodies, next) = within(WAIT, "a page from the store", long_poll(gw, cursor)).await;
    assert_eq!(
        bodies,
        vec![20, 21, 22, 23, 24],
        "the first page, at the limit"
    );
    assert_eq!(
        c.metric(0, "imgate_long_polls_resumed_total").await,
        before,
        "the overflowed waiter was not taken over"
    );
    got.extend(bodies);
    cursor = next;
    within(
        WAIT,
        "12 messages from the store",
        poll_until(gw, 32, &mut got, &mut cursor),
    )
    .await;

    // Away while 3 arrive: the parked waiter holds them and answers at once.
    for i in 32..35 {
        alice.send_to("bob", json!({"text": i})).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = c.metric(0, "imgate_long_polls_resumed_total").await;
    let (bodies, _) = within(
        Duration::from_secs(2),
        "an immediate answer",
        long_poll(gw, cursor),
    )
    .await;
    assert_eq!(bodies, vec![32, 33, 34]);
    assert_eq!(
        c.metric(0, "imgate_long_polls_resumed_total").await,
        before + 1
    );
    got.extend(bodies);

    assert_eq!(
        got,
        (0..35).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert_eq!(
        c.metric(0, "imgate_slow_consumers_total").await,
        0,
        "an overflowing parked waiter is not a slow consumer"
    );
}

/// One long poll of bob's device `web` (limit 5): the message bodies and the cursor.
async fn long_poll(gw: std::net::SocketAddr, after: u64) -> (Vec<u64>, u64) {
    let page = curl(&[
        "-H",
        &auth("bob"),
        &format!("http://{gw}/v1/messages?device=web&after={after}&limit=5&wait=5"),
    ])
    .await
    .json();
    let bodies = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"]["text"].as_u64().unwrap())
        .collect();
    (bodies, page["cursor"].as_u64().unwrap())
}

/// Long polls from `cursor` until `got` holds `n` bodies.
async fn poll_until(gw: std::net::SocketAddr, n: usize, got: &mut Vec<u64>, cursor: &mut u64) {
    while got.len() < n {
        let (bodies, next) = long_poll(gw, *cursor).await;
        got.extend(bodies);
        *cursor = next;
    }
}

/// A copy is decoded only where a connection wants it. In broadcast mode the gateway that
/// holds nobody receives every copy and drops each undecoded; in interest mode it receives
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_decodes_only_for_local_users() {
    let c = Cluster::start(2, &[]).await;
    let (alice, _a) = c.client(1, "alice", "laptop", Via::Tcp).await;
    let (_b, mut bob) = c.client(1, "bob", "phone", Via::Tcp).await;
    for i in 0..50 {
        alice.send_to("bob", json!({"text": i})).await.unwrap();
    }
    messages(&mut bob, 50).await;
    if interest_fanout() {
        // Gateway 0 holds no connection: no copy reaches it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(c.metric(0, "imgate_tail_received_total").await, 0);
        assert_eq!(c.metric(1, "imgate_tail_received_total").await, 100);
        assert_eq!(c.metric(1, "imgate_tail_decoded_total").await, 100);
        return;
    }
    // Gateway 0 holds no connection: it receives every copy and decodes none.
    within(WAIT, "gateway 0 to see all 100 copies", async {
        while c.metric(0, "imgate_tail_received_total").await < 100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(c.metric(0, "imgate_tail_decoded_total").await, 0);
    assert_eq!(
        c.metric(0, "imgate_fanout_dropped_not_local_total").await,
        100
    );
    // Gateway 1 holds both users: it decodes each copy once.
    assert_eq!(c.metric(1, "imgate_tail_received_total").await, 100);
    assert_eq!(c.metric(1, "imgate_tail_decoded_total").await, 100);
}

/// A login reads its backlog with batch direct gets: no consumer is made, and nats-server
/// counts no JetStream API request for it (`/jsz`). The backlog is whole and in order, on
/// both sides of the conversation (alice's own copies carry the seqs her sends were given).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_with_a_backlog_costs_no_jetstream_api_request() {
    let nats = vec![NatsServer::start().await.expect("nats-server starts")];
    let monitor = nats[0].monitor;
    let c = Cluster::with_nats(nats, 2, &[]).await;
    let api = || async {
        curl(&[&format!("http://127.0.0.1:{monitor}/jsz")])
            .await
            .json()["api"]["total"]
            .as_u64()
            .unwrap()
    };
    // bob's phone is seen once, so it has a cursor; then 30 messages wait for it.
    drop(c.client(1, "bob", "phone", Via::Tcp).await);
    let (alice, _a) = c.client(0, "alice", "laptop", Via::Tcp).await;
    let (mut sent, mut ids) = (Vec::new(), Vec::new());
    for i in 0..30 {
        let s = alice.send_to("bob", json!({ "text": i })).await.unwrap();
        sent.push(s.seq);
        ids.push(s.id);
    }
    let before = api().await;
    for round in 0..5 {
        // The first login resumes from the stored cursor, the others from the start.
        let (bob, mut events) = if round == 0 {
            c.client(0, "bob", "phone", Via::Tcp).await
        } else {
            builder(&c.gws[round % 2], "bob", "phone", Via::Tcp)
                .resume(Some(0))
                .connect()
                .await
                .unwrap()
        };
        let got = messages(&mut events, 30).await;
        assert_eq!(got.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), ids);
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
        drop(bob);
    }
    let (_l, mut laptop2) = builder(&c.gws[1], "alice", "tablet", Via::WsJson)
        .resume(Some(0))
        .connect()
        .await
        .unwrap();
    let mine = messages(&mut laptop2, 30).await;
    assert_eq!(mine.iter().map(|m| m.seq).collect::<Vec<_>>(), sent);
    assert_eq!(
        api().await - before,
        0,
        "JetStream API requests for 6 logins"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_publishing_to_the_user_subject_is_delivered() {
    let c = Cluster::start(2, &[]).await;
    let (_b, mut bob) = c.client(0, "bob", "phone", Via::WsJson).await;
    let nc = async_nats::connect(c.nats[0].url()).await.unwrap();
    let full = rmp_serde::to_vec_named(&json!({"id": "b-1", "from": "billing", "ts": 1_700_000_000_000u64, "body": {"text": "invoice ready"}})).unwrap();
    nc.publish("imgate.u.bob", full.into()).await.unwrap();
    let minimal = rmp_serde::to_vec_named(&json!({"body": {"text": "bare"}})).unwrap();
    nc.publish("imgate.u.bob", minimal.into()).await.unwrap();
    nc.flush().await.unwrap();
    let got = messages(&mut bob, 2).await;
    assert_eq!(
        (got[0].from.as_str(), got[0].id.as_str(), text(&got[0])),
        ("billing", "b-1", "invoice ready")
    );
    assert_eq!(got[1].from, "system");
    assert_eq!(got[1].id, format!("nats-{}", got[1].seq));
    assert!(
        got[1].ts > 1_700_000_000_000,
        "ts defaults to the stream's time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_gathered_from_every_gateway() {
    let c = Cluster::start(3, &[]).await;
    let (_b1, _e1) = c.client(0, "bob", "phone", Via::Tcp).await;
    let (_b2, _e2) = c.client(2, "bob", "web", Via::WsJson).await;
    let (_c1, _e3) = c.client(1, "carol", "x", Via::Tcp).await;
    let r = curl(&[
        "-H",
        &auth("alice"),
        &format!("http://{}/v1/presence?uid=bob,carol,dave", c.gws[1].http),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json();
    assert_eq!(p["gateways"], 3, "{p}");
    assert_eq!(
        p["presence"]["bob"],
        json!({"online": true, "connections": 2})
    );
    assert_eq!(
        p["presence"]["carol"],
        json!({"online": true, "connections": 1})
    );
    assert_eq!(
        p["presence"]["dave"],
        json!({"online": false, "connections": 0})
    );
}

/// Two gateways started on `nats` with `accepted` deliver across it; then a gateway started
/// with `refused` must exit at start with `cause` (see [`refused_at_start`]).
async fn serves_with_and_refuses(
    nats: NatsServer,
    accepted: &[&str],
    refused: &[&str],
    cause: &str,
) {
    let c = Cluster::with_nats(vec![nats], 2, accepted).await;
    c.delivers(0, 1, &format!("with {accepted:?}")).await;
    refused_at_start(&c.nats[0].url(), refused, cause).await;
}

/// Starts a gateway on `nats` with `args`, which NATS refuses: it must exit without ever
/// listening, and its error must name the NATS address and contain `cause`.
async fn refused_at_start(nats: &str, args: &[&str], cause: &str) {
    let out = within(
        Duration::from_secs(30),
        "a gateway that NATS refuses to exit",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_imgate"))
            .args(["serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"])
            .args(["--nats", nats, "--nats-startup-timeout", "2s"])
            .args(args)
            .env("RUST_LOG", "error")
            .env("RUST_BACKTRACE", "0")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(out.stdout.is_empty(), "it never listened");
    assert!(
        stderr.contains(&format!("Error: NATS at {nats}")) && stderr.contains(cause),
        "{stderr}"
    );
}

/// A server that introduces itself as nats-server 2.12.3 (a few lines of NATS protocol: INFO,
/// then PONG to every PING) is refused at start, and the error names both versions: 2.12
/// has atomic batches, but refuses message ids inside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_older_than_the_minimum_is_refused_naming_both_versions() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nats://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let info = r#"INFO {"server_id":"OLD","version":"2.12.3","proto":1,"headers":true,"max_payload":1048576,"jetstream":true}"#;
                w.write_all(format!("{info}\r\n").as_bytes()).await.ok()?;
                let mut lines = BufReader::new(r).lines();
                while let Some(line) = lines.next_line().await.ok()? {
                    if line.starts_with("PING") {
                        w.write_all(b"PONG\r\n").await.ok()?;
                    }
                }
                Some(())
            });
        }
    });
    refused_at_start(&url, &[], "nats-server 2.12.3 is too old").await;
    refused_at_start(&url, &[], "nats-server 2.14.0 or newer").await;
}

/// NATS with a user and password, then with a token: gateways given the credentials serve
/// across the cluster; one given a wrong password exits at start, naming the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_credentials_are_used_and_a_refusal_is_named() {
    let nats = NatsServer::start_with(&["--user", "imgate", "--pass", "s3cret"])
        .await
        .expect("nats-server starts");
    serves_with_and_refuses(
        nats,
        &["--nats-user", "imgate", "--nats-password", "s3cret"],
        &["--nats-user", "imgate", "--nats-password", "wrong"],
        "authorization violation",
    )
    .await;

    let nats = vec![NatsServer::start_with(&["--auth", "t0ken"])
        .await
        .expect("nats-server starts")];
    let c = Cluster::with_nats(nats, 1, &["--nats-token", "t0ken"]).await;
    c.delivers(0, 0, "with a token").await;
}

/// A test CA and a certificate it signed for 127.0.0.1, written under `dir`; returns the
/// paths of the CA certificate, the server certificate and the server key.
fn tls_files(dir: &std::path::Path, name: &str) -> (String, String, String) {
    let ca = TestCa::new(dir, name);
    let (cert, key) = ca.issue("server");
    (ca.path.display().to_string(), cert, key)
}

/// NATS that requires TLS: gateways given the CA that signed its certificate (`--nats-ca`)
/// serve across the cluster; one given another CA exits at start, naming the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_is_used_and_an_unknown_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(dir.path(), "server");
    let (other_ca, _, _) = tls_files(dir.path(), "other");
    let nats = NatsServer::start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key])
        .await
        .expect("nats-server starts");
    serves_with_and_refuses(
        nats,
        &["--nats-ca", &ca],
        &["--nats-ca", &other_ca],
        "invalid peer certificate",
    )
    .await;
}

/// A NATS JWT for `subject` whose `nats` claim is `nats` (with `jti`, `iat`, `iss`, `name`
/// and `sub` beside it), signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let header = B64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": format!("{name}-{subject}"),
        "iat": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", B64.encode(claims.to_string()));
    let sig = B64.encode(issuer.sign(body.as_bytes()).unwrap());
    format!("{body}.{sig}")
}

/// NATS in operator mode (decentralized JWT auth, the way `nsc` sets it up): a gateway given
/// a user's creds file (`--nats-creds`) serves across the cluster; one given the creds of a
/// user its account never signed exits at start, naming the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_creds_files_are_used_and_an_unknown_user_is_refused() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let op_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "op",
        json!({"type": "operator", "version": 2}),
    );
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let acc_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "imgate",
        json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let sys_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2}),
    );
    let creds = |signer: &nkeys::KeyPair, file: &std::path::Path| {
        let user = nkeys::KeyPair::new_user();
        let jwt = nats_jwt(
            signer,
            &user.public_key(),
            "gateway",
            json!({"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1}),
        );
        let seed = user.seed().unwrap();
        std::fs::write(
            file,
            format!(
                "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        )
        .unwrap();
        file.display().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("operator.conf");
    std::fs::write(
        &conf,
        format!(
            "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{ {sys}: {sys_jwt}, {acc}: {acc_jwt} }}\n\
             jetstream {{ max_file_store: 1GB, max_memory_store: 256MB }}\n",
            sys = system.public_key(),
            acc = account.public_key(),
        ),
    )
    .unwrap();
    let good = creds(&account, &dir.path().join("gateway.creds"));
    let stranger = creds(
        &nkeys::KeyPair::new_account(),
        &dir.path().join("stranger.creds"),
    );

    let nats = NatsServer::start_from(Some(conf.clone()), &[])
        .await
        .expect("nats-server starts");
    serves_with_and_refuses(
        nats,
        &["--nats-creds", &good],
        &["--nats-creds", &stranger],
        "authorization violation",
    )
    .await;
}

/// Waits for `events` to say the connection was closed with `reason`.
async fn disconnected(events: &mut imgate_client::Events, reason: imgate_proto::ByeReason) {
    within(WAIT, "the kick to arrive", async {
        loop {
            match events.recv().await {
                Some(imgate_client::Event::Disconnected { reason: r }) => {
                    assert_eq!(r, Some(reason));
                    return;
                }
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
    })
    .await;
}

/// `POST /v1/admin/kick` closes a user's devices on every gateway with `bye kicked` and
/// says how many; with `device` only that one; a non-admin token is 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_kick_closes_a_users_devices_on_every_gateway() {
    let c = Cluster::start(2, &[]).await;
    let (_p, mut phone) = c.client(0, "bob", "phone", Via::Tcp).await;
    let (_l, mut laptop) = c.client(1, "bob", "laptop", Via::WsJson).await;
    welcome(&mut phone).await;
    welcome(&mut laptop).await;
    let kick = |token: String, body: Value| {
        let url = format!("http://{}/v1/admin/kick", c.gws[0].http);
        async move {
            curl(&[
                "-H",
                &format!("Authorization: Bearer {token}"),
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
                &url,
            ])
            .await
        }
    };
    let refused = kick(token("mallory"), json!({"uid": "bob"})).await;
    assert_eq!(refused.status, 403, "{}", refused.body);

    let one = kick(
        admin_token("ops"),
        json!({"uid": "bob", "device": "laptop"}),
    )
    .await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.json()["closed"], 1);
    assert_eq!(one.json()["gateways"], 2);
    disconnected(&mut laptop, imgate_proto::ByeReason::Kicked).await;
    // The laptop's client reconnects (a kick without revoke leaves its token good).
    welcome(&mut laptop).await;

    let all = kick(admin_token("ops"), json!({"uid": "bob"})).await;
    assert_eq!(all.json()["closed"], 2, "{}", all.body);
    disconnected(&mut phone, imgate_proto::ByeReason::Kicked).await;
    disconnected(&mut laptop, imgate_proto::ByeReason::Kicked).await;

    let bad = kick(admin_token("ops"), json!({"uid": "b.b"})).await;
    assert_eq!(
        (bad.status, bad.json()["code"].clone()),
        (400, json!("bad_request"))
    );
}

/// Whether `token` is accepted on `gw`: over HTTP (a short poll), as a WebSocket upgrade,
/// and as a TCP login. The three must agree.
async fn accepted_everywhere(gw: &Gateway, token: &str) -> bool {
    let auth = format!("Authorization: Bearer {token}");
    let http = curl(&[
        "-H",
        &auth,
        &format!("http://{}/v1/messages?device=x", gw.http),
    ])
    .await;
    let ws = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?token={token}", gw.http))
        .await
        .is_ok();
    let mut tcp = RawTcp::connect(gw).await;
    tcp.send(json!({"type": "login", "token": token, "device": "x"}))
        .await;
    let login = tcp.recv().await.expect("an answer to login");
    let tcp_ok = login["type"] == "welcome";
    assert!(
        tcp_ok || login["code"] == "unauthorized",
        "a refused login says unauthorized: {login}"
    );
    assert_eq!(
        (http.status == 200, ws),
        (tcp_ok, tcp_ok),
        "HTTP {} / WebSocket / TCP disagree: {}",
        http.status,
        http.body
    );
    tcp_ok
}

/// A kick with `revoke` closes the user's devices on every gateway, and from then on its
/// tokens issued before the kick are refused on every gateway, by every way in, also by a
/// gateway started afterwards; a token issued later is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_with_revoke_refuses_the_users_older_tokens_on_every_gateway() {
    let mut c = Cluster::start(2, &[]).await;
    let old = token("bob");
    let (_p, mut phone) = c.client(0, "bob", "phone", Via::Tcp).await;
    let (_l, mut laptop) = c.client(1, "bob", "laptop", Via::WsJson).await;
    welcome(&mut phone).await;
    welcome(&mut laptop).await;
    assert!(accepted_everywhere(&c.gws[1], &old).await);

    let r = post_json(
        &c.gws[0],
        "/v1/admin/kick",
        &format!("Authorization: Bearer {}", admin_token("ops")),
        json!({"uid": "bob", "revoke": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (&r.json()["closed"], &r.json()["gateways"]),
        (&json!(2), &json!(2))
    );
    let before = r.json()["revoked_before"]
        .as_u64()
        .expect("the revocation time");
    disconnected(&mut phone, imgate_proto::ByeReason::Kicked).await;
    disconnected(&mut laptop, imgate_proto::ByeReason::Kicked).await;
    for gw in &c.gws {
        assert!(
            !accepted_everywhere(gw, &old).await,
            "revoked on {}",
            gw.http
        );
    }
    assert!(
        accepted_everywhere(&c.gws[0], &token("carol")).await,
        "others are not touched"
    );

    // A gateway started after the kick knows it too.
    let args = ["--nats".to_owned(), c.nats[0].url()];
    c.gws
        .push(Gateway::start(&args).await.expect("gateway starts"));
    assert!(!accepted_everywhere(&c.gws[2], &old).await);

    // A token issued in a later second than the kick is accepted everywhere.
    while imgate_gateway::auth::unix_now() <= before {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = token("bob");
    for gw in &c.gws {
        assert!(
            accepted_everywhere(gw, &fresh).await,
            "a new token on {}",
            gw.http
        );
    }
}

/// Live copies are at most once. A gateway that loses some of them (every third, through a
/// test-only hook) reads the missing ones back from the stream before it hands over later
/// ones: each of its devices gets every message once and in order, the last one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_loses_live_copies_still_delivers_each_once_in_order() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let url = nats.url();
    let a = Gateway::start(&["--nats", &url]).await.unwrap();
    let b = Gateway::start(&["--nats", &url, "--test-drop-live", "3"])
        .await
        .unwrap();
    let (alice, _a) = connect(&a, "alice", "laptop", Via::Tcp).await;
    let (_p, mut phone) = connect(&b, "bob", "phone", Via::Tcp).await;
    let (_w, mut web) = connect(&b, "bob", "web", Via::WsJson).await;
    const N: usize = 60;
    for i in 0..N {
        alice.send_to("bob", json!({ "i": i })).await.unwrap();
    }
    for ev in [&mut phone, &mut web] {
        let (seqs, _) = receive_all(ev, N, Duration::from_secs(30)).await;
        assert_eq!(seqs.len(), N);
    }
    assert!(
        b.metric("imgate_live_gaps_total").await >= (N / 3) as u64 / 2,
        "the hook made gaps, and the tail saw them"
    );
    assert_eq!(
        a.metric("imgate_live_gaps_total").await,
        0,
        "no loss, no gap"
    );
}

/// A gateway stopped (SIGSTOP) until nats-server cuts it off as a slow consumer loses the
/// copies published meanwhile; once it runs again it reconnects, reads them back from the
/// stream, and its device gets every message once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_as_a_slow_consumer_catches_up_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    let base =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nats/nats.conf")).unwrap();
    // A small per-connection allowance and a short write deadline: a stopped reader is cut
    // off within seconds.
    std::fs::write(
        &conf,
        format!("{base}\nmax_pending: 1MB\nwrite_deadline: \"2s\"\n"),
    )
    .unwrap();
    let nats = NatsServer::start_from(Some(conf), &[])
        .await
        .expect("nats-server starts");
    let url = nats.url();
    let a = Gateway::start(&["--nats", &url]).await.unwrap();
    let b = Gateway::start(&["--nats", &url]).await.unwrap();
    let (alice, _a) = connect(&a, "alice", "laptop", Via::Tcp).await;
    let (_p, mut phone) = within(
        WAIT,
        "bob connects",
        builder(&b, "bob", "phone", Via::Tcp)
            .timeout(Duration::from_secs(60))
            .connect(),
    )
    .await
    .unwrap();
    alice.send_to("bob", json!({"i": "before"})).await.unwrap();
    receive_all(&mut phone, 1, WAIT).await;

    b.signal("STOP").unwrap();
    // More than the kernel's socket buffers hold, so the server's own queue fills.
    const N: usize = 400;
    let pad = "x".repeat(32 * 1024);
    for i in 0..N {
        alice
            .send_to("bob", json!({ "i": i, "pad": pad }))
            .await
            .unwrap();
    }
    // Past the write deadline the server cuts the stopped gateway off.
    within(WAIT, "nats-server to cut the stopped gateway off", async {
        while nats.counts().await.map_or(0, |c| c.slow_consumers) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    b.signal("CONT").unwrap();
    let (seqs, _) = receive_all(&mut phone, N, Duration::from_secs(60)).await;
    assert_eq!(seqs.len(), N);
    assert!(
        b.metric("imgate_tail_catch_ups_total").await >= 1,
        "the copies came back from the stream"
    );
}

/// Republish happens on the stream's leader only, so a leader change can lose live copies.
/// Three replicas, the leader made to step down three times while alice sends: bob, on the
/// other gateway, still gets every accepted message once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_changes_under_load_lose_nothing() {
    const N: u64 = 300;
    let nats = NatsServer::cluster(3)
        .await
        .expect("a nats-server cluster starts");
    let admin = async_nats::connect(nats[1].url()).await.unwrap();
    let c = Cluster::with_nats(nats, 2, &["--replicas", "3", "--nats-timeout", "2s"]).await;
    let (_b, mut bob) = c.client(1, "bob", "phone", Via::Tcp).await;
    let (alice, _a) = c.client(0, "alice", "laptop", Via::Tcp).await;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            send_until_accepted(&alice, "bob", format!("l-{i}"), i).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut stepped = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let answer = admin
            .request("$JS.API.STREAM.LEADER.STEPDOWN.IMGATE", "".into())
            .await;
        if let Ok(m) = answer {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if v["success"] == json!(true) {
                stepped += 1;
            }
        }
    }
    assert!(
        stepped >= 2,
        "the stream's leader stepped down ({stepped} times)"
    );
    within(Duration::from_secs(120), "sender", sender)
        .await
        .unwrap();
    receive_all(&mut bob, N as usize, Duration::from_secs(60)).await;
    no_message(&mut bob, Duration::from_millis(500)).await;
}
