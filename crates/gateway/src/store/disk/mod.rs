//! The disk store of standalone mode: inboxes, cursors, groups and the dedupe window in an
//! embedded LSM database (fjall) in `--data-dir`, so a restart or a SIGKILL loses nothing.
//!
//! One writer at a time commits message writes, from a queue: sends that arrive while it
//! commits queue up and go into its next batch (group commit): one journal write, and with
//! `--fsync always` one fsync, for many sends. With `--fsync batch` or `never` the writer is
//! the task of a send that finds nobody committing: it commits what is queued, its own send
//! among it, without handing anything to another thread (each such hand-over cost a thread
//! wake-up per send, and another for the answer). With `--fsync always`, whose fsync would
//! stall a runtime thread, the writer thread commits. That thread also syncs `--fsync
//! batch` writes, drops what `--retention` expired, and reopens the database after a
//! failed write. A batch is in the operating system (or on the device) before any of its
//! senders hears `sent`, and its copies reach the [`Fanout`] after that, in seq order.
//! Reads go to the database directly, from any task; they never load an inbox whole, so
//! opening a large store costs nothing per stored message.
//!
//! Files: this one holds the store's API (the [`Store`] and [`NotifyState`] methods), its
//! keys, and the opening of the engine that a start and the writer's reopen share;
//! `open.rs` opens a store and finds lost data; `writer.rs` is the writer and its thread;
//! `seal.rs` is the record that lets a damaged journal be found.
//!
//! Keys (`uid` and ids match `[A-Za-z0-9_-]`, so the `0` byte separates fields):
//! - `inbox`: `uid 0 seq` → the message (msgpack, without its seq),
//! - `sends`: the first seq of a send → the send: `from`, `id`, when it was stored, and
//!   each inbox with its copy's seq. Time-based retention drops sends in this order, and
//!   the dedupe window is read back from its newest end at open,
//! - `inbox_meta`: `uid` → the highest seq retention dropped (a reader below it has a gap),
//! - `cursors`: `uid 0 device` → seq, `groups`: `id` → the group (JSON),
//! - `meta`: `epoch`, and `last_seq`, the highest seq ever assigned.
//!
//! Nothing here knows about connections or transports.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use imgate_proto::scratch::written;
use imgate_proto::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::memory::Keep;
use super::{
    now_ms, Appended, ChangeError, CursorWrite, Draft, Fanout, Group, GroupChange, History,
    NotifyRecord, NotifyState, Older, Page, Store, StoreError, DEDUPE_WINDOW,
};
use crate::config::Fsync;

mod open;
pub mod seal;
mod writer;

use writer::{commit_queued, current, Writer};

/// Journal kept before memtables are flushed.
const MAX_JOURNAL: u64 = 64 * 1024 * 1024;
/// The storage engine's own marker file in a data directory.
const ENGINE_MARKER: &str = "version";

/// How the disk store writes, and what it does with a store that lost data.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub fsync: Fsync,
    /// Serve a store that lost acknowledged messages under a new epoch instead of refusing.
    pub repair: bool,
}

/// Why the data directory cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the data directory {0} is in use by another running gateway (its lock is held); \
         stop that gateway or pass another --data-dir"
    )]
    Locked(PathBuf),
    #[error("the data directory {0} is a file, not a directory; pass a directory with --data-dir")]
    NotADirectory(PathBuf),
    #[error(
        "{0} is not empty and is not an imgate data directory (it has neither {seal} nor the \
         storage engine's files); pass an empty or new directory with --data-dir",
        seal = seal::FILE
    )]
    Foreign(PathBuf),
    #[error("cannot open the data directory {path}: {source}")]
    Open {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the data directory {path} holds a damaged store: {what}. Nothing was served; \
         restore the directory from a backup and start it once with --repair, or move it \
         aside to start an empty store"
    )]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "the data directory {path} is damaged and lost acknowledged messages: {what}. \
         Nothing was served (the storage engine may already have cut the damaged journal \
         short); restore the directory from a backup and start it once with --repair, or \
         start this one once with --repair to serve what is left under a new epoch \
         (resuming devices are told of the gap)"
    )]
    Damaged { path: PathBuf, what: String },
}

/// The database and its keyspaces: replaced whole when the writer reopens the database
/// after a failed write (the storage engine refuses every write after one fails).
struct Engine {
    db: Database,
    ks: Keyspaces,
}

/// The engine in use; `None` while the writer reopens it.
type Slot = Arc<RwLock<Option<Arc<Engine>>>>;

