//! Opening the disk store: the data directory checked (what is not one is named), the
//! storage engine opened (or, with `--repair`, its journals set aside), the seal compared
//! with what the journal holds so that lost acknowledged data is found, and the epoch kept
//! or begun.
//!
//! Nothing here writes a message; it only builds a [`DiskStore`] or says why it cannot.

use super::writer::run;
use super::*;

/// What the seal said: its record (none for a store without one), or why it is unreadable.
type Sealed = Result<Option<seal::Record>, String>;

/// Checks that `path` is a data directory, or an empty place for one, that this process can
/// write, and reads its seal.
pub(super) fn check_directory(path: &Path) -> Result<Sealed, OpenError> {
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
pub(super) fn open_engine_or_repair(path: &Path, repair: bool) -> Result<Engine, OpenError> {
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
pub(super) fn damage_found(
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
pub(super) fn new_epoch(
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
    let epoch = crate::store::new_epoch();
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

pub(super) fn epoch_and_seal(
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

/// Renames the journals of `path` (`N.jnl` to `N.jnl.damaged`), so the storage engine
/// opens with what it had flushed to its tables: for `--repair` of a journal it refuses to
/// read. They are kept for whoever wants to look at them.
pub(super) fn set_journals_aside(path: &Path) -> std::io::Result<()> {
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

/// What the database holds against what its seal says it made known: `Some(what)` when
/// acknowledged data is gone.
pub(super) fn lost(
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
        keep: Keep,
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
            keep,
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
}
