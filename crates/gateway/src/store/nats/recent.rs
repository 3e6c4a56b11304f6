//! The inbox copies this gateway's tail saw lately, kept in memory (`--backlog-cache`), so
//! a device that reconnects here (a reconnect storm after another gateway died, a long
//! poll, a short poll) reads its backlog without asking NATS.
//!
//! The tail inserts every copy before it hands it to the registry, and the oldest copies
//! leave first when the budget is spent. So every copy with a seq above [`Recent`]'s floor
//! (the last seq evicted, or where the tail started) is here: a read after a seq at or
//! above the floor is complete from memory, and a read below it goes to NATS. The cache
//! drops what the stream drops: past `--max-inbox` copies of one user (raising that user's
//! own floor), and copies older than `--retention` send the read to NATS, which says `gap`.
//! Nothing here talks to NATS or decodes anything until a read asks for it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use imgate_proto::Message;

use super::decode_payload;
use crate::store::{now_ms, Page};

/// What one cached copy costs besides its payload: its entry in the user's queue and in
/// the eviction order, and the map's share.
const ENTRY_OVERHEAD: usize = 64;

/// One cached copy.
struct Cached {
    seq: u64,
    /// When the stream stored it (a backend's message may carry no `ts`).
    published_ms: u64,
    payload: Bytes,
}

/// Recently stored inbox copies, per user, within a byte budget.
pub struct Recent {
    budget: usize,
    /// The stream's limits: at most this many copies per user, none older than this.
    max_inbox: usize,
    retention: Duration,
    inner: Mutex<Inner>,
}

/// One user's cached copies.
#[derive(Default)]
struct Copies {
    /// The highest seq of this user dropped for `--max-inbox`: a read after less than this
    /// must ask NATS (which says `gap`).
    floor: u64,
    copies: VecDeque<Cached>,
}

#[derive(Default)]
struct Inner {
    /// Every copy with a seq above this is cached.
    floor: u64,
    bytes: usize,
    /// Copies in the order they arrived (seq order): who to evict first.
    order: VecDeque<(u64, Arc<str>)>,
    by_user: HashMap<Arc<str>, Copies>,
}

