//! Interest fanout (`--fanout interest`): the gateway subscribes to `<prefix>.live.<uid>`
//! while it holds a connection (or a long poll) of uid, so NATS routes each republished
//! copy only to the gateways that hold its recipient. NATS's subject interest is the
//! registry; this file keeps only the subscriptions of this gateway.
//!
//! - [`NatsStore::follow`] counts the holders of an inbox. The first one subscribes, waits
//!   until the server has the subscription (a flush), then reads the inbox's last seq:
//!   every copy after it arrives on the subscription, and every copy up to it is in the
//!   backlog the connection reads next. The last holder to go unsubscribes.
//! - The tail ([`NatsStore::run_interest_tail`]) owns every subscription and hands copies
//!   over in seq order per inbox. Republish is at most once: a copy whose
//!   `Nats-Last-Sequence` (the previous seq of the same inbox) is above the last seq handed
//!   over for that inbox means copies were lost on the way, and they are read back from
//!   the stream (batch direct get) before it. After a reconnect, a slow-consumer cut or a
//!   stream leader change every followed inbox is checked against the stream, and a few
//!   inboxes more each [`POSITION_CHECK`], so a lost last copy, which no later copy reveals,
//!   is found within `ceil(inboxes / CHECK_CHUNK)` checks.
//!
//! It knows nothing about connections: copies go to the [`Fanout`].

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::stream::{AbortHandle, Abortable, SelectAll};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, OnceCell};
use tokio_util::sync::CancellationToken;

use super::{header_u64, live_time, unavailable, NatsStore, MAX_DIRECT_BATCH, POSITION_CHECK};
use crate::metrics::TailStats;
use crate::store::{Fanout, Following, StoreError};

/// Inboxes checked against the stream in one request (a multi-last batch direct get).
pub(super) const CHECK_CHUNK: usize = 256;

/// The followed inboxes of this gateway, shared by the sessions and the tail.
pub(super) struct Interest {
    followed: Mutex<HashMap<Arc<str>, Holders>>,
    next_gen: AtomicU64,
    to_tail: mpsc::UnboundedSender<Command>,
    stats: Arc<TailStats>,
    /// The tail's end of `to_tail`, taken when it starts.
    tail_rx: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
}

struct Holders {
    count: usize,
    inbox: Arc<Inbox>,
}

/// One followed inbox.
pub(super) struct Inbox {
    /// Tells one following of the inbox from the next, after everyone let go in between.
    gen: u64,
    /// Set once the subscription is in place.
    subscribed: OnceCell<()>,
    /// The last seq handed over (or known to be in every holder's backlog read).
    delivered: AtomicU64,
}

enum Command {
    /// A subscription in place, for the tail to read.
    Add {
        uid: Arc<str>,
        inbox: Arc<Inbox>,
        sub: async_nats::Subscriber,
    },
    /// Nobody holds the inbox any more.
    Remove { uid: Arc<str>, gen: u64 },
}

/// Lets go of an inbox when dropped (inside a [`Following`]).
struct Release {
    interest: Arc<Interest>,
    uid: Arc<str>,
    gen: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut followed = self.interest.lock();
        let Some(h) = followed.get_mut(&self.uid) else {
            return;
        };
        if h.inbox.gen != self.gen {
            return;
        }
        h.count -= 1;
        if h.count == 0 {
            followed.remove(&self.uid);
            self.interest.stats.followed.fetch_sub(1, Ordering::Relaxed);
            let _ = self.interest.to_tail.send(Command::Remove {
                uid: self.uid.clone(),
                gen: self.gen,
            });
        }
    }
}

