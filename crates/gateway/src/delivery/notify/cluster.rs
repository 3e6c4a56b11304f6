//! Notification windows of a gateway in a cluster, kept by NATS ([`NotifyWindows`]): one
//! pending window per user across gateways, each due window handled by one gateway, and a
//! window whose gateway died handled by another.
//!
//! - A send, once stored, opens the window of each recipient this gateway does not know to
//!   have one pending: at most one schedule per user per window from each gateway, never
//!   one per message. The send is answered after that, so an answered message has its
//!   window in NATS whatever happens to this gateway next.
//! - A window opened after the message was stored covers it: the window's handler, which
//!   runs after the window falls due, reads the inbox after the message was stored. A
//!   gateway that knows a window is pending trusts it until [`MARGIN_MS`] before it falls
//!   due, for the clocks of gateways and NATS servers to differ by that much.
//! - A due window is handled as in standalone mode ([`Reporter`]), against the user's
//!   record in NATS. Before it sends, the gateway writes the notification into the record
//!   (compare-and-set): a second gateway handling the same user meanwhile leaves it alone,
//!   and one that gets the window again after its first handler died sends the same
//!   notification again, under the same delivery id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Reporter, CONCURRENT};
use crate::store::nats::{DueWindow, NotifyRecord, NotifyWindows, Scheduled, Sending};
use crate::store::{now_ms, StoreError};

/// How long before a known window's due time a send opens one again.
const MARGIN_MS: u64 = 1000;
/// How often a gateway handling a window tells NATS it is still at it.
const PROGRESS: Duration = Duration::from_secs(10);

/// The notifier of one gateway of a cluster.
pub struct Notifier {
    after: Duration,
    reporter: Reporter,
    windows: Arc<NotifyWindows>,
    /// Users with a window known to be pending, until [`MARGIN_MS`] before it falls due.
    open: Mutex<HashMap<String, u64>>,
    /// Windows being handled, so shutdown can let them record what they sent.
    tasks: TaskTracker,
}

impl Notifier {
    pub fn new(reporter: Reporter, windows: Arc<NotifyWindows>) -> Arc<Self> {
        Arc::new(Notifier {
            after: reporter.after,
            reporter,
            windows,
            open: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
        })
    }

    pub(super) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message from `from` is stored in `inboxes`: opens the windows not known here.
    pub async fn open_after(self: &Arc<Self>, inboxes: &[String], from: &str) {
        let now = now_ms();
        let needed: Vec<String> = {
            let open = self.lock();
            inboxes
                .iter()
                .filter(|u| *u != from && open.get(*u).is_none_or(|until| *until <= now))
                .cloned()
                .collect()
        };
        if needed.is_empty() {
            return;
        }
        // In a task of its own, so a caller dropped meanwhile (a connection that closed)
        // still opens them.
        let this = self.clone();
        let opening = tokio::spawn(async move {
            for uid in needed {
                this.open_window(&uid).await;
            }
        });
        let _ = opening.await;
    }

