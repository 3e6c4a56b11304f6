//! Prometheus metrics of one gateway, served at `GET /metrics`.
//!
//! A Prometheus recorder is built for this gateway and its handles are registered once at
//! start, so counting on the hot path is one atomic add and no global recorder is involved.
//! Counters the registry and the cluster tail keep themselves ([`HubStats`], [`TailStats`]:
//! plain atomics, defined here) are copied in when `/metrics` is rendered. Nothing here decides anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use imgate_proto::ErrorCode;
use metrics::{Counter, Gauge, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Counters of the fanout, read by `/metrics`.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Copies handed to at least one local connection.
    pub dispatched: AtomicU64,
    /// Copies for users with no local connection, dropped without decoding.
    pub dropped_not_local: AtomicU64,
    /// Connections closed because their outbox was full.
    pub slow_consumers: AtomicU64,
    /// Room messages put in an outbox.
    pub room_delivered: AtomicU64,
    /// Room messages dropped for connections too slow to take them.
    pub room_dropped: AtomicU64,
}

/// Counters of the cluster store (its tail and its publishes), read by `/metrics`.
#[derive(Debug, Default)]
pub struct TailStats {
    /// Inbox copies the tail received from the stream.
    pub received: AtomicU64,
    /// Their subject and payload bytes: what the broadcast costs this gateway on the bus.
    pub received_bytes: AtomicU64,
    /// Copies it decoded (only ever for users with a local connection).
    pub decoded: AtomicU64,
    /// Payloads that did not decode as a message (published by something else).
    pub undecodable: AtomicU64,
    /// Times the tail consumer was recreated after a failure.
    pub restarts: AtomicU64,
    /// Atomic batches committed, and the sends they held: sends per batch is how much the
    /// group commit shares.
    pub batches: AtomicU64,
    pub batched_sends: AtomicU64,
    /// Backlog reads answered from the gateway's memory of recent copies, not NATS.
    pub backlog_hits: AtomicU64,
    /// Times the tail found live copies missing (a jump in `Nats-Sequence`, or the stream
    /// ahead of it after a quiet spell).
    pub live_gaps: AtomicU64,
    /// Times it read copies back from the stream (gaps, reconnects, full subscriptions).
    pub catch_ups: AtomicU64,
    /// Inboxes this gateway subscribes to now (interest mode; 0 in broadcast mode).
    pub followed: AtomicU64,
}

/// What offline notifications count: sent (the webhook took it), tries again, given up,
/// and windows with nothing to report because a device acked or the user read in time.
#[derive(Clone)]
pub struct NotifyCounters {
    pub sent: Counter,
    pub retried: Counter,
    pub given_up: Counter,
    pub suppressed_acked: Counter,
    pub suppressed_read: Counter,
}

/// How a client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Ws,
    Sse,
    LongPoll,
    ShortPoll,
}

