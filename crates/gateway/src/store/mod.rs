//! The store seam: where inboxes, cursors, read positions and groups live, and how stored
//! messages and read positions reach the delivery registry.
//!
//! [`Store`] is implemented by [`disk::DiskStore`] (standalone mode, the default),
//! [`memory::MemoryStore`] (standalone with `--store memory`, and tests) and
//! [`nats::NatsStore`] (cluster mode, on JetStream). A store calls its [`Fanout`] once per
//! stored inbox copy, in seq order per inbox, after the copy is readable, and once per rise
//! of a user's read position. The standalone stores also keep offline-notification state
//! ([`NotifyState`]). The store is the bottom layer: it imports nothing above it and knows
//! nothing about connections or transports.

pub mod disk;
pub mod memory;
pub mod nats;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use imgate_proto::{ErrorCode, Message};
use serde_json::Value;

use crate::refusal::Refusal;

/// How long a `(from, id)` pair is remembered, so a send repeated within it stores nothing
/// new (JetStream's duplicate window in cluster mode).
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(120);

/// Now, in Unix milliseconds: the clock of acceptance times.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A message accepted from a sender, not yet stored.
#[derive(Debug, Clone)]
pub struct Draft {
    pub id: String,
    pub from: String,
    pub to: Option<String>,
    pub group: Option<String>,
    /// Acceptance time, Unix milliseconds.
    pub ts: u64,
    /// Shared with every inbox copy made from it.
    pub body: Arc<Value>,
}

impl Draft {
    /// The message as stored in `seq`'s inbox copy.
    pub fn to_message(&self, seq: u64) -> Message {
        Message {
            seq,
            id: self.id.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            group: self.group.clone(),
            ts: self.ts,
            body: self.body.clone(),
        }
    }
}

/// The outcome of [`Store::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The seq of each inbox copy, in the order the inboxes were given.
    pub seqs: Vec<u64>,
    /// Acceptance time of the stored message (the original one for a duplicate send).
    pub ts: u64,
}

/// One page of an inbox.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Messages after the asked seq, in seq order.
    pub messages: Vec<Arc<Message>>,
    /// Retention dropped messages between the asked seq and the first one returned.
    pub gap: bool,
    /// More messages follow the last one returned: read again after it. A page can hold
    /// fewer than the limit and still have more behind it.
    pub more: bool,
}

/// Which page of history to read: up to `limit` messages with seq below `before` (from the
/// newest, without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Older {
    pub before: Option<u64>,
    pub limit: usize,
}

/// One page of history: messages below a seq, newest first.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub messages: Vec<Arc<Message>>,
    /// The lowest seq returned, when older retained messages follow: the next `before`.
    pub next: Option<u64>,
}

/// A new random epoch (docs/protocol.md, "Messages, seqs and guarantees"): 16 characters
/// of `[A-Za-z0-9]`.
pub fn new_epoch() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 16)
}

/// A store failure. `Unavailable` promises nothing was stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::new(e.code(), e.to_string())
    }
}

/// A group: its owner and members (the owner is a member).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Group {
    pub owner: String,
    pub members: Vec<String>,
}

/// Why a group change did not happen.
#[derive(Debug, Clone)]
pub enum ChangeError {
    NotFound,
    Refused(Refusal),
    Store(StoreError),
}

/// A membership change, applied to the current group inside the store's compare-and-set.
pub type GroupChange<'a> = dyn Fn(&Group) -> Result<Group, Refusal> + Send + Sync + 'a;

/// One device's cursor to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorWrite {
    pub uid: String,
    pub device: String,
    pub seq: u64,
    /// The store's version of this cursor as this gateway last wrote it (0: not known). A
    /// store with versions writes against it without reading the cursor first; if someone
    /// else wrote meanwhile, it reads and compares as usual.
    pub version: u64,
}

impl CursorWrite {
    /// A write whose stored version is not known.
    pub fn new(uid: &str, device: &str, seq: u64) -> Self {
        CursorWrite {
            uid: uid.to_owned(),
            device: device.to_owned(),
            seq,
            version: 0,
        }
    }
}

/// Receives stored inbox copies for delivery. Implemented by the registry.
pub trait Fanout: Send + Sync + 'static {
    /// One stored copy for inbox `uid`. `build` makes the message; call it only when a local
    /// connection wants it (this is where "filter before decode" happens).
    fn deliver(&self, uid: &str, build: &mut dyn FnMut() -> Option<Message>);

    /// `uid`'s read position rose to `seq`. `except` is this gateway's connection that set
    /// it (0: none here), which is not told.
    fn read(&self, uid: &str, seq: u64, except: u64);
}

/// Keeps a store handing one inbox's stored copies to this gateway's [`Fanout`] for as
/// long as it lives ([`Store::follow`]). Dropping the last one of an inbox lets the store
/// stop.
#[must_use = "the inbox is followed only while this lives"]
pub struct Following(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl Following {
    /// For a store that hands every inbox's copies over anyway.
    pub fn always() -> Self {
        Following(None)
    }

    /// Follows until `guard` is dropped.
    pub fn until_dropped(guard: impl Send + Sync + 'static) -> Self {
        Following(Some(Box::new(guard)))
    }
}

impl std::fmt::Debug for Following {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Following")
    }
}

/// A user's offline-notification state: when the pending window falls due, and the highest
/// seq a notification listed already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NotifyRecord {
    /// Unix milliseconds at which the user's window falls due; 0 when none is pending.
    pub due_ms: u64,
    /// The highest seq an earlier notification listed, or that was found acked or read.
    pub upto: u64,
}

