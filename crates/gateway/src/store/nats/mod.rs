//! The cluster-mode store on NATS: JetStream is both the message store and the broadcast
//! of stored messages; KV buckets hold device cursors and groups (docs/protocol.md has the
//! layout, [`crate::subjects`] every name).
//!
//! - A send is one copy per inbox on `<prefix>.u.<uid>` with `Nats-Msg-Id =
//!   <from>:<id>:<uid>`, published as one atomic batch (all or nothing, group-committed) or
//!   copy by copy ([`publish`], `--nats-publish`). A resend names the original seq.
//! - Backlog reads are batch direct gets on one user's subject: no consumer per login.
//! - The stream republishes every stored copy on `<prefix>.live.<uid>` (core NATS). In
//!   broadcast mode the tail subscribes to all of them (interest mode subscribes per held
//!   user, in `interest.rs`) and hands each copy to the [`Fanout`] with the uid read from
//!   the subject; the payload is decoded only when the fanout asks (a local connection wants
//!   it). Republish is at most once: a jump in `Nats-Sequence`, a reconnect, a full
//!   subscription or a quiet spell make the tail read the missed copies back from the stream
//!   (a short-lived consumer) before it goes on, so every copy arrives once and in order.
//!   After any failure the tail starts again from the last stream seq it handed over.
//! - While the client is not connected to NATS, every operation that would send NATS a
//!   request fails at once with `Unavailable` (its `connected()` check comes first),
//!   so sends, cursors, read positions, history, revocations and group changes fail. What
//!   this gateway holds in memory is still served: a backlog read that the [`Recent`] cache
//!   covers (broadcast mode), a group in the group cache (kept by watching the bucket), the
//!   epoch, an inbox's live tail where it is known here (broadcast: the tail's position;
//!   interest: an inbox this gateway follows), and a `follow` of an inbox already followed.
//!
//! This module knows nothing about connections; it talks to NATS and to the `Fanout` trait.
//! Rooms and presence travel on the same connection but belong to [`crate::bus`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::try_join_all;

mod interest;
mod publish;
mod recent;
mod windows;

use futures::StreamExt;
use imgate_proto::scratch::written;
use imgate_proto::Message;
use publish::{Copy, Publisher};
pub use recent::Recent;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
pub use windows::{DueWindow, NotifyWindows, Record as WindowRecord, Scheduled, Sending};

use super::{
    Appended, ChangeError, CursorWrite, Draft, Fanout, Following, Group, GroupChange, History,
    Older, Page, Store, StoreError, DEDUPE_WINDOW,
};
use crate::config::{Config, Fanout as FanoutMode};
use crate::metrics::TailStats;
use crate::subjects::Names;

/// Heartbeat the tail asks of the server; two missed ones recreate the consumer.
const TAIL_HEARTBEAT: Duration = Duration::from_secs(2);
/// A server-side consumer nobody pulls from is removed after this long.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(30);
/// Longest pause between attempts to recreate the tail.
const TAIL_MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A live subscription quiet this long makes the tail ask the stream whether it missed the
/// last copies (one request); checked this often, so a lost last copy waits at most twice
/// this.
const POSITION_CHECK: Duration = Duration::from_secs(1);
/// How long the tail waits for the stream's position before it starts over.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// The most bytes one pull of a catch-up asks for: a burst far below what nats-server lets
/// a client have pending (`max_pending`) before it cuts the client off as a slow consumer,
/// which is what a catch-up after such a cut must not cause again.
const CATCH_UP_BYTES: usize = 512 * 1024;
/// A catch-up consumer that delivers nothing for this long is checked against the stream.
const CATCH_UP_IDLE: Duration = Duration::from_secs(3);
/// The most messages one batch direct get returns (the server's limit).
const MAX_DIRECT_BATCH: usize = 1000;

/// The JetStream-backed store.
pub struct NatsStore {
    /// This store, for the tasks it starts (one per followed inbox in interest mode).
    me: std::sync::Weak<NatsStore>,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    cursors: kv::Store,
    groups: kv::Store,
    /// uid -> the revocation time (decimal Unix seconds), watched by every gateway.
    revocations: kv::Store,
    /// uid -> [`ReadValue`], watched by every gateway.
    reads: kv::Store,
    /// This process among the gateways: names the raiser of a read position.
    instance: String,
    /// Every group, kept current by a watch on the groups bucket.
    group_cache: dashmap::DashMap<String, Group>,
    names: Names,
    /// Publishes sends' copies (atomic batches, or one by one).
    publisher: Publisher,
    max_inbox: usize,
    /// Messages per pull request of the tail (`--tail-batch`).
    tail_batch: usize,
    /// The last stream seq the tail handed to the fanout: the live tail for a new device.
    tail_last: AtomicU64,
    /// What the tail saw lately, for backlog reads that need not ask NATS (broadcast mode
    /// only: in interest mode the tail sees only the inboxes already held here).
    recent: Option<Recent>,
    /// The inboxes followed in interest mode (`--fanout interest`); `None` in broadcast
    /// mode, where the tail follows every inbox.
    interest: Option<Arc<interest::Interest>>,
    /// Time allowed for one NATS request (`--nats-timeout`).
    timeout: Duration,
    /// Test hook (`--test-follow-delay`): how long `follow` waits after subscribing. 0 in
    /// production.
    follow_delay: Duration,
    /// Woken when live copies may have been lost: after a reconnect, or when the client
    /// dropped messages of a full subscription.
    resync: Arc<tokio::sync::Notify>,
    /// Test hook (`--test-drop-live`): the tail ignores every Nth live copy, as if the bus
    /// had lost it. 0 in production.
    drop_live_every: u64,
    /// The stream's creation time: a recreated stream is a new epoch.
    epoch: std::sync::RwLock<Arc<str>>,
    pub tail_stats: Arc<TailStats>,
}

/// The client, connecting in the background, with what a failed start needs.
struct Connecting {
    client: async_nats::Client,
    /// The last error the connection reported (none once connected).
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    /// Woken when live copies may have been lost (a reconnect, a slow-consumer cut).
    resync: Arc<tokio::sync::Notify>,
    servers: Vec<async_nats::ServerAddr>,
}

