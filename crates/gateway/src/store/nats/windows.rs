//! Offline-notification windows in cluster mode, kept by NATS so that every gateway sees
//! one window per user, exactly one gateway handles each, and a window whose gateway died
//! is handled by another:
//!
//! - A window is a JetStream message schedule on `<prefix>.nq.sched.<uid>` (`@at` its due
//!   time), published only if the subject holds none: one pending window per user, whoever
//!   opens it.
//! - When due, the server publishes it on `<prefix>.nq.due.<uid>` and removes the schedule.
//!   The stream is a work queue with one durable consumer that all gateways pull from, so
//!   one gateway gets each due window; unacked, it goes to another after [`ACK_WAIT`] (so a
//!   window can be handled twice, which the record's claim makes harmless).
//! - What each user's notifications listed, and the one being sent, is a compare-and-set
//!   record in the `<prefix>_notify` bucket.
//!
//! This module talks to NATS only; what a window reports is decided in
//! [`crate::delivery::notify`].

use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull, AckPolicy};
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{self, stream, AckKind};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use super::setup::kv_bucket;
use super::{unavailable, unix_ms, NatsStore};
use crate::store::StoreError;
use crate::subjects::Names;

/// How long a due window may go without an ack or a progress report before the server
/// hands it to another gateway.
pub(super) const ACK_WAIT: Duration = Duration::from_secs(30);
/// How long a due window nobody handles is kept (all gateways down).
const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// The durable consumer every gateway pulls due windows from.
const CONSUMER: &str = "notify";
/// Due windows one gateway pulls ahead of handling them.
const PULL_AHEAD: usize = 16;

/// A user's notification record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Everything up to this seq was listed, acked, read, or the user's own.
    pub upto: u64,
    /// A notification a gateway set out to send and has not finished with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sending: Option<Sending>,
}

/// A notification being sent: enough to send it again, under the same delivery id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sending {
    pub id: String,
    /// The seqs it lists.
    pub seqs: Vec<u64>,
    /// The record's `upto` once it is sent.
    pub upto: u64,
    /// When its sender last said it is still at it (Unix ms).
    #[serde(default)]
    pub at_ms: u64,
}

/// What opening a window found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduled {
    /// This call opened it, due at the given Unix ms.
    Opened(u64),
    /// One was pending already, due at the given Unix ms (0: it fell due meanwhile).
    Pending(u64),
}

/// A due window this gateway got.
pub struct DueWindow {
    pub uid: String,
    acker: Acker,
}

impl DueWindow {
    /// Tells the server the window is still being handled.
    pub async fn progress(&self) {
        let _ = self.acker.ack_with(AckKind::Progress).await;
    }

    /// The window is handled.
    pub async fn done(self) {
        if let Err(e) = self.acker.ack().await {
            tracing::debug!(uid = self.uid, error = %e, "acking a due window failed");
        }
    }

    /// The window could not be handled now: again after `delay`, by any gateway.
    pub async fn later(self, delay: Duration) {
        let _ = self.acker.ack_with(AckKind::Nak(Some(delay))).await;
    }
}

/// The cluster's notification windows and records.
pub struct NotifyWindows {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    records: kv::Store,
    consumer: consumer::Consumer<pull::Config>,
    names: Names,
}

/// `due_ms` as a schedule's time: RFC 3339 in whole seconds, rounded up.
fn schedule_time(due_ms: u64) -> (String, u64) {
    let secs = due_ms.div_ceil(1000);
    let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let text = t
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a whole-second time formats");
    (text, secs * 1000)
}

/// The due time of a `Nats-Schedule: @at <RFC 3339>` header, in Unix ms.
fn scheduled_at(header: &str) -> Option<u64> {
    let at = header.strip_prefix("@at ")?;
    let t = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()?;
    Some(unix_ms(t))
}

impl NatsStore {
    /// Creates (or updates) the notification stream, its consumer and the records bucket.
    pub async fn notify_windows(&self, replicas: usize) -> anyhow::Result<NotifyWindows> {
        let names = self.names.clone();
        self.js
            .create_or_update_stream(stream::Config {
                name: names.notify_stream.clone(),
                description: Some(
                    "imgate notification windows: <prefix>.nq.sched.<uid> (a schedule) \
                     becomes <prefix>.nq.due.<uid> when due"
                        .into(),
                ),
                subjects: vec![names.windows_all()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                max_age: KEEP,
                num_replicas: replicas,
                allow_direct: true,
                allow_message_schedules: true,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!("creating or updating stream {}: {e}", names.notify_stream)
            })?;
        let stream = self.js.get_stream(&names.notify_stream).await?;
        let consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    filter_subject: names.windows_due(),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!("creating consumer {CONSUMER} of the notification stream: {e}")
            })?;
        let records = kv_bucket(
            &self.js,
            &names.notify_records,
            "imgate notifications: <uid> -> JSON {upto, sending?} (what was listed, what is being sent)",
            replicas,
        )
        .await?;
        Ok(NotifyWindows {
            client: self.client.clone(),
            js: self.js.clone(),
            stream,
            records,
            consumer,
            names,
        })
    }
}