/// Where a standalone store keeps notification state. Each store that keeps messages on
/// this machine implements it; what it keeps must survive a restart exactly when the
/// messages do.
#[async_trait]
pub trait NotifyState: Send + Sync + 'static {
    /// Every user with a record: the pending windows to resume after a start.
    async fn notify_records(&self) -> Result<Vec<(String, NotifyRecord)>, StoreError>;

    /// `uid`'s record (the default one if none was saved).
    async fn notify_record(&self, uid: &str) -> Result<NotifyRecord, StoreError>;

    /// Stores `uid`'s record, once durable.
    async fn save_notify(&self, uid: &str, record: NotifyRecord) -> Result<(), StoreError>;
}

/// Inboxes and cursors. Every method is safe to call concurrently.
///
/// What a caller may not assume of every store (each method's doc says which):
/// - **When the fanout hears of a copy.** A standalone store hands each copy to the
///   [`Fanout`] before `append` returns; in a cluster copies come back from NATS, usually
///   after it returns, and through the same path as copies other gateways stored.
/// - **Which inboxes reach the fanout at all.** Standalone and cluster broadcast: every
///   inbox's copies. Cluster interest: only those of inboxes [`Store::follow`]ed here.
/// - **Where a new device starts** ([`Store::live_tail`]): the inbox's newest seq, or the
///   position of the cluster tail (which serves every inbox).
/// - **Reads from memory.** Groups, and in cluster broadcast recent backlogs, may be
///   answered from this gateway's copy of what NATS holds, which can lag it briefly.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores `draft` in every inbox of `inboxes`, all or nothing from the caller's point of
    /// view: `Ok` only once every copy is durable. A repeat of the same `(from, id)` within
    /// the dedupe window stores nothing and returns the original seqs.
    async fn append(&self, draft: Draft, inboxes: &[String]) -> Result<Appended, StoreError>;

    /// Makes sure every copy stored in `uid`'s inbox from now on reaches the fanout, for as
    /// long as the returned guard lives. A connection calls it after it registers and
    /// before it reads its backlog, so each copy is in the read or in its outbox. Stores
    /// that hand over every inbox's copies anyway (standalone, cluster broadcast) return
    /// at once; cluster interest subscribes to the inbox's live subject and returns once
    /// the subscription is in place.
    async fn follow(&self, _uid: &str) -> Result<Following, StoreError> {
        Ok(Following::always())
    }

    /// Up to `limit` messages of `uid`'s inbox with seq above `after`.
    async fn read(&self, uid: &str, after: u64, limit: usize) -> Result<Page, StoreError>;

    /// The seq of the newest message ever stored in `uid`'s inbox (0 if none), asked of the
    /// store itself.
    async fn inbox_newest(&self, uid: &str) -> Result<u64, StoreError>;

    /// Where a device that names no resume point starts: a seq after which no copy of
    /// `uid`'s inbox can be missed, since every later one reaches this gateway's [`Fanout`]
    /// (once the device's connection follows the inbox) or is in the backlog read after
    /// it. A standalone store answers [`Store::inbox_newest`]; in a cluster it is the
    /// position of what this gateway's tail handed over, which needs no request and may be
    /// below or above the inbox's newest seq.
    async fn live_tail(&self, uid: &str) -> Result<u64, StoreError> {
        self.inbox_newest(uid).await
    }

    /// The highest seq any device of `uid` has acked (its highest stored cursor; 0 if none).
    async fn acked_by_any_device(&self, uid: &str) -> Result<u64, StoreError>;

    /// The store's epoch: fixed when the store was created, new when it is reset.
    fn epoch(&self) -> Arc<str>;

    /// The highest seq the store has ever assigned (0 if none). A resume above it belongs
    /// to a store that was reset or replaced.
    async fn high_seq(&self) -> Result<u64, StoreError>;

    /// One page of `uid`'s inbox, older than [`Older::before`], newest first. Reads only: no cursor moves.
    async fn history(&self, uid: &str, page: Older) -> Result<History, StoreError>;

    /// The stored cursor (last acked seq) of `(uid, device)`.
    async fn cursor(&self, uid: &str, device: &str) -> Result<Option<u64>, StoreError>;

    /// Stores cursors; a cursor never moves backwards. Each write's `version` is updated to
    /// the version the store now holds (a store without versions leaves it).
    async fn save_cursors(&self, cursors: &mut [CursorWrite]) -> Result<(), StoreError>;

    /// `uid`'s read position (0 if never set).
    async fn read_position(&self, uid: &str) -> Result<u64, StoreError>;

    /// Raises `uid`'s read position to `seq` (a lower one changes nothing) and returns the
    /// stored position, once durable. When it rose, the store makes [`Fanout::read`] reach
    /// every gateway: at once here, through the bucket's watch in cluster mode. `by` is the
    /// connection that set it on this gateway (0 over HTTP).
    async fn set_read(&self, uid: &str, seq: u64, by: u64) -> Result<u64, StoreError>;

    /// Whether the store can take writes now (for `/readyz`).
    async fn ready(&self) -> bool;

    /// Creates group `id`; `false` if it exists already.
    async fn create_group(&self, id: &str, group: &Group) -> Result<bool, StoreError>;

    /// Group `id`, if it exists (in cluster mode, from this gateway's watched cache).
    async fn group(&self, id: &str) -> Result<Option<Group>, StoreError>;

    /// Applies `change` to group `id` atomically (retrying on a concurrent change).
    async fn change_group(&self, id: &str, change: &GroupChange<'_>) -> Result<Group, ChangeError>;

    /// Stores that `uid`'s tokens issued at or before `before` (Unix seconds) are revoked;
    /// `Ok` once durable. A stored later time is kept.
    async fn revoke(&self, uid: &str, before: u64) -> Result<(), StoreError>;

    /// Every stored revocation: `(uid, before)`.
    async fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError>;
}