/// The standalone store on disk.
pub struct DiskStore {
    engine: Slot,
    epoch: Arc<str>,
    /// The highest seq assigned, as the writer last committed it.
    high: Arc<AtomicU64>,
    /// Set by any failed write until the writer has the database writing again.
    failed: Arc<AtomicBool>,
    /// Sends waiting for a writer, in the order they came.
    queue: flume::Sender<Append>,
    queued: flume::Receiver<Append>,
    /// Rings the writer thread; disconnected once it stopped.
    thread: flume::Sender<Ring>,
    /// The writer's state: whoever holds it commits the queue.
    state: Arc<Mutex<Writer>>,
    /// Whether a send's own task commits (`--fsync batch` or `never`).
    inline: bool,
    /// Serialises every read-modify-write that is not a send (cursors, groups, read
    /// positions, revocations, notification records: [`DiskStore::small`]); what it
    /// guards is the groups, reloaded by the writer when it reopens the database.
    small_writes: Arc<Mutex<HashMap<String, Group>>>,
    /// Seqs up to this were lost to damage (`--repair`): a read after an older seq says
    /// `gap`, in every inbox, since what was lost cannot be named per inbox.
    lost_upto: u64,
    durability: PersistMode,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Where a rise of a read position is told (stored messages go through the writer's).
    fanout: Arc<dyn Fanout>,
}

#[derive(Clone)]
struct Keyspaces {
    inbox: Keyspace,
    sends: Keyspace,
    inbox_meta: Keyspace,
    cursors: Keyspace,
    groups: Keyspace,
    /// uid -> the revocation time, big-endian Unix seconds.
    revocations: Keyspace,
    /// uid -> the read position, big-endian.
    reads: Keyspace,
    /// uid -> the notification record: due time (Unix ms) and listed-up-to seq, big-endian.
    notify: Keyspace,
    meta: Keyspace,
}

/// What the writer thread is woken for.
enum Ring {
    /// Sends are queued (`--fsync always`), or a `--fsync batch` write waits for its sync.
    Work,
    /// Commit what is queued, fsync, answer, and stop.
    Close(flume::Sender<()>),
}

/// One send handed to the writer.
struct Append {
    draft: Draft,
    inboxes: Vec<String>,
    reply: tokio::sync::oneshot::Sender<Result<Appended, StoreError>>,
}

/// A stored copy, without its seq (the key has it).
#[derive(Serialize)]
struct StoredCopyRef<'a> {
    id: &'a str,
    from: &'a str,
    to: Option<&'a str>,
    group: Option<&'a str>,
    ts: u64,
    body: &'a Value,
}

#[derive(Deserialize)]
struct StoredCopy {
    id: String,
    from: String,
    to: Option<String>,
    group: Option<String>,
    ts: u64,
    body: Value,
}

/// What a remembered send returned, and when (wall clock, ms) it was first stored.
#[derive(Clone)]
struct Remembered {
    at: u64,
    ts: u64,
    seqs: Vec<u64>,
}

/// A stored send, in `sends`.
#[derive(Serialize, Deserialize)]
struct SendRecord {
    /// Wall clock (ms) when it was stored: the dedupe window counts from here.
    at: u64,
    /// Acceptance time: retention counts from here.
    ts: u64,
    from: String,
    id: String,
    /// Each inbox and its copy's seq.
    copies: Vec<(String, u64)>,
}

