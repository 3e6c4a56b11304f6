//! The embedded store of standalone mode: inboxes, dedupe window and cursors in process
//! memory behind one mutex.
//!
//! Seqs come from one counter for the whole store, like JetStream's stream sequence, so they
//! increase within each inbox without being contiguous. Copies are handed to the [`Fanout`]
//! under the same lock that stores them, which keeps delivery in seq order per inbox.
//! Every inbox copy of one message shares that message's one [`Draft`]: an inbox keeps only
//! `(seq, Arc<Draft>)`, and a [`Message`](imgate_proto::Message) is built when a copy is
//! read or delivered.
//! Nothing here survives a restart of the process: each start is a new epoch.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hashbrown::HashTable;

use super::{
    now_ms, Appended, ChangeError, CursorWrite, Draft, Fanout, Group, GroupChange, History,
    NotifyRecord, NotifyState, Older, Page, Store, StoreError, DEDUPE_WINDOW,
};

/// What an inbox keeps: messages younger than `retention`, at most `max_inbox` of them.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    pub retention: Duration,
    pub max_inbox: usize,
}

/// The standalone store.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    keep: Keep,
    fanout: Arc<dyn Fanout>,
    /// [`DEDUPE_WINDOW`]; shorter in tests.
    dedupe_window: Duration,
    epoch: Arc<str>,
}

#[derive(Default)]
struct Inner {
    last_seq: u64,
    inboxes: HashMap<String, Inbox>,
    /// Sends within the dedupe window, found by their `(from, id)`.
    dedupe: HashTable<DedupeEntry>,
    /// Insertion order of `dedupe`, to expire it; the same keys, shared.
    dedupe_order: VecDeque<(Instant, SendKey)>,
    dedupe_hasher: RandomState,
    /// (uid, device) -> cursor, in order so a user's devices are one range.
    cursors: BTreeMap<(String, String), u64>,
    groups: HashMap<String, Group>,
    revocations: HashMap<String, u64>,
    /// uid -> read position.
    reads: HashMap<String, u64>,
    notify: HashMap<String, NotifyRecord>,
}

/// A send within the dedupe window and what it returned.
struct DedupeEntry {
    key: SendKey,
    appended: Appended,
}

/// `from` and `id` of a send in one allocation, shared by the dedupe table and its expiry
/// queue. Not the stored draft: a draft retention has dropped from every inbox must not stay
/// in memory, body and all, for the rest of the window.
#[derive(Clone)]
struct SendKey {
    from_then_id: Arc<str>,
    from_len: usize,
}

impl SendKey {
    fn new(from: &str, id: &str) -> Self {
        SendKey {
            from_then_id: [from, id].concat().into(),
            from_len: from.len(),
        }
    }

    fn parts(&self) -> (&str, &str) {
        self.from_then_id.split_at(self.from_len)
    }

    fn is(&self, from: &str, id: &str) -> bool {
        self.parts() == (from, id)
    }

    fn hash(&self, hasher: &RandomState) -> u64 {
        let (from, id) = self.parts();
        send_hash(hasher, from, id)
    }
}

/// The dedupe table's hash of a send: the same for a stored key and for a draft's fields.
fn send_hash(hasher: &RandomState, from: &str, id: &str) -> u64 {
    hasher.hash_one((from, id))
}

#[derive(Default)]
struct Inbox {
    /// Each copy's seq and the message it is a copy of, in seq order.
    msgs: VecDeque<(u64, Arc<Draft>)>,
    /// Highest seq retention has removed; a reader starting below it has a gap.
    dropped_upto: u64,
}

impl Inbox {
    fn expire(&mut self, keep: Keep, now_ms: u64) {
        let horizon = now_ms.saturating_sub(keep.retention.as_millis() as u64);
        while let Some((seq, draft)) = self.msgs.front() {
            if self.msgs.len() > keep.max_inbox || draft.ts < horizon {
                self.dropped_upto = *seq;
                self.msgs.pop_front();
            } else {
                break;
            }
        }
    }

    fn last_seq(&self) -> u64 {
        self.msgs.back().map_or(self.dropped_upto, |(seq, _)| *seq)
    }
}

impl MemoryStore {
    pub fn new(keep: Keep, fanout: Arc<dyn Fanout>) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            keep,
            fanout,
            dedupe_window: DEDUPE_WINDOW,
            epoch: super::new_epoch().into(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind, still consistent enough
        // to serve: every mutation below completes before any call that could panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn acked_by_any_device(&self, uid: &str) -> Result<u64, StoreError> {
        let inner = self.lock();
        let from = (uid.to_owned(), String::new());
        Ok(inner
            .cursors
            .range(from..)
            .take_while(|((u, _), _)| u == uid)
            .map(|(_, seq)| *seq)
            .max()
            .unwrap_or(0))
    }

