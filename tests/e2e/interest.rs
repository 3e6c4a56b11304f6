//! Cluster mode with `--fanout interest`: NATS routes each stored copy only to the gateways
//! that hold a connection of its recipient, and a login that subscribes, then reads its
//! backlog, loses nothing in between. The rest of the cluster suite runs in this mode too
//! (`tests/run` runs it a second time with `IMGATE_FANOUT=interest`).

use std::collections::HashSet;
use std::time::Duration;

use imgate_client::Event;
use serde_json::json;

use crate::support::*;
use imgate_harness::NatsServer;

/// Polls a gauge or counter of `gw` until it equals `want`.
async fn metric_becomes(gw: &Gateway, name: &str, want: u64) {
    let mut seen = 0;
    for _ in 0..100 {
        seen = gw.metric(name).await;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} on {} is {seen}, not {want}", gw.http);
}

/// Three gateways: alice on the first, bob on the second, carol on the third. Bob's copies
/// reach the second gateway only; the third, which holds no recipient, receives none. Once
/// bob leaves, his gateway unsubscribes and receives nothing more for him, and a message
/// sent meanwhile waits in his inbox for his next login, on any gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_reach_only_the_gateways_that_hold_their_recipient() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let url = nats.url();
    let args = ["--nats", &url, "--fanout", "interest"];
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(Gateway::start(&args).await.expect("gateway starts"));
    }
    let (alice, _a) = connect(&gws[0], "alice", "laptop", Via::Tcp).await;
    let (bob, mut bob_ev) = connect(&gws[1], "bob", "phone", Via::Tcp).await;
    let (_c, _carol) = connect(&gws[2], "carol", "web", Via::WsJson).await;
    for gw in &gws {
        metric_becomes(gw, "imgate_live_subscriptions", 1).await;
    }
    const N: usize = 20;
    for i in 0..N {
        alice.send_to("bob", json!({ "i": i })).await.unwrap();
    }
    let got = messages(&mut bob_ev, N).await;
    assert_eq!(got.len(), N);
    // Bob's copies on bob's gateway, alice's own copies (for her other devices) on hers.
    metric_becomes(&gws[1], "imgate_tail_received_total", N as u64).await;
    metric_becomes(&gws[0], "imgate_tail_received_total", N as u64).await;
    assert_eq!(
        gws[2].metric("imgate_tail_received_total").await,
        0,
        "the gateway holding no recipient received no copy"
    );

    bob.close().await;
    drop(bob_ev);
    metric_becomes(&gws[1], "imgate_live_subscriptions", 0).await;
    alice
        .send_to("bob", json!({ "i": "while away" }))
        .await
        .unwrap();
    metric_becomes(&gws[0], "imgate_tail_received_total", N as u64 + 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gws[1].metric("imgate_tail_received_total").await,
        N as u64,
        "nothing reaches a gateway after its last holder of the inbox left"
    );
    let (_b, mut bob_ev) = connect(&gws[2], "bob", "phone", Via::WsJson).await;
    let back = messages(&mut bob_ev, 1).await;
    assert_eq!(back[0].body["i"], "while away");
    assert_eq!(
        gws[2].metric("imgate_tail_received_total").await,
        0,
        "the waiting message came from the stream, not the live subject"
    );
}

/// Bob's phone logs in and out over and over on a gateway that waits 150 ms between
/// subscribing to his inbox and reading his backlog, while alice sends without pause from
/// another gateway: messages are stored in that window at almost every login. Each login
/// resumes after the last message the previous one received, and across all of them every
/// message arrives exactly once and in order, over TCP and WebSocket alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_churn_delivers_each_message_once_in_order() {
    const N: usize = 300;
    let nats = NatsServer::start().await.expect("nats-server starts");
    let url = nats.url();
    let a = Gateway::start(&["--nats", &url, "--fanout", "interest"])
        .await
        .unwrap();
    let b = Gateway::start(&[
        "--nats",
        &url,
        "--fanout",
        "interest",
        "--test-follow-delay",
        "150ms",
    ])
    .await
    .unwrap();
    let (alice, _a) = connect(&a, "alice", "laptop", Via::Tcp).await;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            alice.send_to("bob", json!({ "i": i })).await.unwrap();
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        alice
    });

    let mut ids = HashSet::new();
    // From the start of his inbox: a device with no cursor would start at the live tail.
    let mut last: Option<u64> = Some(0);
    let mut logins = 0;
    within(Duration::from_secs(90), "every message through the churn", async {
        while ids.len() < N {
            logins += 1;
            let via = if logins % 2 == 0 { Via::Tcp } else { Via::WsJson };
            let (bob, mut ev) = within(
                WAIT,
                "bob logs in",
                builder(&b, "bob", "phone", via).resume(last).connect(),
            )
            .await
            .unwrap();
            let stay = tokio::time::sleep(Duration::from_millis(100 + (logins % 3) * 100));
            tokio::pin!(stay);
            loop {
                tokio::select! {
                    _ = &mut stay => break,
                    ev = ev.recv() => {
                        if let Event::Msg(m) = ev.expect("client ended") {
                            assert!(ids.insert(m.id.clone()), "{} delivered twice", m.id);
                            assert!(last.is_none_or(|l| l < m.seq), "out of order at {}", m.seq);
                            last = Some(m.seq);
                        }
                    }
                }
            }
            bob.close().await;
        }
    })
    .await;
    assert!(logins >= 5, "the receiver logged in {logins} times");
    let alice = sender.await.unwrap();
    drop(alice);
    // The gateway let go of bob's inbox, and a last login has nothing more to give.
    metric_becomes(&b, "imgate_live_subscriptions", 0).await;
    let (_bob, mut ev) = within(
        WAIT,
        "bob logs in",
        builder(&b, "bob", "phone", Via::Tcp).resume(last).connect(),
    )
    .await
    .unwrap();
    no_message(&mut ev, Duration::from_millis(500)).await;
}
