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
//! senders hears `sent`, and its copies reach the [`Fanout`] after that, in seq order. Reads go to the database directly, from any task; they never load an inbox whole,
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use imgate_proto::scratch::written;
use imgate_proto::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::memory::Limits;
use super::{
    now_ms, Appended, ChangeError, CursorWrite, Draft, Fanout, Group, GroupChange, History,
    NotifyRecord, NotifyState, Older, Page, Store, StoreError, DEDUPE_WINDOW,
};
use crate::config::Fsync;

pub mod seal;

/// Journal kept before memtables are flushed.
const MAX_JOURNAL: u64 = 64 * 1024 * 1024;
/// Most sends one group commit takes.
const MAX_COMMIT: usize = 1024;
/// How often the writer drops messages older than `--retention`.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// With `--fsync batch`, the longest a written batch waits for its fsync.
const FSYNC_BATCH_DELAY: Duration = Duration::from_millis(200);
/// After a failed write, how often the writer tries whether the disk takes writes again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// What that try writes: about a journal batch of a few sends.
const PROBE_BYTES: usize = 64 * 1024;
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

/// What the seal said: its record (none for a store without one), or why it is unreadable.
type Sealed = Result<Option<seal::Record>, String>;

/// Checks that `path` is a data directory, or an empty place for one, that this process can
/// write, and reads its seal.
fn check_directory(path: &Path) -> Result<Sealed, OpenError> {
    let open_err = |e: std::io::Error| OpenError::Open {
        path: path.to_owned(),
        source: e.into(),
    };
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => return Err(OpenError::NotADirectory(path.to_owned())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(open_err(e)),
    }
    std::fs::create_dir_all(path).map_err(open_err)?;
    // fjall creates a missing directory's files lazily; ask for write access up front so
    // a read-only directory fails here, not at the first send.
    let probe = path.join(".imgate-write-check");
    std::fs::write(&probe, b"").map_err(open_err)?;
    let _ = std::fs::remove_file(&probe);
    let sealed = match seal::read(path) {
        Err(seal::ReadError::Io(e)) => return Err(open_err(e)),
        Err(seal::ReadError::Invalid(why)) => Err(why),
        Ok(r) => Ok(r),
    };
    if !path.join(ENGINE_MARKER).exists() {
        // A fresh filesystem's root holds `lost+found`; anything else is someone's.
        let empty = std::fs::read_dir(path)
            .map_err(open_err)?
            .filter_map(Result::ok)
            .all(|e| e.file_name() == "lost+found");
        match &sealed {
            Ok(None) if !empty => return Err(OpenError::Foreign(path.to_owned())),
            Ok(None) => {}
            _ => {
                return Err(OpenError::Corrupt {
                    path: path.to_owned(),
                    what: format!(
                        "the storage engine's files are gone (no `{ENGINE_MARKER}` file) \
                         beside {}",
                        seal::FILE
                    ),
                })
            }
        }
    }
    Ok(sealed)
}

/// The storage engine at `path`; with `repair`, a journal that cannot be read back is set
/// aside first.
fn open_engine_or_repair(path: &Path, repair: bool) -> Result<Engine, OpenError> {
    let open_err = |e: std::io::Error| OpenError::Open {
        path: path.to_owned(),
        source: e.into(),
    };
    Ok(match open_engine(path) {
        Err(OpenError::Corrupt { what, .. }) if what.contains("JournalRecovery") => {
            if !repair {
                return Err(OpenError::Damaged {
                    path: path.to_owned(),
                    what: format!("its journal cannot be read back ({what})"),
                });
            }
            set_journals_aside(path).map_err(open_err)?;
            open_engine(path)?
        }
        r => r?,
    })
}