fn inbox_key(uid: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(uid.len() + 9);
    k.extend_from_slice(uid.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn inbox_prefix(uid: &str) -> Vec<u8> {
    let mut prefix = uid.as_bytes().to_vec();
    prefix.push(0);
    prefix
}

fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn be_u64(v: &[u8]) -> u64 {
    v.get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

fn seq_of_inbox_key(k: &[u8]) -> u64 {
    be_u64(&k[k.len().saturating_sub(8)..])
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("disk store: {e}"))
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("disk store: {e}"))
}

fn decode(key: &[u8], value: &[u8]) -> Result<Message, StoreError> {
    let s: StoredCopy = rmp_serde::from_slice(value).map_err(internal)?;
    Ok(Message {
        seq: seq_of_inbox_key(key),
        id: s.id,
        from: s.from,
        to: s.to,
        group: s.group,
        ts: s.ts,
        body: Arc::new(s.body),
    })
}

/// Opens the database in `path` with its keyspaces.
fn open_engine(path: &Path) -> Result<Engine, OpenError> {
    let corrupt = |e: fjall::Error| OpenError::Corrupt {
        path: path.to_owned(),
        what: e.to_string(),
    };
    // A smaller journal than fjall's default (512 MiB) flushes memtables sooner, which
    // bounds what an open after a crash replays (bench/README.md: store open).
    let open = || {
        Database::builder(path)
            .max_journaling_size(MAX_JOURNAL)
            .open()
    };
    // Some damage trips a debug assertion of the engine's journal decoder (in a release
    // build it is an error or a truncation like any other): a damaged journal either way.
    let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open))
        .unwrap_or_else(|_| {
            Err(fjall::Error::JournalRecovery(
                fjall::JournalRecoveryError::ChecksumMismatch,
            ))
        })
        .map_err(|e| match e {
            fjall::Error::Locked => OpenError::Locked(path.to_owned()),
            fjall::Error::Io(io) => OpenError::Open {
                path: path.to_owned(),
                source: io.into(),
            },
            other => corrupt(other),
        })?;
    let space = |name: &str| {
        db.keyspace(name, KeyspaceCreateOptions::default)
            .map_err(corrupt)
    };
    let ks = Keyspaces {
        inbox: space("inbox")?,
        sends: space("sends")?,
        inbox_meta: space("inbox_meta")?,
        cursors: space("cursors")?,
        groups: space("groups")?,
        revocations: space("revocations")?,
        reads: space("reads")?,
        notify: space("notify")?,
        meta: space("meta")?,
    };
    Ok(Engine { db, ks })
}

/// Every group the database holds.
fn load_groups(ks: &Keyspaces) -> Result<HashMap<String, Group>, String> {
    let mut groups = HashMap::new();
    for item in ks.groups.iter() {
        let (k, v) = item.into_inner().map_err(|e| e.to_string())?;
        let g: Group = serde_json::from_slice(&v).map_err(|e| format!("group record: {e}"))?;
        groups.insert(String::from_utf8_lossy(&k).into_owned(), g);
    }
    Ok(groups)
}

/// The epoch and highest assigned seq the database records.
fn recorded(ks: &Keyspaces) -> Result<(Option<String>, u64), String> {
    let epoch = match ks.meta.get("epoch").map_err(|e| e.to_string())? {
        Some(e) => Some(
            std::str::from_utf8(&e)
                .map_err(|_| "the epoch record is not text".to_owned())?
                .to_owned(),
        ),
        None => None,
    };
    let last = ks
        .meta
        .get("last_seq")
        .map_err(|e| e.to_string())?
        .map_or(0, |v| be_u64(&v));
    Ok((epoch, last))
}

impl DiskStore {
    /// The engine to read or write with; unavailable while the writer reopens it.
    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        current(&self.engine)
            .ok_or_else(|| unavailable("reopening the database after a failed write"))
    }

    fn small(&self) -> MutexGuard<'_, HashMap<String, Group>> {
        lock(&self.small_writes)
    }

    /// Whether a read after `after` must say `gap` whatever the inbox: seqs up to
    /// `lost_upto` were lost to damage.
    fn lost_after(&self, after: u64) -> bool {
        self.lost_upto > after
    }
}

fn lock(groups: &Mutex<HashMap<String, Group>>) -> MutexGuard<'_, HashMap<String, Group>> {
    groups.lock().unwrap_or_else(|p| p.into_inner())
}

impl DiskStore {
    fn dropped_upto(&self, e: &Engine, uid: &str) -> Result<u64, StoreError> {
        Ok(e.ks
            .inbox_meta
            .get(uid)
            .map_err(internal)?
            .map_or(0, |v| be_u64(&v)))
    }

    fn stored_read(&self, uid: &str) -> Result<u64, StoreError> {
        Ok(self
            .engine()?
            .ks
            .reads
            .get(uid.as_bytes())
            .map_err(internal)?
            .map_or(0, |v| be_u64(&v)))
    }

    fn commit_small(
        &self,
        f: impl FnOnce(&Keyspaces, &mut fjall::OwnedWriteBatch),
    ) -> Result<(), StoreError> {
        let e = self.engine()?;
        let mut b = e.db.batch().durability(Some(self.durability));
        f(&e.ks, &mut b);
        b.commit().map_err(|err| {
            self.failed.store(true, Ordering::Release);
            unavailable(err)
        })
    }

