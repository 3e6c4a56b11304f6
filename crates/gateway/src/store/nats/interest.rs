//! Interest fanout (`--fanout interest`): the gateway subscribes to `<prefix>.live.<uid>`
//! while it holds a connection (or a long poll) of uid, so NATS routes each republished
//! copy only to the gateways that hold its recipient. NATS's subject interest is the
//! registry; this file keeps only the subscriptions of this gateway.
//!
//! - [`NatsStore::follow`] counts the holders of an inbox. The first one subscribes, then
//!   reads the inbox's last seq with a direct get on the same connection, which the server
//!   handles after the subscription: every copy stored after that seq is republished to
//!   the subscription (on one NATS server at once; across a NATS cluster the interest
//!   reaches the stream's server a moment later, and a copy lost in that moment is found
//!   like any lost copy), and every copy up to it is in the backlog the connection reads
//!   next. The last holder to go unsubscribes.
//! - Each followed inbox has a task of its own that reads its subscription and hands its
//!   copies over in seq order. Republish is at most once: a copy whose
//!   `Nats-Last-Sequence` (the previous seq of the same inbox) is above the last seq handed
//!   over means copies were lost on the way, and they are read back from the stream
//!   (batch direct get) before it.
//! - The checker ([`NatsStore::run_interest_tail`]) compares followed inboxes with the
//!   stream (multi-last batch direct gets) and asks an inbox's task to read back what it
//!   lacks; the task first takes everything its subscription already received, so only
//!   what is really missing is read. After a reconnect, a slow-consumer cut or a stream
//!   leader election every followed inbox is checked at once. Otherwise [`CHECK_CHUNK`]
//!   inboxes are checked each [`POSITION_CHECK`], and an inbox found behind is read back
//!   only if it is behind that copy still at a later check (the copy may have been on its
//!   way): a lost last copy, which no later copy reveals, arrives within
//!   `ceil(inboxes / CHECK_CHUNK) + 1` intervals. Every [`EPOCH_CHECK`] intervals the
//!   checker also asks whether the stream was recreated.
//!
//! It knows nothing about connections: copies go to the [`Fanout`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, OnceCell};
use tokio_util::sync::CancellationToken;

use super::tail::{header_u64, live_time, POSITION_CHECK};
use super::{unavailable, NatsStore, MAX_DIRECT_BATCH};
use crate::metrics::TailStats;
use crate::store::{Fanout, Following, StoreError};

/// Inboxes checked against the stream in one request (a multi-last batch direct get).
/// nats-server resolves each subject's last message through the block that holds it, so a
/// check costs it about as much per inbox as a direct get; W1 with 256 per second per
/// gateway doubled nats-server's CPU.
pub(super) const CHECK_CHUNK: usize = 64;

/// Every this many position checks, the checker asks whether the stream was recreated
/// (one stream info, a JetStream API request).
const EPOCH_CHECK: u64 = 5;

/// How often an inbox's task reads back before it leaves a gap to the checker: a replica
/// answering a direct get may lag the leader that republished the copy.
const READ_BACK_TRIES: u32 = 3;

/// What the checker asks of an inbox's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Hand over everything up to this seq, which the stream holds.
    UpTo(u64),
    /// The stream was recreated: follow the new one from its start.
    NewEpoch,
}

/// The followed inboxes of this gateway, shared by the sessions, the inboxes' tasks and
/// the checker.
pub(super) struct Interest {
    followed: Mutex<HashMap<Arc<str>, Holders>>,
    next_gen: AtomicU64,
    stats: Arc<TailStats>,
    /// Where the inboxes' tasks hand copies to; set when the checker starts.
    fanout: OnceLock<Arc<dyn Fanout>>,
    /// Live copies received, counted only for the test hook that drops every Nth.
    seen: AtomicU64,
}

struct Holders {
    count: usize,
    inbox: Arc<Inbox>,
}

/// One followed inbox.
pub(super) struct Inbox {
    /// Tells one following of the inbox from the next, after everyone let go in between.
    gen: u64,
    /// Set once the subscription is in place and its task runs.
    subscribed: OnceCell<()>,
    /// The last seq handed over (or known to be in every holder's backlog read).
    delivered: AtomicU64,
    /// Ends the inbox's task, and with it the subscription, when the last holder goes.
    stop: CancellationToken,
    /// What the checker asks of the inbox's task.
    checks: OnceLock<mpsc::UnboundedSender<Check>>,
}

impl Inbox {
    fn check(&self, check: Check) {
        if let Some(tx) = self.checks.get() {
            let _ = tx.send(check);
        }
    }
}

