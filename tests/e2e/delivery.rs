//! Direct messages over every long-lived transport, multi-device delivery, idempotent sends,
//! and the backlog-to-live hand-over under load with random reconnects.

use std::collections::HashSet;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use imgate_client::{ErrorKind, Event};
use imgate_proto::Send;
use rand::Rng;
use serde_json::json;

use crate::support::*;

async fn alice_to_bob(env: &Env, via: Via) {
    let gw = env.gateway(&[]).await;
    let (bob, mut bob_ev) = connect(&gw, "bob", "phone", via).await;
    let (alice, mut alice_ev) = connect(&gw, "alice", "laptop", via).await;
    let sent = alice
        .send_to("bob", json!({"text": "hi bob"}))
        .await
        .unwrap();
    let got = messages(&mut bob_ev, 1).await;
    assert_eq!(got[0].from, "alice");
    assert_eq!(got[0].to.as_deref(), Some("bob"));
    assert_eq!(text(&got[0]), "hi bob");
    assert_eq!(got[0].id, sent.id);
    // Alice's own copy reaches her own connection too, with the seq `sent` named.
    let own = messages(&mut alice_ev, 1).await;
    assert_eq!(own[0].seq, sent.seq);
    // And back.
    bob.send_to("alice", json!({"text": "hi alice"}))
        .await
        .unwrap();
    let back = messages(&mut alice_ev, 1).await;
    assert_eq!(text(&back[0]), "hi alice");
}

both_modes! {
async fn alice_to_bob_over_tcp(env) {
    alice_to_bob(&env, Via::Tcp).await;
}
}

both_modes! {
async fn alice_to_bob_over_websocket_json(env) {
    alice_to_bob(&env, Via::WsJson).await;
}
}

both_modes! {
async fn alice_to_bob_over_websocket_msgpack(env) {
    alice_to_bob(&env, Via::WsMsgpack).await;
}
}

both_modes! {
async fn every_device_gets_every_message(env) {
    let gw = env.gateway(&[]).await;
    let (_bob_tcp, mut bob_tcp_ev) = connect(&gw, "bob", "phone", Via::Tcp).await;
    let (_bob_ws, mut bob_ws_ev) = connect(&gw, "bob", "web", Via::WsJson).await;
    let (alice, _alice_ev) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    let (_alice2, mut alice2_ev) = connect(&gw, "alice", "tablet", Via::WsMsgpack).await;
    for i in 0..10 {
        alice
            .send_to("bob", json!({"text": format!("m{i}")}))
            .await
            .unwrap();
    }
    let a = messages(&mut bob_tcp_ev, 10).await;
    let b = messages(&mut bob_ws_ev, 10).await;
    let c = messages(&mut alice2_ev, 10).await;
    let texts =
        |v: &[imgate_proto::Message]| v.iter().map(|m| text(m).to_owned()).collect::<Vec<_>>();
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&a), want);
    assert_eq!(texts(&b), want);
    assert_eq!(
        texts(&c),
        want,
        "the sender's other device gets its own copies"
    );
    assert_eq!(
        a.iter().map(|m| m.seq).collect::<Vec<_>>(),
        b.iter().map(|m| m.seq).collect::<Vec<_>>()
    );
}
}

both_modes! {
async fn a_message_to_oneself_is_stored_once(env) {
    let gw = env.gateway(&[]).await;
    let (alice, mut ev) = connect(&gw, "alice", "a", Via::Tcp).await;
    let sent = alice
        .send_to("alice", json!({"text": "note"}))
        .await
        .unwrap();
    let got = messages(&mut ev, 1).await;
    assert_eq!(got[0].seq, sent.seq);
    no_message(&mut ev, Duration::from_millis(300)).await;
}
}

both_modes! {
async fn same_id_twice_stores_one_message_with_one_seq(env) {
    let gw = env.gateway(&[]).await;
    let (alice, _ev) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    let send = |id: &str| Send {
        id: Some(id.into()),
        to: Some("bob".into()),
        group: None,
        body: json!({"text": "once"}),
    };
    let first = alice.send(send("dup-1")).await.unwrap();
    let second = alice.send(send("dup-1")).await.unwrap();
    assert_eq!(first, second);
    // Over another transport and connection, still the same.
    let (alice_ws, _ev2) = connect(&gw, "alice", "web", Via::WsJson).await;
    assert_eq!(alice_ws.send(send("dup-1")).await.unwrap(), first);
    let other = alice.send(send("dup-2")).await.unwrap();
    assert!(other.seq > first.seq);
    // Bob's whole inbox holds exactly two messages.
    let (_bob, mut bob_ev) = within(
        WAIT,
        "bob",
        builder(&gw, "bob", "x", Via::Tcp).resume(Some(0)).connect(),
    )
    .await
    .unwrap();
    let got = messages(&mut bob_ev, 2).await;
    assert_eq!(
        got.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["dup-1", "dup-2"]
    );
    no_message(&mut bob_ev, Duration::from_millis(300)).await;
}
}

