//! Notification windows of a standalone gateway: kept in memory, and in the store so a
//! window pending at a restart fires after it.
//!
//! A send marks each recipient's window as pending ([`Notifier::open_windows`]: nothing more
//! per message while one is pending) before its append, so a caller dropped while the store
//! works (a connection that closed mid-send) cannot leave a stored message without them; a
//! window for a send that then fails finds nothing to report. The window's record (due
//! time, and the highest seq already settled) is kept by the store's [`NotifyState`]. What a due window reports is
//! [`Reporter`]'s decision. What is not yet old enough, did not fit, or came while the
//! window was handled opens the next window.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Reporter, CONCURRENT};
use crate::store::{now_ms, NotifyRecord, NotifyState, StoreError};

/// A pending window (its due time is in [`Pending::order`]).
struct Window {
    /// A message for the user was stored while the window was pending or being handled.
    touched: bool,
}

/// Pending windows, and what is known of each user's record.
#[derive(Default)]
struct Pending {
    windows: HashMap<String, Window>,
    /// The windows by due time.
    order: BTreeSet<(u64, String)>,
    /// Users whose stored record has a due time: a window opened for them needs no write,
    /// since after a restart that record fires at once anyway.
    armed: HashSet<String>,
    /// Each user's settled seq as last known here (at least the stored one).
    settled: HashMap<String, u64>,
}

/// What opening a window did.
#[derive(Debug, PartialEq, Eq)]
enum Opened {
    /// One was open already (now marked touched).
    Already,
    /// Opened; the stored record already has a due time.
    Armed,
    /// Opened; the record must be written for the window to survive a restart.
    Write,
}

impl Pending {
    /// Opens `uid`'s window due at `due_ms`, unless one is open.
    fn open(&mut self, uid: &str, due_ms: u64) -> Opened {
        if let Some(w) = self.windows.get_mut(uid) {
            w.touched = true;
            return Opened::Already;
        }
        let touched = false;
        self.windows.insert(uid.to_owned(), Window { touched });
        self.order.insert((due_ms, uid.to_owned()));
        match self.armed.insert(uid.to_owned()) {
            true => Opened::Write,
            false => Opened::Armed,
        }
    }
}

/// Windows a send opened: their due time, and the users whose records must be written.
pub struct Opening {
    due_ms: u64,
    to_write: Vec<String>,
}

/// How a due window ended.
struct Settled {
    /// Everything up to this seq is listed, acked, read, or the user's own.
    upto: u64,
    /// Messages from others wait above `upto` (not yet due, or more than one notification
    /// lists).
    more: bool,
    /// A notification was sent or given up: its messages must never be listed again.
    reported: bool,
}

/// The notifier of one standalone gateway.
pub struct Notifier {
    reporter: Reporter,
    state: Arc<dyn NotifyState>,
    pending: Mutex<Pending>,
    /// Serialises each read-modify-write of a record (a window opened by a send, and the
    /// end of a window), which are once per user per window.
    records: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
    /// Windows being handled, so shutdown can let them record what they sent.
    tasks: TaskTracker,
}

impl Notifier {
    /// Reads the windows left pending by the last run.
    pub async fn open(
        reporter: Reporter,
        state: Arc<dyn NotifyState>,
    ) -> anyhow::Result<Arc<Self>> {
        let mut pending = Pending::default();
        for (uid, r) in state.notify_records().await? {
            if r.due_ms > 0 {
                pending.open(&uid, r.due_ms);
            }
            pending.settled.insert(uid, r.upto);
        }
        if !pending.windows.is_empty() {
            tracing::info!(
                pending = pending.windows.len(),
                "notifications pending from the last run"
            );
        }
        Ok(Arc::new(Notifier {
            reporter,
            state,
            pending: Mutex::new(pending),
            records: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            tasks: TaskTracker::new(),
        }))
    }

    pub(super) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message from `from` is being stored in these inboxes: each recipient without a
    /// pending window gets one, in memory. Returns the windows whose records must be
    /// written ([`Self::record_windows`], once the message is stored).
    pub fn open_windows(&self, inboxes: &[String], from: &str) -> Opening {
        let due_ms = self.reporter.next_due();
        let mut opened = false;
        let mut to_write = Vec::new();
        {
            let mut p = self.lock();
            for uid in inboxes.iter().filter(|u| *u != from) {
                match p.open(uid, due_ms) {
                    Opened::Already => {}
                    Opened::Armed => opened = true,
                    Opened::Write => to_write.push(uid.clone()),
                }
            }
        }
        // The run loop wakes only for a new window, not for every message.
        if opened || !to_write.is_empty() {
            self.wake.notify_one();
        }
        Opening { due_ms, to_write }
    }