impl Interest {
    pub(super) fn new(stats: Arc<TailStats>) -> Arc<Self> {
        let (to_tail, rx) = mpsc::unbounded_channel();
        Arc::new(Interest {
            followed: Mutex::new(HashMap::new()),
            next_gen: AtomicU64::new(1),
            to_tail,
            stats,
            tail_rx: Mutex::new(Some(rx)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Holders>> {
        self.followed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more holder of `uid`'s inbox.
    fn hold(self: &Arc<Self>, uid: &str) -> (Arc<Inbox>, Release) {
        let mut followed = self.lock();
        let (uid, h) = match followed.get_key_value(uid) {
            Some((k, _)) => {
                let k = k.clone();
                let h = followed.get_mut(&k).expect("just found");
                (k, h)
            }
            None => {
                let k: Arc<str> = uid.into();
                self.stats.followed.fetch_add(1, Ordering::Relaxed);
                let inbox = Arc::new(Inbox {
                    gen: self.next_gen.fetch_add(1, Ordering::Relaxed),
                    subscribed: OnceCell::new(),
                    delivered: AtomicU64::new(0),
                });
                let h = followed
                    .entry(k.clone())
                    .or_insert(Holders { count: 0, inbox });
                (k, h)
            }
        };
        h.count += 1;
        let inbox = h.inbox.clone();
        let release = Release {
            interest: self.clone(),
            gen: inbox.gen,
            uid,
        };
        (inbox, release)
    }

    /// The last seq handed over for `uid`, if it is followed.
    pub(super) fn delivered(&self, uid: &str) -> Option<u64> {
        let followed = self.lock();
        let h = followed.get(uid)?;
        h.inbox
            .subscribed
            .initialized()
            .then(|| h.inbox.delivered.load(Ordering::Relaxed))
    }

    /// Whether `gen` is still how `uid` is followed.
    fn current(&self, uid: &str, gen: u64) -> bool {
        self.lock().get(uid).is_some_and(|h| h.inbox.gen == gen)
    }

    /// Every followed inbox now.
    fn all(&self) -> Vec<(Arc<str>, Arc<Inbox>)> {
        self.lock()
            .iter()
            .filter(|(_, h)| h.inbox.subscribed.initialized())
            .map(|(k, h)| (k.clone(), h.inbox.clone()))
            .collect()
    }
}

type Copies = Pin<Box<dyn Stream<Item = (Arc<str>, Arc<Inbox>, async_nats::Message)> + Send>>;

/// What the tail holds: every subscription, merged into one stream.
struct Subscriptions {
    live: SelectAll<Abortable<Copies>>,
    handles: HashMap<Arc<str>, (u64, AbortHandle)>,
    /// Followed inboxes, with the generation they were added as, in the order the position
    /// check visits them.
    rota: VecDeque<(Arc<str>, u64)>,
}

impl NatsStore {
    /// Follows `uid`'s inbox (interest mode): see the module doc.
    pub(super) async fn follow_interest(
        &self,
        interest: &Arc<Interest>,
        uid: &str,
    ) -> Result<Following, StoreError> {
        let (inbox, release) = interest.hold(uid);
        inbox
            .subscribed
            .get_or_try_init(|| self.subscribe_inbox(interest, &release.uid, &inbox))
            .await?;
        if !self.follow_delay.is_zero() {
            tokio::time::sleep(self.follow_delay).await;
        }
        Ok(Following::until_dropped(release))
    }

    async fn subscribe_inbox(
        &self,
        interest: &Interest,
        uid: &Arc<str>,
        inbox: &Arc<Inbox>,
    ) -> Result<(), StoreError> {
        self.connected()?;
        let subscribing = async {
            let sub = self
                .client
                .subscribe(self.names.live_subject(uid))
                .await
                .map_err(unavailable)?;
            // The server has the subscription once it answered a ping sent after it.
            self.client.flush().await.map_err(unavailable)?;
            Ok::<_, StoreError>(sub)
        };
        let sub = tokio::time::timeout(self.timeout, subscribing)
            .await
            .map_err(|_| StoreError::Unavailable("subscribing to NATS timed out".into()))??;
        let last = self.inbox_last(uid).await?;
        inbox.delivered.fetch_max(last, Ordering::Relaxed);
        let _ = interest.to_tail.send(Command::Add {
            uid: uid.clone(),
            inbox: inbox.clone(),
            sub,
        });
        Ok(())
    }

    /// The seq of the newest copy stored in `uid`'s inbox (0 if none): one direct get.
    pub(super) async fn inbox_last(&self, uid: &str) -> Result<u64, StoreError> {
        self.connected()?;
        match self
            .stream
            .direct_get_last_for_subject(self.names.user_subject(uid))
            .await
        {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                Ok(0)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Hands the copies of followed inboxes over until `stop`.
    pub async fn run_interest_tail(
        self: Arc<Self>,
        fanout: Arc<dyn Fanout>,
        stop: CancellationToken,
    ) {
        let interest = self.interest.clone().expect("interest mode");
        let Some(mut commands) = interest
            .tail_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            tracing::error!("the interest tail was started twice");
            return;
        };
        let mut subs = Subscriptions {
            live: SelectAll::new(),
            handles: HashMap::new(),
            rota: VecDeque::new(),
        };
        let leaders = self.leader_changes().await;
        let mut leaders = std::pin::pin!(leaders);
        // A failed read back leaves inboxes behind: every one is checked again until a
        // check succeeds.
        let mut behind = false;
        let mut seen: u64 = 0;
        let mut check = tokio::time::interval(POSITION_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                () = self.resync.notified() => behind = true,
                Some(()) = leaders.next() => behind = true,
                Some(c) = commands.recv() => subs.apply(&interest, c),
                Some((uid, inbox, m)) = subs.live.next(), if !subs.live.is_empty() => {
                    if !interest.current(&uid, inbox.gen) {
                        continue;
                    }
                    seen += 1;
                    if self.drop_live_every > 0 && seen.is_multiple_of(self.drop_live_every) {
                        continue;
                    }
                    if let Err(e) = self.live_copy(&*fanout, &uid, &inbox, &m).await {
                        tracing::warn!(error = %e, uid = %uid, "reading missed copies back failed; checking again soon");
                        behind = true;
                    }
                    continue;
                }
                _ = check.tick() => {}
            }
            // A check: every followed inbox after a possible loss, else the next few.
            let inboxes = if behind {
                interest.all()
            } else {
                subs.next_in_rota(&interest)
            };
            if inboxes.is_empty() {
                behind = false;
                continue;
            }
            match self.check_inboxes(&*fanout, &inboxes, behind).await {
                Ok(()) => behind = false,
                Err(e) => {
                    tracing::warn!(error = %e, "checking followed inboxes against the stream failed; trying again");
                    behind = true;
                }
            }
        }
    }

    /// One republished copy of a followed inbox.
    async fn live_copy(
        &self,
        fanout: &dyn Fanout,
        uid: &str,
        inbox: &Inbox,
        m: &async_nats::Message,
    ) -> Result<(), StoreError> {
        let Some(seq) = header_u64(m, async_nats::header::NATS_SEQUENCE) else {
            return Ok(());
        };
        let delivered = inbox.delivered.load(Ordering::Relaxed);
        if seq <= delivered {
            return Ok(());
        }
        let previous = header_u64(m, async_nats::header::NATS_LAST_SEQUENCE).unwrap_or(0);
        if previous > delivered {
            self.tail_stats.live_gaps.fetch_add(1, Ordering::Relaxed);
            self.read_back(fanout, uid, inbox).await?;
            if seq <= inbox.delivered.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
        self.hand_over(fanout, &m.subject, seq, || live_time(m), &m.payload);
        inbox.delivered.store(seq, Ordering::Relaxed);
        Ok(())
    }

    /// Hands over everything stored in `uid`'s inbox after its delivered seq, in order.
    async fn read_back(
        &self,
        fanout: &dyn Fanout,
        uid: &str,
        inbox: &Inbox,
    ) -> Result<(), StoreError> {
        self.tail_stats.catch_ups.fetch_add(1, Ordering::Relaxed);
        loop {
            let after = inbox.delivered.load(Ordering::Relaxed);
            let batch = self
                .direct_batch(self.names.user_subject(uid), after, MAX_DIRECT_BATCH)
                .await?;
            for msg in batch.messages {
                let seq = msg.seq;
                self.tail_stats.received.fetch_add(1, Ordering::Relaxed);
                fanout.deliver(uid, &mut || Some(Message::clone(&msg)));
                inbox.delivered.store(seq, Ordering::Relaxed);
            }
            if !batch.more {
                return Ok(());
            }
        }
    }

    /// Compares `inboxes` with the stream (one multi-last batch direct get per
    /// [`CHECK_CHUNK`]) and reads back every one that is behind.
    /// `after_loss` (a reconnect, a cut, a leader change, a failed check) also asks whether
    /// the stream was recreated meanwhile.
    async fn check_inboxes(
        &self,
        fanout: &dyn Fanout,
        inboxes: &[(Arc<str>, Arc<Inbox>)],
        after_loss: bool,
    ) -> anyhow::Result<()> {
        use jetstream_extra::batch_fetch::{BatchFetchErrorKind, BatchFetchExt};
        self.connected()?;
        if after_loss {
            self.follow_new_epoch().await?;
        }
        for chunk in inboxes.chunks(CHECK_CHUNK) {
            let subjects = chunk
                .iter()
                .map(|(uid, _)| self.names.user_subject(uid))
                .collect();
            let mut replies = self
                .js
                .get_last_messages_for(&self.names.stream)
                .subjects(subjects)
                .batch(chunk.len())
                .send()
                .await?;
            let mut last = HashMap::with_capacity(chunk.len());
            while let Some(m) = replies.next().await {
                let m = match m {
                    Ok(m) => m,
                    Err(e) if e.kind() == BatchFetchErrorKind::NoMessages => break,
                    Err(e) => return Err(e.into()),
                };
                if let Some(uid) = self.names.owner(&m.subject) {
                    last.insert(uid.to_owned(), m.sequence);
                }
            }
            for (uid, inbox) in chunk {
                let Some(&seq) = last.get(&**uid) else {
                    continue;
                };
                let delivered = inbox.delivered.load(Ordering::Relaxed);
                if seq < delivered {
                    // An inbox's newest seq never falls, unless the stream is new.
                    self.follow_new_epoch().await?;
                    anyhow::bail!("the stream was recreated: reading every followed inbox again");
                }
                if seq > delivered {
                    self.tail_stats.live_gaps.fetch_add(1, Ordering::Relaxed);
                    self.read_back(fanout, uid, inbox).await?;
                }
            }
        }
        Ok(())
    }

    /// If the stream was recreated, follows every inbox of the new one from its start (the
    /// next check reads them).
    async fn follow_new_epoch(&self) -> anyhow::Result<()> {
        if self.adopt_new_epoch().await? {
            for (_, inbox) in self.interest.as_ref().map(|i| i.all()).unwrap_or_default() {
                inbox.delivered.store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// A stream of one item per leader election of the stream (JetStream's advisory): a
    /// new leader may not have republished every copy the old one stored. Empty if the
    /// subscription cannot be made.
    async fn leader_changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        let subject = format!(
            "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{}",
            self.names.stream
        );
        match self.client.subscribe(subject).await {
            Ok(sub) => sub.map(|_| ()).left_stream(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the stream's leader changes");
                futures::stream::pending().right_stream()
            }
        }
    }
}

use imgate_proto::Message;

impl Subscriptions {
    fn apply(&mut self, interest: &Interest, c: Command) {
        match c {
            Command::Add { uid, inbox, sub } => {
                // Let go of meanwhile (or followed again since): dropping `sub` unsubscribes.
                if !interest.current(&uid, inbox.gen) {
                    return;
                }
                let (handle, registration) = AbortHandle::new_pair();
                if let Some((_, old)) = self.handles.insert(uid.clone(), (inbox.gen, handle)) {
                    old.abort();
                }
                self.rota.push_back((uid.clone(), inbox.gen));
                let copies: Copies = Box::pin(sub.map(move |m| (uid.clone(), inbox.clone(), m)));
                self.live.push(Abortable::new(copies, registration));
            }
            Command::Remove { uid, gen } => {
                if self.handles.get(&uid).is_some_and(|(g, _)| *g == gen) {
                    let (_, (_, handle)) = self.handles.remove_entry(&uid).expect("just found");
                    handle.abort();
                }
            }
        }
    }

    /// The next [`CHECK_CHUNK`] followed inboxes of the position check's rota.
    fn next_in_rota(&mut self, interest: &Interest) -> Vec<(Arc<str>, Arc<Inbox>)> {
        let mut out = Vec::new();
        let mut visited = 0;
        let n = self.rota.len();
        while out.len() < CHECK_CHUNK && visited < n {
            let Some((uid, gen)) = self.rota.pop_front() else {
                break;
            };
            visited += 1;
            // Let go of, or followed again (and so in the rota again) since.
            if self.handles.get(&uid).is_none_or(|(g, _)| *g != gen) {
                continue;
            }
            let inbox = {
                let followed = interest.lock();
                followed
                    .get(&uid)
                    .filter(|h| h.inbox.gen == gen)
                    .map(|h| h.inbox.clone())
            };
            if let Some(inbox) = inbox {
                out.push((uid.clone(), inbox));
                self.rota.push_back((uid, gen));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_holder_to_go_unsubscribes_and_the_next_follow_is_a_new_generation() {
        let stats = Arc::new(TailStats::default());
        let interest = Interest::new(stats.clone());
        let mut tail = interest.tail_rx.lock().unwrap().take().unwrap();
        let (first, a) = interest.hold("bob");
        let (same, b) = interest.hold("bob");
        assert_eq!(first.gen, same.gen, "two holders share one subscription");
        assert_eq!(stats.followed.load(Ordering::Relaxed), 1);
        drop(a);
        assert!(tail.try_recv().is_err(), "one holder is left");
        assert!(interest.current("bob", first.gen));
        drop(b);
        match tail.try_recv() {
            Ok(Command::Remove { uid, gen }) => assert_eq!((&*uid, gen), ("bob", first.gen)),
            _ => panic!("the last holder's going is sent to the tail"),
        }
        assert_eq!(stats.followed.load(Ordering::Relaxed), 0);
        assert!(!interest.current("bob", first.gen));
        let (again, _c) = interest.hold("bob");
        assert_ne!(again.gen, first.gen, "followed again: a new generation");
        // Not subscribed yet: nothing handed over is promised for it.
        assert_eq!(interest.delivered("bob"), None);
    }
}
