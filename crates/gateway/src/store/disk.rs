//! The disk store of standalone mode: inboxes, cursors, groups and the dedupe window in an
//! embedded LSM database (fjall) in `--data-dir`, so a restart or a SIGKILL loses nothing.
//!
//! One writer thread owns every message write. Sends that arrive while it commits queue up
//! and go into its next batch (group commit): one journal write, and with `--fsync always`
//! one fsync, for many sends. A batch is in the operating system (or on the device) before
//! any of its senders hears `sent`, and its copies reach the [`Fanout`] after that, in seq
//! order. Reads go to the database directly, from any task; they never load an inbox whole,
//! so opening a large store costs nothing per stored message.
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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use imgate_proto::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::memory::Limits;
use super::{
    now_ms, Appended, ChangeError, CursorWrite, Draft, Fanout, Group, GroupChange, History, Older,
    Page, Store, StoreError, DEDUPE_WINDOW,
};
use crate::config::Fsync;

/// Journal kept before memtables are flushed.
const MAX_JOURNAL: u64 = 64 * 1024 * 1024;
/// Most sends one group commit takes.
const MAX_BATCH: usize = 1024;
/// How often the writer drops messages older than `--retention`.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// With `--fsync batch`, the longest a written batch waits for its fsync.
const FSYNC_BATCH_DELAY: Duration = Duration::from_millis(200);

/// Why the data directory cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the data directory {0} is in use by another running gateway (its lock is held); \
         stop that gateway or pass another --data-dir"
    )]
    Locked(PathBuf),
    #[error("cannot open the data directory {path}: {source}")]
    Open {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the data directory {path} holds a damaged store: {what}")]
    Corrupt { path: PathBuf, what: String },
}

/// The standalone store on disk.
pub struct DiskStore {
    db: Database,
    ks: Keyspaces,
    epoch: Arc<str>,
    /// The highest seq assigned, as the writer last committed it.
    high: Arc<std::sync::atomic::AtomicU64>,
    writes: flume::Sender<Op>,
    /// Serialises read-modify-write of cursors and groups.
    small_writes: Mutex<HashMap<String, Group>>,
    durability: PersistMode,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
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
    meta: Keyspace,
}

/// What the writer is asked to do.
enum Op {
    Append(Append),
    /// Commit what came before, fsync, answer, and stop.
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
struct StoredRef<'a> {
    id: &'a str,
    from: &'a str,
    to: Option<&'a str>,
    group: Option<&'a str>,
    ts: u64,
    body: &'a Value,
}

#[derive(Deserialize)]
struct Stored {
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
    let s: Stored = rmp_serde::from_slice(value).map_err(internal)?;
    Ok(Message {
        seq: seq_of_inbox_key(key),
        id: s.id,
        from: s.from,
        to: s.to,
        group: s.group,
        ts: s.ts,
        body: s.body,
    })
}