    /// Writes the records of windows [`Self::open_windows`] opened, so they survive a
    /// restart.
    pub async fn record_windows(&self, opening: Opening) {
        let due_ms = opening.due_ms;
        for uid in opening.to_write {
            let _one = self.records.lock().await;
            if let Err(e) = self.save(&uid, |r| NotifyRecord { due_ms, ..r }).await {
                tracing::warn!(uid, error = %e, "could not keep a notification window");
                // The next window tries the write again.
                self.lock().armed.remove(&uid);
            }
        }
    }

    /// Rewrites `uid`'s record with `change`; the caller holds `records`.
    async fn save(
        &self,
        uid: &str,
        change: impl FnOnce(NotifyRecord) -> NotifyRecord,
    ) -> Result<(), StoreError> {
        let record = self.state.notify_record(uid).await?;
        self.state.save_notify(uid, change(record)).await
    }

    /// Fires windows as they fall due, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(CONCURRENT));
        loop {
            let now = now_ms();
            let (due, next) = {
                let mut p = self.lock();
                let mut due = Vec::new();
                while let Some((at, _)) = p.order.first() {
                    if *at > now {
                        break;
                    }
                    let uid = p.order.pop_first().expect("first exists").1;
                    if let Some(w) = p.windows.get_mut(&uid) {
                        w.touched = false;
                    }
                    due.push(uid);
                }
                (due, p.order.first().map(|(at, _)| *at))
            };
            for uid in due {
                let slot = tokio::select! {
                    s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
                    _ = stop.cancelled() => return,
                };
                let (this, stop) = (self.clone(), stop.clone());
                self.tasks.spawn(async move {
                    this.fire(&uid, &stop).await;
                    drop(slot);
                });
            }
            let sleep = next.map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis(at.saturating_sub(now_ms()))
            });
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Handles `uid`'s due window. The record is written only when the window reported
    /// something (so it is never listed again) or when a window opens on a record without a
    /// due time: an online user's windows write nothing. A store failure tries again a
    /// window later; a stop (shutdown) while the webhook is tried leaves the window pending
    /// in the store.
    async fn fire(&self, uid: &str, stop: &CancellationToken) {
        let settled = match self.settle(uid, stop).await {
            Ok(Some(s)) => Some(s),
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(uid, error = %e, "notification window failed; trying again");
                None
            }
        };
        let reopen = settled.as_ref().is_none_or(|s| s.more);
        let reported = settled.as_ref().is_some_and(|s| s.reported);
        // Held from the decision to the write, so a window a send opens meanwhile is
        // written after this one's record, never overwritten by it.
        let _one = self.records.lock().await;
        let (due_ms, opened) = {
            let mut p = self.lock();
            let touched = p.windows.remove(uid).is_some_and(|w| w.touched);
            if let Some(s) = &settled {
                let known = p.settled.entry(uid.to_owned()).or_default();
                *known = (*known).max(s.upto);
            }
            if reopen || touched {
                let due_ms = self.reporter.next_due();
                (due_ms, p.open(uid, due_ms))
            } else {
                if reported {
                    p.armed.remove(uid);
                }
                (0, Opened::Already)
            }
        };
        if due_ms > 0 {
            self.wake.notify_one();
        }
        if !(reported || opened == Opened::Write) {
            return;
        }
        let upto = settled.map(|s| s.upto);
        let saved = self
            .save(uid, |r| NotifyRecord {
                due_ms,
                upto: upto.unwrap_or(r.upto).max(r.upto),
            })
            .await;
        if let Err(e) = saved {
            tracing::warn!(uid, error = %e, "notification window not recorded");
            self.lock().armed.remove(uid);
        }
    }

    /// Lists and reports what is due; `None` if stopped while the webhook was tried.
    async fn settle(
        &self,
        uid: &str,
        stop: &CancellationToken,
    ) -> Result<Option<Settled>, StoreError> {
        let known = self.lock().settled.get(uid).copied();
        let upto = match known {
            Some(upto) => upto,
            None => self.state.notify_record(uid).await?.upto,
        };
        let examined = self.reporter.examine(uid, upto).await?;
        let mut settled = Settled {
            upto: examined.upto,
            more: examined.more,
            reported: false,
        };
        if let Some(notice) = &examined.notice {
            if self.reporter.send(uid, notice, stop).await.is_none() {
                return Ok(None);
            }
            settled.reported = true;
        }
        Ok(Some(settled))
    }
}
