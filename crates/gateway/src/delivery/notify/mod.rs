//! Offline notifications (`--notify-url`, `--notify-nats`): a user's stored messages that
//! no device acked and that are above the user's read position, `--notify-after` after they
//! were stored, are reported at most once per user per window.
//!
//! A send opens a window for each recipient that has none pending; when it falls due, the
//! window is handled once. Where windows live depends on the mode: [`standalone`] keeps them
//! in this process and in the store (a window pending at a restart fires after it);
//! [`cluster`] keeps them in NATS, so that one window per user is pending across gateways,
//! one gateway sends its notification, and another does when that one dies. What a due window
//! reports is decided the same way in both modes, by [`Reporter`]:
//!
//! - When a device acked (or the user read) the inbox's newest message, the window closes
//!   without reading the inbox: an online user costs a few lookups per window, not per
//!   message.
//! - Otherwise the inbox above what earlier notifications settled is read once: the user's
//!   own sends are skipped, what a device acked or the user read is passed over, and what
//!   is old enough is listed (at most [`MAX_LISTED`], oldest first). What is not old enough
//!   or did not fit is left for the next window.
//!
//! This module decides what to report; [`super::webhook`] carries it over HTTP.

pub mod cluster;
pub mod standalone;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::cursors::Cursors;
use super::hub::Hub;
use super::reads;
use super::webhook::{Outcome, Webhook};
use crate::config::NotifyArgs;
use crate::metrics::NotifyCounters;
use crate::store::nats::NotifyWindows;
use crate::store::{now_ms, Appended, Draft, Store, StoreError};

/// Messages one notification lists at most.
pub const MAX_LISTED: usize = 20;
/// Messages of an inbox read per window.
const WINDOW_READ: usize = 1000;
/// Windows handled at once.
const CONCURRENT: usize = 64;

/// The notifier of this gateway, in its mode.
pub enum Notifier {
    Standalone(Arc<standalone::Notifier>),
    Cluster(Arc<cluster::Notifier>),
}

impl Notifier {
    /// Stores `draft` in `inboxes` with `store`, and keeps the windows of its recipients
    /// (each mode's module says how, and why in that order).
    pub async fn append(
        &self,
        store: &Arc<dyn Store>,
        draft: Draft,
        inboxes: Vec<String>,
    ) -> Result<Appended, StoreError> {
        match self {
            Notifier::Standalone(n) => {
                let opening = n.open_windows(&inboxes, &draft.from);
                let appended = store.append(draft, &inboxes).await?;
                n.record_windows(opening).await;
                Ok(appended)
            }
            Notifier::Cluster(n) => n.append(store, draft, inboxes).await,
        }
    }

    /// Handles windows as they fall due, until `stop`.
    pub async fn run(&self, stop: CancellationToken) {
        match self {
            Notifier::Standalone(n) => n.clone().run(stop).await,
            Notifier::Cluster(n) => n.clone().run(stop).await,
        }
    }

    /// After `run` stopped: waits up to `limit` for the windows being handled to record
    /// their outcome.
    pub async fn stopped(&self, limit: Duration) {
        let tasks = match self {
            Notifier::Standalone(n) => n.tasks(),
            Notifier::Cluster(n) => n.tasks(),
        };
        tasks.close();
        if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
            tracing::warn!("notification windows still being handled at exit");
        }
    }
}

/// A notification ready to send.
#[derive(Debug, Clone)]
pub struct Notice {
    /// `X-Imgate-Delivery`: `<epoch>.<uid>.<first seq>.<last seq>`.
    pub id: String,
    /// The seqs it lists.
    pub seqs: Vec<u64>,
    body: Bytes,
}

/// What a due window found.
#[derive(Debug)]
pub struct Examined {
    /// Everything up to this seq is listed (by `notice`), acked, read, or the user's own.
    pub upto: u64,
    /// Messages from others wait above `upto` (not yet due, or more than one notification
    /// lists): another window must follow.
    pub more: bool,
    /// What to report, if anything.
    pub notice: Option<Notice>,
}

/// Decides what a due window reports, and sends it.
pub struct Reporter {
    after: Duration,
    body: bool,
    store: Arc<dyn Store>,
    cursors: Arc<Cursors>,
    /// Which of a user's devices are connected here, for their acks not yet stored.
    hub: Arc<Hub>,
    hook: Option<Webhook>,
    /// `--notify-nats`: also published on NATS.
    nats: Option<Arc<NotifyWindows>>,
    /// The store is NATS (cluster mode), whose inbox reads may lag its newest seq.
    nats_reads: bool,
    counters: NotifyCounters,
}