    /// Stops the writer after the sends queued so far and forces everything to the device.
    pub fn close(&self) {
        let (done, wait) = flume::bounded(1);
        if self.thread.send(Ring::Close(done)).is_ok() {
            // A writer that died (a panic) after the send leaves the request queued in a
            // channel nobody reads: stop waiting once it is gone.
            loop {
                match wait.recv_timeout(Duration::from_millis(50)) {
                    Err(flume::RecvTimeoutError::Timeout) if !self.thread.is_disconnected() => {}
                    _ => break,
                }
            }
        }
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl Store for DiskStore {
    async fn acked_by_any_device(&self, uid: &str) -> Result<u64, StoreError> {
        let e = self.engine()?;
        let mut max = 0;
        for item in e.ks.cursors.prefix(pair_key(uid, "")) {
            let (_, v) = item.into_inner().map_err(internal)?;
            max = max.max(be_u64(&v));
        }
        Ok(max)
    }

    async fn append(&self, draft: Draft, inboxes: &[String]) -> Result<Appended, StoreError> {
        if self.thread.is_disconnected() {
            return Err(unavailable("the store is closing"));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue
            .send(Append {
                draft,
                inboxes: inboxes.to_vec(),
                reply,
            })
            .map_err(|_| unavailable("the store is closing"))?;
        // A writer thread that stopped meanwhile (the store closing) leaves it to this task.
        if self.inline || self.thread.send(Ring::Work).is_err() {
            commit_queued(&self.state, &self.queued);
        }
        answer
            .await
            .map_err(|_| unavailable("the writer stopped before answering"))?
    }

    async fn read(&self, uid: &str, after: u64, limit: usize) -> Result<Page, StoreError> {
        let from = inbox_key(uid, after.saturating_add(1));
        let to = inbox_key(uid, u64::MAX);
        let mut messages = Vec::with_capacity(limit.min(256));
        let mut more = false;
        let e = self.engine()?;
        for item in e.ks.inbox.range(from..=to) {
            if messages.len() == limit {
                more = true;
                break;
            }
            let (k, v) = item.into_inner().map_err(internal)?;
            messages.push(Arc::new(decode(&k, &v)?));
        }
        Ok(Page {
            messages,
            gap: self.dropped_upto(&e, uid)? > after || self.lost_after(after),
            more,
        })
    }

    async fn inbox_newest(&self, uid: &str) -> Result<u64, StoreError> {
        let from = inbox_key(uid, 0);
        let to = inbox_key(uid, u64::MAX);
        let e = self.engine()?;
        let last = match e.ks.inbox.range(from..=to).next_back() {
            Some(item) => seq_of_inbox_key(&item.key().map_err(internal)?),
            None => 0,
        };
        Ok(last.max(self.dropped_upto(&e, uid)?))
    }

    fn epoch(&self) -> Arc<str> {
        self.epoch.clone()
    }

    async fn high_seq(&self) -> Result<u64, StoreError> {
        Ok(self.high.load(std::sync::atomic::Ordering::Acquire))
    }

    async fn history(&self, uid: &str, page: Older) -> Result<History, StoreError> {
        let Older { before, limit } = page;
        let from = inbox_key(uid, 0);
        let to = inbox_key(uid, before.unwrap_or(u64::MAX));
        let mut messages = Vec::with_capacity(limit.min(256));
        let mut next = None;
        let e = self.engine()?;
        for item in e.ks.inbox.range(from..to).rev() {
            if messages.len() == limit {
                next = messages.last().map(|m: &Arc<Message>| m.seq);
                break;
            }
            let (k, v) = item.into_inner().map_err(internal)?;
            messages.push(Arc::new(decode(&k, &v)?));
        }
        Ok(History { messages, next })
    }

    async fn cursor(&self, uid: &str, device: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .engine()?
            .ks
            .cursors
            .get(pair_key(uid, device))
            .map_err(internal)?
            .map(|v| be_u64(&v)))
    }

    async fn save_cursors(&self, cursors: &mut [CursorWrite]) -> Result<(), StoreError> {
        let _serial = self.small();
        let mut writes = Vec::with_capacity(cursors.len());
        let e = self.engine()?;
        for w in cursors.iter() {
            let key = pair_key(&w.uid, &w.device);
            let stored = e.ks.cursors.get(&key).map_err(internal)?;
            if stored.is_none_or(|v| be_u64(&v) < w.seq) {
                writes.push((key, w.seq));
            }
        }
        if writes.is_empty() {
            return Ok(());
        }
        self.commit_small(|ks, b| {
            for (k, seq) in writes {
                b.insert(&ks.cursors, k, seq.to_be_bytes());
            }
        })
    }

    async fn read_position(&self, uid: &str) -> Result<u64, StoreError> {
        self.stored_read(uid)
    }

    async fn set_read(&self, uid: &str, seq: u64, by: u64) -> Result<u64, StoreError> {
        let _serial = self.small();
        let stored = self.stored_read(uid)?;
        if seq <= stored {
            return Ok(stored);
        }
        self.commit_small(|ks, b| b.insert(&ks.reads, uid.as_bytes(), seq.to_be_bytes()))?;
        // Still serialised, so two rises reach connections in the order they were stored.
        self.fanout.read(uid, seq, by);
        Ok(seq)
    }

    async fn ready(&self) -> bool {
        !self.thread.is_disconnected() && !self.failed.load(Ordering::Acquire)
    }

    async fn create_group(&self, id: &str, group: &Group) -> Result<bool, StoreError> {
        let mut groups = self.small();
        if groups.contains_key(id) {
            return Ok(false);
        }
        let v = serde_json::to_vec(group).map_err(internal)?;
        self.commit_small(|ks, b| b.insert(&ks.groups, id.as_bytes(), v))?;
        groups.insert(id.to_owned(), group.clone());
        Ok(true)
    }

    async fn group(&self, id: &str) -> Result<Option<Group>, StoreError> {
        Ok(self.small().get(id).cloned())
    }

    async fn change_group(&self, id: &str, change: &GroupChange<'_>) -> Result<Group, ChangeError> {
        let mut groups = self.small();
        let current = groups.get(id).ok_or(ChangeError::NotFound)?;
        let next = change(current).map_err(ChangeError::Refused)?;
        let v = serde_json::to_vec(&next).map_err(|e| ChangeError::Store(internal(e)))?;
        self.commit_small(|ks, b| b.insert(&ks.groups, id.as_bytes(), v))
            .map_err(ChangeError::Store)?;
        groups.insert(id.to_owned(), next.clone());
        Ok(next)
    }

    async fn revoke(&self, uid: &str, before: u64) -> Result<(), StoreError> {
        let _serial = self.small();
        let stored = self.engine()?.ks.revocations.get(uid).map_err(internal)?;
        if stored.is_some_and(|v| be_u64(&v) >= before) {
            return Ok(());
        }
        self.commit_small(|ks, b| b.insert(&ks.revocations, uid.as_bytes(), before.to_be_bytes()))
    }

    async fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut all = Vec::new();
        for item in self.engine()?.ks.revocations.iter() {
            let (k, v) = item.into_inner().map_err(internal)?;
            all.push((String::from_utf8_lossy(&k).into_owned(), be_u64(&v)));
        }
        Ok(all)
    }
}

fn notify_record_of(v: &[u8]) -> NotifyRecord {
    NotifyRecord {
        due_ms: be_u64(&v[..8]),
        upto: be_u64(&v[8..]),
    }
}

#[async_trait]
impl NotifyState for DiskStore {
    async fn notify_records(&self) -> Result<Vec<(String, NotifyRecord)>, StoreError> {
        let e = self.engine()?;
        let mut all = Vec::new();
        for item in e.ks.notify.iter() {
            let (k, v) = item.into_inner().map_err(internal)?;
            if v.len() == 16 {
                all.push((
                    String::from_utf8_lossy(&k).into_owned(),
                    notify_record_of(&v),
                ));
            }
        }
        Ok(all)
    }