    async fn append(&self, draft: Draft, inboxes: &[String]) -> Result<Appended, StoreError> {
        let mut inner = self.lock();
        let now = Instant::now();
        while let Some((at, _)) = inner.dedupe_order.front() {
            if now.duration_since(*at) < self.dedupe_window {
                break;
            }
            let (_, old) = inner.dedupe_order.pop_front().expect("front exists");
            let hash = old.hash(&inner.dedupe_hasher);
            let same = |r: &DedupeEntry| Arc::ptr_eq(&r.key.from_then_id, &old.from_then_id);
            if let Ok(entry) = inner.dedupe.find_entry(hash, same) {
                entry.remove();
            }
        }
        let hash = send_hash(&inner.dedupe_hasher, &draft.from, &draft.id);
        let same = |r: &DedupeEntry| r.key.is(&draft.from, &draft.id);
        if let Some(original) = inner.dedupe.find(hash, same) {
            return Ok(original.appended.clone());
        }
        let now_ms = now_ms();
        let ts = draft.ts;
        let draft = Arc::new(draft);
        let mut seqs = Vec::with_capacity(inboxes.len());
        for uid in inboxes {
            inner.last_seq += 1;
            let seq = inner.last_seq;
            let inbox = inner.inboxes.entry(uid.clone()).or_default();
            inbox.msgs.push_back((seq, draft.clone()));
            inbox.expire(self.keep, now_ms);
            seqs.push(seq);
            self.fanout
                .deliver(uid, &mut || Some(draft.to_message(seq)));
        }
        let appended = Appended { seqs, ts };
        let key = SendKey::new(&draft.from, &draft.id);
        let entry = DedupeEntry {
            key: key.clone(),
            appended: appended.clone(),
        };
        let Inner {
            dedupe,
            dedupe_hasher,
            ..
        } = &mut *inner;
        dedupe.insert_unique(hash, entry, |r| r.key.hash(dedupe_hasher));
        inner.dedupe_order.push_back((now, key));
        Ok(appended)
    }

    async fn read(&self, uid: &str, after: u64, limit: usize) -> Result<Page, StoreError> {
        let mut inner = self.lock();
        let Some(inbox) = inner.inboxes.get_mut(uid) else {
            return Ok(Page::default());
        };
        inbox.expire(self.keep, now_ms());
        let start = inbox.msgs.partition_point(|(seq, _)| *seq <= after);
        Ok(Page {
            messages: inbox
                .msgs
                .range(start..)
                .take(limit)
                .map(|(seq, draft)| Arc::new(draft.to_message(*seq)))
                .collect(),
            gap: inbox.dropped_upto > after,
            more: inbox.msgs.len() - start > limit,
        })
    }

    async fn inbox_newest(&self, uid: &str) -> Result<u64, StoreError> {
        Ok(self.lock().inboxes.get(uid).map_or(0, Inbox::last_seq))
    }

    fn epoch(&self) -> Arc<str> {
        self.epoch.clone()
    }

    async fn high_seq(&self) -> Result<u64, StoreError> {
        Ok(self.lock().last_seq)
    }

    async fn history(&self, uid: &str, page: Older) -> Result<History, StoreError> {
        let Older { before, limit } = page;
        let mut inner = self.lock();
        let Some(inbox) = inner.inboxes.get_mut(uid) else {
            return Ok(History::default());
        };
        inbox.expire(self.keep, now_ms());
        let end = inbox
            .msgs
            .partition_point(|(seq, _)| before.is_none_or(|b| *seq < b));
        let start = end.saturating_sub(limit);
        let messages: Vec<_> = inbox
            .msgs
            .range(start..end)
            .rev()
            .map(|(seq, draft)| Arc::new(draft.to_message(*seq)))
            .collect();
        let next = (start > 0)
            .then(|| messages.last().map(|m| m.seq))
            .flatten();
        Ok(History { messages, next })
    }

