//! Notification windows of a gateway in a cluster, kept by NATS ([`NotifyWindows`]): one
//! pending window per user across gateways, each due window handled by one gateway, and a
//! window whose gateway died handled by another.
//!
//! - A send opens the window of each recipient this gateway does not know to have one
//!   pending, while its append runs, and is answered once both are done: an answered
//!   message has its window in NATS whatever happens to this gateway next, unless NATS
//!   refused the opening (then it is tried again in the background for a minute). A send
//!   that has windows to open runs its append and the opening in a task of their own, so a
//!   caller dropped meanwhile (a connection that closed) cannot leave the stored message
//!   without them. Sends for users with known windows (nearly all) pay a lookup per
//!   recipient and no task.
//! - A window covers a message if its handler reads the inbox after the message was
//!   stored. A gateway trusts a window it knows of until [`MARGIN_MS`] before it falls due
//!   (for the clocks of gateways and NATS servers to differ by that much), and asks again
//!   once the append is done: a window still trusted then falls due after the append, and
//!   one no longer trusted is opened again (or found pending, so not yet fired).
//! - A due window is handled as in standalone mode ([`Reporter`]), against the user's
//!   record in NATS. Before it sends, the gateway writes the notification into the record
//!   (compare-and-set) and refreshes that claim while it retries. Another handler of the
//!   same user meanwhile leaves a fresh claim alone and opens the next window; one that
//!   finds a claim nobody refreshed for [`STALE_MS`] (its gateway died) sends that
//!   notification again, under the same delivery id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Reporter, CONCURRENT};
use crate::store::nats::{DueWindow, NotifyWindows, Scheduled, Sending, WindowRecord};
use crate::store::{now_ms, Appended, Draft, Store, StoreError};

/// How long before a known window's due time a send opens one again.
const MARGIN_MS: u64 = 1000;
/// How often a gateway handling a window tells NATS, and the user's record, it is still
/// at it.
const PROGRESS: Duration = Duration::from_secs(10);
/// A claim not refreshed for this long belongs to a handler that stopped.
const STALE_MS: u64 = 20_000;
/// How many times (a second apart) a window that could not be opened is tried again.
const OPEN_RETRIES: u32 = 60;

/// The claim a handler holds while it sends: the record as it last wrote it, and the
/// revision that write made.
type Held = Mutex<Option<(WindowRecord, u64)>>;