/// An inbox a check found behind the stream: its newest seq then, and the check's number.
struct Suspect {
    gen: u64,
    seq: u64,
    check: u64,
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
            h.inbox.stop.cancel();
            followed.remove(&self.uid);
            self.interest.stats.followed.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Interest {
    pub(super) fn new(stats: Arc<TailStats>) -> Arc<Self> {
        Arc::new(Interest {
            followed: Mutex::new(HashMap::new()),
            next_gen: AtomicU64::new(1),
            stats,
            fanout: OnceLock::new(),
            seen: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Holders>> {
        self.followed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more holder of `uid`'s inbox.
    fn hold(self: &Arc<Self>, uid: &str) -> (Arc<Inbox>, Release) {
        let mut followed = self.lock();
        let key: Arc<str> = match followed.get_key_value(uid) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = uid.into();
                self.stats.followed.fetch_add(1, Ordering::Relaxed);
                let inbox = Arc::new(Inbox {
                    gen: self.next_gen.fetch_add(1, Ordering::Relaxed),
                    subscribed: OnceCell::new(),
                    delivered: AtomicU64::new(0),
                    stop: CancellationToken::new(),
                    checks: OnceLock::new(),
                });
                followed.insert(k.clone(), Holders { count: 0, inbox });
                k
            }
        };
        let h = followed.get_mut(&key).expect("just found or inserted");
        h.count += 1;
        let inbox = h.inbox.clone();
        let release = Release {
            interest: self.clone(),
            gen: inbox.gen,
            uid: key,
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

    /// Drops `uid`'s inbox of generation `gen`, whose subscription ended by itself: its
    /// holders' releases find nothing, and the next follow subscribes again.
    fn forget(&self, uid: &str, gen: u64) {
        let mut followed = self.lock();
        if followed.get(uid).is_some_and(|h| h.inbox.gen == gen) {
            followed.remove(uid);
            self.stats.followed.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Every followed inbox whose subscription is in place, oldest following first.
    fn all(&self) -> Vec<(Arc<str>, Arc<Inbox>)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .filter(|(_, h)| h.inbox.subscribed.initialized())
            .map(|(k, h)| (k.clone(), h.inbox.clone()))
            .collect();
        all.sort_unstable_by_key(|(_, inbox)| inbox.gen);
        all
    }
}

/// The inboxes a routine check covers: the next [`CHECK_CHUNK`] in following order after
/// `rota` (wrapping around; `rota` moves to the last of them), and the suspects not among
/// them.
fn next_to_check(
    all: Vec<(Arc<str>, Arc<Inbox>)>,
    rota: &mut u64,
    suspects: &HashMap<Arc<str>, Suspect>,
) -> Vec<(Arc<str>, Arc<Inbox>)> {
    let start = all.partition_point(|(_, inbox)| inbox.gen <= *rota);
    let next = all
        .iter()
        .cycle()
        .skip(start)
        .take(CHECK_CHUNK.min(all.len()));
    let next: Vec<_> = next.cloned().collect();
    *rota = next.last().map_or(0, |(_, inbox)| inbox.gen);
    let suspected = all.iter().filter(|(uid, inbox)| {
        suspects.get(uid).is_some_and(|s| s.gen == inbox.gen) && !next.iter().any(|(u, _)| u == uid)
    });
    next.iter().chain(suspected).cloned().collect()
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
        let (Some(fanout), Some(me)) = (interest.fanout.get(), self.me.upgrade()) else {
            return Err(StoreError::Unavailable(
                "the gateway is not following the stream yet".into(),
            ));
        };
        let subscribing = async {
            let sub = self
                .client
                .subscribe(self.names.live_subject(uid))
                .await
                .map_err(unavailable)?;
            // Out now; the server handles it before the direct get below.
            self.client.flush().await.map_err(unavailable)?;
            Ok::<_, StoreError>(sub)
        };
        let sub = tokio::time::timeout(self.timeout, subscribing)
            .await
            .map_err(|_| StoreError::Unavailable("subscribing to NATS timed out".into()))??;
        let last = self.inbox_last(uid).await?;
        inbox.delivered.fetch_max(last, Ordering::Relaxed);
        let (tx, checks) = mpsc::unbounded_channel();
        let _ = inbox.checks.set(tx);
        let task = me.follow_live(fanout.clone(), uid.clone(), inbox.clone(), sub, checks);
        tokio::spawn(task);
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

    /// One followed inbox's task: hands over its live copies in order, and reads back
    /// what the checker finds missing, until the last holder goes (dropping `sub`
    /// unsubscribes).
    async fn follow_live(
        self: Arc<Self>,
        fanout: Arc<dyn Fanout>,
        uid: Arc<str>,
        inbox: Arc<Inbox>,
        mut sub: async_nats::Subscriber,
        mut checks: mpsc::UnboundedReceiver<Check>,
    ) {
        let fanout = &*fanout;
        loop {
            let m = tokio::select! {
                biased;
                () = inbox.stop.cancelled() => return,
                Some(check) = checks.recv() => {
                    let upto = match check {
                        Check::UpTo(seq) => seq,
                        Check::NewEpoch => {
                            inbox.delivered.store(0, Ordering::Relaxed);
                            u64::MAX
                        }
                    };
                    // What the subscription received already first: only what is still
                    // missing after it is read back.
                    while let Some(Some(m)) = sub.next().now_or_never() {
                        self.live_copy(fanout, &uid, &inbox, &m).await;
                    }
                    if upto > inbox.delivered.load(Ordering::Relaxed) {
                        self.tail_stats.live_gaps.fetch_add(1, Ordering::Relaxed);
                        self.read_back_logged(fanout, &uid, &inbox).await;
                    }
                    continue;
                }
                m = sub.next() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            self.live_copy(fanout, &uid, &inbox, &m).await;
        }
        // The subscription ended by itself (the client closed): let the next follow of
        // the inbox subscribe again.
        if let Some(interest) = &self.interest {
            interest.forget(&uid, inbox.gen);
        }
    }

    /// One republished copy of a followed inbox.
    async fn live_copy(
        &self,
        fanout: &dyn Fanout,
        uid: &str,
        inbox: &Inbox,
        m: &async_nats::Message,
    ) {
        if inbox.stop.is_cancelled() {
            return;
        }
        // The test hook's count, shared by every inbox's task: kept only when it is on.
        if let (n @ 1.., Some(interest)) = (self.drop_live_every, &self.interest) {
            if (interest.seen.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(n) {
                return;
            }
        }
        let Some(seq) = header_u64(m, async_nats::header::NATS_SEQUENCE) else {
            return;
        };
        let delivered = inbox.delivered.load(Ordering::Relaxed);
        if seq <= delivered {
            return;
        }
        let previous = header_u64(m, async_nats::header::NATS_LAST_SEQUENCE).unwrap_or(0);
        if previous > delivered {
            self.tail_stats.live_gaps.fetch_add(1, Ordering::Relaxed);
            for attempt in 1..=READ_BACK_TRIES {
                self.read_back_logged(fanout, uid, inbox).await;
                let done = previous <= inbox.delivered.load(Ordering::Relaxed);
                if done || inbox.stop.is_cancelled() || attempt == READ_BACK_TRIES {
                    break;
                }
                let pause = std::time::Duration::from_millis(20 * u64::from(attempt));
                tokio::time::sleep(pause).await;
            }
            if seq <= inbox.delivered.load(Ordering::Relaxed) {
                return;
            }
            if previous > inbox.delivered.load(Ordering::Relaxed) {
                // Not read back (NATS is failing, or its replica lags): handing this one
                // over would skip the missing ones for good. The checker asks again.
                return;
            }
        }
        self.hand_over(fanout, &m.subject, seq, || live_time(m), &m.payload);
        inbox.delivered.store(seq, Ordering::Relaxed);
    }

    /// [`NatsStore::read_back`], logging a failure (the checker finds the inbox behind
    /// again and asks once more).
    async fn read_back_logged(&self, fanout: &dyn Fanout, uid: &str, inbox: &Inbox) {
        if let Err(e) = self.read_back(fanout, uid, inbox).await {
            tracing::warn!(error = %e, uid, "reading missed copies back failed; checking again soon");
        }
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
                if inbox.stop.is_cancelled() {
                    return Ok(());
                }
                self.tail_stats.received.fetch_add(1, Ordering::Relaxed);
                let seq = msg.seq;
                let mut msg = Some(msg);
                fanout.deliver(uid, &mut || msg.take().map(Arc::unwrap_or_clone));
                inbox.delivered.store(seq, Ordering::Relaxed);
            }
            // Past copies that do not decode too, so they are not asked for again.
            if batch.last > after {
                inbox.delivered.fetch_max(batch.last, Ordering::Relaxed);
            }
            if !batch.more || batch.last <= after {
                return Ok(());
            }
        }
    }

    /// Checks the followed inboxes against the stream until `stop` (see the module doc);
    /// from its start on, inboxes can be followed.
    pub async fn run_interest_tail(
        self: Arc<Self>,
        fanout: Arc<dyn Fanout>,
        stop: CancellationToken,
    ) {
        // Past 60 lines: one loop whose state (behind, the suspects, the rota, the count of
        // checks) every step of it reads and changes.
        let interest = self.interest.clone().expect("interest mode");
        if interest.fanout.set(fanout).is_err() {
            tracing::error!("the interest tail was started twice");
            return;
        }
        let leaders = self.leader_changes().await;
        let mut leaders = std::pin::pin!(leaders);
        // A failed check leaves inboxes unchecked: every one is checked at the next.
        let mut behind = false;
        let mut suspects: HashMap<Arc<str>, Suspect> = HashMap::new();
        // The following generation the rota checked last.
        let mut rota = 0;
        // Checks made, for the suspects' age and the epoch check.
        let mut checks: u64 = 0;
        let mut tick = tokio::time::interval(POSITION_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = self.resync.notified() => behind = true,
                Some(()) = leaders.next() => behind = true,
                _ = tick.tick() => {}
            }
            let all = interest.all();
            let inboxes = if behind {
                all
            } else {
                next_to_check(all, &mut rota, &suspects)
            };
            suspects.retain(|uid, s| inboxes.iter().any(|(u, i)| u == uid && i.gen == s.gen));
            checks += 1;
            if behind || checks.is_multiple_of(EPOCH_CHECK) {
                match self.adopt_new_epoch().await {
                    Ok(false) => {}
                    Ok(true) => {
                        suspects.clear();
                        for (_, inbox) in interest.all() {
                            inbox.check(Check::NewEpoch);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "asking the stream for its epoch failed; trying again");
                        behind = true;
                        continue;
                    }
                }
            }
            if inboxes.is_empty() {
                behind = false;
                continue;
            }
            let checked = self.check_inboxes(&inboxes, behind, checks, &mut suspects);
            match checked.await {
                Ok(()) => behind = false,
                Err(e) => {
                    tracing::warn!(error = %e, "checking followed inboxes against the stream failed; trying again");
                    behind = true;
                }
            }
        }
    }

    /// Compares `inboxes` with the stream (one multi-last batch direct get per
    /// [`CHECK_CHUNK`]) and asks the task of each one behind to read back. After a possible
    /// loss (`after_loss`: a reconnect, a cut, a leader change, a failed check) it asks at
    /// once. Otherwise it asks only for an inbox an earlier check (before check number
    /// `check`) found behind, and that is behind that copy still; under load most inboxes
    /// found behind have a copy on its way. `suspects` holds the inboxes found behind and
    /// not yet asked about.
    async fn check_inboxes(
        &self,
        inboxes: &[(Arc<str>, Arc<Inbox>)],
        after_loss: bool,
        check: u64,
        suspects: &mut HashMap<Arc<str>, Suspect>,
    ) -> anyhow::Result<()> {
        use jetstream_extra::batch_fetch::{BatchFetchErrorKind, BatchFetchExt};
        self.connected()?;
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
                // Read after the answer: the inbox's task may have handed over more since
                // (or a lagging replica answered), so a seq below it is no news.
                let delivered = inbox.delivered.load(Ordering::Relaxed);
                let earlier = suspects.get(&**uid).filter(|s| s.gen == inbox.gen);
                let still = earlier
                    .filter(|s| s.seq > delivered && s.check < check)
                    .map(|s| s.seq);
                if seq <= delivered {
                    suspects.remove(&**uid);
                } else if after_loss {
                    suspects.remove(&**uid);
                    inbox.check(Check::UpTo(seq));
                } else if let Some(lost) = still {
                    suspects.remove(&**uid);
                    inbox.check(Check::UpTo(lost));
                } else if earlier.is_none_or(|s| s.seq <= delivered) {
                    let gen = inbox.gen;
                    suspects.insert(uid.clone(), Suspect { gen, seq, check });
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_holder_to_go_unsubscribes_and_the_next_follow_is_a_new_generation() {
        let stats = Arc::new(TailStats::default());
        let interest = Interest::new(stats.clone());
        let (first, a) = interest.hold("bob");
        let (same, b) = interest.hold("bob");
        assert_eq!(first.gen, same.gen, "two holders share one subscription");
        assert_eq!(stats.followed.load(Ordering::Relaxed), 1);
        drop(a);
        assert!(!first.stop.is_cancelled(), "one holder is left");
        drop(b);
        assert!(
            first.stop.is_cancelled(),
            "the last holder's going ends the task"
        );
        assert_eq!(stats.followed.load(Ordering::Relaxed), 0);
        let (again, _c) = interest.hold("bob");
        assert_ne!(again.gen, first.gen, "followed again: a new generation");
        assert!(!again.stop.is_cancelled());
        // Not subscribed yet: nothing handed over is promised for it.
        assert_eq!(interest.delivered("bob"), None);
    }
}