impl Transport {
    pub const ALL: [Transport; 5] = [
        Transport::Tcp,
        Transport::Ws,
        Transport::Sse,
        Transport::LongPoll,
        Transport::ShortPoll,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::LongPoll => "long_poll",
            Transport::ShortPoll => "short_poll",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The gateway's metric handles.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    connections: Vec<Gauge>,
    delivered: Vec<Counter>,
    errors: Vec<Counter>,
    /// Messages accepted and stored (one per send, however many inbox copies).
    pub stored: Counter,
    /// Cumulative acks received (frames, and polls that name `after`).
    pub acks: Counter,
    /// Long polls waiting for a message now.
    pub long_polls_waiting: Gauge,
    /// Long polls that took over the waiter of the device's previous poll (no store read).
    pub long_polls_resumed: Counter,
    pub notify: NotifyCounters,
    dropped_not_local: Counter,
    dispatched: Counter,
    slow_consumers: Counter,
    tail_received: Counter,
    tail_received_bytes: Counter,
    tail_decoded: Counter,
    tail_undecodable: Counter,
    tail_restarts: Counter,
    live_gaps: Counter,
    catch_ups: Counter,
    followed: Gauge,
    nats_batches: Counter,
    nats_batched_sends: Counter,
    backlog_hits: Counter,
    room_delivered: Counter,
    room_dropped: Counter,
    /// The cluster tail's counters, read at each render (`None` standalone).
    tail: Option<Arc<TailStats>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Metrics {
    // Long only because it registers every metric, one handle each.
    pub fn new(tail: Option<Arc<TailStats>>) -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let gauge = |name: &'static str, labels: Vec<Label>| {
            recorder.register_gauge(&Key::from_parts(name, labels), &METADATA)
        };
        let by_transport = |name: &'static str| {
            Transport::ALL
                .iter()
                .map(|t| vec![Label::new("transport", t.as_str())])
                .map(|l| (name, l))
                .collect::<Vec<_>>()
        };
        let connections = by_transport("imgate_connections")
            .into_iter()
            .map(|(n, l)| gauge(n, l))
            .collect();
        let delivered = by_transport("imgate_delivered_total")
            .into_iter()
            .map(|(n, l)| counter(n, l))
            .collect();
        let errors = ErrorCode::ALL
            .iter()
            .map(|c| counter("imgate_errors_total", vec![Label::new("code", c.as_str())]))
            .collect();
        let m = Metrics {
            connections,
            delivered,
            errors,
            stored: counter("imgate_messages_stored_total", vec![]),
            acks: counter("imgate_acks_total", vec![]),
            long_polls_waiting: gauge("imgate_long_polls_waiting", vec![]),
            long_polls_resumed: counter("imgate_long_polls_resumed_total", vec![]),
            notify: NotifyCounters {
                sent: counter(
                    "imgate_notifications_total",
                    vec![Label::new("outcome", "sent")],
                ),
                retried: counter("imgate_notification_retries_total", vec![]),
                given_up: counter(
                    "imgate_notifications_total",
                    vec![Label::new("outcome", "given_up")],
                ),
                suppressed_acked: counter(
                    "imgate_notifications_suppressed_total",
                    vec![Label::new("reason", "acked")],
                ),
                suppressed_read: counter(
                    "imgate_notifications_suppressed_total",
                    vec![Label::new("reason", "read")],
                ),
            },
            dropped_not_local: counter("imgate_fanout_dropped_not_local_total", vec![]),
            dispatched: counter("imgate_fanout_dispatched_total", vec![]),
            slow_consumers: counter("imgate_slow_consumers_total", vec![]),
            tail_received: counter("imgate_tail_received_total", vec![]),
            tail_received_bytes: counter("imgate_tail_received_bytes_total", vec![]),
            tail_decoded: counter("imgate_tail_decoded_total", vec![]),
            tail_undecodable: counter("imgate_tail_undecodable_total", vec![]),
            tail_restarts: counter("imgate_tail_restarts_total", vec![]),
            live_gaps: counter("imgate_live_gaps_total", vec![]),
            catch_ups: counter("imgate_tail_catch_ups_total", vec![]),
            followed: gauge("imgate_live_subscriptions", vec![]),
            nats_batches: counter("imgate_nats_batches_total", vec![]),
            nats_batched_sends: counter("imgate_nats_batched_sends_total", vec![]),
            backlog_hits: counter("imgate_backlog_cache_hits_total", vec![]),
            room_delivered: counter("imgate_room_delivered_total", vec![]),
            room_dropped: counter("imgate_room_dropped_total", vec![]),
            tail,
            recorder,
            handle,
        };
        m.describe();
        m
    }

    // Long only because it is the list of every metric's help text, one call each.
    fn describe(&self) {
        let d = |name: &'static str, unit: Unit, text: &'static str| {
            self.recorder
                .describe_counter(name.into(), Some(unit), text.into())
        };
        let g = |name: &'static str, text: &'static str| {
            self.recorder
                .describe_gauge(name.into(), Some(Unit::Count), text.into())
        };
        g(
            "imgate_connections",
            "Open connections by transport (tcp, ws, sse).",
        );
        g(
            "imgate_long_polls_waiting",
            "Long polls held open waiting for a message.",
        );
        d(
            "imgate_notifications_total",
            Unit::Count,
            "Offline notifications by outcome: sent (the webhook answered 2xx), given_up (refused, or retries ran out).",
        );
        d(
            "imgate_notification_retries_total",
            Unit::Count,
            "Notification attempts tried again after a network error, a timeout, 429 or 5xx.",
        );
        d(
            "imgate_notifications_suppressed_total",
            Unit::Count,
            "Windows that fell due with nothing to report because a device acked (reason=acked) or the user read (reason=read) their messages in time.",
        );
        d(
            "imgate_long_polls_resumed_total",
            Unit::Count,
            "Long polls answered from the waiter the device's previous poll left registered, without reading the store.",
        );
        d(
            "imgate_delivered_total",
            Unit::Count,
            "Stored messages written to clients, by transport.",
        );
        d(
            "imgate_errors_total",
            Unit::Count,
            "Error answers sent to clients, by error code.",
        );
        d(
            "imgate_messages_stored_total",
            Unit::Count,
            "Sends accepted and stored.",
        );
        d(
            "imgate_acks_total",
            Unit::Count,
            "Cumulative acks received.",
        );
        d(
            "imgate_fanout_dropped_not_local_total",
            Unit::Count,
            "Stored inbox copies dropped by the local filter (no connection of that user here), never decoded.",
        );
        d(
            "imgate_fanout_dispatched_total",
            Unit::Count,
            "Stored inbox copies handed to at least one local connection.",
        );
        d(
            "imgate_tail_received_total",
            Unit::Count,
            "Cluster mode: inbox copies received from the stream (every copy, for every user).",
        );
        d(
            "imgate_tail_received_bytes_total",
            Unit::Bytes,
            "Cluster mode: subject and payload bytes of the copies received from the stream.",
        );
        d(
            "imgate_tail_decoded_total",
            Unit::Count,
            "Cluster mode: copies decoded, which happens only for users connected to this gateway.",
        );
        d(
            "imgate_tail_undecodable_total",
            Unit::Count,
            "Cluster mode: stored payloads that did not decode as a message.",
        );
        d(
            "imgate_nats_batches_total",
            Unit::Count,
            "Cluster mode: atomic batches committed to JetStream (--nats-publish atomic).",
        );
        d(
            "imgate_nats_batched_sends_total",
            Unit::Count,
            "Cluster mode: sends stored by those batches (sends per batch is what the group commit shares).",
        );
        d(
            "imgate_backlog_cache_hits_total",
            Unit::Count,
            "Cluster mode: backlog reads (logins, polls) answered from the copies this gateway's tail saw lately, without asking NATS (--backlog-cache).",
        );
        d(
            "imgate_live_gaps_total",
            Unit::Count,
            "Cluster mode: times live copies were found missing (a jump in Nats-Sequence; in interest mode a Nats-Last-Sequence above what was handed over; or a position check); each is read back from the stream.",
        );
        d(
            "imgate_tail_catch_ups_total",
            Unit::Count,
            "Cluster mode: times the tail read copies back from the stream (gaps, reconnects, a full subscription, its start).",
        );
        d(
            "imgate_live_subscriptions",
            Unit::Count,
            "Cluster mode with --fanout interest: inboxes whose live subject this gateway subscribes to now (one per user it holds a connection or long poll of).",
        );
        d(
            "imgate_tail_restarts_total",
            Unit::Count,
            "Cluster mode: times the stream tail was recreated after a failure (from its last seq).",
        );
        d(
            "imgate_room_delivered_total",
            Unit::Count,
            "Room messages put in a connection's outbox.",
        );
        d(
            "imgate_room_dropped_total",
            Unit::Count,
            "Room messages dropped for connections too slow to take them (stored messages never are).",
        );
        d(
            "imgate_slow_consumers_total",
            Unit::Count,
            "Connections closed because their outbox of stored messages was full.",
        );
    }

    pub fn connection(&self, t: Transport) -> &Gauge {
        &self.connections[t.index()]
    }

    pub fn delivered(&self, t: Transport) -> &Counter {
        &self.delivered[t.index()]
    }

    pub fn error(&self, code: ErrorCode) -> &Counter {
        let i = ErrorCode::ALL
            .iter()
            .position(|c| *c == code)
            .expect("every code is in ALL");
        &self.errors[i]
    }

    /// The Prometheus text exposition, with the hub's and the tail's own counters copied in.
    pub fn render(&self, hub: &HubStats) -> String {
        if let Some(t) = &self.tail {
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            self.tail_received.absolute(get(&t.received));
            self.tail_received_bytes.absolute(get(&t.received_bytes));
            self.tail_decoded.absolute(get(&t.decoded));
            self.tail_undecodable.absolute(get(&t.undecodable));
            self.tail_restarts.absolute(get(&t.restarts));
            self.live_gaps.absolute(get(&t.live_gaps));
            self.catch_ups.absolute(get(&t.catch_ups));
            self.followed.set(get(&t.followed) as f64);
            self.nats_batches.absolute(get(&t.batches));
            self.nats_batched_sends.absolute(get(&t.batched_sends));
            self.backlog_hits.absolute(get(&t.backlog_hits));
        }
        self.dropped_not_local
            .absolute(hub.dropped_not_local.load(Ordering::Relaxed));
        self.dispatched
            .absolute(hub.dispatched.load(Ordering::Relaxed));
        self.slow_consumers
            .absolute(hub.slow_consumers.load(Ordering::Relaxed));
        self.room_delivered
            .absolute(hub.room_delivered.load(Ordering::Relaxed));
        self.room_dropped
            .absolute(hub.room_dropped.load(Ordering::Relaxed));
        let mut text = self.handle.render();
        if let Some(count) = ALLOCATIONS.get() {
            let (calls, bytes) = count();
            text.push_str(&format!(
                "# TYPE imgate_allocations_total counter\nimgate_allocations_total {calls}\n\
                 # TYPE imgate_allocated_bytes_total counter\nimgate_allocated_bytes_total {bytes}\n"
            ));
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            text.push_str(&runtime_text(&rt.metrics()));
        }
        text
    }
}