both_modes! {
/// While alice sends 5,000 messages as fast as the gateway takes them, bob's device drops
/// and resumes 20 times; bob ends with every message exactly once, in seq order.
async fn hand_over_under_load_loses_nothing(env) {
    const N: usize = 5_000;
    let gw = env.gateway(&[]).await;
    let (bob, mut bob_ev) = connect(&gw, "bob", "phone", Via::WsJson).await;
    let (alice, _alice_ev) = connect(&gw, "alice", "laptop", Via::Tcp).await;

    let sender = tokio::spawn(async move {
        let mut inflight = FuturesUnordered::new();
        for i in 0..N {
            let alice = alice.clone();
            inflight.push(async move {
                loop {
                    let r = alice
                        .send(Send {
                            id: Some(format!("h-{i}")),
                            to: Some("bob".into()),
                            group: None,
                            body: json!({"text": i}),
                        })
                        .await;
                    match r {
                        Ok(s) => return s,
                        Err(e)
                            if e.kind()
                                == ErrorKind::Server(imgate_proto::ErrorCode::RateLimited) =>
                        {
                            tokio::time::sleep(Duration::from_millis(10)).await
                        }
                        Err(e) => panic!("send {i} failed: {e}"),
                    }
                }
            });
            if inflight.len() >= 64 {
                inflight.next().await;
            }
        }
        while inflight.next().await.is_some() {}
    });
    let mut seqs = Vec::with_capacity(N);
    let mut ids = HashSet::with_capacity(N);
    let mut welcomes = 0;
    let mut cuts = 0;
    let mut next_cut = rand::rng().random_range(1..N / 21);
    within(
        Duration::from_secs(120),
        "bob to receive all 5,000",
        async {
            while ids.len() < N {
                match bob_ev.recv().await.expect("bob's client ended") {
                    Event::Msg(m) => {
                        seqs.push(m.seq);
                        assert!(ids.insert(m.id.clone()), "duplicate delivery of {}", m.id);
                        // Cut the connection 20 times, spread over the stream, at random points.
                        if seqs.len() >= next_cut && cuts < 20 {
                            bob.reconnect().await.unwrap();
                            cuts += 1;
                            next_cut += rand::rng().random_range(N / 40..N / 21);
                        }
                    }
                    Event::Welcome { .. } => welcomes += 1,
                    _ => {}
                }
            }
        },
    )
    .await;
    sender.await.unwrap();
    assert_eq!(cuts, 20);
    assert!(
        welcomes >= 20,
        "bob logged in again after each cut: {welcomes} welcomes"
    );
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs in strictly increasing order"
    );
    // The whole inbox, read fresh, is exactly what bob got.
    let (_b2, mut all) = within(
        WAIT,
        "fresh device",
        builder(&gw, "bob", "audit", Via::Tcp)
            .resume(Some(0))
            .connect(),
    )
    .await
    .unwrap();
    let stored: Vec<u64> = messages(&mut all, N).await.iter().map(|m| m.seq).collect();
    assert_eq!(stored, seqs);
}
}

/// Batching keeps order: one connection writes 1,000 sends in one burst, and the recipient
/// reads slowly (a pause every 25 frames) while they arrive. On both standalone stores
/// (the disk store commits on the sender's task, several sends per batch) the sender is
/// answered send by send with rising seqs, and the recipient gets every message once, in
/// the order it was sent, with the seqs the answers named.
#[tokio::test]
async fn a_burst_of_sends_reaches_a_slow_reader_once_each_in_order() {
    const N: usize = 1_000;
    let stores: [&[&str]; 2] = [
        &["--store", "memory", "--send-rate", "0"],
        &["--send-rate", "0"],
    ];
    for store in stores {
        let gw = Gateway::start(store).await.unwrap();
        let mut bob = RawTcp::connect(&gw).await;
        bob.login(&token("bob"), "phone").await;
        let mut alice = RawTcp::connect(&gw).await;
        alice.login(&token("alice"), "laptop").await;
        let mut burst = Vec::new();
        for i in 0..N {
            let f = json!({"type": "send", "id": format!("b{i}"), "to": "bob", "body": {"i": i}});
            let payload = rmp_serde::to_vec_named(&f).unwrap();
            burst.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            burst.extend_from_slice(&payload);
        }
        alice.write(&burst).await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < N {
                let f = bob.recv().await.expect("bob's connection stays open");
                assert_eq!(f["type"], "msg", "{f}");
                got.push((
                    f["body"]["i"].as_u64().unwrap() as usize,
                    f["seq"].as_u64().unwrap(),
                ));
                if got.len() % 25 == 0 {
                    bob.send(json!({"type": "ack", "seq": f["seq"]})).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            got
        });
        let mut answers = Vec::new();
        within(WAIT, "every send answered", async {
            while answers.len() < N {
                let f = alice.recv().await.expect("an answer");
                if f["type"] == "msg" {
                    continue;
                }
                assert_eq!(f["type"], "sent", "{f}");
                answers.push((
                    f["id"].as_str().unwrap().to_owned(),
                    f["seq"].as_u64().unwrap(),
                ));
            }
        })
        .await;
        let ids: Vec<String> = (0..N).map(|i| format!("b{i}")).collect();
        assert_eq!(
            answers.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
            ids,
            "{store:?}: answers in the order of the sends"
        );
        assert!(
            answers.windows(2).all(|w| w[0].1 < w[1].1),
            "{store:?}: seqs rise with the order of the sends"
        );
        let got = within(WAIT, "bob read everything", reader).await.unwrap();
        assert_eq!(
            got.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (0..N).collect::<Vec<_>>(),
            "{store:?}: every message once, in order"
        );
        assert!(
            got.windows(2).all(|w| w[0].1 < w[1].1),
            "{store:?}: bob's seqs rise too"
        );
    }
}