    async fn notify_record(&self, uid: &str) -> Result<NotifyRecord, StoreError> {
        Ok(self
            .engine()?
            .ks
            .notify
            .get(uid.as_bytes())
            .map_err(internal)?
            .filter(|v| v.len() == 16)
            .map_or_else(NotifyRecord::default, |v| notify_record_of(&v)))
    }

    async fn save_notify(&self, uid: &str, record: NotifyRecord) -> Result<(), StoreError> {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&record.due_ms.to_be_bytes());
        v[8..].copy_from_slice(&record.upto.to_be_bytes());
        let _serial = self.small();
        self.commit_small(|ks, b| b.insert(&ks.notify, uid.as_bytes(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Nobody;
    impl Fanout for Nobody {
        fn read(&self, _: &str, _: u64, _: u64) {}
        fn deliver(&self, _: &str, _: &mut dyn FnMut() -> Option<Message>) {}
    }

    fn open(dir: &Path, max_inbox: usize) -> DiskStore {
        open_for(dir, max_inbox, Duration::from_secs(3600))
    }

    fn open_for(dir: &Path, max_inbox: usize, retention: Duration) -> DiskStore {
        let keep = Keep {
            retention,
            max_inbox,
        };
        DiskStore::open(
            dir,
            keep,
            Options {
                fsync: Fsync::Never,
                repair: false,
            },
            Arc::new(Nobody),
        )
        .unwrap()
    }

    fn draft(id: &str) -> Draft {
        Draft {
            id: id.into(),
            from: "alice".into(),
            to: Some("bob".into()),
            group: None,
            ts: now_ms(),
            body: json!({ "id": id }).into(),
        }
    }

    fn seqs(p: &[Arc<Message>]) -> Vec<u64> {
        p.iter().map(|m| m.seq).collect()
    }

    #[tokio::test]
    async fn a_reopened_store_keeps_seqs_epoch_cursors_groups_revocations_and_the_dedupe_window() {
        let dir = tempfile::tempdir().unwrap();
        let inboxes = ["bob".to_owned(), "alice".to_owned()];
        let (first, epoch) = {
            let s = open(dir.path(), 100);
            let a = s.append(draft("x"), &inboxes).await.unwrap();
            s.save_cursors(&mut [CursorWrite::new("bob", "phone", a.seqs[0])])
                .await
                .unwrap();
            let g = Group {
                owner: "alice".into(),
                members: vec!["alice".into(), "bob".into()],
            };
            assert!(s.create_group("team", &g).await.unwrap());
            s.revoke("mallory", 1_700_000_100).await.unwrap();
            s.revoke("mallory", 1_700_000_000).await.unwrap();
            (a, s.epoch())
        };
        let s = open(dir.path(), 100);
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.high_seq().await.unwrap(), 2);
        assert_eq!(s.append(draft("x"), &inboxes).await.unwrap(), first);
        let next = s.append(draft("y"), &inboxes).await.unwrap();
        assert_eq!(next.seqs, vec![3, 4], "seqs go on from where they were");
        assert_eq!(s.cursor("bob", "phone").await.unwrap(), Some(1));
        assert!(s.group("team").await.unwrap().is_some());
        assert_eq!(
            s.revocations().await.unwrap(),
            vec![("mallory".to_owned(), 1_700_000_100)],
            "kept, and never lowered"
        );
        let bob = s.read("bob", 0, 10).await.unwrap();
        assert_eq!(seqs(&bob.messages), vec![1, 3]);
        assert_eq!(*bob.messages[1].body, json!({"id": "y"}));
        assert!(!bob.gap && !bob.more);
    }

    #[tokio::test]
    async fn max_inbox_drops_the_oldest_and_says_gap_and_history_pages_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 3);
        for i in 0..5 {
            s.append(draft(&i.to_string()), &["bob".to_owned()])
                .await
                .unwrap();
        }
        let page = s.read("bob", 0, 10).await.unwrap();
        assert_eq!(seqs(&page.messages), vec![3, 4, 5]);
        assert!(page.gap);
        assert!(!s.read("bob", 2, 10).await.unwrap().gap);
        let p = s.read("bob", 2, 2).await.unwrap();
        assert_eq!((seqs(&p.messages), p.more), (vec![3, 4], true));
        assert_eq!(s.inbox_newest("bob").await.unwrap(), 5);
        let h = s
            .history(
                "bob",
                Older {
                    before: None,
                    limit: 2,
                },
            )
            .await
            .unwrap();
        assert_eq!((seqs(&h.messages), h.next), (vec![5, 4], Some(4)));
        let h = s
            .history(
                "bob",
                Older {
                    before: Some(4),
                    limit: 2,
                },
            )
            .await
            .unwrap();
        assert_eq!((seqs(&h.messages), h.next), (vec![3], None));
    }