impl Recent {
    /// A cache of at most `budget` bytes (0 keeps nothing: every read goes to NATS) for a
    /// stream of these limits.
    pub fn new(budget: usize, max_inbox: usize, retention: Duration) -> Self {
        Recent {
            budget,
            max_inbox: max_inbox.max(1),
            retention,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Forgets everything; copies above `floor` are cached from now on (the tail follows
    /// the stream from `floor + 1`).
    pub(super) fn restart_at(&self, floor: u64) {
        let mut inner = self.lock();
        *inner = Inner {
            floor,
            ..Inner::default()
        };
    }

    /// A copy the tail saw, in stream order.
    pub(super) fn insert(&self, uid: &str, seq: u64, published_ms: u64, payload: &[u8]) {
        let cost = payload.len() + uid.len() + ENTRY_OVERHEAD;
        if self.budget == 0 || cost > self.budget {
            // Not kept: reads from here on must ask NATS.
            self.lock().floor = seq;
            return;
        }
        let mut inner = self.lock();
        if seq <= inner.floor {
            return;
        }
        while inner.bytes + cost > self.budget && !inner.order.is_empty() {
            inner.evict_oldest();
        }
        let uid: Arc<str> = match inner.by_user.get_key_value(uid) {
            Some((k, _)) => k.clone(),
            None => uid.into(),
        };
        inner.order.push_back((seq, uid.clone()));
        inner.bytes += cost;
        let user = inner.by_user.entry(uid.clone()).or_default();
        user.copies.push_back(Cached {
            seq,
            published_ms,
            // A copy, not a slice: a slice would keep the whole read buffer alive.
            payload: Bytes::copy_from_slice(payload),
        });
        // The stream keeps at most --max-inbox copies per user: so does the cache.
        let mut freed = 0;
        while user.copies.len() > self.max_inbox {
            let dropped = user.copies.pop_front().expect("longer than max_inbox");
            user.floor = dropped.seq;
            freed += dropped.payload.len() + uid.len() + ENTRY_OVERHEAD;
        }
        inner.bytes -= freed;
    }

    /// Up to `limit` of `uid`'s copies after `after`, if every one of them is cached.
    pub(super) fn read(&self, uid: &str, after: u64, limit: usize) -> Option<Page> {
        let inner = self.lock();
        if after < inner.floor {
            return None;
        }
        let Some(user) = inner.by_user.get(uid) else {
            return Some(Page::default());
        };
        if after < user.floor {
            return None;
        }
        let copies = &user.copies;
        let start = copies.partition_point(|c| c.seq <= after);
        let oldest = copies.get(start).map_or(u64::MAX, |c| c.published_ms);
        if oldest.saturating_add(self.retention.as_millis() as u64) < now_ms() {
            // The stream may have dropped it by age: NATS knows, and says gap.
            return None;
        }
        let mut messages: Vec<Arc<Message>> = Vec::with_capacity(limit.min(copies.len() - start));
        for c in copies.iter().skip(start).take(limit) {
            match decode_payload(&c.payload, c.seq, c.published_ms) {
                Some(m) => messages.push(Arc::new(m)),
                None => tracing::warn!(
                    seq = c.seq,
                    "skipping a stored payload that does not decode"
                ),
            }
        }
        Some(Page {
            more: copies.len() - start > limit,
            gap: false,
            messages,
        })
    }

    /// Copies and bytes held now.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.order.len(), inner.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn evict_oldest(&mut self) {
        let Some((seq, uid)) = self.order.pop_front() else {
            return;
        };
        if let Some(user) = self.by_user.get_mut(&uid) {
            // Not there if --max-inbox dropped it already (its bytes went then).
            if user.copies.front().is_some_and(|c| c.seq == seq) {
                let c = user.copies.pop_front().expect("checked");
                self.bytes -= c.payload.len() + uid.len() + ENTRY_OVERHEAD;
            }
            if user.copies.is_empty() {
                // Its own floor is at most this seq, which the cache's floor becomes.
                self.by_user.remove(&uid);
            }
        }
        self.floor = seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: u64) -> Vec<u8> {
        rmp_serde::to_vec_named(
            &serde_json::json!({"id": format!("m{n}"), "from": "a", "to": "b", "ts": n, "body": n}),
        )
        .unwrap()
    }

    fn seqs(p: &Page) -> Vec<u64> {
        p.messages.iter().map(|m| m.seq).collect()
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn reads_above_the_floor_come_from_memory_and_others_do_not() {
        let r = Recent::new(1 << 20, 100, LONG);
        r.restart_at(10);
        for seq in 11..=20 {
            r.insert(
                if seq % 2 == 0 { "bob" } else { "ann" },
                seq,
                now_ms(),
                &payload(seq),
            );
        }
        assert_eq!(
            seqs(&r.read("bob", 10, 100).unwrap()),
            vec![12, 14, 16, 18, 20]
        );
        assert_eq!(seqs(&r.read("bob", 14, 100).unwrap()), vec![16, 18, 20]);
        let page = r.read("bob", 10, 2).unwrap();
        assert_eq!((seqs(&page), page.more), (vec![12, 14], true));
        assert!(r.read("carol", 12, 10).unwrap().messages.is_empty());
        assert!(
            r.read("bob", 9, 10).is_none(),
            "below where the tail started"
        );
        assert_eq!(r.read("ann", 20, 10).unwrap().messages.len(), 0);
        assert_eq!(r.read("ann", 10, 1).unwrap().messages[0].id, "m11");
    }

    #[test]
    fn the_oldest_copies_leave_first_and_raise_the_floor() {
        let one = payload(1).len() + 3 + ENTRY_OVERHEAD;
        let r = Recent::new(one * 3, 100, LONG);
        for seq in 1..=5 {
            r.insert("bob", seq, now_ms(), &payload(seq));
        }
        assert_eq!(r.held(), (3, one * 3));
        assert!(r.read("bob", 1, 10).is_none(), "2 was evicted");
        assert_eq!(seqs(&r.read("bob", 2, 10).unwrap()), vec![3, 4, 5]);
        r.restart_at(100);
        assert_eq!(r.held(), (0, 0));
        assert!(r.read("bob", 5, 10).is_none());
        let none = Recent::new(0, 100, LONG);
        none.insert("bob", 7, now_ms(), &payload(7));
        assert!(
            none.read("bob", 6, 10).is_none(),
            "a zero budget caches nothing"
        );
    }

    #[test]
    fn what_the_stream_drops_by_max_inbox_or_age_is_read_from_nats() {
        let one = payload(1).len() + 3 + ENTRY_OVERHEAD;
        let r = Recent::new(1 << 20, 3, LONG);
        for seq in 1..=5 {
            r.insert("bob", seq, now_ms(), &payload(seq));
            r.insert("ann", 100 + seq, now_ms(), &payload(seq));
        }
        assert_eq!(r.held().1, 6 * one, "three copies each");
        assert!(
            r.read("bob", 1, 10).is_none(),
            "bob's 2 went for --max-inbox"
        );
        assert_eq!(seqs(&r.read("bob", 2, 10).unwrap()), vec![3, 4, 5]);
        // The budget still evicts in arrival order across users.
        let small = Recent::new(one * 2, 3, LONG);
        for seq in 1..=4 {
            small.insert("bob", seq, now_ms(), &payload(seq));
        }
        assert_eq!(small.held(), (2, 2 * one));
        let old = Recent::new(1 << 20, 100, Duration::from_secs(60));
        old.insert("bob", 1, now_ms() - 120_000, &payload(1));
        old.insert("bob", 2, now_ms(), &payload(2));
        assert!(old.read("bob", 0, 10).is_none(), "1 is past --retention");
        assert_eq!(seqs(&old.read("bob", 1, 10).unwrap()), vec![2]);
    }
}