impl Connecting {
    /// Starts the client: it retries until connected, and reports its events.
    async fn start(n: &crate::config::NatsArgs) -> anyhow::Result<Connecting> {
        // The client connects in the background; its last error is what a failed start
        // reports (an authorization violation would otherwise read as a stream timeout).
        let last_error = Arc::new(std::sync::Mutex::new(None::<String>));
        let slot = last_error.clone();
        let resync = Arc::new(tokio::sync::Notify::new());
        let lost = resync.clone();
        let opts = NatsStore::options(n)
            .await?
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let slot = slot.clone();
                // Live copies are at most once: whatever was published while the connection
                // was down, or dropped from a full subscription, is read back by the tail.
                if matches!(
                    event,
                    async_nats::Event::Connected | async_nats::Event::SlowConsumer(_)
                ) {
                    lost.notify_one();
                }
                async move {
                    let mut last = slot.lock().unwrap_or_else(|p| p.into_inner());
                    match &event {
                        async_nats::Event::Connected => *last = None,
                        async_nats::Event::ClientError(e) => *last = Some(e.to_string()),
                        async_nats::Event::ServerError(e) => *last = Some(e.to_string()),
                        _ => {}
                    }
                    tracing::info!(%event, "nats");
                }
            });
        let servers = n
            .nats
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--nats: {e}"))?;
        let client = opts.connect(servers.clone()).await?;
        Ok(Connecting {
            client,
            last_error,
            resync,
            servers,
        })
    }
}

/// The stream and the buckets, once created or updated.
struct Provisioned {
    stream: stream::Stream,
    cursors: kv::Store,
    groups: kv::Store,
    revocations: kv::Store,
    reads: kv::Store,
}

/// A value of the reads bucket: the position, and the connection that raised it (so its
/// own gateway does not tell it).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ReadValue {
    seq: u64,
    /// The raising gateway's [`NatsStore::instance`].
    gw: String,
    /// Its connection id there (0: over HTTP).
    conn: u64,
}

/// The epoch of a stream: its creation time, the same on every gateway.
fn epoch_of(info: &stream::Info) -> Arc<str> {
    format!("js{}", info.created.unix_timestamp_nanos()).into()
}

/// The payload of a stored message: the message without its seq (the stream assigns it).
#[derive(Serialize)]
struct PayloadOut<'a> {
    id: &'a str,
    from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    ts: u64,
    body: &'a Value,
}

/// What a payload may hold. A backend publishing straight to `imgate.u.<uid>` may leave out
/// `id` (then `nats-<seq>`), `from` (then `system`) and `ts` (then the stream's time).
#[derive(Deserialize)]
struct PayloadIn {
    id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    group: Option<String>,
    ts: Option<u64>,
    #[serde(default)]
    body: Value,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// What the tail hands a copy to: the subject names, the backlog cache (broadcast mode) and
/// the counters.
pub struct Tail<'a> {
    pub names: &'a Names,
    pub recent: Option<&'a Recent>,
    pub stats: &'a TailStats,
}

/// Hands copy `seq`, received on `subject` (republished `<prefix>.live.<uid>`, or the
/// stored `<prefix>.u.<uid>` when read back), to the fanout and the backlog cache,
/// decoding the payload only if the fanout asks for it. Public so that the hot-path
/// benchmarks run this very code.
pub fn hand_over(
    tail: &Tail<'_>,
    fanout: &dyn Fanout,
    subject: &str,
    seq: u64,
    published: impl FnOnce() -> u64,
    payload: &[u8],
) {
    let stats = tail.stats;
    stats.received.fetch_add(1, Ordering::Relaxed);
    stats
        .received_bytes
        .fetch_add((subject.len() + payload.len()) as u64, Ordering::Relaxed);
    let names = tail.names;
    let Some(uid) = names.live_owner(subject).or_else(|| names.owner(subject)) else {
        return;
    };
    let published = published();
    // Cached before it is handed over: a login that registers in between reads it here
    // or gets it in its outbox, never neither.
    if let Some(recent) = tail.recent {
        recent.insert(uid, seq, published, payload);
    }
    fanout.deliver(uid, &mut || {
        stats.decoded.fetch_add(1, Ordering::Relaxed);
        let msg = decode_payload(payload, seq, published);
        if msg.is_none() {
            stats.undecodable.fetch_add(1, Ordering::Relaxed);
        }
        msg
    });
}

/// Decodes a stored payload as the message with stream seq `seq`.
pub fn decode_payload(payload: &[u8], seq: u64, published_ms: u64) -> Option<Message> {
    // Leniently, unlike a client's frame: a backend's payload with bytes after its map is
    // still delivered.
    let mut d = rmp_serde::Deserializer::from_read_ref(payload);
    d.set_max_depth(imgate_proto::encoding::MAX_DEPTH);
    let p = PayloadIn::deserialize(&mut d).ok()?;
    Some(Message {
        seq,
        id: p.id.unwrap_or_else(|| format!("nats-{seq}")),
        from: p.from.unwrap_or_else(|| "system".to_owned()),
        to: p.to,
        group: p.group,
        ts: p.ts.unwrap_or(published_ms),
        body: Arc::new(p.body),
    })
}

/// The oldest nats-server this store works with: batch direct gets (2.11) read backlogs
/// without a consumer, and atomic batches with message ids (2.14; 2.12 refuses ids inside
/// a batch) store a send's copies all or nothing.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 14, 0);

/// `"2.15.1"` (or `"2.12.0-beta.3"`) as numbers; `None` if it does not start like a version.
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next()?.parse().ok();
    Some((next()?, next()?, next()?))
}

/// Refuses a server older than [`MIN_SERVER_VERSION`], naming both versions.
pub fn check_server_version(version: &str) -> anyhow::Result<()> {
    let (a, b, c) = MIN_SERVER_VERSION;
    match parse_version(version) {
        Some(v) if v >= MIN_SERVER_VERSION => Ok(()),
        _ => anyhow::bail!(
            "nats-server {version} is too old: imgate needs nats-server {a}.{b}.{c} or newer \
             (batch direct gets, atomic batch publishes with message ids); upgrade the NATS \
             servers"
        ),
    }
}

