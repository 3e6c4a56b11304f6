//! The disk store's writer: one [`Writer`] behind a mutex commits queued sends in groups
//! (the sending task commits the queue when it can take the lock, the writer thread when
//! it is woken), syncs by `--fsync`, hands each stored copy to the fanout, trims inboxes
//! by `--max-inbox` and retention, and reopens the engine after the disk refused a write.
//!
//! Reads never come here; they go to the engine directly.

use super::*;

/// Most sends one group commit takes.
pub(super) const MAX_COMMIT: usize = 1024;

/// How often the writer drops messages older than `--retention`.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// With `--fsync batch`, the longest a written batch waits for its fsync.
pub(super) const FSYNC_BATCH_DELAY: Duration = Duration::from_millis(200);

/// After a failed write, how often the writer tries whether the disk takes writes again.
pub(super) const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// What that try writes: about a journal batch of a few sends.
pub(super) const PROBE_BYTES: usize = 64 * 1024;

pub(super) fn current(slot: &Slot) -> Option<Arc<Engine>> {
    slot.read().unwrap_or_else(|p| p.into_inner()).clone()
}

pub(super) fn lock_writer(state: &Mutex<Writer>) -> MutexGuard<'_, Writer> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Commits the queue unless a writer is at it already: that one commits what this caller
/// queued, as it commits until the queue is empty. A send queued between a writer's last
/// look and its release is seen by the look after the release.
pub(super) fn commit_queued(state: &Mutex<Writer>, queued: &flume::Receiver<Append>) {
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
pub(super) fn run(
    state: &Mutex<Writer>,
    queued: &flume::Receiver<Append>,
    rings: &flume::Receiver<Ring>,
) {
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

/// The writer thread's state: everything a send decides on.
pub(super) struct Writer {
    pub(super) path: PathBuf,
    pub(super) slot: Slot,
    pub(super) failed: Arc<AtomicBool>,
    pub(super) seal: seal::Seal,
    pub(super) epoch: Arc<str>,
    pub(super) keep: Keep,
    pub(super) durability: PersistMode,
    pub(super) fanout: Arc<dyn Fanout>,
    pub(super) last_seq: u64,
    pub(super) high: Arc<AtomicU64>,
    /// Copies per inbox this writer has counted (loaded when an inbox is first written).
    pub(super) counts: HashMap<String, usize>,
    pub(super) dedupe: HashMap<(String, String), Remembered>,
    pub(super) dedupe_order: VecDeque<(u64, String, String)>,
    pub(super) dedupe_window_ms: u64,
    pub(super) last_sweep: Instant,
    /// When the writer last tried whether the disk takes writes again.
    pub(super) last_probe: Instant,
    /// The store's groups (shared with it), reloaded after a reopen.
    pub(super) groups: Arc<Mutex<HashMap<String, Group>>>,
    /// `--fsync batch`: the writer thread syncs what was written within FSYNC_BATCH_DELAY.
    pub(super) background_fsync: bool,
    /// The first write not synced yet (`--fsync batch`).
    pub(super) unsynced_since: Option<Instant>,
    /// Wakes the writer thread.
    pub(super) ring: flume::Sender<Ring>,
}

/// The value every inbox copy of `d` is stored as (`None`: it cannot be encoded).
pub(super) fn encode_copy(d: &Draft) -> Option<fjall::Slice> {
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
pub(super) fn record_send(
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
    if let (Ok(v), Some(first)) = (
        written(|b| rmp_serde::encode::write(b, &record)),
        seqs.first(),
    ) {
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
    pub(super) fn remember_recent_sends(&mut self) -> Result<(), StoreError> {
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
            self.write_sends(batch);
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
    fn write_sends(&mut self, sends: Vec<Append>) {
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
        let max = self.keep.max_inbox;
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
    pub(super) fn sweep_by_time(&mut self) -> Result<(), fjall::Error> {
        let Some(e) = current(&self.slot) else {
            return Ok(());
        };
        let horizon = now_ms().saturating_sub(self.keep.retention.as_millis() as u64);
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
