//! Batched persistence of device cursors (docs/protocol.md, "Messages, seqs and guarantees",
//! rule 5).
//!
//! Each `(uid, device)` with a live connection here has one slot, shared by its connections
//! (an old one being replaced and the new one). A session acks by raising the slot's atomic;
//! one background task writes every changed cursor to the store once per `--cursor-interval`,
//! spread over that interval in small batches. A session flushes the slot when it ends, and shutdown
//! flushes them all. Loading a cursor looks at the live slot before the store, so a device
//! that reconnects at once is not sent what it acked a moment ago. Cursors are at-least-once
//! hints: a lost write only means a device is sent some messages again.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::store::{CursorWrite, Store, StoreError};

/// Batches each interval's writes are spread over.
const FLUSH_SLICES: usize = 10;

type Key = (String, String);

#[derive(Debug)]
struct Slot {
    acked: AtomicU64,
    persisted: AtomicU64,
    /// The store's version of the cursor as last written from here (0: not known), so the
    /// next write need not read it first.
    version: AtomicU64,
    /// Connections holding this slot.
    holders: AtomicUsize,
}

/// The cursors of this gateway's live devices.
pub struct Cursors {
    store: Arc<dyn Store>,
    /// How often changed cursors are written (`--cursor-interval`).
    interval: Duration,
    slots: DashMap<Key, Arc<Slot>>,
}

/// One connection's hold on its device's cursor.
pub struct CursorHandle {
    cursors: Arc<Cursors>,
    key: Key,
    slot: Arc<Slot>,
}

impl Cursors {
    pub fn new(store: Arc<dyn Store>, interval: Duration) -> Arc<Self> {
        Arc::new(Cursors {
            store,
            interval,
            slots: DashMap::new(),
        })
    }

    /// The cursor of `(uid, device)`: the live slot here if any, else the store.
    pub async fn load(&self, uid: &str, device: &str) -> Result<Option<u64>, StoreError> {
        // The slot first: it leaves the map only after its last write reached the store.
        let live = self
            .slots
            .get(&(uid.to_owned(), device.to_owned()))
            .map(|s| s.acked.load(Ordering::Relaxed));
        let stored = self.store.cursor(uid, device).await?;
        Ok(live.max(stored))
    }

    /// The highest seq acked by these live devices of `uid` here, written to the store or
    /// not (0 for a device with no live slot).
    pub fn acked_here<'a>(&self, uid: &str, devices: impl IntoIterator<Item = &'a str>) -> u64 {
        devices
            .into_iter()
            .filter_map(|d| self.slots.get(&(uid.to_owned(), d.to_owned())))
            .map(|s| s.acked.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// Stores an ack at once (a poll naming `after`), and raises the live slot if any.
    pub async fn ack_now(&self, uid: &str, device: &str, seq: u64) -> Result<(), StoreError> {
        if let Some(slot) = self.slots.get(&(uid.to_owned(), device.to_owned())) {
            slot.acked.fetch_max(seq, Ordering::Relaxed);
        }
        self.store
            .save_cursors(&mut [CursorWrite::new(uid, device, seq)])
            .await
    }

    /// Takes a hold on the cursor of `(uid, device)`, which starts at least at `acked`;
    /// `persisted` is what the store holds already.
    pub fn open(
        self: &Arc<Self>,
        uid: &str,
        device: &str,
        acked: u64,
        persisted: u64,
    ) -> CursorHandle {
        let key = (uid.to_owned(), device.to_owned());
        let slot = self
            .slots
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    acked: AtomicU64::new(acked),
                    persisted: AtomicU64::new(persisted),
                    version: AtomicU64::new(0),
                    holders: AtomicUsize::new(0),
                })
            })
            .clone();
        slot.holders.fetch_add(1, Ordering::Relaxed);
        slot.acked.fetch_max(acked, Ordering::Relaxed);
        CursorHandle {
            cursors: self.clone(),
            key,
            slot,
        }
    }

    /// The cursors that moved since their last write.
    fn dirty(&self) -> Vec<(Key, Arc<Slot>)> {
        self.slots
            .iter()
            .filter(|s| s.acked.load(Ordering::Relaxed) > s.persisted.load(Ordering::Relaxed))
            .map(|s| (s.key().clone(), s.value().clone()))
            .collect()
    }

    /// Writes every cursor that moved since its last write.
    pub async fn flush(&self) -> Result<(), StoreError> {
        write(&*self.store, &self.dirty()).await
    }

    /// Every interval, writes the cursors that moved, spread over the interval in
    /// [`FLUSH_SLICES`] batches, until `stop`; then writes what is left at once. Written in
    /// one burst, a busy gateway's cursors (one per active device, then a read and a write
    /// each) queued the messages behind them on the bus: spreading them took W1's p99 from 29 to
    /// 11 ms (bench/README.md).
    pub async fn run_flusher(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let slice = self.interval / FLUSH_SLICES as u32;
        'run: loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let dirty = self.dirty();
            let per_slice = dirty.len().div_ceil(FLUSH_SLICES).max(1);
            for (i, batch) in dirty.chunks(per_slice).enumerate() {
                if i > 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(slice) => {}
                        _ = stop.cancelled() => break 'run,
                    }
                }
                if let Err(e) = write(&*self.store, batch).await {
                    tracing::warn!(error = %e, "cursor flush failed; will retry");
                }
            }
        }
        if let Err(e) = self.flush().await {
            tracing::warn!(error = %e, "final cursor flush failed");
        }
    }
}