impl DiskStore {
    /// Opens (or creates) the store in `path`. Nothing stored is read but the dedupe window,
    /// the groups and two counters.
    pub fn open(
        path: &Path,
        limits: Limits,
        fsync: Fsync,
        fanout: Arc<dyn Fanout>,
    ) -> Result<DiskStore, OpenError> {
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| OpenError::Open {
            path: path.to_owned(),
            source: e,
        };
        std::fs::create_dir_all(path).map_err(|e| open_err(e.into()))?;
        // fjall creates a missing directory's files lazily; ask for write access up front so
        // a read-only directory fails here, not at the first send.
        let probe = path.join(".imgate-write-check");
        std::fs::write(&probe, b"").map_err(|e| open_err(e.into()))?;
        let _ = std::fs::remove_file(&probe);
        // A smaller journal than fjall's default (512 MiB) flushes memtables sooner, which
        // bounds what an open after a crash replays (bench/README.md: store open).
        let db = Database::builder(path)
            .max_journaling_size(MAX_JOURNAL)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => OpenError::Locked(path.to_owned()),
                fjall::Error::Io(io) => open_err(io.into()),
                other => OpenError::Corrupt {
                    path: path.to_owned(),
                    what: other.to_string(),
                },
            })?;
        let corrupt = |e: fjall::Error| OpenError::Corrupt {
            path: path.to_owned(),
            what: e.to_string(),
        };
        let space = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        let ks = Keyspaces {
            inbox: space("inbox").map_err(corrupt)?,
            sends: space("sends").map_err(corrupt)?,
            inbox_meta: space("inbox_meta").map_err(corrupt)?,
            cursors: space("cursors").map_err(corrupt)?,
            groups: space("groups").map_err(corrupt)?,
            revocations: space("revocations").map_err(corrupt)?,
            meta: space("meta").map_err(corrupt)?,
        };
        let durability = match fsync {
            Fsync::Always => PersistMode::SyncData,
            Fsync::Batch | Fsync::Never => PersistMode::Buffer,
        };
        let epoch: Arc<str> = match ks.meta.get("epoch").map_err(corrupt)? {
            Some(e) => std::str::from_utf8(&e)
                .map_err(|_| OpenError::Corrupt {
                    path: path.to_owned(),
                    what: "the epoch is not text".into(),
                })?
                .into(),
            None => {
                let e = super::new_epoch();
                ks.meta.insert("epoch", e.as_bytes()).map_err(corrupt)?;
                db.persist(PersistMode::SyncAll).map_err(corrupt)?;
                e.into()
            }
        };
        let last_seq = ks
            .meta
            .get("last_seq")
            .map_err(corrupt)?
            .map_or(0, |v| be_u64(&v));
        let mut groups = HashMap::new();
        for item in ks.groups.iter() {
            let (k, v) = item.into_inner().map_err(corrupt)?;
            let g: Group = serde_json::from_slice(&v).map_err(|e| OpenError::Corrupt {
                path: path.to_owned(),
                what: format!("group record: {e}"),
            })?;
            groups.insert(String::from_utf8_lossy(&k).into_owned(), g);
        }
        let mut writer = Writer {
            db: db.clone(),
            ks: ks.clone(),
            limits,
            durability,
            fanout,
            last_seq,
            high: Arc::new(last_seq.into()),
            counts: HashMap::new(),
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            dedupe_window_ms: DEDUPE_WINDOW.as_millis() as u64,
            last_sweep: Instant::now(),
        };
        writer.remember_recent_sends().map_err(corrupt)?;
        let high = writer.high.clone();
        let (tx, rx) = flume::unbounded();
        let background_fsync = fsync == Fsync::Batch;
        let handle = std::thread::Builder::new()
            .name("imgate-disk-writer".into())
            .spawn(move || writer.run(rx, background_fsync))
            .map_err(|e| open_err(e.into()))?;
        Ok(DiskStore {
            db,
            ks,
            epoch,
            high,
            writes: tx,
            small_writes: Mutex::new(groups),
            durability,
            writer: Mutex::new(Some(handle)),
        })
    }

    fn small(&self) -> MutexGuard<'_, HashMap<String, Group>> {
        self.small_writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dropped_upto(&self, uid: &str) -> Result<u64, StoreError> {
        Ok(self
            .ks
            .inbox_meta
            .get(uid)
            .map_err(internal)?
            .map_or(0, |v| be_u64(&v)))
    }

    fn commit_small(&self, f: impl FnOnce(&mut fjall::OwnedWriteBatch)) -> Result<(), StoreError> {
        let mut b = self.db.batch().durability(Some(self.durability));
        f(&mut b);
        b.commit().map_err(unavailable)
    }

    /// Stops the writer after the sends queued so far and forces everything to the device.
    pub fn close(&self) {
        let (done, wait) = flume::bounded(1);
        if self.writes.send(Op::Close(done)).is_ok() {
            let _ = wait.recv();
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

/// The writer thread's state: everything a send decides on.
struct Writer {
    db: Database,
    ks: Keyspaces,
    limits: Limits,
    durability: PersistMode,
    fanout: Arc<dyn Fanout>,
    last_seq: u64,
    high: Arc<std::sync::atomic::AtomicU64>,
    /// Copies per inbox this writer has counted (loaded when an inbox is first written).
    counts: HashMap<String, usize>,
    dedupe: HashMap<(String, String), Remembered>,
    dedupe_order: VecDeque<(u64, String, String)>,
    dedupe_window_ms: u64,
    last_sweep: Instant,
}

impl Writer {
    /// Loads the sends of the last dedupe window, so a retry after a restart is still
    /// recognised.
    fn remember_recent_sends(&mut self) -> Result<(), fjall::Error> {
        let now = now_ms();
        // Sends are in seq order, which is storing order: the window is at the newest end.
        let mut remembered = Vec::new();
        for item in self.ks.sends.iter().rev() {
            let v = item.value()?;
            let Ok(rec) = rmp_serde::from_slice::<SendRecord>(&v) else {
                continue;
            };
            if now.saturating_sub(rec.at) >= self.dedupe_window_ms {
                break;
            }
            let r = Remembered {
                at: rec.at,
                ts: rec.ts,
                seqs: rec.copies.iter().map(|(_, seq)| *seq).collect(),
            };
            remembered.push((rec.from, rec.id, r));
        }
        for (from, id, r) in remembered.into_iter().rev() {
            self.dedupe_order
                .push_back((r.at, from.clone(), id.clone()));
            self.dedupe.insert((from, id), r);
        }
        Ok(())
    }

    fn run(mut self, rx: flume::Receiver<Op>, background_fsync: bool) {
        // A store opened after a long stop drops what expired meanwhile before anything else.
        if let Err(e) = self.sweep_by_time() {
            tracing::warn!(error = %e, "disk store: retention sweep failed");
        }
        let mut unsynced_since: Option<Instant> = None;
        let mut closed = None;
        while closed.is_none() {
            let wait = match unsynced_since {
                Some(t) => FSYNC_BATCH_DELAY.saturating_sub(t.elapsed()),
                None => SWEEP_EVERY,
            };
            let first = match rx.recv_timeout(wait) {
                Ok(a) => Some(a),
                Err(flume::RecvTimeoutError::Timeout) => None,
                Err(flume::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = Vec::new();
            let mut next = first;
            while let Some(op) = next.take() {
                match op {
                    Op::Append(a) => batch.push(a),
                    Op::Close(done) => {
                        closed = Some(done);
                        break;
                    }
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.commit(batch);
                if background_fsync && unsynced_since.is_none() {
                    unsynced_since = Some(Instant::now());
                }
            }
            if unsynced_since.is_some_and(|t| t.elapsed() >= FSYNC_BATCH_DELAY) {
                if let Err(e) = self.db.persist(PersistMode::SyncData) {
                    tracing::error!(error = %e, "disk store: fsync failed");
                }
                unsynced_since = None;
            }
            if self.last_sweep.elapsed() >= SWEEP_EVERY {
                self.last_sweep = Instant::now();
                if let Err(e) = self.sweep_by_time() {
                    tracing::warn!(error = %e, "disk store: retention sweep failed");
                }
            }
        }
        if let Err(e) = self.db.persist(PersistMode::SyncAll) {
            tracing::error!(error = %e, "disk store: final fsync failed");
        }
        if let Some(done) = closed {
            let _ = done.send(());
        }
    }

    /// Stores a group of sends in one batch, then fans out and answers each.
    fn commit(&mut self, sends: Vec<Append>) {
        let now = now_ms();
        let mut batch = self.db.batch().durability(Some(self.durability));
        while let Some((at, _, _)) = self.dedupe_order.front() {
            if now.saturating_sub(*at) < self.dedupe_window_ms {
                break;
            }
            let (_, from, id) = self.dedupe_order.pop_front().expect("front exists");
            self.dedupe.remove(&(from, id));
        }
        let mut seq = self.last_seq;
        // Per send: Err(original) for a repeat, Ok(seqs) for a new one.
        let mut outcomes: Vec<Result<Appended, Appended>> = Vec::with_capacity(sends.len());
        let mut fresh: HashMap<(String, String), Appended> = HashMap::new();
        for s in &sends {
            let key = (s.draft.from.clone(), s.draft.id.clone());
            if let Some(r) = self.dedupe.get(&key) {
                outcomes.push(Err(Appended {
                    seqs: r.seqs.clone(),
                    ts: r.ts,
                }));
                continue;
            }
            if let Some(a) = fresh.get(&key) {
                outcomes.push(Err(a.clone()));
                continue;
            }
            let d = &s.draft;
            let value = rmp_serde::to_vec(&StoredRef {
                id: &d.id,
                from: &d.from,
                to: d.to.as_deref(),
                group: d.group.as_deref(),
                ts: d.ts,
                body: &d.body,
            });
            let Ok(value) = value else {
                outcomes.push(Err(Appended {
                    seqs: Vec::new(),
                    ts: 0,
                }));
                continue;
            };
            let value = fjall::Slice::from(value);
            let mut seqs = Vec::with_capacity(s.inboxes.len());
            for uid in &s.inboxes {
                seq += 1;
                batch.insert(&self.ks.inbox, inbox_key(uid, seq), value.clone());
                seqs.push(seq);
            }
            let record = SendRecord {
                at: now,
                ts: d.ts,
                from: d.from.clone(),
                id: d.id.clone(),
                copies: s
                    .inboxes
                    .iter()
                    .cloned()
                    .zip(seqs.iter().copied())
                    .collect(),
            };
            if let (Ok(v), Some(first)) = (rmp_serde::to_vec(&record), seqs.first()) {
                batch.insert(&self.ks.sends, first.to_be_bytes(), v);
            }
            let appended = Appended { seqs, ts: d.ts };
            fresh.insert(key, appended.clone());
            outcomes.push(Ok(appended));
        }
        batch.insert(&self.ks.meta, "last_seq", seq.to_be_bytes());
        if let Err(e) = batch.commit() {
            tracing::error!(error = %e, "disk store: write failed; the batch's sends are refused");
            for s in sends {
                let _ = s.reply.send(Err(unavailable(&e)));
            }
            return;
        }
        self.last_seq = seq;
        self.high.store(seq, std::sync::atomic::Ordering::Release);
        for ((from, id), a) in fresh {
            self.dedupe_order.push_back((now, from.clone(), id.clone()));
            self.dedupe.insert(
                (from, id),
                Remembered {
                    at: now,
                    ts: a.ts,
                    seqs: a.seqs,
                },
            );
        }
        let mut touched: HashMap<String, usize> = HashMap::new();
        for (s, outcome) in sends.iter().zip(&outcomes) {
            let Ok(a) = outcome else { continue };
            for (uid, seq) in s.inboxes.iter().zip(&a.seqs) {
                let seq = *seq;
                self.fanout
                    .deliver(uid, &mut || Some(s.draft.to_message(seq)));
                *touched.entry(uid.clone()).or_default() += 1;
            }
        }
        if let Err(e) = self.trim(touched) {
            tracing::warn!(error = %e, "disk store: trimming inboxes failed");
        }
        for (s, outcome) in sends.into_iter().zip(outcomes) {
            let answer = match outcome {
                Ok(a) => Ok(a),
                Err(a) if a.seqs.is_empty() => Err(internal("the message cannot be encoded")),
                Err(a) => Ok(a),
            };
            let _ = s.reply.send(answer);
        }
    }

    /// Drops the oldest copies beyond `--max-inbox` of each inbox just written (with the
    /// number of copies it just got).
    fn trim(&mut self, added: HashMap<String, usize>) -> Result<(), fjall::Error> {
        let mut batch = self.db.batch().durability(Some(self.durability));
        for (uid, n) in added {
            let count = match self.counts.get_mut(uid.as_str()) {
                Some(c) => {
                    *c += n;
                    *c
                }
                // Counted after the commit: the new copies are in the count.
                None => {
                    let mut prefix = uid.as_bytes().to_vec();
                    prefix.push(0);
                    let n = self.ks.inbox.prefix(&prefix).count();
                    self.counts.insert(uid.clone(), n);
                    n
                }
            };
            if count <= self.limits.max_inbox {
                continue;
            }
            let excess = count - self.limits.max_inbox;
            let mut prefix = uid.as_bytes().to_vec();
            prefix.push(0);
            let mut dropped = 0;
            // The sends these copies belong to stay in `sends` until time retention drops
            // them (their other copies may live on).
            for item in self.ks.inbox.prefix(&prefix).take(excess) {
                let k = item.key()?;
                dropped = seq_of_inbox_key(&k);
                batch.remove(&self.ks.inbox, k);
            }
            batch.insert(&self.ks.inbox_meta, uid.as_bytes(), dropped.to_be_bytes());
            self.counts.insert(uid.clone(), self.limits.max_inbox);
        }
        if !batch.is_empty() {
            batch.commit()?;
        }
        Ok(())
    }

    /// Drops sends older than `--retention`, with every copy, oldest first.
    fn sweep_by_time(&mut self) -> Result<(), fjall::Error> {
        let horizon = now_ms().saturating_sub(self.limits.retention.as_millis() as u64);
        loop {
            let mut batch = self.db.batch().durability(Some(self.durability));
            let mut dropped: HashMap<String, u64> = HashMap::new();
            for item in self.ks.sends.iter().take(1024) {
                let (k, v) = item.into_inner()?;
                let rec: Option<SendRecord> = rmp_serde::from_slice(&v).ok();
                if let Some(rec) = rec {
                    if rec.ts >= horizon {
                        break;
                    }
                    for (uid, seq) in rec.copies {
                        batch.remove(&self.ks.inbox, inbox_key(&uid, seq));
                        let d = dropped.entry(uid).or_default();
                        *d = (*d).max(seq);
                    }
                }
                batch.remove(&self.ks.sends, k);
            }
            if batch.is_empty() {
                return Ok(());
            }
            for (uid, seq) in &dropped {
                let kept = self
                    .ks
                    .inbox_meta
                    .get(uid.as_bytes())?
                    .map_or(0, |v| be_u64(&v));
                batch.insert(
                    &self.ks.inbox_meta,
                    uid.as_bytes(),
                    kept.max(*seq).to_be_bytes(),
                );
                // Recounted when next written.
                self.counts.remove(uid);
            }
            batch.commit()?;
        }
    }
}

#[async_trait]
impl Store for DiskStore {
    async fn append(&self, draft: Draft, inboxes: &[String]) -> Result<Appended, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writes
            .send(Op::Append(Append {
                draft,
                inboxes: inboxes.to_vec(),
                reply,
            }))
            .map_err(|_| unavailable("the store is closing"))?;
        answer
            .await
            .map_err(|_| unavailable("the writer stopped before answering"))?
    }

    async fn read(&self, uid: &str, after: u64, limit: usize) -> Result<Page, StoreError> {
        let from = inbox_key(uid, after.saturating_add(1));
        let to = inbox_key(uid, u64::MAX);
        let mut messages = Vec::with_capacity(limit.min(256));
        let mut more = false;
        for item in self.ks.inbox.range(from..=to) {
            if messages.len() == limit {
                more = true;
                break;
            }
            let (k, v) = item.into_inner().map_err(internal)?;
            messages.push(Arc::new(decode(&k, &v)?));
        }
        Ok(Page {
            messages,
            gap: self.dropped_upto(uid)? > after,
            more,
        })
    }

    async fn last_seq(&self, uid: &str) -> Result<u64, StoreError> {
        let from = inbox_key(uid, 0);
        let to = inbox_key(uid, u64::MAX);
        let last = match self.ks.inbox.range(from..=to).next_back() {
            Some(item) => seq_of_inbox_key(&item.key().map_err(internal)?),
            None => 0,
        };
        Ok(last.max(self.dropped_upto(uid)?))
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
        for item in self.ks.inbox.range(from..to).rev() {
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
            .ks
            .cursors
            .get(pair_key(uid, device))
            .map_err(internal)?
            .map(|v| be_u64(&v)))
    }

    async fn save_cursors(&self, cursors: &mut [CursorWrite]) -> Result<(), StoreError> {
        let _serial = self.small();
        let mut writes = Vec::with_capacity(cursors.len());
        for w in cursors.iter() {
            let key = pair_key(&w.uid, &w.device);
            let stored = self.ks.cursors.get(&key).map_err(internal)?;
            if stored.is_none_or(|v| be_u64(&v) < w.seq) {
                writes.push((key, w.seq));
            }
        }
        if writes.is_empty() {
            return Ok(());
        }
        self.commit_small(|b| {
            for (k, seq) in writes {
                b.insert(&self.ks.cursors, k, seq.to_be_bytes());
            }
        })
    }

    async fn ready(&self) -> bool {
        !self.writes.is_disconnected()
    }

    async fn create_group(&self, id: &str, group: &Group) -> Result<bool, StoreError> {
        let mut groups = self.small();
        if groups.contains_key(id) {
            return Ok(false);
        }
        let v = serde_json::to_vec(group).map_err(internal)?;
        self.commit_small(|b| b.insert(&self.ks.groups, id.as_bytes(), v))?;
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
        self.commit_small(|b| b.insert(&self.ks.groups, id.as_bytes(), v))
            .map_err(ChangeError::Store)?;
        groups.insert(id.to_owned(), next.clone());
        Ok(next)
    }

    async fn revoke(&self, uid: &str, before: u64) -> Result<(), StoreError> {
        let _serial = self.small();
        let stored = self.ks.revocations.get(uid).map_err(internal)?;
        if stored.is_some_and(|v| be_u64(&v) >= before) {
            return Ok(());
        }
        self.commit_small(|b| b.insert(&self.ks.revocations, uid.as_bytes(), before.to_be_bytes()))
    }

    async fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut all = Vec::new();
        for item in self.ks.revocations.iter() {
            let (k, v) = item.into_inner().map_err(internal)?;
            all.push((String::from_utf8_lossy(&k).into_owned(), be_u64(&v)));
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Nobody;
    impl Fanout for Nobody {
        fn deliver(&self, _: &str, _: &mut dyn FnMut() -> Option<Message>) {}
    }

    fn open(dir: &Path, max_inbox: usize) -> DiskStore {
        open_for(dir, max_inbox, Duration::from_secs(3600))
    }

    fn open_for(dir: &Path, max_inbox: usize, retention: Duration) -> DiskStore {
        let limits = Limits {
            retention,
            max_inbox,
        };
        DiskStore::open(dir, limits, Fsync::Never, Arc::new(Nobody)).unwrap()
    }

    fn draft(id: &str) -> Draft {
        Draft {
            id: id.into(),
            from: "alice".into(),
            to: Some("bob".into()),
            group: None,
            ts: now_ms(),
            body: json!({ "id": id }),
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
        assert_eq!(bob.messages[1].body, json!({"id": "y"}));
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
        assert_eq!(s.last_seq("bob").await.unwrap(), 5);
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
