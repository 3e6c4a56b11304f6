//! Cluster mode: with atomic batches (`--nats-publish atomic`, the default with
//! `--replicas 3`) the inbox copies of one send are stored all or nothing. A group message
//! to eight members is eight JetStream messages; whatever fails (nats-server killed in the
//! middle of a stream of sends, a full store refusing writes), no inbox may hold a copy of a
//! send whose other copies are missing, and a retry with the same id stores it exactly once.
//!
//! The copies are counted in the stream itself, read straight from NATS, not through a
//! gateway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::stream::{FuturesUnordered, StreamExt};
use imgate_client::{Client, ErrorKind};
use imgate_proto::{ErrorCode, Send};
use serde_json::json;

use crate::support::*;
use imgate_harness::NatsServer;

/// Members of the test group, the sender included: copies per send.
const MEMBERS: usize = 8;

/// Sends waiting for an answer at once on one connection.
const IN_FLIGHT: usize = 32;

fn members() -> Vec<String> {
    (1..MEMBERS).map(|i| format!("m{i}")).collect()
}

/// How many inbox copies each send (`<from>:<id>`) has in the stream, read from NATS (a
/// cluster that was just restarted may take a few seconds to answer again).
async fn copies_per_send(nats_url: &str) -> HashMap<String, usize> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.unwrap());
    let (total, consumer) = within(Duration::from_secs(60), "the stream answers", async {
        loop {
            let ready = async {
                let mut stream = js.get_stream("IMGATE").await?;
                let total = stream.info().await?.state.messages;
                let consumer = stream
                    .create_consumer(pull::Config {
                        deliver_policy: DeliverPolicy::All,
                        ack_policy: AckPolicy::None,
                        ..Default::default()
                    })
                    .await?;
                anyhow::Ok((total, consumer))
            };
            match ready.await {
                Ok(r) => return r,
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    })
    .await;
    let mut messages = consumer.messages().await.unwrap();
    let mut counts = HashMap::new();
    for _ in 0..total {
        let m = within(WAIT, "a stored copy", messages.next())
            .await
            .expect("the stream has as many messages as its info says")
            .unwrap();
        let id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id"));
        let id = id.expect("every copy has a message id").as_str();
        let send = id.rsplit_once(':').expect("<from>:<id>:<uid>").0;
        *counts.entry(send.to_owned()).or_insert(0) += 1;
    }
    counts
}

fn group_send(id: &str, body: serde_json::Value) -> Send {
    Send {
        id: Some(id.to_owned()),
        to: None,
        group: Some("crew".into()),
        body,
    }
}

/// Every send in `copies` has all its copies or none; returns how many have all.
fn all_or_nothing(copies: &HashMap<String, usize>) -> usize {
    let partial: Vec<_> = copies.iter().filter(|(_, n)| **n != MEMBERS).collect();
    assert!(
        partial.is_empty(),
        "sends stored in only some inboxes (of {MEMBERS}): {partial:?}"
    );
    copies.len()
}

/// Four of alice's devices stream group messages; every NATS server is SIGKILLed in the
/// middle of it and started again. Afterwards no send is in only some inboxes, and every
/// send answered `sent` is in all of them.
async fn kill_nats_in_a_stream_of_group_sends(mut nats: Vec<NatsServer>, args: &[&str]) {
    let urls: Vec<String> = nats.iter().map(NatsServer::url).collect();
    let urls = urls.join(",");
    let mut a = vec!["--nats", &urls, "--nats-timeout", "1s"];
    a.extend(args);
    let gw = Gateway::start(&a).await.expect("gateway starts");
    create_group(&gw, "alice", "crew", &members()).await;

    let answers: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for d in 0..4 {
        let (alice, _events) = connect(&gw, "alice", &format!("d{d}"), Via::Tcp).await;
        let (answers, stop) = (answers.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let _events = _events;
            let mut pending = FuturesUnordered::new();
            let send = |alice: Client, id: String| async move {
                let r = alice.send(group_send(&id, json!({"text": id}))).await;
                (id, r)
            };
            let mut i = 0;
            loop {
                while pending.len() < IN_FLIGHT && !stop.load(Ordering::Relaxed) {
                    pending.push(send(alice.clone(), format!("k{d}-{i}")));
                    i += 1;
                }
                let Some((id, r)) = pending.next().await else {
                    return;
                };
                answers.lock().unwrap().insert(id, r.is_ok());
                if r.is_err() {
                    // NATS is away: do not spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let stored = || answers.lock().unwrap().values().filter(|ok| **ok).count();

    // Let the stream run, kill every nats-server in the middle of it, bring them back.
    within(WAIT, "sends stored before the kill", async {
        while stored() < 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    for n in &mut nats {
        n.stop(true).await;
    }
    // Longer than --nats-timeout: sends in flight at the kill fail too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in &mut nats {
        n.restart().await.unwrap();
    }
    within(Duration::from_secs(60), "the gateway stores again", async {
        let before = stored();
        while stored() < before + 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        within(Duration::from_secs(30), "senders finish", s)
            .await
            .unwrap();
    }

    let answers = answers.lock().unwrap().clone();
    let copies = copies_per_send(&nats[0].url()).await;
    let all = all_or_nothing(&copies);
    assert!(
        answers.values().any(|ok| !*ok),
        "the kill was seen by the senders"
    );
    for (id, ok) in &answers {
        if *ok {
            assert_eq!(copies.get(&format!("alice:{id}")), Some(&MEMBERS), "{id}");
        }
    }
    assert!(all >= stored());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_in_a_stream_of_group_sends_leaves_no_send_in_only_some_inboxes() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    kill_nats_in_a_stream_of_group_sends(vec![nats], &["--nats-publish", "atomic"]).await;
}

/// The default with three replicas is atomic: the same, with the whole cluster killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_killed_in_a_stream_of_group_sends_leaves_no_send_in_only_some_inboxes(
) {
    let nats = NatsServer::cluster(3).await.expect("a nats cluster starts");
    kill_nats_in_a_stream_of_group_sends(nats, &["--replicas", "3"]).await;
}

/// A nats-server config whose JetStream file store holds at most `max`.
fn limited_config(dir: &std::path::Path, max: &str) -> std::path::PathBuf {
    let path = dir.join("limited.conf");
    std::fs::write(
        &path,
        format!("port: 4222\nhttp_port: 8222\njetstream {{\n  max_file_store: {max}\n  max_memory_store: 64MB\n}}\n"),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_the_store_refuses_is_in_no_inbox_and_its_retry_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = limited_config(dir.path(), "2MB");
    let mut nats = NatsServer::start_from(Some(config.clone()), &[])
        .await
        .expect("nats-server starts");
    let url = nats.url();
    let args = [
        "--nats",
        &url,
        "--nats-timeout",
        "2s",
        "--nats-publish",
        "atomic",
    ];
    let gw = Gateway::start(&args).await.expect("gateway starts");
    create_group(&gw, "alice", "crew", &members()).await;
    let (alice, _events) = connect(&gw, "alice", "laptop", Via::Tcp).await;

    // 4 KiB bodies, eight copies each, one send after another until the store is full.
    let body = json!({"text": "x".repeat(4096)});
    let mut sent = Vec::new();
    let refused = within(Duration::from_secs(60), "the store fills up", async {
        for i in 0.. {
            let id = format!("f-{i}");
            match alice.send(group_send(&id, body.clone())).await {
                Ok(_) => sent.push(id),
                Err(e) => {
                    assert_eq!(
                        e.kind(),
                        ErrorKind::Server(ErrorCode::Unavailable),
                        "a full store answers unavailable: {e}"
                    );
                    return id;
                }
            }
        }
        unreachable!()
    })
    .await;
    assert!(!sent.is_empty(), "some sends fit before the store was full");

    let copies = copies_per_send(&url).await;
    all_or_nothing(&copies);
    assert_eq!(copies.get(&format!("alice:{refused}")), None, "{copies:?}");
    for id in &sent {
        assert_eq!(copies.get(&format!("alice:{id}")), Some(&MEMBERS), "{id}");
    }

    // With room again, the retry with the same id is stored once, in every inbox.
    nats.stop(false).await;
    limited_config(dir.path(), "64MB");
    nats.restart().await.unwrap();
    let retried = within(Duration::from_secs(30), "the retry is stored", async {
        loop {
            match alice.send(group_send(&refused, body.clone())).await {
                Ok(s) => return s,
                Err(e) if e.kind() == ErrorKind::Server(ErrorCode::Unavailable) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("retry of {refused}: {e}"),
            }
        }
    })
    .await;
    let again = alice
        .send(group_send(&refused, body.clone()))
        .await
        .unwrap();
    assert_eq!(again.seq, retried.seq, "a second retry is a duplicate");
    let copies = copies_per_send(&url).await;
    all_or_nothing(&copies);
    assert_eq!(copies.get(&format!("alice:{refused}")), Some(&MEMBERS));
}

/// `imgate_nats_batches_total` and `imgate_nats_batched_sends_total` of a gateway.
async fn batch_counters(gw: &Gateway) -> (u64, u64) {
    (
        gw.metric("imgate_nats_batches_total").await,
        gw.metric("imgate_nats_batched_sends_total").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_made_at_once_share_atomic_batches_and_each_gets_its_own_seqs() {
    const SENDS: usize = 200;
    let nats = NatsServer::start().await.expect("nats-server starts");
    let gw = Gateway::start(&["--nats", &nats.url(), "--nats-publish", "atomic"])
        .await
        .expect("gateway starts");
    let (_b, mut bob) = connect(&gw, "bob", "phone", Via::Tcp).await;
    let mut alices = Vec::new();
    for d in 0..4 {
        alices.push(connect(&gw, "alice", &format!("d{d}"), Via::Tcp).await);
    }
    let sent: Vec<_> = within(
        WAIT,
        "every send answered",
        futures::future::join_all((0..SENDS).map(|i| {
            let alice = alices[i % alices.len()].0.clone();
            async move { alice.send_to("bob", json!({"n": i})).await.unwrap() }
        })),
    )
    .await;
    let mut seqs: Vec<u64> = sent.iter().map(|s| s.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), SENDS, "each send's own copy has its own seq");
    let (batches, batched) = batch_counters(&gw).await;
    assert_eq!(batched, SENDS as u64, "every send went through a batch");
    assert!(
        batches < SENDS as u64,
        "sends made at once share batches: {batches} batches for {SENDS} sends"
    );

    // Resends among new sends: a resent id refuses the batch it is in, whose sends are then
    // stored one by one; the resends answer their original seqs, the new ones are stored.
    let mixed = within(
        WAIT,
        "every mixed send answered",
        futures::future::join_all((0..SENDS).map(|i| {
            let alice = alices[i % alices.len()].0.clone();
            let id = sent[i].id.clone();
            async move {
                let send = |id: String, n: usize| Send {
                    id: Some(id),
                    to: Some("bob".into()),
                    group: None,
                    body: json!({ "n": n }),
                };
                match i % 2 {
                    0 => alice.send(send(id, i)).await.unwrap(),
                    _ => alice
                        .send(send(format!("new-{i}"), SENDS + i))
                        .await
                        .unwrap(),
                }
            }
        })),
    )
    .await;
    for (i, s) in mixed.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        assert_eq!(
            s.seq, sent[i].seq,
            "resend of {} answers the original seq",
            s.id
        );
    }
    let got = messages(&mut bob, SENDS + SENDS / 2).await;
    let mut ns: Vec<u64> = got.iter().map(|m| m.body["n"].as_u64().unwrap()).collect();
    ns.sort_unstable();
    let want: Vec<u64> = (0..SENDS as u64)
        .chain((SENDS as u64..2 * SENDS as u64).filter(|n| n % 2 == 1))
        .collect();
    assert_eq!(ns, want, "every send once, resends not again");
    no_message(&mut bob, std::time::Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_publishes_store_every_copy_and_a_resend_answers_the_original_seq() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let url = nats.url();
    // Separate publishes are the default on one NATS server.
    let gw = Gateway::start(&["--nats", &url])
        .await
        .expect("gateway starts");
    create_group(&gw, "alice", "crew", &members()).await;
    let (alice, _a) = connect(&gw, "alice", "laptop", Via::Tcp).await;
    let mut first = Vec::new();
    for i in 0..20 {
        first.push(
            alice
                .send(group_send(&format!("s-{i}"), json!(i)))
                .await
                .unwrap(),
        );
    }
    let again = alice.send(group_send("s-7", json!(7))).await.unwrap();
    assert_eq!((again.seq, again.ts), (first[7].seq, first[7].ts));
    let copies = copies_per_send(&url).await;
    assert_eq!(all_or_nothing(&copies), 20);
    assert_eq!(
        batch_counters(&gw).await,
        (0, 0),
        "no atomic batch was used"
    );
}