async fn write(store: &dyn Store, slots: &[(Key, Arc<Slot>)]) -> Result<(), StoreError> {
    if slots.is_empty() {
        return Ok(());
    }
    let mut batch: Vec<CursorWrite> = slots
        .iter()
        .map(|((uid, device), s)| CursorWrite {
            uid: uid.clone(),
            device: device.clone(),
            seq: s.acked.load(Ordering::Relaxed),
            version: s.version.load(Ordering::Relaxed),
        })
        .collect();
    store.save_cursors(&mut batch).await?;
    for ((_, slot), w) in slots.iter().zip(&batch) {
        slot.persisted.fetch_max(w.seq, Ordering::Relaxed);
        // Revisions only grow, so the larger one is the newer write's.
        slot.version.fetch_max(w.version, Ordering::Relaxed);
    }
    Ok(())
}

impl CursorHandle {
    pub fn uid(&self) -> &str {
        &self.key.0
    }

    pub fn device(&self) -> &str {
        &self.key.1
    }

    /// Records a cumulative ack; never moves back.
    pub fn ack(&self, seq: u64) {
        self.slot.acked.fetch_max(seq, Ordering::Relaxed);
    }

    /// Releases the hold; the last holder writes the cursor if it moved, then forgets it.
    pub async fn close(self) {
        if self.slot.holders.load(Ordering::Relaxed) == 1
            && self.slot.acked.load(Ordering::Relaxed) > self.slot.persisted.load(Ordering::Relaxed)
        {
            let one = [(self.key.clone(), self.slot.clone())];
            if let Err(e) = write(&*self.cursors.store, &one).await {
                tracing::warn!(error = %e, "cursor write on disconnect failed");
            }
        }
    }
}

impl Drop for CursorHandle {
    fn drop(&mut self) {
        if self.slot.holders.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.cursors
                .slots
                .remove_if(&self.key, |_, s| s.holders.load(Ordering::Relaxed) == 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::{Keep, MemoryStore};
    use crate::store::Fanout;

    struct Nobody;
    impl Fanout for Nobody {
        fn read(&self, _: &str, _: u64, _: u64) {}
        fn deliver(&self, _: &str, _: &mut dyn FnMut() -> Option<imgate_proto::Message>) {}
    }

    fn cursors() -> (Arc<Cursors>, Arc<MemoryStore>) {
        let keep = Keep {
            retention: Duration::from_secs(60),
            max_inbox: 10,
        };
        let store = Arc::new(MemoryStore::new(keep, Arc::new(Nobody)));
        (Cursors::new(store.clone(), Duration::from_secs(1)), store)
    }

    #[tokio::test]
    async fn live_slot_is_seen_before_the_store_and_shared_by_holders() {
        let (c, store) = cursors();
        let old = c.open("bob", "phone", 5, 5);
        old.ack(9);
        assert_eq!(c.load("bob", "phone").await.unwrap(), Some(9));
        assert_eq!(store.cursor("bob", "phone").await.unwrap(), None);
        let new = c.open("bob", "phone", 5, 5);
        old.close().await; // not the last holder: no write yet
        assert_eq!(store.cursor("bob", "phone").await.unwrap(), None);
        new.ack(12);
        new.close().await;
        assert_eq!(store.cursor("bob", "phone").await.unwrap(), Some(12));
        assert!(c.slots.is_empty());
    }

    #[tokio::test]
    async fn flush_writes_only_moved_cursors() {
        let (c, store) = cursors();
        let a = c.open("a", "d", 0, 0);
        let _b = c.open("b", "d", 3, 3);
        a.ack(4);
        c.flush().await.unwrap();
        assert_eq!(store.cursor("a", "d").await.unwrap(), Some(4));
        assert_eq!(store.cursor("b", "d").await.unwrap(), None);
    }
}