    /// Opens `uid`'s window unless one is pending; `false` if NATS could not be asked.
    async fn open_window(&self, uid: &str) -> bool {
        let due_ms = now_ms() + self.after.as_millis() as u64;
        match self.windows.schedule(uid, due_ms).await {
            Ok(Scheduled::Opened(at) | Scheduled::Pending(at)) => {
                let until = at.saturating_sub(MARGIN_MS);
                if until > now_ms() {
                    self.lock().insert(uid.to_owned(), until);
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
        let mut sweep = tokio::time::interval(self.after.max(Duration::from_secs(1)));
        loop {
            let due = tokio::select! {
                d = self.windows.due() => d,
                _ = stop.cancelled() => return,
            };
            match due {
                Ok(due) => {
                    let mut due = std::pin::pin!(due);
                    loop {
                        let window = tokio::select! {
                            w = due.next() => match w {
                                Some(w) => w,
                                None => break,
                            },
                            _ = sweep.tick() => {
                                let now = now_ms();
                                self.lock().retain(|_, until| *until > now);
                                continue;
                            }
                            _ = stop.cancelled() => return,
                        };
                        let slot = tokio::select! {
                            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
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

    /// Handles one due window, telling NATS it is at it meanwhile, and acks it once done.
    async fn fire(&self, window: DueWindow, stop: &CancellationToken) {
        let handled = {
            let handling = self.handle(&window.uid, window.redelivered, stop);
            let mut handling = std::pin::pin!(handling);
            let start = tokio::time::Instant::now() + PROGRESS;
            let mut tick = tokio::time::interval_at(start, PROGRESS);
            loop {
                tokio::select! {
                    r = &mut handling => break r,
                    _ = tick.tick() => window.progress().await,
                }
            }
        };
        match handled {
            Ok(Some(reopen)) => {
                if !reopen || self.open_window(&window.uid).await {
                    window.done().await;
                } else {
                    window.later(self.after).await;
                }
            }
            // Stopped: NATS hands the window out again once its ack wait passes.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(uid = window.uid, error = %e, "notification window failed; trying again");
                window.later(self.after).await;
            }
        }
    }

    /// Reports what `uid`'s window has due: `Some(true)` if another window must follow,
    /// `None` if stopped before the notification was taken.
    async fn handle(
        &self,
        uid: &str,
        redelivered: bool,
        stop: &CancellationToken,
    ) -> Result<Option<bool>, StoreError> {
        loop {
            let (record, revision) = self.windows.record(uid).await?;
            if let Some(sending) = record.sending.clone() {
                if !redelivered {
                    // Another handler is sending this user's last notification: what came
                    // after it waits for the next window.
                    return Ok(Some(true));
                }
                // Its handler stopped before it finished: send it again, same id.
                return self.again(uid, record, revision, sending, stop).await;
            }
            let examined = self.reporter.examine(uid, record.upto).await?;
            let Some(notice) = examined.notice else {
                if examined.upto > record.upto {
                    let settled = NotifyRecord {
                        upto: examined.upto,
                        sending: None,
                    };
                    if self.windows.save(uid, &settled, revision).await?.is_none() {
                        continue;
                    }
                }
                return Ok(Some(examined.more));
            };
            let claim = NotifyRecord {
                upto: record.upto,
                sending: Some(Sending {
                    id: notice.id.clone(),
                    seqs: notice.seqs.clone(),
                    upto: examined.upto,
                }),
            };
            let Some(revision) = self.windows.save(uid, &claim, revision).await? else {
                // Another gateway got there first: look again.
                continue;
            };
            if self.reporter.send(uid, &notice, stop).await.is_none() {
                return Ok(None);
            }
            self.finish(uid, claim, revision, &notice.id, examined.upto)
                .await?;
            return Ok(Some(examined.more));
        }
    }

    /// Sends again the notification a stopped handler left in `uid`'s record.
    async fn again(
        &self,
        uid: &str,
        record: NotifyRecord,
        revision: u64,
        sending: Sending,
        stop: &CancellationToken,
    ) -> Result<Option<bool>, StoreError> {
        let notice = self.reporter.again(uid, &sending.id, &sending.seqs).await?;
        if let Some(notice) = &notice {
            tracing::info!(uid, id = notice.id, "sending a notification again");
            if self.reporter.send(uid, notice, stop).await.is_none() {
                return Ok(None);
            }
        }
        self.finish(uid, record, revision, &sending.id, sending.upto)
            .await?;
        Ok(Some(true))
    }

    /// Clears notification `id` from `uid`'s record (`record`, at `revision`, as last
    /// known here) and raises its `upto`; a record that changed meanwhile is read again.
    async fn finish(
        &self,
        uid: &str,
        mut record: NotifyRecord,
        mut revision: u64,
        id: &str,
        upto: u64,
    ) -> Result<(), StoreError> {
        loop {
            let ours = record.sending.as_ref().is_some_and(|s| s.id == id);
            if !ours && record.upto >= upto {
                return Ok(());
            }
            let done = NotifyRecord {
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