    async fn cursor(&self, uid: &str, device: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .lock()
            .cursors
            .get(&(uid.to_owned(), device.to_owned()))
            .copied())
    }

    async fn save_cursors(&self, cursors: &mut [CursorWrite]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for w in cursors {
            let slot = inner
                .cursors
                .entry((w.uid.clone(), w.device.clone()))
                .or_insert(0);
            *slot = (*slot).max(w.seq);
        }
        Ok(())
    }

    async fn read_position(&self, uid: &str) -> Result<u64, StoreError> {
        Ok(self.lock().reads.get(uid).copied().unwrap_or(0))
    }

    async fn set_read(&self, uid: &str, seq: u64, by: u64) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let slot = inner.reads.entry(uid.to_owned()).or_insert(0);
        if seq <= *slot {
            return Ok(*slot);
        }
        *slot = seq;
        // Under the lock, so two rises reach connections in the order they were stored.
        self.fanout.read(uid, seq, by);
        Ok(seq)
    }

    async fn ready(&self) -> bool {
        true
    }

    async fn create_group(&self, id: &str, group: &Group) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if inner.groups.contains_key(id) {
            return Ok(false);
        }
        inner.groups.insert(id.to_owned(), group.clone());
        Ok(true)
    }

    async fn group(&self, id: &str) -> Result<Option<Group>, StoreError> {
        Ok(self.lock().groups.get(id).cloned())
    }

    async fn change_group(&self, id: &str, change: &GroupChange<'_>) -> Result<Group, ChangeError> {
        let mut inner = self.lock();
        let current = inner.groups.get(id).ok_or(ChangeError::NotFound)?;
        let next = change(current).map_err(ChangeError::Refused)?;
        inner.groups.insert(id.to_owned(), next.clone());
        Ok(next)
    }

    async fn revoke(&self, uid: &str, before: u64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let v = inner.revocations.entry(uid.to_owned()).or_insert(0);
        *v = (*v).max(before);
        Ok(())
    }

    async fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .revocations
            .iter()
            .map(|(u, b)| (u.clone(), *b))
            .collect())
    }
}

#[async_trait]
impl NotifyState for MemoryStore {
    async fn notify_records(&self) -> Result<Vec<(String, NotifyRecord)>, StoreError> {
        Ok(self
            .lock()
            .notify
            .iter()
            .map(|(u, r)| (u.clone(), *r))
            .collect())
    }

    async fn notify_record(&self, uid: &str) -> Result<NotifyRecord, StoreError> {
        Ok(self.lock().notify.get(uid).copied().unwrap_or_default())
    }