/// A value of the revocations bucket: the revocation time as decimal Unix seconds.
fn revoked_before(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Runs `watch` until `stop`, again half a second after each time it fails or ends.
async fn keep_watching<F, Fut>(what: &str, stop: &CancellationToken, mut watch: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    loop {
        let r = tokio::select! {
            r = watch() => r,
            _ = stop.cancelled() => return,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "{what} interrupted; watching again");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Creates (or updates) a KV bucket with one value per key, and opens it.
async fn kv_bucket(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    replicas: usize,
) -> anyhow::Result<kv::Store> {
    js.create_or_update_key_value(kv::Config {
        bucket: bucket.to_owned(),
        description: description.to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating KV bucket {bucket}: {e}"))
}

/// The position in a value of the reads bucket (0 if it does not parse).
fn read_seq(value: &[u8]) -> u64 {
    serde_json::from_slice::<ReadValue>(value).map_or(0, |v| v.seq)
}

/// A decimal header of a republished copy.
fn header_u64(m: &async_nats::Message, name: async_nats::HeaderName) -> Option<u64> {
    m.headers.as_ref()?.get(name)?.as_str().parse().ok()
}

/// When a republished copy was stored (`Nats-Time-Stamp`, RFC 3339), in Unix ms; 0 when it
/// does not say.
fn live_time(m: &async_nats::Message) -> u64 {
    let stamp = m
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_TIME_STAMP));
    stamp
        .and_then(|v| {
            time::OffsetDateTime::parse(v.as_str(), &time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(0, unix_ms)
}

fn unix_ms(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

impl NatsStore {
    /// The connection options every connection of this gateway shares: name, timeout,
    /// credentials and TLS.
    async fn options(n: &crate::config::NatsArgs) -> anyhow::Result<async_nats::ConnectOptions> {
        let mut opts = async_nats::ConnectOptions::new()
            .name("imgate")
            .connection_timeout(n.nats_timeout);
        if let (Some(user), Some(pass)) = (&n.nats_user, &n.nats_password) {
            opts = opts.user_and_password(user.clone(), pass.0.clone());
        }
        if let Some(token) = &n.nats_token {
            opts = opts.token(token.0.clone());
        }
        if let Some(creds) = &n.nats_creds {
            opts = opts.credentials_file(creds).await?;
        }
        if let Some(ca) = &n.nats_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(opts)
    }

    /// Connects, then creates or updates the stream and the buckets (cursors, groups,
    /// revocations, read positions).
    pub async fn connect(cfg: &Config) -> anyhow::Result<Arc<Self>> {
        let n = &cfg.nats;
        // A group message is one atomic batch, one copy per member.
        anyhow::ensure!(
            cfg.max_group <= publish::MAX_ATOMIC_BATCH,
            "--max-group {} is above {}, the most copies nats-server stores in one atomic batch",
            cfg.max_group,
            publish::MAX_ATOMIC_BATCH
        );
        let Connecting {
            client,
            last_error,
            resync,
            servers,
        } = Connecting::start(n).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(n.nats_timeout)
            .build(client.clone());
        let names = Names::new(&n.stream_prefix);

        let Provisioned {
            stream,
            cursors,
            groups,
            revocations,
            reads,
        } = Self::provision_when_ready(&client, &js, &names, cfg, &last_error, &servers).await?;
        check_server_version(&client.server_info().version)
            .map_err(|e| e.context(format!("NATS at {}", n.nats.join(","))))?;
        tracing::info!(version = %client.server_info().version, "nats-server version");
        let epoch = epoch_of(stream.cached_info());
        let stats = Arc::new(TailStats::default());
        let mode = n.publish_mode();
        tracing::info!(
            ?mode,
            replicas = n.replicas,
            "sends are published to JetStream this way (--nats-publish)"
        );
        let publisher = Publisher::start(client.clone(), n.nats_timeout, mode, stats.clone());
        Ok(Arc::new_cyclic(|me| NatsStore {
            me: me.clone(),
            epoch: std::sync::RwLock::new(epoch),
            publisher,
            client,
            js,
            stream,
            cursors,
            groups,
            revocations,
            reads,
            instance: super::new_epoch(),
            group_cache: dashmap::DashMap::new(),
            names,
            max_inbox: cfg.max_inbox,
            tail_last: AtomicU64::new(0),
            recent: (n.fanout == FanoutMode::Broadcast)
                .then(|| Recent::new(n.backlog_cache, cfg.max_inbox, cfg.retention)),
            interest: (n.fanout == FanoutMode::Interest)
                .then(|| interest::Interest::new(stats.clone())),
            timeout: n.nats_timeout,
            follow_delay: n.test_follow_delay,
            resync,
            drop_live_every: n.test_drop_live,
            tail_batch: n.tail_batch as usize,
            tail_stats: stats,
        }))
    }

    /// Creates or updates the stream and the buckets, trying again until
    /// `--nats-startup-timeout` while NATS is not ready (compose, a restart); a failure then
    /// names what the connection last reported.
    async fn provision_when_ready(
        client: &async_nats::Client,
        js: &jetstream::Context,
        names: &Names,
        cfg: &Config,
        last_error: &std::sync::Mutex<Option<String>>,
        servers: &[async_nats::ServerAddr],
    ) -> anyhow::Result<Provisioned> {
        let n = &cfg.nats;
        // NATS may still be starting (compose, a restart): keep trying for a while.
        let deadline = tokio::time::Instant::now() + n.nats_startup_timeout;
        loop {
            let connection = || {
                let last = last_error.lock().unwrap_or_else(|p| p.into_inner());
                last.clone()
            };
            // The server's version is known once connected; too old a server is final.
            let at = || format!("NATS at {}", n.nats.join(","));
            // Give the background connect a moment, so the version is checked before any
            // JetStream request (an old server would only time them out).
            let wait = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            while client.connection_state() != State::Connected
                && tokio::time::Instant::now() < wait
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if client.connection_state() == State::Connected {
                check_server_version(&client.server_info().version).map_err(|e| e.context(at()))?;
            }
            match Self::provision(js, names, cfg).await {
                Ok(v) => return Ok(v),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, connection = ?connection(), "NATS not ready yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    let Some(c) = connection() else {
                        return Err(e);
                    };
                    // The background client's events name only the kind of failure ("IO
                    // error"); one direct attempt returns the cause (a TLS refusal, say).
                    let cause = match Self::options(n).await?.connect(servers.to_vec()).await {
                        Err(direct) => direct.to_string(),
                        Ok(_) => c,
                    };
                    return Err(e.context(format!(
                        "NATS at {} refused or dropped the connection: {cause} \
                         (check --nats-user/--nats-password, --nats-token, --nats-creds, --nats-ca)",
                        n.nats.join(",")
                    )));
                }
            }
        }
    }

    // Long only because it is the stream's and the four buckets' configurations.
    async fn provision(
        js: &jetstream::Context,
        names: &Names,
        cfg: &Config,
    ) -> anyhow::Result<Provisioned> {
        let replicas = cfg.nats.replicas;
        js.create_or_update_stream(stream::Config {
            name: names.stream.clone(),
            subjects: vec![names.all_users()],
            storage: stream::StorageType::File,
            max_age: cfg.retention,
            max_messages_per_subject: cfg.max_inbox as i64,
            duplicate_window: DEDUPE_WINDOW,
            num_replicas: replicas,
            allow_direct: true,
            allow_atomic_publish: true,
            // Every stored copy is published again on a core subject: the live delivery.
            republish: Some(stream::Republish {
                source: names.users_source(),
                destination: names.live_all(),
                headers_only: false,
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating or updating stream {}: {e}", names.stream))?;
        let stream = js.get_stream(&names.stream).await?;
        let cursors = kv_bucket(
            js,
            &names.cursors,
            "imgate device cursors: <uid>.<device> -> last acked seq",
            replicas,
        )
        .await?;
        let groups = kv_bucket(
            js,
            &names.groups,
            "imgate groups: <gid> -> msgpack {owner, members}",
            replicas,
        )
        .await?;
        let revocations = kv_bucket(
            js,
            &names.revocations,
            "imgate revoked tokens: <uid> -> tokens issued at or before these Unix seconds are refused",
            replicas,
        )
        .await?;
        let reads = kv_bucket(
            js,
            &names.reads,
            "imgate read positions: <uid> -> JSON {seq, gw, conn} (who raised it last)",
            replicas,
        )
        .await?;
        Ok(Provisioned {
            stream,
            cursors,
            groups,
            revocations,
            reads,
        })
    }

    /// Raises `into` from the revocations bucket until `stop`: every stored value first, then
    /// each change (made by any gateway); re-watches after a failure.
    pub async fn run_revocation_watch(
        self: Arc<Self>,
        into: Arc<crate::auth::Revocations>,
        stop: CancellationToken,
    ) {
        let (this, into) = (&self, &into);
        keep_watching("revocation watch", &stop, || async move {
            this.connected()?;
            let mut watch = this.revocations.watch_with_history(">").await?;
            while let Some(e) = watch.next().await {
                let e = e?;
                if e.operation != kv::Operation::Put {
                    continue;
                }
                match revoked_before(&e.value) {
                    Some(before) => into.raise(&e.key, before),
                    None => {
                        tracing::warn!(key = e.key, "ignoring a revocation that does not parse")
                    }
                }
            }
            anyhow::bail!("revocation watch ended")
        })
        .await
    }

    /// Tells `fanout` of every rise of a read position, made by any gateway, until `stop`;
    /// after a failure it watches again from the revision after the last one seen, so no
    /// rise is missed.
    pub async fn run_read_watch(self: Arc<Self>, fanout: Arc<dyn Fanout>, stop: CancellationToken) {
        let next = AtomicU64::new(0);
        let (this, fanout, next) = (&self, &fanout, &next);
        keep_watching("read watch", &stop, || async move {
            this.connected()?;
            if next.load(Ordering::Relaxed) == 0 {
                // From the bucket's end at the first watch, so a watch made again after
                // an early failure still starts where the first one would have.
                let mut bucket = this.js.get_stream(format!("KV_{}", this.names.reads)).await?;
                let last = bucket.info().await?.state.last_sequence;
                next.store(last + 1, Ordering::Relaxed);
            }
            let from = next.load(Ordering::Relaxed);
            let mut watch = this.reads.watch_all_from_revision(from).await?;
            while let Some(e) = watch.next().await {
                let e = e?;
                next.store(e.revision + 1, Ordering::Relaxed);
                if e.operation != kv::Operation::Put {
                    continue;
                }
                match serde_json::from_slice::<ReadValue>(&e.value) {
                    Ok(v) => {
                        let except = if v.gw == this.instance { v.conn } else { 0 };
                        fanout.read(&e.key, v.seq, except);
                    }
                    Err(err) => {
                        tracing::warn!(key = e.key, error = %err, "ignoring a read position that does not parse")
                    }
                }
            }
            anyhow::bail!("read watch ended")
        })
        .await
    }

    /// Keeps the group cache current from the groups bucket until `stop`; re-watches after a
    /// failure (a watch starts with every current value).
    pub async fn run_group_watch(
        self: Arc<Self>,
        ready: tokio::sync::oneshot::Sender<()>,
        stop: CancellationToken,
    ) {
        let ready = std::sync::Mutex::new(Some(ready));
        keep_watching("group watch", &stop, || self.watch_groups_once(&ready)).await
    }

    async fn watch_groups_once(
        &self,
        ready: &std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    ) -> anyhow::Result<()> {
        self.connected()?;
        // Everything there is now, then every change.
        let mut current = std::collections::HashMap::new();
        let mut keys = self.groups.keys().await?;
        while let Some(k) = keys.next().await {
            let k = k?;
            if let Some(v) = self.groups.get(&k).await? {
                if let Ok(g) = rmp_serde::from_slice::<Group>(&v) {
                    current.insert(k, g);
                }
            }
        }
        // Last value of every key, then every change: anything changed after the listing
        // above arrives here too.
        let mut watch = self.groups.watch_with_history(">").await?;
        self.group_cache.retain(|k, _| current.contains_key(k));
        for (k, g) in current {
            self.group_cache.insert(k, g);
        }
        let first = ready.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(r) = first {
            let _ = r.send(());
        }
        while let Some(e) = watch.next().await {
            let e = e?;
            match e.operation {
                kv::Operation::Put => match rmp_serde::from_slice::<Group>(&e.value) {
                    Ok(g) => {
                        self.group_cache.insert(e.key, g);
                    }
                    Err(err) => {
                        tracing::warn!(key = e.key, error = %err, "ignoring a group that does not decode")
                    }
                },
                kv::Operation::Delete | kv::Operation::Purge => {
                    self.group_cache.remove(&e.key);
                }
            }
        }
        anyhow::bail!("group watch ended")
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Whether the NATS connection is up right now.
    pub fn connected_now(&self) -> bool {
        self.connected().is_ok()
    }

    fn connected(&self) -> Result<(), StoreError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            s => Err(StoreError::Unavailable(format!(
                "NATS is not connected ({s})"
            ))),
        }
    }

    /// The stream's last seq now: where a new gateway's tail starts.
    pub async fn stream_last_seq(&self) -> Result<u64, StoreError> {
        self.connected()?;
        let mut s = self.stream.clone();
        Ok(s.info().await.map_err(unavailable)?.state.last_sequence)
    }

    /// Follows the stream after `after` until `stop`, handing each copy to `fanout`.
    pub async fn run_tail(
        self: Arc<Self>,
        fanout: Arc<dyn Fanout>,
        after: u64,
        stop: CancellationToken,
    ) {
        let mut last = after;
        if let Some(recent) = &self.recent {
            recent.restart_at(after);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let r = tokio::select! {
                r = self.tail_once(&*fanout, &mut last) => r,
                _ = stop.cancelled() => return,
            };
            if let Err(e) = r {
                self.tail_stats.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, last, "tail interrupted; recreating it after the last seq seen");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(TAIL_MAX_BACKOFF);
        }
    }

    /// Follows the live copies the stream republishes, from `last` on. It subscribes before
    /// it catches up with what the stream stored since `last`, so no copy falls between the
    /// two; a copy whose `Nats-Sequence` is not the next one means copies were missed on the
    /// way (republish is at most once), and they are read back from the stream before it is
    /// handed over, so the order holds. So is everything stored while the connection was
    /// down or the subscription overflowed ([`NatsStore::resync`]), and a subscription quiet
    /// for [`POSITION_CHECK`] makes the tail ask the stream whether it missed the last
    /// copies, which no later copy would reveal.
    async fn tail_once(&self, fanout: &dyn Fanout, last: &mut u64) -> anyhow::Result<()> {
        self.connected()?;
        let mut stream = self.stream.clone();
        if self.adopt_new_epoch().await? {
            *last = 0;
            self.tail_last.store(0, Ordering::Relaxed);
            if let Some(recent) = &self.recent {
                recent.restart_at(0);
            }
        }
        self.tail_last.fetch_max(*last, Ordering::Relaxed);
        let mut live = self.client.subscribe(self.names.live_all()).await?;
        let end = self.stream_last_seq().await?;
        self.catch_up(fanout, last, end).await?;
        tracing::debug!(after = *last, "tail following the live copies");
        let mut seen: u64 = 0;
        // When the tail last handed a copy over (or checked the stream): copies it skips as
        // already seen do not count, so a stream recreated under it is noticed too.
        let mut progress = tokio::time::Instant::now();
        // One timer for the whole loop, not one per copy: it fires every POSITION_CHECK,
        // and the check runs when nothing was handed over for that long.
        let mut check = std::pin::pin!(tokio::time::sleep(POSITION_CHECK));
        loop {
            let m = tokio::select! {
                biased;
                () = self.resync.notified() => {
                    let end = tokio::time::timeout(CHECK_TIMEOUT, self.stream_last_seq()).await??;
                    self.catch_up(fanout, last, end).await?;
                    continue;
                }
                m = live.next() => m.ok_or_else(|| anyhow::anyhow!("live subscription ended"))?,
                () = &mut check => {
                    check.as_mut().reset(tokio::time::Instant::now() + POSITION_CHECK);
                    if progress.elapsed() < POSITION_CHECK {
                        continue;
                    }
                    progress = tokio::time::Instant::now();
                    self.connected()?;
                    // A request sent just before the connection turned out dead is lost:
                    // give up on it soon and start the tail over.
                    let info = tokio::time::timeout(CHECK_TIMEOUT, stream.info()).await??;
                    if epoch_of(info) != self.epoch() {
                        anyhow::bail!("the stream was recreated");
                    }
                    let end = info.state.last_sequence;
                    if end > *last {
                        self.tail_stats.live_gaps.fetch_add(1, Ordering::Relaxed);
                        self.catch_up(fanout, last, end).await?;
                    }
                    continue;
                }
            };
            let Some(seq) = header_u64(&m, async_nats::header::NATS_SEQUENCE) else {
                continue;
            };
            if seq <= *last {
                continue;
            }
            seen += 1;
            if self.drop_live_every > 0 && seen.is_multiple_of(self.drop_live_every) {
                continue;
            }
            if seq > *last + 1 {
                self.tail_stats.live_gaps.fetch_add(1, Ordering::Relaxed);
                self.catch_up(fanout, last, seq - 1).await?;
                if seq <= *last {
                    continue;
                }
            }
            self.hand_over(fanout, &m.subject, seq, || live_time(&m), &m.payload);
            *last = seq;
            self.tail_last.store(seq, Ordering::Relaxed);
            progress = tokio::time::Instant::now();
        }
    }

    /// Whether the stream was deleted and created again since this gateway last looked
    /// (one stream info). A new stream starts its seqs over: its creation time becomes the
    /// epoch, so resumes from the old one become resets, and the old epoch's cursors are
    /// purged. The caller follows the new stream from its start.
    async fn adopt_new_epoch(&self) -> anyhow::Result<bool> {
        let mut stream = self.stream.clone();
        let epoch = epoch_of(stream.info().await?);
        if epoch == self.epoch() {
            return Ok(false);
        }
        tracing::warn!(old = %self.epoch(), new = %epoch, "the stream was recreated: new epoch, following it from its start");
        *self.epoch.write().unwrap_or_else(|p| p.into_inner()) = epoch;
        // Cursors and read positions are seqs of the old stream: one above the new
        // stream's seqs would never move (both only rise). Every gateway that sees the
        // change purges; purging twice is harmless.
        for kv in [
            self.names.cursors_stream(),
            format!("KV_{}", self.names.reads),
        ] {
            let purged = async {
                let s = self.js.get_stream(&kv).await.map_err(|e| e.to_string())?;
                s.purge().await.map_err(|e| e.to_string())
            };
            if let Err(e) = purged.await {
                tracing::warn!(error = %e, stream = kv, "purging the old epoch's seqs failed");
            }
        }
        Ok(true)
    }

    /// Hands copy `seq`, received on `subject`, over ([`hand_over`]).
    fn hand_over(
        &self,
        fanout: &dyn Fanout,
        subject: &str,
        seq: u64,
        published: impl FnOnce() -> u64,
        payload: &[u8],
    ) {
        let tail = Tail {
            names: &self.names,
            recent: self.recent.as_ref(),
            stats: &self.tail_stats,
        };
        hand_over(&tail, fanout, subject, seq, published, payload);
    }

    /// Reads the stream after `last` up to `end` with a consumer of its own (served by the
    /// stream's leader, which has every stored copy) and hands each copy over in order.
    async fn catch_up(&self, fanout: &dyn Fanout, last: &mut u64, end: u64) -> anyhow::Result<()> {
        if end <= *last {
            return Ok(());
        }
        self.tail_stats.catch_ups.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            after = *last,
            end,
            "tail reading missed copies from the stream"
        );
        let consumer = self
            .stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: *last + 1,
                },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: CONSUMER_INACTIVE,
                memory_storage: true,
                ..Default::default()
            })
            .await?;
        let name = consumer.cached_info().name.clone();
        let read = async {
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(self.tail_batch)
                .max_bytes_per_batch(CATCH_UP_BYTES)
                .heartbeat(TAIL_HEARTBEAT)
                .messages()
                .await?;
            while *last < end {
                let Ok(next) = tokio::time::timeout(CATCH_UP_IDLE, messages.next()).await else {
                    // Nothing more to read: what is left up to `end` was removed meanwhile.
                    let now = self.stream_first_and_last().await?;
                    if now.1 <= *last || now.0 > end {
                        break;
                    }
                    continue;
                };
                let m = next.ok_or_else(|| anyhow::anyhow!("catch-up stream ended"))??;
                let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                let seq = info.stream_sequence;
                if seq <= *last {
                    continue;
                }
                let published = unix_ms(info.published);
                self.hand_over(fanout, &m.subject, seq, || published, &m.payload);
                *last = seq;
                self.tail_last.store(seq, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        };
        let r = read.await;
        let _ = self.stream.delete_consumer(&name).await;
        r
    }

    /// The stream's first and last seq now.
    async fn stream_first_and_last(&self) -> Result<(u64, u64), StoreError> {
        self.connected()?;
        let mut s = self.stream.clone();
        let state = s.info().await.map_err(unavailable)?.state.clone();
        Ok((state.first_sequence, state.last_sequence))
    }

    /// The acceptance time stored with message `seq` (for answering a duplicate send).
    async fn stored_ts(&self, seq: u64) -> Result<u64, StoreError> {
        let raw = self
            .stream
            .get_raw_message(seq)
            .await
            .map_err(unavailable)?;
        decode_payload(&raw.payload, seq, unix_ms(raw.time))
            .map(|m| m.ts)
            .ok_or_else(|| StoreError::Internal(format!("stored message {seq} does not decode")))
    }
}

#[async_trait]
impl Store for NatsStore {
    async fn append(&self, draft: Draft, inboxes: &[String]) -> Result<Appended, StoreError> {
        self.connected()?;
        // Every copy carries the same payload: the message without its seq or inbox.
        let payload = written(|b| {
            rmp_serde::encode::write_named(
                b,
                &PayloadOut {
                    id: &draft.id,
                    from: &draft.from,
                    to: draft.to.as_deref(),
                    group: draft.group.as_deref(),
                    ts: draft.ts,
                    body: &draft.body,
                },
            )
        })
        .map_err(|e| StoreError::Internal(e.to_string()))?;
        let copies = inboxes
            .iter()
            .map(|uid| Copy {
                subject: self.names.user_subject(uid).into(),
                msg_id: format!("{}:{}:{uid}", draft.from, draft.id),
            })
            .collect();
        let c = self.publisher.commit(copies, Bytes::from(payload)).await?;
        let ts = match c.seqs.last() {
            Some(&last) if c.duplicate => self.stored_ts(last).await?,
            _ => draft.ts,
        };
        Ok(Appended { seqs: c.seqs, ts })
    }

    async fn read(&self, uid: &str, after: u64, limit: usize) -> Result<Page, StoreError> {
        // Everything after `after` that the tail has seen is cached; what it has not seen
        // yet reaches a registered connection through the tail.
        let cached = self
            .recent
            .as_ref()
            .and_then(|recent| recent.read(uid, after, limit.clamp(1, MAX_DIRECT_BATCH)));
        if let Some(page) = cached {
            self.tail_stats.backlog_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(page);
        }
        self.connected()?;
        // One batch direct get for the inbox's subject and one plain direct get for the
        // stream's first message (retention), both at once. Direct gets create no consumer
        // and are no JetStream API request. The first message is asked without a batch: a
        // batch answer counts what is pending after it, which for a filter of the whole
        // stream walks every subject in nats-server (W7 measured it).
        let limit = limit.clamp(1, MAX_DIRECT_BATCH);
        let first = async {
            match self
                .stream
                .direct_get_next_for_subject(self.names.everything(), Some(1))
                .await
            {
                Ok(m) => Ok(Some(m.sequence)),
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        };
        let (batch, first) = futures::try_join!(
            self.direct_batch(self.names.user_subject(uid), after, limit),
            first,
        )?;
        // An empty stream kept nothing up to where it ends (in broadcast mode the tail's
        // position; in interest mode the tail has none, so the stream is asked).
        let stream_first = match first {
            Some(first) => first,
            None if self.interest.is_some() => self.stream_last_seq().await? + 1,
            None => self.tail_last.load(Ordering::Relaxed) + 1,
        };
        Ok(batch.page(after, stream_first, self.max_inbox))
    }

    async fn follow(&self, uid: &str) -> Result<Following, StoreError> {
        match &self.interest {
            Some(interest) => self.follow_interest(interest, uid).await,
            None => Ok(Following::always()),
        }
    }

    async fn inbox_newest(&self, uid: &str) -> Result<u64, StoreError> {
        self.inbox_last(uid).await
    }

    async fn acked_by_any_device(&self, uid: &str) -> Result<u64, StoreError> {
        use jetstream_extra::batch_fetch::{BatchFetchErrorKind, BatchFetchExt};
        self.connected()?;
        // The last value of every `<uid>.<device>` key: one multi-last batch direct get.
        let keys = format!("$KV.{}.{uid}.*", self.names.cursors);
        let mut replies = self
            .js
            .get_last_messages_for(&self.names.cursors_stream())
            .subjects(vec![keys])
            .batch(MAX_DIRECT_BATCH)
            .send()
            .await
            .map_err(unavailable)?;
        let mut max = 0;
        while let Some(m) = replies.next().await {
            match m {
                Ok(m) => {
                    let seq = std::str::from_utf8(&m.payload)
                        .ok()
                        .and_then(|v| v.parse().ok());
                    max = max.max(seq.unwrap_or(0));
                }
                Err(e) if e.kind() == BatchFetchErrorKind::NoMessages => break,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(max)
    }

    async fn live_tail(&self, uid: &str) -> Result<u64, StoreError> {
        let Some(interest) = &self.interest else {
            // Everything after the tail's position reaches this gateway's connections
            // through the tail, so it is a live tail for every inbox at once, with no
            // request.
            return Ok(self.tail_last.load(Ordering::Relaxed));
        };
        // A followed inbox: everything after what the tail handed over arrives through
        // it. Otherwise the inbox's newest copy, from the stream.
        match interest.delivered(uid) {
            Some(seq) => Ok(seq),
            None => self.inbox_last(uid).await,
        }
    }

    fn epoch(&self) -> Arc<str> {
        self.epoch.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn high_seq(&self) -> Result<u64, StoreError> {
        // The tail may lag the stream by a moment: ask the stream itself (one API request,
        // only for a resume above what the tail has seen).
        self.stream_last_seq().await
    }

    async fn history(&self, uid: &str, page: Older) -> Result<History, StoreError> {
        let Older { before, limit } = page;
        use jetstream_extra::batch_fetch::{BatchFetchErrorKind, BatchFetchExt};
        self.connected()?;
        // One multi-last direct get per message, each for the newest copy below the last:
        // JetStream reads a subject forwards only, and a page is at most 500.
        let subject = self.names.user_subject(uid);
        let mut below = before;
        let mut messages: Vec<Arc<Message>> = Vec::with_capacity(limit.min(256));
        let mut next = None;
        while below != Some(1) {
            let last = self.js.get_last_messages_for(&self.names.stream);
            let last = last.subjects(vec![subject.clone()]);
            // A bound past the stream's end finds nothing: without one, the newest.
            let sent = match below {
                Some(b) => last.up_to_seq(b - 1).send().await,
                None => last.send().await,
            };
            let mut replies = sent.map_err(unavailable)?;
            let m = match replies.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) if e.kind() == BatchFetchErrorKind::NoMessages => break,
                Some(Err(e)) => return Err(unavailable(e)),
                None => break,
            };
            below = Some(m.sequence);
            if messages.len() == limit {
                next = messages.last().map(|m| m.seq);
                break;
            }
            if let Some(msg) = decode_payload(&m.payload, m.sequence, unix_ms(m.time)) {
                messages.push(Arc::new(msg));
            }
        }
        Ok(History { messages, next })
    }

    async fn cursor(&self, uid: &str, device: &str) -> Result<Option<u64>, StoreError> {
        self.connected()?;
        let v = self
            .cursors
            .get(format!("{uid}.{device}"))
            .await
            .map_err(unavailable)?;
        Ok(v.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok()))
    }

    async fn save_cursors(&self, cursors: &mut [CursorWrite]) -> Result<(), StoreError> {
        self.connected()?;
        try_join_all(cursors.iter_mut().map(|w| {
            let key = format!("{}.{}", w.uid, w.device);
            self.raise_cursor(key, w.seq, &mut w.version)
        }))
        .await?;
        Ok(())
    }

    async fn ready(&self) -> bool {
        self.connected().is_ok()
    }

    async fn read_position(&self, uid: &str) -> Result<u64, StoreError> {
        self.connected()?;
        let v = self.reads.get(uid).await.map_err(unavailable)?;
        Ok(v.as_deref().map_or(0, read_seq))
    }

    async fn set_read(&self, uid: &str, seq: u64, by: u64) -> Result<u64, StoreError> {
        self.connected()?;
        let value = ReadValue {
            seq,
            gw: self.instance.clone(),
            conn: by,
        };
        let value = Bytes::from(
            serde_json::to_vec(&value).map_err(|e| StoreError::Internal(e.to_string()))?,
        );
        // Compare-and-set, so two devices reading at once never lower it.
        for _ in 0..5 {
            let entry = self.reads.entry(uid).await.map_err(unavailable)?;
            let written = match entry.filter(|e| e.operation == kv::Operation::Put) {
                Some(e) => {
                    let stored = read_seq(&e.value);
                    if stored >= seq {
                        return Ok(stored);
                    }
                    self.reads
                        .update(uid, value.clone(), e.revision)
                        .await
                        .is_ok()
                }
                None => self.reads.create(uid, value.clone()).await.is_ok(),
            };
            if written {
                return Ok(seq);
            }
        }
        Err(StoreError::Unavailable(format!(
            "the read position of {uid} kept changing under us"
        )))
    }

    async fn revoke(&self, uid: &str, before: u64) -> Result<(), StoreError> {
        self.connected()?;
        // Compare-and-set, so two admins revoking at once never lower the stored time.
        for _ in 0..5 {
            let entry = self.revocations.entry(uid).await.map_err(unavailable)?;
            let value = Bytes::from(before.to_string());
            let written = match entry.filter(|e| e.operation == kv::Operation::Put) {
                Some(e) => {
                    if revoked_before(&e.value).is_some_and(|stored| stored >= before) {
                        return Ok(());
                    }
                    self.revocations
                        .update(uid, value, e.revision)
                        .await
                        .is_ok()
                }
                None => self.revocations.create(uid, value).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(format!(
            "the revocation of {uid} kept changing under us"
        )))
    }

    async fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.connected()?;
        let mut all = Vec::new();
        let mut keys = self.revocations.keys().await.map_err(unavailable)?;
        while let Some(k) = keys.next().await {
            let k = k.map_err(unavailable)?;
            let v = self.revocations.get(&k).await.map_err(unavailable)?;
            if let Some(before) = v.as_deref().and_then(revoked_before) {
                all.push((k, before));
            }
        }
        Ok(all)
    }

    fn tail_stats(&self) -> Option<&TailStats> {
        Some(&self.tail_stats)
    }

    async fn create_group(&self, id: &str, group: &Group) -> Result<bool, StoreError> {
        self.connected()?;
        let value =
            rmp_serde::to_vec_named(group).map_err(|e| StoreError::Internal(e.to_string()))?;
        match self.groups.create(id, value.into()).await {
            Ok(_) => {
                self.group_cache.insert(id.to_owned(), group.clone());
                Ok(true)
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn group(&self, id: &str) -> Result<Option<Group>, StoreError> {
        if let Some(g) = self.group_cache.get(id) {
            return Ok(Some(g.clone()));
        }
        // Not in the cache: possibly created a moment ago on another gateway.
        self.connected()?;
        let v = self.groups.get(id).await.map_err(unavailable)?;
        Ok(v.and_then(|b| rmp_serde::from_slice(&b).ok()))
    }

    async fn change_group(&self, id: &str, change: &GroupChange<'_>) -> Result<Group, ChangeError> {
        self.connected().map_err(ChangeError::Store)?;
        for _ in 0..5 {
            let entry = self
                .groups
                .entry(id)
                .await
                .map_err(|e| ChangeError::Store(unavailable(e)))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                return Err(ChangeError::NotFound);
            };
            let current: Group = rmp_serde::from_slice(&entry.value)
                .map_err(|e| ChangeError::Store(StoreError::Internal(e.to_string())))?;
            let next = change(&current).map_err(ChangeError::Refused)?;
            let value = rmp_serde::to_vec_named(&next)
                .map_err(|e| ChangeError::Store(StoreError::Internal(e.to_string())))?;
            if self
                .groups
                .update(id, value.into(), entry.revision)
                .await
                .is_ok()
            {
                self.group_cache.insert(id.to_owned(), next.clone());
                return Ok(next);
            }
        }
        Err(ChangeError::Store(StoreError::Unavailable(format!(
            "group {id} kept changing under us"
        ))))
    }
}

/// What one batch direct get returned for one subject filter.
#[derive(Debug, Default)]
struct Batch {
    /// In seq order.
    messages: Vec<Arc<Message>>,
    /// Messages of the filter after the asked seq, this batch's included (0 if none).
    total: u64,
    /// The filter has messages after the last one returned.
    more: bool,
    /// The seq of the last message returned, decoded or not (0 if none).
    last: u64,
}

impl Batch {
    /// The inbox page this batch (read after `after`) makes. The gap rule is conservative
    /// (docs/decisions.md, "`gap` in cluster mode is conservative": a gap may be reported
    /// when none of this inbox was dropped, never missed): the stream dropped messages above
    /// `after` by age (its first seq is past `after + 1`), or the inbox holds `--max-inbox`
    /// messages after `after` (an inbox that dropped messages above `after` keeps exactly
    /// `--max-inbox`, all above it).
    fn page(self, after: u64, stream_first: u64, max_inbox: usize) -> Page {
        Page {
            gap: stream_first > after + 1 || self.total >= max_inbox as u64,
            more: self.more,
            messages: self.messages,
        }
    }
}

impl NatsStore {
    /// Up to `limit` messages on `filter` after `after`, with one batch direct get.
    async fn direct_batch(
        &self,
        filter: String,
        after: u64,
        limit: usize,
    ) -> Result<Batch, StoreError> {
        use jetstream_extra::batch_fetch::{BatchFetchErrorKind, BatchFetchExt};
        let mut replies = self
            .js
            .get_batch(&self.names.stream, limit)
            .sequence(after + 1)
            .subject(filter)
            .send()
            .await
            .map_err(unavailable)?;
        let mut batch = Batch::default();
        while let Some(m) = replies.next().await {
            let m = match m {
                Ok(m) => m,
                Err(e) if e.kind() == BatchFetchErrorKind::NoMessages => break,
                Err(e) => return Err(unavailable(e)),
            };
            let pending: u64 = m
                .headers
                .get("Nats-Num-Pending")
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            if batch.total == 0 {
                batch.total = pending + 1;
            }
            batch.more = pending > 0;
            batch.last = m.sequence;
            match decode_payload(&m.payload, m.sequence, unix_ms(m.time)) {
                Some(msg) => batch.messages.push(Arc::new(msg)),
                None => tracing::warn!(
                    seq = m.sequence,
                    "skipping a stored payload that does not decode"
                ),
            }
        }
        Ok(batch)
    }

    /// Sets a cursor key to `seq` unless it already holds more (compare-and-set, retried).
    /// `version` is the key's revision as this gateway last wrote it (0: not known): the
    /// write goes against it without a read, the common case of one gateway acking for a
    /// device, and reads first only when it fails (another writer, or no version). It is
    /// set to the revision written or read.
    async fn raise_cursor(
        &self,
        key: String,
        seq: u64,
        version: &mut u64,
    ) -> Result<(), StoreError> {
        let value = Bytes::from(seq.to_string());
        if *version != 0 {
            if let Ok(rev) = self.cursors.update(&key, value.clone(), *version).await {
                *version = rev;
                return Ok(());
            }
        }
        for _ in 0..5 {
            let entry = self.cursors.entry(key.clone()).await.map_err(unavailable)?;
            let r = match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    let current: u64 = std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    if current >= seq {
                        *version = e.revision;
                        return Ok(());
                    }
                    self.cursors
                        .update(&key, value.clone(), e.revision)
                        .await
                        .map_err(|e| e.to_string())
                }
                _ => self
                    .cursors
                    .create(&key, value.clone())
                    .await
                    .map_err(|e| e.to_string()),
            };
            if let Ok(rev) = r {
                *version = rev;
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(format!(
            "cursor {key} kept changing under us"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> Arc<Message> {
        Arc::new(Message {
            seq,
            id: format!("m{seq}"),
            from: "a".into(),
            to: Some("b".into()),
            group: None,
            ts: 0,
            body: Value::Null.into(),
        })
    }

    fn batch(seqs: &[u64], total: u64, more: bool) -> Batch {
        Batch {
            messages: seqs.iter().copied().map(msg).collect(),
            total,
            more,
            last: seqs.last().copied().unwrap_or(0),
        }
    }

    #[test]
    fn an_inbox_page_says_gap_when_retention_may_have_dropped_something_after_the_resume_point() {
        let page =
            |after, stream_first, total| batch(&[20], total, false).page(after, stream_first, 5);
        // The stream dropped seqs up to 9 by age: a device after 3 missed something.
        assert!(page(3, 10, 1).gap);
        assert!(!page(9, 10, 1).gap);
        // An inbox with --max-inbox (5) messages after the resume point may have dropped
        // older ones after it.
        assert!(page(9, 1, 5).gap);
        assert!(!page(9, 1, 4).gap);
        assert!(batch(&[1, 2], 9, true).page(0, 1, 100).more);
    }

    #[test]
    fn servers_older_than_the_minimum_are_refused_naming_both_versions() {
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("2.14.0").is_ok());
        assert!(check_server_version("2.12.3").is_err());
        assert!(check_server_version("3.0.0-beta.1").is_ok());
        let e = check_server_version("2.11.9").unwrap_err().to_string();
        assert!(e.contains("2.11.9") && e.contains("2.14.0"), "{e}");
        assert!(check_server_version("2.9.10").is_err());
        assert!(check_server_version("").is_err());
        assert!(check_server_version("garbage").is_err());
    }
}