/// The runtime's own counts, summed over its worker threads: how often a worker parked
/// (went to sleep for lack of work, so each park is followed by a wake-up) and how long
/// workers were busy. What a message costs in thread wake-ups is read from these.
fn runtime_text(rt: &tokio::runtime::RuntimeMetrics) -> String {
    let workers = rt.num_workers();
    let parks: u64 = (0..workers).map(|w| rt.worker_park_count(w)).sum();
    let busy: f64 = (0..workers)
        .map(|w| rt.worker_total_busy_duration(w).as_secs_f64())
        .sum();
    format!(
        "# HELP imgate_runtime_worker_parks_total Times a runtime worker thread went to sleep \
         for lack of work (each is followed by a wake-up).\n\
         # TYPE imgate_runtime_worker_parks_total counter\n\
         imgate_runtime_worker_parks_total {parks}\n\
         # HELP imgate_runtime_worker_busy_seconds_total Time runtime worker threads spent \
         running tasks.\n\
         # TYPE imgate_runtime_worker_busy_seconds_total counter\n\
         imgate_runtime_worker_busy_seconds_total {busy}\n"
    )
}

/// The allocator's counts (calls, bytes), when the binary counts them: only a benchmark
/// build does (`imgate --features alloc-stats`).
static ALLOCATIONS: std::sync::OnceLock<fn() -> (u64, u64)> = std::sync::OnceLock::new();

/// Shows the allocator's counts in /metrics as `imgate_allocations_total` and
/// `imgate_allocated_bytes_total`, read from `count` at each scrape.
pub fn count_allocations(count: fn() -> (u64, u64)) {
    let _ = ALLOCATIONS.set(count);
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_series() {
        let m = Metrics::new(None);
        m.delivered(Transport::Sse).increment(3);
        m.error(ErrorCode::TooLarge).increment(1);
        m.connection(Transport::Tcp).increment(2.0);
        let hub = HubStats::default();
        hub.dropped_not_local.store(7, Ordering::Relaxed);
        let text = m.render(&hub);
        assert!(
            text.contains(r#"imgate_delivered_total{transport="sse"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"imgate_errors_total{code="too_large"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"imgate_connections{transport="tcp"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("imgate_fanout_dropped_not_local_total 7"),
            "{text}"
        );
        assert!(text.contains("# HELP imgate_acks_total"), "{text}");
    }
}