    #[tokio::test]
    async fn retention_drops_every_copy_of_an_expired_send_and_says_gap() {
        let dir = tempfile::tempdir().unwrap();
        let inboxes = ["bob".to_owned(), "alice".to_owned()];
        {
            let s = open_for(dir.path(), 100, Duration::from_millis(50));
            s.append(draft("old"), &inboxes).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
        // Opening sweeps first.
        let s = open_for(dir.path(), 100, Duration::from_millis(50));
        s.append(draft("new"), &inboxes).await.unwrap();
        for uid in ["bob", "alice"] {
            let page = s.read(uid, 0, 10).await.unwrap();
            assert_eq!(page.messages.len(), 1, "{uid}");
            assert_eq!(page.messages[0].id, "new");
            assert!(page.gap, "{uid}");
        }
        assert_eq!(s.high_seq().await.unwrap(), 4);
    }
}

#[cfg(test)]
mod damage_tests {
    use super::*;
    use serde_json::json;

    struct Nobody;
    impl Fanout for Nobody {
        fn read(&self, _: &str, _: u64, _: u64) {}
        fn deliver(&self, _: &str, _: &mut dyn FnMut() -> Option<Message>) {}
    }

    fn open_with(dir: &Path, repair: bool) -> Result<DiskStore, OpenError> {
        let keep = Keep {
            retention: Duration::from_secs(3600),
            max_inbox: 100_000,
        };
        let options = Options {
            fsync: Fsync::Never,
            repair,
        };
        DiskStore::open(dir, keep, options, Arc::new(Nobody))
    }