/// What the database and the seal together say was lost (`None`: nothing); any of it
/// stops the start unless `--repair`.
fn damage_found(
    path: &Path,
    engine: &Engine,
    sealed: &Sealed,
    repair: bool,
) -> Result<(Option<String>, Option<String>, u64), OpenError> {
    let corrupt = |what: String| OpenError::Corrupt {
        path: path.to_owned(),
        what,
    };

    let (db_epoch, db_last) = recorded(&engine.ks).map_err(corrupt)?;
    let was_sealed = engine
        .ks
        .meta
        .get("sealed")
        .map_err(|e| corrupt(e.to_string()))?
        .is_some();
    let mut damage = lost(sealed, db_epoch.as_deref(), db_last);
    if damage.is_none() && was_sealed && matches!(sealed, Ok(None)) {
        damage = Some(format!(
            "its seal {} is gone, so what the journal lost cannot be told",
            seal::FILE
        ));
    }
    if let (Some(what), false) = (&damage, repair) {
        return Err(OpenError::Damaged {
            path: path.to_owned(),
            what: what.clone(),
        });
    }
    Ok((damage, db_epoch, db_last))
}

/// The epoch and highest seq the store goes on with, and its seal: the recorded ones, or a
/// new epoch (a new store, or `--repair`) above every seq either the database or the seal
/// made known.
/// Starts a new epoch (a new store, or `--repair`) with seqs above anything the database
/// (`db_last`) or the seal made known (a store restored from a backup too), so none is ever
/// reused; `repaired` (with the damage found) also records those seqs as lost.
fn new_epoch(
    path: &Path,
    engine: &Engine,
    sealed: &Sealed,
    db_last: u64,
    repaired: Option<Option<&str>>,
) -> Result<(String, u64), OpenError> {
    let sealed_seq = sealed
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .map_or(0, |s| s.seq);
    let last = db_last.max(sealed_seq);
    let epoch = super::new_epoch();
    let mut b = engine.db.batch();
    b.insert(&engine.ks.meta, "epoch", epoch.as_bytes());
    b.insert(&engine.ks.meta, "last_seq", last.to_be_bytes());
    if let Some(damage) = repaired {
        // Every read after an older seq says `gap` from now on.
        b.insert(&engine.ks.meta, "lost_upto", last.to_be_bytes());
        tracing::warn!(
            data_dir = %path.display(),
            damage = damage.unwrap_or("none found"),
            new_epoch = %epoch,
            next_seq = last + 1,
            "--repair: serving what the disk store holds under a new epoch; \
             devices resuming from before it are told of a gap"
        );
    }
    b.commit().map_err(|e| OpenError::Corrupt {
        path: path.to_owned(),
        what: e.to_string(),
    })?;
    Ok((epoch, last))
}