/// The notifier of one gateway of a cluster.
pub struct Notifier {
    reporter: Reporter,
    windows: Arc<NotifyWindows>,
    /// Users with a window known to be pending, until [`MARGIN_MS`] before it falls due.
    open: Mutex<HashMap<String, u64>>,
    /// Windows being handled, so shutdown can let them record what they sent.
    tasks: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Notifier {
    pub fn new(reporter: Reporter, windows: Arc<NotifyWindows>) -> Arc<Self> {
        Arc::new(Notifier {
            reporter,
            windows,
            open: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
        })
    }

    pub(super) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The recipients of `inboxes` (but the sender, at `sender`) with no window known to
    /// be pending now.
    fn unknown(&self, inboxes: &[String], sender: Option<usize>) -> Vec<String> {
        let now = now_ms();
        let open = lock(&self.open);
        inboxes
            .iter()
            .enumerate()
            .filter(|(i, u)| Some(*i) != sender && open.get(*u).is_none_or(|until| *until <= now))
            .map(|(_, u)| u.clone())
            .collect()
    }

    /// Stores `draft` in `inboxes` and opens the windows this gateway does not know.
    pub async fn append(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        draft: Draft,
        inboxes: Vec<String>,
    ) -> Result<Appended, StoreError> {
        let sender = inboxes.iter().position(|u| *u == draft.from);
        if self.unknown(&inboxes, sender).is_empty() {
            let appended = store.append(draft, &inboxes).await?;
            // Asked again now that it is stored: a window may have neared its due time.
            // (A caller dropped here, in the rare case of one that did, leaves it unopened.)
            let late = self.unknown(&inboxes, sender);
            if !late.is_empty() {
                let failed = self.open_all(&late).await;
                self.retry_later(failed);
            }
            return Ok(appended);
        }
        let (this, store) = (self.clone(), store.clone());
        let task = tokio::spawn(async move {
            // The opening does not wait for the append: a window opened now falls due
            // `--notify-after` from now, long after the append. Asked again afterwards,
            // as above.
            let needed = this.unknown(&inboxes, sender);
            let (appended, mut failed) =
                tokio::join!(store.append(draft, &inboxes), this.open_all(&needed));
            // Nothing stored, nothing to open again.
            let appended = appended?;
            let late = this.unknown(&inboxes, sender);
            if !late.is_empty() {
                failed.extend(this.open_all(&late).await);
            }
            this.retry_later(failed);
            Ok(appended)
        });
        task.await
            .unwrap_or_else(|e| Err(StoreError::Internal(format!("a send's task failed: {e}"))))
    }

    /// Opens these users' windows at once; returns those that could not be opened.
    async fn open_all(&self, uids: &[String]) -> Vec<String> {
        let opened = futures::future::join_all(uids.iter().map(|u| self.open_window(u))).await;
        uids.iter()
            .zip(opened)
            .filter(|(_, ok)| !ok)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Tries to open these windows again in the background, a second apart, for a minute.
    /// The send that needed them is answered meanwhile: if this gateway stops first, or
    /// NATS stays unreachable, the message gets no notification.
    fn retry_later(self: &Arc<Self>, uids: Vec<String>) {
        for uid in uids {
            let this = self.clone();
            tokio::spawn(async move {
                for _ in 0..OPEN_RETRIES {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if this.open_window(&uid).await {
                        return;
                    }
                }
                tracing::error!(uid, "a notification window could not be opened; given up");
            });
        }
    }

    /// Opens `uid`'s window unless one is pending; `false` if NATS could not be asked.
    async fn open_window(&self, uid: &str) -> bool {
        let due_ms = self.reporter.next_due();
        match self.windows.schedule(uid, due_ms).await {
            Ok(Scheduled::Opened(at) | Scheduled::Pending(at)) => {
                let until = at.saturating_sub(MARGIN_MS);
                if until > now_ms() {
                    lock(&self.open).insert(uid.to_owned(), until);
                }
                true
            }
            Err(e) => {
                tracing::warn!(uid, error = %e, "could not open a notification window");
                false
            }
        }
    }

    /// Handles windows as NATS hands them to this gateway, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(CONCURRENT));
        let mut sweep = tokio::time::interval(self.reporter.after.max(Duration::from_secs(1)));
        loop {
            let due = tokio::select! {
                d = self.windows.due() => d,
                _ = stop.cancelled() => return,
            };
            match due {
                Ok(due) => {
                    let mut due = std::pin::pin!(due);
                    loop {
                        // A slot first, so a window pulled here finds one; up to PULL_AHEAD more
                        // can still wait in the client's buffer, and one that waits past the
                        // ack wait goes to another gateway too (the record's claim keeps it
                        // from being sent twice).
                        let slot = tokio::select! {
                            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
                            _ = stop.cancelled() => return,
                        };
                        let window = tokio::select! {
                            w = due.next() => match w {
                                Some(w) => w,
                                None => break,
                            },
                            _ = sweep.tick() => {
                                let now = now_ms();
                                lock(&self.open).retain(|_, until| *until > now);
                                continue;
                            }
                            _ = stop.cancelled() => return,
                        };
                        let (this, stop) = (self.clone(), stop.clone());
                        self.tasks.spawn(async move {
                            this.fire(window, &stop).await;
                            drop(slot);
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot pull due notification windows"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Handles one due window, telling NATS and the record it is at it meanwhile, and acks
    /// it once done.
    async fn fire(&self, window: DueWindow, stop: &CancellationToken) {
        let held = Held::default();
        let handled = {
            let handling = self.handle(&window.uid, &held, stop);
            let mut handling = std::pin::pin!(handling);
            let start = tokio::time::Instant::now() + PROGRESS;
            let mut tick = tokio::time::interval_at(start, PROGRESS);
            loop {
                tokio::select! {
                    r = &mut handling => break r,
                    _ = tick.tick() => {
                        window.progress().await;
                        self.refresh(&window.uid, &held).await;
                    }
                }
            }
        };
        match handled {
            Ok(Some(reopen)) => {
                if !reopen || self.open_window(&window.uid).await {
                    window.done().await;
                } else {
                    window.later(self.reporter.after).await;
                }
            }
            // Stopped: NATS hands the window out again once its ack wait passes, and the
            // claim left in the record goes stale.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(uid = window.uid, error = %e, "notification window failed; trying again");
                window.later(self.reporter.after).await;
            }
        }
    }

    /// Writes the time into the claim `held`, so no other gateway takes it over.
    async fn refresh(&self, uid: &str, held: &Held) {
        let Some((mut record, revision)) = lock(held).clone() else {
            return;
        };
        if let Some(s) = record.sending.as_mut() {
            s.at_ms = now_ms();
        }
        match self.windows.save(uid, &record, revision).await {
            // `handle` is not polled while this runs (both are in `fire`'s one task), so the
            // claim is still held.
            Ok(Some(revision)) => *lock(held) = Some((record, revision)),
            Ok(None) => {}
            Err(e) => tracing::debug!(uid, error = %e, "refreshing a notification claim failed"),
        }
    }

    /// Reports what `uid`'s window has due: `Some(true)` if another window must follow,
    /// `None` if stopped before the notification was taken.
    async fn handle(
        &self,
        uid: &str,
        held: &Held,
        stop: &CancellationToken,
    ) -> Result<Option<bool>, StoreError> {
        loop {
            let (record, revision) = self.windows.record(uid).await?;
            if let Some(sending) = record.sending.clone() {
                if now_ms() < sending.at_ms + STALE_MS {
                    // Another handler is sending this user's last notification: what came
                    // after it waits for the next window.
                    return Ok(Some(true));
                }
                match self
                    .take_over(uid, &record, revision, sending, held, stop)
                    .await?
                {
                    Some(outcome) => return Ok(outcome),
                    None => continue,
                }
            }
            let examined = self.reporter.examine(uid, record.upto).await?;
            let Some(notice) = examined.notice else {
                if examined.upto > record.upto {
                    let settled = WindowRecord {
                        upto: examined.upto,
                        sending: None,
                    };
                    if self.windows.save(uid, &settled, revision).await?.is_none() {
                        continue;
                    }
                }
                return Ok(Some(examined.more));
            };
            let claim = WindowRecord {
                upto: record.upto,
                sending: Some(Sending {
                    id: notice.id.clone(),
                    seqs: notice.seqs.clone(),
                    upto: examined.upto,
                    at_ms: now_ms(),
                }),
            };
            let Some(revision) = self.windows.save(uid, &claim, revision).await? else {
                // Another gateway got there first: look again.
                continue;
            };
            *lock(held) = Some((claim, revision));
            if self.reporter.send(uid, &notice, stop).await.is_none() {
                return Ok(None);
            }
            self.finish(uid, held, &notice.id, examined.upto).await?;
            return Ok(Some(examined.more));
        }
    }

    /// Takes over the stale claim `sending` of `uid`'s record (at `revision`), whose
    /// handler stopped before it finished, and sends that notification again, same id;
    /// `None` if the record changed meanwhile (look again), else what [`Self::handle`]
    /// returns.
    async fn take_over(
        &self,
        uid: &str,
        record: &WindowRecord,
        revision: u64,
        sending: Sending,
        held: &Held,
        stop: &CancellationToken,
    ) -> Result<Option<Option<bool>>, StoreError> {
        let taken = WindowRecord {
            upto: record.upto,
            sending: Some(Sending {
                at_ms: now_ms(),
                ..sending.clone()
            }),
        };
        let Some(revision) = self.windows.save(uid, &taken, revision).await? else {
            return Ok(None);
        };
        *lock(held) = Some((taken, revision));
        let notice = self.reporter.again(uid, &sending.id, &sending.seqs).await?;
        if let Some(notice) = &notice {
            tracing::info!(uid, id = notice.id, "sending a notification again");
            if self.reporter.send(uid, notice, stop).await.is_none() {
                return Ok(Some(None));
            }
        }
        self.finish(uid, held, &sending.id, sending.upto).await?;
        Ok(Some(Some(true)))
    }

    /// Clears notification `id` from `uid`'s record and raises its `upto`, starting from
    /// the claim `held`; a record that changed meanwhile is read again.
    async fn finish(&self, uid: &str, held: &Held, id: &str, upto: u64) -> Result<(), StoreError> {
        let known = lock(held).take();
        let (mut record, mut revision) = match known {
            Some(k) => k,
            None => self.windows.record(uid).await?,
        };
        loop {
            let ours = record.sending.as_ref().is_some_and(|s| s.id == id);
            if !ours && record.upto >= upto {
                return Ok(());
            }
            let done = WindowRecord {
                upto: record.upto.max(upto),
                sending: record.sending.filter(|s| s.id != id),
            };
            if self.windows.save(uid, &done, revision).await?.is_some() {
                return Ok(());
            }
            (record, revision) = self.windows.record(uid).await?;
        }
    }
}