impl Reporter {
    /// Reads the signing secret. `windows` are the cluster's (none standalone).
    pub fn new(
        args: &NotifyArgs,
        store: Arc<dyn Store>,
        cursors: Arc<Cursors>,
        hub: Arc<Hub>,
        windows: Option<&Arc<NotifyWindows>>,
        counters: NotifyCounters,
    ) -> anyhow::Result<Self> {
        let secret = match &args.notify_secret_file {
            None => None,
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("reading --notify-secret-file {}: {e}", path.display())
            })?),
        };
        let hook = match args.notify_url.clone() {
            Some(url) => Some(Webhook::new(
                url,
                secret,
                args.notify_retry_for,
                counters.retried.clone(),
            )?),
            None => None,
        };
        Ok(Reporter {
            after: args.notify_after,
            body: args.notify_body,
            store,
            cursors,
            hub,
            hook,
            nats: windows.filter(|_| args.notify_nats).cloned(),
            nats_reads: windows.is_some(),
            counters,
        })
    }

    /// When a window opened now falls due (Unix ms).
    fn next_due(&self) -> u64 {
        now_ms() + self.after.as_millis() as u64
    }

    /// `uid`'s window, with everything up to `upto` settled before.
    pub async fn examine(&self, uid: &str, upto: u64) -> Result<Examined, StoreError> {
        let read = self.store.read_position(uid).await?;
        let newest = self.store.inbox_newest(uid).await?;
        // Acks of devices connected here may not be stored yet (`--cursor-interval`).
        let devices = self.hub.devices_of(uid);
        let live_ack = self.cursors.acked_here(uid, devices.iter().map(|d| &**d));
        let acked = self.store.acked_by_any_device(uid).await?.max(live_ack);
        let done = |upto| Examined {
            upto,
            more: false,
            notice: None,
        };
        if newest <= upto {
            return Ok(done(upto));
        }
        if acked.max(read) >= newest {
            // Everything was taken in time: the common case of an online user.
            self.suppressed(acked >= newest);
            return Ok(done(newest));
        }
        let old_enough = now_ms().saturating_sub(self.after.as_millis() as u64);
        let page = self.store.read(uid, upto, WINDOW_READ).await?;
        // In a cluster a page can come from this gateway's cache of what its tail saw,
        // which may lag the stream: one that ends below the newest seq leaves the rest to
        // the next window. (A standalone store's page is the inbox itself; its newest seq
        // can be one retention dropped.)
        let lags = self.nats_reads && page.messages.last().map_or(upto, |m| m.seq) < newest;
        let mut examined = Examined {
            more: page.more || lags,
            ..done(upto)
        };
        let (mut listed, mut passed_over, mut newest_acked) = (Vec::new(), false, false);
        for m in &page.messages {
            // The user's own sends settle without a word.
            if m.from != uid {
                if m.seq <= acked || m.seq <= read {
                    passed_over = true;
                    newest_acked = m.seq <= acked;
                } else if m.ts <= old_enough && listed.len() < MAX_LISTED {
                    listed.push(m.clone());
                } else {
                    examined.more = true;
                    break;
                }
            }
            examined.upto = m.seq;
        }
        if listed.is_empty() {
            if passed_over {
                self.suppressed(newest_acked);
            }
            return Ok(examined);
        }
        examined.notice = Some(self.notice(uid, &listed, read).await?);
        Ok(examined)
    }

    /// The notification `id` listing `seqs` again, for a window whose first handler
    /// stopped before it finished; `None` if none of them is kept.
    pub async fn again(
        &self,
        uid: &str,
        id: &str,
        seqs: &[u64],
    ) -> Result<Option<Notice>, StoreError> {
        let Some(first) = seqs.first() else {
            return Ok(None);
        };
        let page = self
            .store
            .read(uid, first.saturating_sub(1), WINDOW_READ)
            .await?;
        let listed: Vec<_> = page
            .messages
            .iter()
            .filter(|m| seqs.contains(&m.seq))
            .cloned()
            .collect();
        if listed.is_empty() {
            return Ok(None);
        }
        let read = self.store.read_position(uid).await?;
        let mut notice = self.notice(uid, &listed, read).await?;
        notice.id = id.to_owned();
        Ok(Some(notice))
    }

    async fn notice(
        &self,
        uid: &str,
        listed: &[Arc<imgate_proto::Message>],
        read: u64,
    ) -> Result<Notice, StoreError> {
        let unread = reads::unread(self.store.as_ref(), uid, read).await?;
        let seqs: Vec<u64> = listed.iter().map(|m| m.seq).collect();
        let id = format!(
            "{}.{uid}.{}.{}",
            self.store.epoch(),
            seqs[0],
            seqs[seqs.len() - 1]
        );
        let messages: Vec<Value> = listed.iter().map(|m| self.listed(m)).collect();
        let body = json!({"uid": uid, "unread": unread, "messages": messages});
        let body = Bytes::from(serde_json::to_vec(&body).expect("JSON always encodes"));
        Ok(Notice { id, seqs, body })
    }

    /// Sends `notice`: on NATS (`--notify-nats`), then to the webhook; `None` if `stop`
    /// came first (the notification stays pending).
    pub async fn send(
        &self,
        uid: &str,
        notice: &Notice,
        stop: &CancellationToken,
    ) -> Option<Outcome> {
        let mut outcome = None;
        if let Some(nats) = &self.nats {
            outcome = Some(match nats.publish_notice(uid, notice.body.clone()).await {
                Ok(()) => Outcome::Sent,
                Err(e) => Outcome::GaveUp(format!("publishing on NATS failed: {e}")),
            });
        }
        if let Some(hook) = &self.hook {
            outcome = Some(hook.deliver(&notice.id, notice.body.clone(), stop).await?);
        }
        let outcome = outcome.expect("notifications go to a webhook, NATS, or both");
        match &outcome {
            Outcome::Sent => self.counters.sent.increment(1),
            Outcome::GaveUp(why) => {
                tracing::warn!(uid, id = notice.id, %why, "notification given up");
                self.counters.given_up.increment(1);
            }
        }
        Some(outcome)
    }

    /// A window whose messages were all acked or read before it fell due.
    fn suppressed(&self, acked: bool) {
        match acked {
            true => self.counters.suppressed_acked.increment(1),
            false => self.counters.suppressed_read.increment(1),
        }
    }

    /// One message as a notification lists it.
    fn listed(&self, m: &imgate_proto::Message) -> Value {
        let mut v = json!({"seq": m.seq, "id": m.id, "from": m.from, "ts": m.ts});
        if let Some(g) = &m.group {
            v["group"] = g.as_str().into();
        }
        if self.body {
            v["body"] = (*m.body).clone();
        }
        v
    }
}