impl NotifyWindows {
    /// Opens `uid`'s window due at `due_ms` (rounded up to a whole second), unless one is
    /// pending.
    pub async fn schedule(&self, uid: &str, due_ms: u64) -> Result<Scheduled, StoreError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(StoreError::Unavailable("NATS is not connected".into()));
        }
        let (at, due_ms) = schedule_time(due_ms);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Schedule", format!("@at {at}").as_str());
        headers.insert("Nats-Schedule-Target", self.names.window_due(uid).as_str());
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        let published = self
            .js
            .publish_with_headers(self.names.window_schedule(uid), headers, Bytes::new())
            .await
            .map_err(unavailable)?
            .await;
        match published {
            Ok(_) => Ok(Scheduled::Opened(due_ms)),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(Scheduled::Pending(self.pending_due(uid).await?))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// When `uid`'s pending window falls due (0: none is pending now).
    async fn pending_due(&self, uid: &str) -> Result<u64, StoreError> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        match self
            .stream
            .direct_get_last_for_subject(self.names.window_schedule(uid))
            .await
        {
            Ok(m) => Ok(m
                .headers
                .get("Nats-Schedule")
                .and_then(|v| scheduled_at(v.as_str()))
                .unwrap_or(0)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(0),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Due windows as the server hands them to this gateway; ends when the consumer's
    /// stream fails (the caller starts again).
    pub async fn due(&self) -> Result<impl Stream<Item = DueWindow> + Send + '_, StoreError> {
        let messages = self
            .consumer
            .stream()
            .max_messages_per_batch(PULL_AHEAD)
            .messages()
            .await
            .map_err(unavailable)?;
        Ok(messages
            .take_while(|m| {
                if let Err(e) = m {
                    tracing::warn!(error = %e, "pulling due notification windows failed");
                }
                std::future::ready(m.is_ok())
            })
            .filter_map(move |m| {
                let window = m.ok().and_then(|m| {
                    let (m, acker) = m.split();
                    match self.names.window_owner(&m.subject) {
                        Some(uid) => Some(DueWindow {
                            uid: uid.to_owned(),
                            acker,
                        }),
                        None => {
                            // Not a window of ours: never to be handed out again.
                            tracing::warn!(subject = %m.subject, "dropping a due window with no user");
                            tokio::spawn(async move { acker.ack_with(AckKind::Term).await });
                            None
                        }
                    }
                });
                std::future::ready(window)
            }))
    }

    /// `uid`'s record and its revision (0: none stored).
    pub async fn record(&self, uid: &str) -> Result<(Record, u64), StoreError> {
        match self.records.entry(uid).await.map_err(unavailable)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&e.value).unwrap_or_else(|err| {
                    tracing::warn!(uid, error = %err, "unreadable notification record; starting over");
                    Record::default()
                });
                Ok((record, e.revision))
            }
            Some(e) => Ok((Record::default(), e.revision)),
            None => Ok((Record::default(), 0)),
        }
    }

    /// Stores `record` if `uid`'s record is still at `revision`: the new revision, or
    /// `None` if someone changed it meanwhile.
    pub async fn save(
        &self,
        uid: &str,
        record: &Record,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let value = Bytes::from(serde_json::to_vec(record).expect("a record encodes"));
        if revision == 0 {
            return match self.records.create(uid, value).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(unavailable(e)),
            };
        }
        match self.records.update(uid, value, revision).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Publishes a notification on `<prefix>.notify.<uid>` (`--notify-nats`), flushed.
    pub async fn publish_notice(&self, uid: &str, body: Bytes) -> Result<(), StoreError> {
        self.client
            .publish(self.names.notice(uid), body)
            .await
            .map_err(unavailable)?;
        self.client.flush().await.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_times_are_whole_seconds_rounded_up_and_read_back() {
        let (text, due) = schedule_time(1_764_190_000_123);
        assert_eq!(text, "2025-11-26T20:46:41Z");
        assert_eq!(due, 1_764_190_001_000);
        assert_eq!(scheduled_at(&format!("@at {text}")), Some(due));
        assert_eq!(scheduled_at("@every 1s"), None);
        let record = Record {
            upto: 7,
            sending: None,
        };
        assert_eq!(serde_json::to_string(&record).unwrap(), r#"{"upto":7}"#);
    }
}
