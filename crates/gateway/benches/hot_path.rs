//! Criterion benchmarks of the delivery hot path, without sockets:
//! - `tail_copy_dropped`: the tail's own hand-over (`store::nats::hand_over`, in broadcast
//!   mode with its backlog cache) of a live copy for a user this gateway does not hold;
//! - `tail_copy_delivered`: the same hand-over of a copy for a user held here by one
//!   connection, which then takes the encoded frame from its outbox;
//! - `deliver_to_k`: decode a stored payload once, encode it once per wire format, and hand
//!   it to k local connections' outboxes.
//!
//! - `standalone_send`: the in-memory store keeping a 1:1 message (recipient's and sender's
//!   copy) and handing both copies, encoded, to each side's one connection.
//!
//! All on 32 B, 1 KiB and 8 KiB bodies: `cargo bench -p imgate-gateway --bench hot_path`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use imgate_gateway::delivery::hub::{Hub, Kick};
use imgate_gateway::delivery::outbox::OutboxItem;
use imgate_gateway::metrics::TailStats;
use imgate_gateway::store::memory::{Keep, MemoryStore};
use imgate_gateway::store::nats::{decode_payload, hand_over, Recent, Tail};
use imgate_gateway::store::{Draft, Fanout, Store};
use imgate_gateway::subjects::Names;
use imgate_proto::Encoding;
use serde_json::json;

const SIZES: [(&str, usize); 3] = [("32B", 32), ("1KiB", 1024), ("8KiB", 8 * 1024)];

/// A stored payload (msgpack, as the NATS store writes it) with a body of about `size` bytes.
fn payload(size: usize) -> Vec<u8> {
    let body = json!({"text": "x".repeat(size.saturating_sub(11))});
    rmp_serde::to_vec_named(&json!({
        "id": "c-1", "from": "alice", "to": "bob", "ts": 1_764_190_000_123u64, "body": body
    }))
    .unwrap()
}

/// A benchmark group `name` of the broadcast tail's hand-over (subject names, a backlog
/// cache of the default size, counters) of copies on `subject` to `hub`; `after` runs
/// after each hand-over (what the receiving connection does).
fn bench_hand_over(
    c: &mut Criterion,
    name: &str,
    hub: &Hub,
    subject: &str,
    mut after: impl FnMut(),
) {
    let names = Names::new("imgate");
    let recent = Recent::new(64 << 20, 10_000, std::time::Duration::from_secs(3600));
    let stats = TailStats::default();
    let tail = Tail {
        names: &names,
        recent: Some(&recent),
        stats: &stats,
    };
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(1));
    for (size_name, size) in SIZES {
        let p = payload(size);
        let mut seq = 0;
        g.bench_with_input(BenchmarkId::from_parameter(size_name), &p, |b, p| {
            b.iter(|| {
                seq += 1;
                hand_over(
                    &tail,
                    hub,
                    black_box(subject),
                    seq,
                    || 1_764_190_000_123,
                    black_box(p),
                );
                after();
            })
        });
    }
    g.finish();
}

fn tail_copy_dropped(c: &mut Criterion) {
    let hub = Hub::new();
    // Some users are held here, just not the recipient.
    let regs: Vec<_> = (0..1000)
        .map(|i| hub.register(&format!("local{i}"), "d", Arc::new(Kick::default()), 16, 16))
        .collect();
    bench_hand_over(
        c,
        "tail_copy_dropped",
        &hub,
        "imgate.live.remote-user-4711",
        || {},
    );
    drop(regs);
}

fn tail_copy_delivered(c: &mut Criterion) {
    let hub = Hub::new();
    let bob = hub.register("bob", "d", Arc::new(Kick::default()), 1024, 16);
    bench_hand_over(c, "tail_copy_delivered", &hub, "imgate.live.bob", || {
        // What the connection's writer does: take the shared msgpack encoding.
        if let Ok(OutboxItem::Msg(d)) = bob.rx.try_recv() {
            black_box(d.encoded(Encoding::Msgpack));
        }
    });
    assert!(bob.rx.is_empty());
    drop(bob);
}

fn deliver_to_k(c: &mut Criterion) {
    let mut g = c.benchmark_group("deliver_to_k");
    for k in [1usize, 10, 100] {
        let hub = Hub::new();
        let mut regs: Vec<_> = (0..k)
            .map(|i| {
                hub.register(
                    "bob",
                    &format!("d{i}"),
                    Arc::new(Kick::default()),
                    1024,
                    1000,
                )
            })
            .collect();
        g.throughput(Throughput::Elements(k as u64));
        for (name, size) in SIZES {
            let p = payload(size);
            g.bench_with_input(BenchmarkId::new(format!("k={k}"), name), &p, |b, p| {
                b.iter(|| {
                    hub.deliver("bob", &mut || decode_payload(black_box(p), 42, 0));
                    // What each connection's writer does: take the shared encoding, as a
                    // WebSocket binary frame (msgpack) or text frame (JSON, whose UTF-8 the
                    // WebSocket transport checks).
                    for (i, r) in regs.iter_mut().enumerate() {
                        if let Ok(OutboxItem::Msg(d)) = r.rx.try_recv() {
                            if i % 2 == 0 {
                                black_box(d.encoded(Encoding::Msgpack));
                            } else {
                                let json = d.encoded(Encoding::Json);
                                black_box(std::str::from_utf8(&json).is_ok());
                            }
                        }
                    }
                })
            });
        }
    }
    g.finish();
}

fn standalone_send(c: &mut Criterion) {
    let mut g = c.benchmark_group("standalone_send");
    g.throughput(Throughput::Elements(1));
    for (name, size) in SIZES {
        let body = json!({"text": "x".repeat(size.saturating_sub(11))});
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            // A fresh store for each sample, so that no sample pays for the growth of the
            // whole run (millions of messages in one inbox pair).
            b.iter_custom(|iters| {
                let hub = Hub::new();
                let keep = Keep {
                    retention: std::time::Duration::from_secs(3600),
                    max_inbox: 10_000,
                };
                let store = MemoryStore::new(keep, hub.clone());
                let mut conns: Vec<_> = ["bob", "alice"]
                    .iter()
                    .map(|uid| hub.register(uid, "d", Arc::new(Kick::default()), 1024, 1000))
                    .collect();
                let inboxes = ["bob".to_owned(), "alice".to_owned()];
                let started = std::time::Instant::now();
                for n in 0..iters {
                    let draft = Draft {
                        id: format!("c-{n}"),
                        from: "alice".into(),
                        to: Some("bob".into()),
                        group: None,
                        ts: 1_764_190_000_123,
                        body: Arc::new(body.clone()),
                    };
                    let appended = futures::executor::block_on(store.append(draft, &inboxes));
                    black_box(appended.unwrap());
                    for r in &mut conns {
                        if let Ok(OutboxItem::Msg(d)) = r.rx.try_recv() {
                            black_box(d.encoded(Encoding::Msgpack));
                        }
                    }
                }
                started.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    tail_copy_dropped,
    tail_copy_delivered,
    deliver_to_k,
    standalone_send
);
criterion_main!(benches);
