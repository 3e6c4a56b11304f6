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
//! Files: this one holds the store's API (the [`Store`] methods) and its reads; `setup.rs`
//! connects and lays out the stream and buckets; `tail.rs` is the broadcast tail and
//! `interest.rs` interest mode's; `watch.rs` mirrors the revocation, read-position and
//! group buckets; `publish.rs` publishes sends; `recent.rs` is the backlog cache;
//! `windows.rs` keeps notification windows.
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
mod setup;
mod tail;
mod watch;
mod windows;

use futures::StreamExt;
use imgate_proto::scratch::written;
use imgate_proto::Message;
use publish::{Copy, Publisher};
pub use recent::Recent;
use serde::{Deserialize, Serialize};
use serde_json::Value;
pub use setup::check_server_version;
pub use tail::{hand_over, Tail};
use tokio_util::sync::CancellationToken;
use watch::{read_seq, revoked_before};
pub use windows::{DueWindow, NotifyWindows, Record as WindowRecord, Scheduled, Sending};

use super::{
    Appended, ChangeError, CursorWrite, Draft, Fanout, Following, Group, GroupChange, History,
    Older, Page, Store, StoreError, DEDUPE_WINDOW,
};
use crate::config::{Config, Fanout as FanoutMode};
use crate::metrics::TailStats;
use crate::subjects::Names;

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

fn unix_ms(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

impl NatsStore {
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
        let c = self
            .publisher
            .store_copies(copies, Bytes::from(payload))
            .await?;
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
}