fn epoch_and_seal(
    path: &Path,
    engine: &Engine,
    sealed: &Sealed,
    repair: bool,
) -> Result<(String, u64, seal::Seal), OpenError> {
    let corrupt = |what: String| OpenError::Corrupt {
        path: path.to_owned(),
        what,
    };
    let seal_err = |e: std::io::Error| corrupt(format!("writing {}: {e}", seal::FILE));
    let (damage, db_epoch, db_last) = damage_found(path, engine, sealed, repair)?;
    let (epoch, last_seq) = match (db_epoch, repair) {
        (Some(e), false) => (e, db_last),
        // New, or repaired.
        (known, repair) => {
            let repaired = (repair && known.is_some()).then_some(damage.as_deref());
            new_epoch(path, engine, sealed, db_last, repaired)?
        }
    };
    let seal = if matches!(sealed, Ok(Some(r)) if r.epoch == epoch) {
        seal::open(path, &epoch).map_err(seal_err)?
    } else {
        // A new store, a repaired one, or one written before seals existed.
        let record = seal::Record {
            epoch: epoch.clone(),
            seq: last_seq,
        };
        engine
            .ks
            .meta
            .insert("sealed", b"1")
            .map_err(|e| corrupt(e.to_string()))?;
        engine
            .db
            .persist(PersistMode::SyncAll)
            .map_err(|e| corrupt(e.to_string()))?;
        seal::create(path, &record).map_err(seal_err)?
    };
    Ok((epoch, last_seq, seal))
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

/// Renames the journals of `path` (`N.jnl` to `N.jnl.damaged`), so the storage engine
/// opens with what it had flushed to its tables: for `--repair` of a journal it refuses to
/// read. They are kept for whoever wants to look at them.
fn set_journals_aside(path: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.extension().is_some_and(|x| x == "jnl") {
            let mut aside = p.clone().into_os_string();
            aside.push(format!(".damaged-{}", now_ms()));
            tracing::warn!(journal = %p.display(), "--repair: setting an unreadable journal aside");
            std::fs::rename(&p, aside)?;
        }
    }
    Ok(())
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

/// What the database holds against what its seal says it made known: `Some(what)` when
/// acknowledged data is gone.
fn lost(
    sealed: &Result<Option<seal::Record>, String>,
    epoch: Option<&str>,
    last: u64,
) -> Option<String> {
    match (sealed, epoch) {
        (Err(why), _) => Some(why.clone()),
        (Ok(Some(s)), None) => Some(format!(
            "the store's records are gone (its seal names epoch {} with seqs up to {}, the \
             database holds no epoch)",
            s.epoch, s.seq
        )),
        (Ok(Some(s)), Some(e)) if e != s.epoch => Some(format!(
            "the database's epoch is {e}, its seal's {}",
            s.epoch
        )),
        (Ok(Some(s)), Some(_)) if last < s.seq => Some(format!(
            "seqs up to {} were made known, but the journal holds records only up to {last} \
             (a journal cut short or damaged in its middle)",
            s.seq
        )),
        _ => None,
    }
}

impl DiskStore {
    /// Opens (or creates) the store in `path`. Nothing stored is read but the dedupe window,
    /// the groups and two counters. A store that lost acknowledged data is refused, or with
    /// `repair` served under a new epoch.
    pub fn open(
        path: &Path,
        limits: Limits,
        options: Options,
        fanout: Arc<dyn Fanout>,
    ) -> Result<DiskStore, OpenError> {
        // What is left here past 60 lines is the two structs it fills, field by field.
        let sealed = check_directory(path)?;
        let engine = open_engine_or_repair(path, options.repair)?;
        let (epoch, last_seq, seal) = epoch_and_seal(path, &engine, &sealed, options.repair)?;
        let corrupt = |what: String| OpenError::Corrupt {
            path: path.to_owned(),
            what,
        };
        let open_err = |e: std::io::Error| OpenError::Open {
            path: path.to_owned(),
            source: e.into(),
        };
        let lost_upto = engine
            .ks
            .meta
            .get("lost_upto")
            .map_err(|e| corrupt(e.to_string()))?
            .map_or(0, |v| be_u64(&v));
        let durability = match options.fsync {
            Fsync::Always => PersistMode::SyncData,
            Fsync::Batch | Fsync::Never => PersistMode::Buffer,
        };
        let groups = load_groups(&engine.ks).map_err(corrupt)?;
        let epoch: Arc<str> = epoch.into();
        let small_writes = Arc::new(Mutex::new(groups));
        let slot: Slot = Arc::new(RwLock::new(Some(Arc::new(engine))));
        let failed = Arc::new(AtomicBool::new(false));
        let (thread, rings) = flume::unbounded();
        let mut writer = Writer {
            path: path.to_owned(),
            slot: slot.clone(),
            failed: failed.clone(),
            seal,
            epoch: epoch.clone(),
            limits,
            durability,
            fanout: fanout.clone(),
            last_seq,
            high: Arc::new(last_seq.into()),
            counts: HashMap::new(),
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            dedupe_window_ms: DEDUPE_WINDOW.as_millis() as u64,
            last_sweep: Instant::now(),
            last_probe: Instant::now(),
            groups: small_writes.clone(),
            background_fsync: options.fsync == Fsync::Batch,
            unsynced_since: None,
            ring: thread.clone(),
        };
        writer
            .remember_recent_sends()
            .map_err(|e| corrupt(e.to_string()))?;
        // A store opened after a long stop drops what expired meanwhile before anything else.
        if let Err(e) = writer.sweep_by_time() {
            tracing::warn!(error = %e, "disk store: retention sweep failed");
        }
        let high = writer.high.clone();
        let (queue, queued) = flume::unbounded();
        let state = Arc::new(Mutex::new(writer));
        let (for_thread, queued_for_thread) = (state.clone(), queued.clone());
        let handle = std::thread::Builder::new()
            .name("imgate-disk-writer".into())
            .spawn(move || run(&for_thread, &queued_for_thread, &rings))
            .map_err(open_err)?;
        Ok(DiskStore {
            engine: slot,
            epoch,
            high,
            failed,
            queue,
            queued,
            thread,
            state,
            inline: options.fsync != Fsync::Always,
            small_writes,
            lost_upto,
            durability,
            writer: Mutex::new(Some(handle)),
            fanout,
        })
    }

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

fn current(slot: &Slot) -> Option<Arc<Engine>> {
    slot.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn lock_writer(state: &Mutex<Writer>) -> MutexGuard<'_, Writer> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Commits the queue unless a writer is at it already: that one commits what this caller
/// queued, as it commits until the queue is empty. A send queued between a writer's last
/// look and its release is seen by the look after the release.
fn commit_queued(state: &Mutex<Writer>, queued: &flume::Receiver<Append>) {
    loop {
        let mut writer = match state.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        writer.commit_queue(queued);
        drop(writer);
        if queued.is_empty() {
            return;
        }
    }
}

/// The writer thread: commits the queue when rung (`--fsync always`), and does the
/// writer's rounds ([`Writer::housekeeping`]) when they are due, until the store closes.
fn run(state: &Mutex<Writer>, queued: &flume::Receiver<Append>, rings: &flume::Receiver<Ring>) {
    loop {
        let wait = lock_writer(state).next_wait();
        let closing = match rings.recv_timeout(wait) {
            Ok(Ring::Close(done)) => Some(done),
            Ok(Ring::Work) | Err(flume::RecvTimeoutError::Timeout) => None,
            Err(flume::RecvTimeoutError::Disconnected) => return,
        };
        {
            let mut writer = lock_writer(state);
            writer.housekeeping();
            writer.commit_queue(queued);
            if let Some(done) = closing {
                writer.sync_all();
                let _ = done.send(());
                return;
            }
        }
        commit_queued(state, queued);
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread's state: everything a send decides on.
struct Writer {
    path: PathBuf,
    slot: Slot,
    failed: Arc<AtomicBool>,
    seal: seal::Seal,
    epoch: Arc<str>,
    limits: Limits,
    durability: PersistMode,
    fanout: Arc<dyn Fanout>,
    last_seq: u64,
    high: Arc<AtomicU64>,
    /// Copies per inbox this writer has counted (loaded when an inbox is first written).
    counts: HashMap<String, usize>,
    dedupe: HashMap<(String, String), Remembered>,
    dedupe_order: VecDeque<(u64, String, String)>,
    dedupe_window_ms: u64,
    last_sweep: Instant,
    /// When the writer last tried whether the disk takes writes again.
    last_probe: Instant,
    /// The store's groups (shared with it), reloaded after a reopen.
    groups: Arc<Mutex<HashMap<String, Group>>>,
    /// `--fsync batch`: the writer thread syncs what was written within FSYNC_BATCH_DELAY.
    background_fsync: bool,
    /// The first write not synced yet (`--fsync batch`).
    unsynced_since: Option<Instant>,
    /// Wakes the writer thread.
    ring: flume::Sender<Ring>,
}

/// The value every inbox copy of `d` is stored as (`None`: it cannot be encoded).
fn encode_copy(d: &Draft) -> Option<fjall::Slice> {
    let value = written(|b| {
        rmp_serde::encode::write(
            b,
            &StoredCopyRef {
                id: &d.id,
                from: &d.from,
                to: d.to.as_deref(),
                group: d.group.as_deref(),
                ts: d.ts,
                body: &d.body,
            },
        )
    });
    value.ok().map(fjall::Slice::from)
}

/// Puts the record of send `s`, stored in `seqs`, in `batch`: what a restart needs to
/// answer a repeat of it within the dedupe window.
fn record_send(
    engine: &Engine,
    batch: &mut fjall::OwnedWriteBatch,
    s: &Append,
    seqs: &[u64],
    now: u64,
) {
    let d = &s.draft;
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
    if let (Ok(v), Some(first)) = (written(|b| rmp_serde::encode::write(b, &record)), seqs.first()) {
        batch.insert(&engine.ks.sends, first.to_be_bytes(), v);
    }
}

/// A commit's sends, staged: per send, `Ok(seqs)` when new or `Err(original)` for a repeat
/// (no seqs: it could not be encoded); the new ones by `(from, id)`; their copies; and the
/// last seq given.
struct Staged<'a> {
    outcomes: Vec<Result<Appended, Appended>>,
    fresh: HashMap<(String, String), Appended>,
    copies: Vec<Copy<'a>>,
    seq: u64,
}

/// One inbox copy of a batch, before it is written.
struct Copy<'a> {
    uid: &'a str,
    seq: u64,
    value: fjall::Slice,
}

impl Writer {
    /// Loads the sends of the last dedupe window, so a retry after a restart is still
    /// recognised.
    fn remember_recent_sends(&mut self) -> Result<(), StoreError> {
        let Some(engine) = current(&self.slot) else {
            return Ok(());
        };
        let now = now_ms();
        self.dedupe.clear();
        self.dedupe_order.clear();
        // Sends are in seq order, which is storing order: the window is at the newest end.
        let mut remembered = Vec::new();
        for item in engine.ks.sends.iter().rev() {
            let v = item.value().map_err(internal)?;
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

    /// Commits every queued send, in batches of at most MAX_COMMIT.
    fn commit_queue(&mut self, queued: &flume::Receiver<Append>) {
        loop {
            let batch: Vec<Append> = queued.try_iter().take(MAX_COMMIT).collect();
            if batch.is_empty() {
                return;
            }
            self.commit(batch);
            if self.background_fsync && self.unsynced_since.is_none() {
                self.unsynced_since = Some(Instant::now());
                // The thread may be asleep until the next sweep: it has a sync to do now.
                let _ = self.ring.send(Ring::Work);
            }
        }
    }

    /// How long the writer thread may sleep before it has something to do.
    fn next_wait(&self) -> Duration {
        let mut wait = match self.unsynced_since {
            Some(t) => FSYNC_BATCH_DELAY.saturating_sub(t.elapsed()),
            None => SWEEP_EVERY.saturating_sub(self.last_sweep.elapsed()),
        };
        if self.failed.load(Ordering::Acquire) {
            wait = wait.min(REOPEN_EVERY.saturating_sub(self.last_probe.elapsed()));
        }
        wait
    }

    /// The writer thread's rounds: reopening after a failed write, syncing `--fsync batch`
    /// writes, and the retention sweep, each when it is due.
    fn housekeeping(&mut self) {
        if self.failed.load(Ordering::Acquire) && self.last_probe.elapsed() >= REOPEN_EVERY {
            self.last_probe = Instant::now();
            if self.disk_takes_writes() {
                self.reopen();
            }
        }
        if self
            .unsynced_since
            .is_some_and(|t| t.elapsed() >= FSYNC_BATCH_DELAY)
        {
            if let Some(e) = current(&self.slot) {
                if let Err(err) = e.db.persist(PersistMode::SyncData) {
                    tracing::error!(error = %err, "disk store: fsync failed");
                    self.failed.store(true, Ordering::Release);
                }
            }
            self.unsynced_since = None;
        }
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            if let Err(e) = self.sweep_by_time() {
                tracing::warn!(error = %e, "disk store: retention sweep failed");
            }
        }
    }

    /// Forces everything to the device (closing).
    fn sync_all(&mut self) {
        if let Some(e) = current(&self.slot) {
            if let Err(err) = e.db.persist(PersistMode::SyncAll) {
                tracing::error!(error = %err, "disk store: final fsync failed");
            }
        }
        if let Err(e) = self.seal.sync() {
            tracing::error!(error = %e, "disk store: syncing the seal failed");
        }
    }

    /// Whether the data directory takes a write now: a file of a journal batch's size,
    /// written and synced, then removed. Until it does the failed database stays in place
    /// (reads go on) and `/readyz` keeps failing; opening the database writes nothing, so
    /// it would succeed on a disk that is still full.
    fn disk_takes_writes(&self) -> bool {
        let probe = self.path.join(".imgate-write-probe");
        let wrote = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&probe)?;
            f.write_all(&[0u8; PROBE_BYTES])?;
            f.sync_data()
        })();
        let _ = std::fs::remove_file(&probe);
        if let Err(e) = &wrote {
            tracing::debug!(error = %e, "disk store: the data directory still refuses writes");
        }
        wrote.is_ok()
    }

    /// After a failed write the database refuses every other: drop it, open it again, and
    /// go on writing once it holds what this writer committed.
    fn reopen(&mut self) {
        let old = self.slot.write().unwrap_or_else(|p| p.into_inner()).take();
        let weak = old.as_ref().map(Arc::downgrade);
        drop(old);
        // Readers hold the old engine for one read at most.
        let deadline = Instant::now() + REOPEN_EVERY;
        while weak.as_ref().is_some_and(|w| w.strong_count() > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let engine = match open_engine(&self.path) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "disk store: reopening after a failed write failed; retrying");
                return;
            }
        };
        if let Err(e) = self.resync(&engine) {
            tracing::error!(error = %e, "disk store: the reopened database does not hold what was committed; still refusing writes");
            return;
        }
        let engine = Arc::new(engine);
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = Some(engine.clone());
        self.counts.clear();
        // A group write answered `unavailable` may have reached the journal after all.
        match load_groups(&engine.ks) {
            Ok(g) => *lock(&self.groups) = g,
            Err(e) => tracing::warn!(error = %e, "disk store: reloading the groups failed"),
        }
        if let Err(e) = self.remember_recent_sends() {
            tracing::warn!(error = %e, "disk store: reloading the dedupe window failed");
        }
        self.failed.store(false, Ordering::Release);
        tracing::info!("disk store: writing again after a failed write");
    }

    /// Checks a reopened database against what this writer committed. A batch that was
    /// refused can still have reached the journal (the rest of its bytes written after the
    /// failure): it is kept, as it is stored with its trims already applied, and handed to
    /// the fanout now, before anything newer; its senders heard `unavailable`, and their
    /// retry with the same id is answered with these seqs (the dedupe window is reloaded).
    fn resync(&mut self, e: &Engine) -> Result<(), String> {
        let (epoch, last) = recorded(&e.ks)?;
        if epoch.as_deref() != Some(&*self.epoch) {
            return Err(format!("its epoch is now {epoch:?}"));
        }
        if last < self.last_seq {
            return Err(format!(
                "it holds seqs up to {last}, {} were committed",
                self.last_seq
            ));
        }
        if last > self.last_seq {
            tracing::warn!(
                from = self.last_seq + 1,
                to = last,
                "disk store: sends refused during the write failure reached the journal; \
                 delivering them"
            );
            let from = self.last_seq + 1;
            for item in e.ks.sends.range(from.to_be_bytes()..) {
                let v = item.value().map_err(|e| e.to_string())?;
                let Ok(rec) = rmp_serde::from_slice::<SendRecord>(&v) else {
                    continue;
                };
                for (uid, seq) in rec.copies {
                    let Ok(Some(raw)) = e.ks.inbox.get(inbox_key(&uid, seq)) else {
                        continue;
                    };
                    let key = inbox_key(&uid, seq);
                    self.fanout.deliver(&uid, &mut || decode(&key, &raw).ok());
                }
            }
            self.last_seq = last;
            self.high.store(last, Ordering::Release);
            let _ = self.seal.record(last);
        }
        Ok(())
    }

    /// Stores a group of sends in one batch (with the inbox trims they cause), then fans out
    /// and answers each.
    fn commit(&mut self, sends: Vec<Append>) {
        let Some(engine) = current(&self.slot) else {
            for s in sends {
                let _ = s.reply.send(Err(unavailable(
                    "the database is being reopened after a failed write",
                )));
            }
            return;
        };
        let now = now_ms();
        let mut batch = engine.db.batch().durability(Some(self.durability));
        self.forget_sends_before(now.saturating_sub(self.dedupe_window_ms));
        let Staged {
            outcomes,
            fresh,
            mut copies,
            seq,
        } = self.stage(&engine, &mut batch, &sends, now);
        let counts = match self.trim(&engine, &mut batch, &mut copies) {
            Ok(c) => c,
            Err(e) => {
                self.refuse(sends, &e);
                return;
            }
        };
        for c in copies {
            batch.insert(&engine.ks.inbox, inbox_key(c.uid, c.seq), c.value);
        }
        batch.insert(&engine.ks.meta, "last_seq", seq.to_be_bytes());
        if let Err(e) = batch.commit() {
            self.refuse(sends, &e);
            return;
        }
        if seq != self.last_seq {
            if let Err(e) = self.seal.record(seq) {
                tracing::error!(error = %e, "disk store: recording the seal failed");
            }
        }
        self.last_seq = seq;
        self.high.store(seq, Ordering::Release);
        self.counts.extend(counts);
        self.remember(fresh, now);
        self.hand_over_and_answer(sends, outcomes);
    }

    /// Forgets the sends remembered for the dedupe window before `before` (Unix ms).
    fn forget_sends_before(&mut self, before: u64) {
        while let Some((at, _, _)) = self.dedupe_order.front() {
            if *at > before {
                break;
            }
            let (_, from, id) = self.dedupe_order.pop_front().expect("front exists");
            self.dedupe.remove(&(from, id));
        }
    }

    /// Puts `sends` in `batch` (each new one's send record; its copies are returned, for
    /// the inbox trim first), numbering copies on from the last seq; a repeat of a send
    /// remembered, or of one earlier in `sends`, gets the original's seqs instead.
    fn stage<'a>(
        &self,
        engine: &Engine,
        batch: &mut fjall::OwnedWriteBatch,
        sends: &'a [Append],
        now: u64,
    ) -> Staged<'a> {
        let mut seq = self.last_seq;
        let mut outcomes = Vec::with_capacity(sends.len());
        let mut fresh: HashMap<(String, String), Appended> = HashMap::new();
        let mut copies = Vec::new();
        for s in sends {
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
            let Some(value) = encode_copy(d) else {
                outcomes.push(Err(Appended {
                    seqs: Vec::new(),
                    ts: 0,
                }));
                continue;
            };
            let mut seqs = Vec::with_capacity(s.inboxes.len());
            for uid in &s.inboxes {
                seq += 1;
                copies.push(Copy {
                    uid,
                    seq,
                    value: value.clone(),
                });
                seqs.push(seq);
            }
            record_send(engine, batch, s, &seqs, now);
            let appended = Appended { seqs, ts: d.ts };
            fresh.insert(key, appended.clone());
            outcomes.push(Ok(appended));
        }
        Staged {
            outcomes,
            fresh,
            copies,
            seq,
        }
    }

    /// Remembers the sends just stored, for the dedupe window.
    fn remember(&mut self, fresh: HashMap<(String, String), Appended>, now: u64) {
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
    }

    /// Hands each stored copy to the fanout, then answers every send.
    fn hand_over_and_answer(&self, sends: Vec<Append>, outcomes: Vec<Result<Appended, Appended>>) {
        for (s, outcome) in sends.iter().zip(&outcomes) {
            let Ok(a) = outcome else { continue };
            for (uid, seq) in s.inboxes.iter().zip(&a.seqs) {
                let seq = *seq;
                self.fanout
                    .deliver(uid, &mut || Some(s.draft.to_message(seq)));
            }
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

    /// Answers every send of a batch that could not be written with `unavailable`, and
    /// marks the store failed until the writer has reopened it.
    fn refuse(&mut self, sends: Vec<Append>, e: &dyn std::fmt::Display) {
        tracing::error!(error = %e, "disk store: write failed; the batch's sends are refused");
        self.failed.store(true, Ordering::Release);
        for s in sends {
            let _ = s.reply.send(Err(unavailable(e)));
        }
    }

    /// Adds to `batch` the removal of the oldest copies beyond `--max-inbox` in each inbox
    /// `copies` go to, so an inbox never holds more than that, even after a crash. Copies of
    /// this batch that would be dropped at once are taken out of `copies`. Returns each
    /// touched inbox's count after the batch.
    fn trim(
        &self,
        e: &Engine,
        batch: &mut fjall::OwnedWriteBatch,
        copies: &mut Vec<Copy<'_>>,
    ) -> Result<HashMap<String, usize>, fjall::Error> {
        let mut added: HashMap<&str, usize> = HashMap::new();
        for c in copies.iter() {
            *added.entry(c.uid).or_default() += 1;
        }
        let max = self.limits.max_inbox;
        let mut counts = HashMap::with_capacity(added.len());
        // (uid, how many of this batch's copies to leave out, the highest seq dropped)
        let mut cut: Vec<(String, usize, u64)> = Vec::new();
        for (uid, n) in added {
            let prefix = inbox_prefix(uid);
            let stored = match self.counts.get(uid) {
                Some(c) => *c,
                None => e.ks.inbox.prefix(&prefix).count(),
            };
            let total = stored + n;
            counts.insert(uid.to_owned(), total.min(max));
            if total <= max {
                continue;
            }
            let excess = total - max;
            let mut dropped = 0;
            for item in e.ks.inbox.prefix(&prefix).take(excess) {
                let k = item.key()?;
                dropped = seq_of_inbox_key(&k);
                batch.remove(&e.ks.inbox, k);
            }
            cut.push((uid.to_owned(), excess.saturating_sub(stored), dropped));
        }
        for (uid, mut skip, mut dropped) in cut {
            // Copies are in seq order: the oldest of this batch go first.
            copies.retain(|c| {
                if skip > 0 && c.uid == uid {
                    skip -= 1;
                    dropped = dropped.max(c.seq);
                    false
                } else {
                    true
                }
            });
            batch.insert(&e.ks.inbox_meta, uid.as_bytes(), dropped.to_be_bytes());
        }
        Ok(counts)
    }

    /// Drops sends older than `--retention`, with every copy, oldest first.
    fn sweep_by_time(&mut self) -> Result<(), fjall::Error> {
        let Some(e) = current(&self.slot) else {
            return Ok(());
        };
        let horizon = now_ms().saturating_sub(self.limits.retention.as_millis() as u64);
        loop {
            let mut batch = e.db.batch().durability(Some(self.durability));
            let mut dropped: HashMap<String, u64> = HashMap::new();
            for item in e.ks.sends.iter().take(1024) {
                let (k, v) = item.into_inner()?;
                let rec: Option<SendRecord> = rmp_serde::from_slice(&v).ok();
                if let Some(rec) = rec {
                    if rec.ts >= horizon {
                        break;
                    }
                    for (uid, seq) in rec.copies {
                        batch.remove(&e.ks.inbox, inbox_key(&uid, seq));
                        let d = dropped.entry(uid).or_default();
                        *d = (*d).max(seq);
                    }
                }
                batch.remove(&e.ks.sends, k);
            }
            if batch.is_empty() {
                return Ok(());
            }
            for (uid, seq) in &dropped {
                let kept =
                    e.ks.inbox_meta
                        .get(uid.as_bytes())?
                        .map_or(0, |v| be_u64(&v));
                batch.insert(
                    &e.ks.inbox_meta,
                    uid.as_bytes(),
                    kept.max(*seq).to_be_bytes(),
                );
                // Recounted when next written.
                self.counts.remove(uid);
            }
            if let Err(err) = batch.commit() {
                self.failed.store(true, Ordering::Release);
                return Err(err);
            }
        }
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
        let limits = Limits {
            retention,
            max_inbox,
        };
        DiskStore::open(
            dir,
            limits,
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
        let limits = Limits {
            retention: Duration::from_secs(3600),
            max_inbox: 100_000,
        };
        let options = Options {
            fsync: Fsync::Never,
            repair,
        };
        DiskStore::open(dir, limits, options, Arc::new(Nobody))
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
        let limits = Limits {
            retention: Duration::from_secs(3600),
            max_inbox: 3,
        };
        let options = Options {
            fsync: Fsync::Never,
            repair: false,
        };
        {
            let crash = Arc::new(CrashAt(4.into()));
            let s = DiskStore::open(dir.path(), limits, options, crash).unwrap();
            let bob = ["bob".to_owned()];
            for i in 0..4 {
                // The send's own task commits, so the crash is this task's.
                let append = std::panic::AssertUnwindSafe(s.append(draft(i), &bob));
                let _ = futures::FutureExt::catch_unwind(append).await;
            }
        }
        let s = DiskStore::open(dir.path(), limits, options, Arc::new(Nobody)).unwrap();
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