    fn draft(i: usize) -> Draft {
        Draft {
            id: format!("m{i}"),
            from: "alice".into(),
            to: Some("bob".into()),
            group: None,
            ts: now_ms(),
            body: json!({ "i": i, "pad": "x".repeat(200) }).into(),
        }
    }

    /// A closed store holding `n` sends from alice to bob (2n seqs), and its epoch.
    async fn filled(dir: &Path, n: usize) -> Arc<str> {
        let s = open_with(dir, false).unwrap();
        let inboxes = ["bob".to_owned(), "alice".to_owned()];
        for i in 0..n {
            s.append(draft(i), &inboxes).await.unwrap();
        }
        s.epoch()
    }

    /// The journal files of a data directory, largest first.
    fn journals(dir: &Path) -> Vec<PathBuf> {
        let mut all = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "jnl") {
                    all.push(p);
                }
            }
        }
        all.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).unwrap().len()));
        all
    }

    /// How far the journal's written bytes go (the file is preallocated with zeros).
    fn written(path: &Path) -> u64 {
        let bytes = std::fs::read(path).unwrap();
        bytes
            .iter()
            .rposition(|b| *b != 0)
            .map_or(0, |i| i as u64 + 1)
    }

    /// Cutting the journal in the middle of what it holds, or writing garbage there, is
    /// found at the next open: the start is refused naming the damage, and `--repair`
    /// serves what is left under a new epoch with seqs above every one made known.
    #[tokio::test]
    async fn a_cut_or_scribbled_journal_is_refused_and_repair_starts_a_new_epoch() {
        for damage in ["cut", "garbage", "garbage-early", "garbage-late"] {
            let dir = tempfile::tempdir().unwrap();
            let epoch = filled(dir.path(), 300).await;
            let jnl = journals(dir.path()).remove(0);
            let end = written(&jnl);
            assert!(end > 10_000, "the journal holds the sends ({end} bytes)");
            if damage == "cut" {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&jnl)
                    .unwrap()
                    .set_len(end / 2)
                    .unwrap();
            } else {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(&jnl).unwrap();
                let at = match damage {
                    "garbage-early" => 100,
                    "garbage-late" => end - 500,
                    _ => end / 2,
                };
                f.write_all_at(&[0xA5; 63], at).unwrap();
            }
            let err = open_with(dir.path(), false).err().expect("refused");
            let text = err.to_string();
            assert!(matches!(err, OpenError::Damaged { .. }), "{damage}: {text}");
            assert!(
                text.contains("seqs up to 600 were made known")
                    || text.contains("journal cannot be read back")
                    || text.contains("records are gone"),
                "{text}"
            );
            assert!(text.contains("--repair"), "{text}");
            // Refusing twice is still refusing: the first open's truncation hides nothing.
            assert!(open_with(dir.path(), false).is_err(), "{damage}");

            let s = open_with(dir.path(), true).unwrap();
            assert_ne!(s.epoch(), epoch, "{damage}: a new epoch");
            let left = s.read("bob", 0, 1000).await.unwrap().messages.len();
            assert!(left < 300, "{damage}: {left} left");
            let next = s.append(draft(9999), &["bob".to_owned()]).await.unwrap();
            assert_eq!(next.seqs, vec![601], "{damage}: no seq is made twice");
            let repaired = s.epoch();
            drop(s);
            let s = open_with(dir.path(), false).unwrap();
            assert_eq!(
                s.epoch(),
                repaired,
                "{damage}: a repaired store opens plainly"
            );
            assert_eq!(s.high_seq().await.unwrap(), 601);
        }
    }

    /// An emptied or removed journal, or removed keyspaces, lose the whole store: refused.
    #[tokio::test]
    async fn an_emptied_or_removed_journal_or_keyspaces_are_refused() {
        for damage in ["empty", "remove", "keyspaces"] {
            let dir = tempfile::tempdir().unwrap();
            filled(dir.path(), 50).await;
            let jnl = journals(dir.path()).remove(0);
            match damage {
                "empty" => std::fs::write(&jnl, b"").unwrap(),
                "remove" => std::fs::remove_file(&jnl).unwrap(),
                _ => std::fs::remove_dir_all(dir.path().join("keyspaces")).unwrap(),
            }
            let err = open_with(dir.path(), false).err().expect("refused");
            assert!(
                matches!(err, OpenError::Damaged { .. } | OpenError::Corrupt { .. }),
                "{damage}: {err}"
            );
            assert!(err.to_string().contains("damaged"), "{damage}: {err}");
        }
    }

    /// A closed store and a dropped one (what a SIGKILL leaves: everything is in the
    /// operating system) both open plainly with everything in them.
    #[tokio::test]
    async fn an_undamaged_store_opens_with_everything() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = filled(dir.path(), 100).await;
        let s = open_with(dir.path(), false).unwrap();
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.read("bob", 0, 1000).await.unwrap().messages.len(), 100);
    }

    /// A path that is a file, a directory of something else, and a data directory without
    /// the storage engine's `version` file each get an error saying so.
    #[tokio::test]
    async fn what_is_not_a_data_directory_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = open_with(&file, false).err().unwrap();
        assert!(
            err.to_string().contains("is a file, not a directory"),
            "{err}"
        );

        let foreign = tmp.path().join("photos");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("cat.jpg"), b"meow").unwrap();
        let err = open_with(&foreign, false).err().unwrap();
        assert!(
            err.to_string().contains("is not an imgate data directory"),
            "{err}"
        );
        assert!(foreign.join("cat.jpg").exists() && !foreign.join("version").exists());

        let dir = tmp.path().join("data");
        filled(&dir, 3).await;
        std::fs::remove_file(dir.join(ENGINE_MARKER)).unwrap();
        let err = open_with(&dir, false).err().unwrap();
        assert!(err.to_string().contains("no `version` file"), "{err}");
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    /// Dies at the `n`th copy it is handed: a crash right after a batch was written.
    struct CrashAt(std::sync::atomic::AtomicUsize);
    impl Fanout for CrashAt {
        fn read(&self, _: &str, _: u64, _: u64) {}
        fn deliver(&self, _: &str, _: &mut dyn FnMut() -> Option<Message>) {
            if self.0.fetch_sub(1, Ordering::SeqCst) == 1 {
                panic!("crash after the write");
            }
        }
    }

    /// The trim to `--max-inbox` is in the same write as the copies that cause it: a crash
    /// right after that write leaves no inbox above the limit.
    #[tokio::test]
    async fn a_crash_after_a_write_leaves_no_inbox_above_max_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let keep = Keep {
            retention: Duration::from_secs(3600),
            max_inbox: 3,
        };
        let options = Options {
            fsync: Fsync::Never,
            repair: false,
        };
        {
            let crash = Arc::new(CrashAt(4.into()));
            let s = DiskStore::open(dir.path(), keep, options, crash).unwrap();
            let bob = ["bob".to_owned()];
            for i in 0..4 {
                // The send's own task commits, so the crash is this task's.
                let append = std::panic::AssertUnwindSafe(s.append(draft(i), &bob));
                let _ = futures::FutureExt::catch_unwind(append).await;
            }
        }
        let s = DiskStore::open(dir.path(), keep, options, Arc::new(Nobody)).unwrap();
        let page = s.read("bob", 0, 100).await.unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        assert!(page.gap);
    }

    /// A removed seal is damage (the database records that it had one); `--repair` gives
    /// the store a new epoch and a new seal, and every read from before it says `gap`.
    #[tokio::test]
    async fn a_removed_seal_is_damage_and_repair_says_gap_to_every_reader() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = filled(dir.path(), 5).await;
        std::fs::remove_file(dir.path().join(seal::FILE)).unwrap();
        let err = open_with(dir.path(), false).err().expect("refused");
        assert!(err.to_string().contains("imgate.seal is gone"), "{err}");
        let s = open_with(dir.path(), true).unwrap();
        assert_ne!(s.epoch(), epoch);
        let page = s.read("bob", 3, 10).await.unwrap();
        assert_eq!(
            page.messages.len(),
            3,
            "everything is still there (seqs 5, 7, 9)"
        );
        assert!(
            page.gap,
            "but a reader from before the repair is told of a gap"
        );
        assert!(!s.read("bob", 10, 10).await.unwrap().gap);
        let repaired = s.epoch();
        drop(s);
        let rec = seal::read(dir.path()).unwrap().unwrap();
        assert_eq!((rec.epoch.as_str(), rec.seq), (&*repaired, 10));
        let s = open_with(dir.path(), false).unwrap();
        assert_eq!(s.epoch(), repaired);
        assert!(s.read("bob", 3, 10).await.unwrap().gap, "the gap is kept");
    }
}