    async fn save_notify(&self, uid: &str, record: NotifyRecord) -> Result<(), StoreError> {
        self.lock().notify.insert(uid.to_owned(), record);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgate_proto::Message;
    use serde_json::json;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, u64)>>);

    impl Fanout for Recorder {
        fn read(&self, _: &str, _: u64, _: u64) {}
        fn deliver(&self, uid: &str, build: &mut dyn FnMut() -> Option<Message>) {
            let m = build().unwrap();
            self.0.lock().unwrap().push((uid.to_owned(), m.seq));
        }
    }

    fn draft(id: &str, from: &str, to: &str) -> Draft {
        Draft {
            id: id.into(),
            from: from.into(),
            to: Some(to.into()),
            group: None,
            ts: now_ms(),
            body: json!({"text": id}).into(),
        }
    }

    fn store(max_inbox: usize) -> (MemoryStore, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let keep = Keep {
            retention: Duration::from_secs(3600),
            max_inbox,
        };
        (MemoryStore::new(keep, rec.clone()), rec)
    }

    #[tokio::test]
    async fn append_writes_each_inbox_and_fans_out_in_order() {
        let (s, rec) = store(100);
        let inboxes = ["bob".to_owned(), "alice".to_owned()];
        let a = s
            .append(draft("1", "alice", "bob"), &inboxes)
            .await
            .unwrap();
        let b = s
            .append(draft("2", "alice", "bob"), &inboxes)
            .await
            .unwrap();
        assert_eq!(a.seqs, vec![1, 2]);
        assert_eq!(b.seqs, vec![3, 4]);
        let bob = s.read("bob", 0, 10).await.unwrap();
        assert_eq!(
            bob.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert!(!bob.gap);
        assert_eq!(s.read("bob", 1, 10).await.unwrap().messages.len(), 1);
        assert_eq!(s.inbox_newest("alice").await.unwrap(), 4);
        assert_eq!(s.inbox_newest("nobody").await.unwrap(), 0);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![
                ("bob".into(), 1),
                ("alice".into(), 2),
                ("bob".into(), 3),
                ("alice".into(), 4)
            ]
        );
    }

    #[tokio::test]
    async fn a_messages_inbox_copies_share_one_stored_draft() {
        let (s, _) = store(100);
        let inboxes = ["bob".to_owned(), "alice".to_owned()];
        s.append(draft("1", "alice", "bob"), &inboxes)
            .await
            .unwrap();
        {
            let inner = s.lock();
            let (bob_seq, bob) = &inner.inboxes["bob"].msgs[0];
            let (alice_seq, alice) = &inner.inboxes["alice"].msgs[0];
            assert!(Arc::ptr_eq(bob, alice));
            assert_eq!((*bob_seq, *alice_seq), (1, 2));
        }
        // Each read copy still carries its own inbox's seq.
        assert_eq!(s.read("alice", 0, 10).await.unwrap().messages[0].seq, 2);
    }

    #[tokio::test]
    async fn duplicate_send_returns_original_and_stores_nothing() {
        let (s, rec) = store(100);
        let inboxes = ["bob".to_owned(), "alice".to_owned()];
        let a = s
            .append(draft("x", "alice", "bob"), &inboxes)
            .await
            .unwrap();
        let again = s
            .append(draft("x", "alice", "bob"), &inboxes)
            .await
            .unwrap();
        assert_eq!(a, again);
        assert_eq!(s.read("bob", 0, 10).await.unwrap().messages.len(), 1);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        // Same id from another sender is another message.
        let other = s
            .append(draft("x", "carol", "bob"), &["bob".to_owned()])
            .await
            .unwrap();
        assert_ne!(other.seqs, a.seqs[..1]);
    }

    #[tokio::test]
    async fn a_send_repeated_after_the_dedupe_window_is_a_new_message() {
        let (mut s, _) = store(100);
        s.dedupe_window = Duration::from_millis(50);
        let inboxes = ["bob".to_owned(), "alice".to_owned()];
        let first = s.append(draft("x", "alice", "bob"), &inboxes).await;
        let other = s.append(draft("y", "alice", "bob"), &inboxes).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Both expire on the next append; "y" is then stored again, not answered from memory.
        let again = s.append(draft("y", "alice", "bob"), &inboxes).await;
        assert_ne!(again.unwrap().seqs, other.unwrap().seqs);
        assert_eq!(s.lock().dedupe.len(), 1, "expired entries are gone");
        assert_eq!(s.lock().dedupe_order.len(), 1);
        // Within the window the repeat is still the original.
        let x = s
            .append(draft("x", "alice", "bob"), &inboxes)
            .await
            .unwrap();
        assert_ne!(x.seqs, first.unwrap().seqs);
        let x_again = s
            .append(draft("x", "alice", "bob"), &inboxes)
            .await
            .unwrap();
        assert_eq!(x_again, x);
        assert_eq!(s.read("bob", 0, 10).await.unwrap().messages.len(), 4);
    }

    #[tokio::test]
    async fn a_message_dropped_from_every_inbox_is_not_kept_by_the_dedupe_window() {
        let (s, _) = store(1);
        let bob = ["bob".to_owned()];
        let first = s.append(draft("x", "alice", "bob"), &bob).await.unwrap();
        let kept = Arc::downgrade(&s.lock().inboxes["bob"].msgs[0].1);
        s.append(draft("y", "alice", "bob"), &bob).await.unwrap();
        assert!(kept.upgrade().is_none(), "the dropped draft is freed");
        // Its send is still remembered within the window.
        let again = s.append(draft("x", "alice", "bob"), &bob).await.unwrap();
        assert_eq!(again, first);
    }

    #[tokio::test]
    async fn max_inbox_drops_oldest_and_reports_gap() {
        let (s, _) = store(3);
        for i in 0..5 {
            s.append(draft(&i.to_string(), "alice", "bob"), &["bob".to_owned()])
                .await
                .unwrap();
        }
        let page = s.read("bob", 0, 10).await.unwrap();
        assert_eq!(
            page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert!(page.gap);
        assert!(s.read("bob", 1, 10).await.unwrap().gap);
        assert!(!s.read("bob", 2, 10).await.unwrap().gap);
        assert_eq!(s.read("bob", 3, 1).await.unwrap().messages.len(), 1);
    }

    #[tokio::test]
    async fn retention_drops_old_messages_and_reports_gap() {
        let rec = Arc::new(Recorder::default());
        let keep = Keep {
            retention: Duration::from_millis(50),
            max_inbox: 100,
        };
        let s = MemoryStore::new(keep, rec);
        s.append(draft("old", "alice", "bob"), &["bob".to_owned()])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        s.append(draft("new", "alice", "bob"), &["bob".to_owned()])
            .await
            .unwrap();
        let page = s.read("bob", 0, 10).await.unwrap();
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.messages[0].id, "new");
        assert!(page.gap);
        assert_eq!(s.inbox_newest("bob").await.unwrap(), 2);
    }

    #[tokio::test]
    async fn cursors_never_move_back() {
        let (s, _) = store(3);
        assert_eq!(s.cursor("bob", "phone").await.unwrap(), None);
        s.save_cursors(&mut [CursorWrite::new("bob", "phone", 7)])
            .await
            .unwrap();
        s.save_cursors(&mut [CursorWrite::new("bob", "phone", 5)])
            .await
            .unwrap();
        assert_eq!(s.cursor("bob", "phone").await.unwrap(), Some(7));
    }
}
