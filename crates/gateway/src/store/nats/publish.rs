//! How a send's inbox copies reach JetStream (`--nats-publish`).
//!
//! `atomic`: group commit into atomic batches. The copies of one send are stored all or
//! nothing, and sends that arrive while batches are in flight share the next one.
//! `separate`: one publish per copy, every PubAck awaited. (`auto` is resolved by the
//! configuration before it gets here.)
//!
//! The protocol is nats-server's atomic batch publish (ADR-50): every message of a batch
//! carries `Nats-Batch-Id` and `Nats-Batch-Sequence`, the last one also
//! `Nats-Batch-Commit: 1` and a reply subject; the server stages the batch and answers the
//! commit with one PubAck whose `seq` is the batch's last message, the others taking the
//! seqs just before it. Each copy keeps its `Nats-Msg-Id`, so a resent send is recognised
//! (nats-server 2.14 and newer accept message ids inside a batch). Synadia's
//! `jetstream-extra` 0.3 refuses `Nats-Msg-Id` in a batch on the client side, which is
//! why these few headers are written here.
//!
//! This module knows subjects, message ids and payloads; inboxes and drafts are the
//! store's (`mod.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::NatsPublish;
use crate::metrics::TailStats;
use crate::store::StoreError;

/// The most messages nats-server takes in one atomic batch (its `max_size` default).
pub(super) const MAX_ATOMIC_BATCH: usize = 1000;

/// Batches one gateway has waiting for their commit at once. Sends that arrive meanwhile
/// queue for the next batch, which is what makes batches grow with the load.
const IN_FLIGHT: usize = 2;

/// nats-server's error code for a batch holding a message id it has already stored.
const DUPLICATE_IN_BATCH: u64 = 10201;

/// A header value no message id ever has: a probe carrying it as the expected last message
/// id is refused instead of stored, unless its own id is a duplicate.
const NEVER_AN_ID: &str = "imgate: no message has this id";

/// One inbox copy of a send.
#[derive(Debug, Clone)]
pub(super) struct Copy {
    /// Made once per copy: every publish and request of it clones the subject's shared
    /// bytes, not a string.
    pub(super) subject: Subject,
    /// `<from>:<id>:<uid>`.
    pub(super) msg_id: String,
}

/// What storing a send came to: the seq of each copy, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Committed {
    pub(super) seqs: Vec<u64>,
    /// The send was stored before (a resend within the dedupe window).
    pub(super) duplicate: bool,
}

impl Committed {
    fn stored(seqs: Vec<u64>) -> Self {
        Committed {
            seqs,
            duplicate: false,
        }
    }
}

struct Queued {
    copies: Vec<Copy>,
    payload: Bytes,
    done: oneshot::Sender<Result<Committed, StoreError>>,
}

/// Publishes sends: hands them to the group-commit task, or publishes their copies one by
/// one.
pub(super) struct Publisher(Mode);

enum Mode {
    Atomic(mpsc::UnboundedSender<Queued>),
    Separate {
        client: async_nats::Client,
        timeout: Duration,
    },
}

/// What nats-server answers a commit or a publish with.
#[derive(Debug, Deserialize)]
struct PubAck {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// Why a batch was not stored.
#[derive(Debug)]
enum Failed {
    /// The server answered with an error: nothing of the batch was stored.
    Refused { code: u64, description: String },
    /// No answer (connection lost, timeout): the batch may or may not be stored.
    Unknown(String),
}

impl Failed {
    fn into_store_error(self) -> StoreError {
        match self {
            Failed::Refused { description, .. } => {
                StoreError::Unavailable(format!("NATS refused the batch: {description}"))
            }
            Failed::Unknown(e) => StoreError::Unavailable(e),
        }
    }
}

impl Publisher {
    /// A publisher on `client`; in `atomic` mode this starts the group-commit task, which
    /// ends when the `Publisher` is dropped. `mode` is resolved (`auto` counts as atomic).
    pub(super) fn start(
        client: async_nats::Client,
        timeout: Duration,
        mode: NatsPublish,
        stats: Arc<TailStats>,
    ) -> Self {
        Publisher(match mode {
            NatsPublish::Atomic | NatsPublish::Auto => {
                let (tx, rx) = mpsc::unbounded_channel();
                let committer = Arc::new(Committer {
                    client,
                    timeout,
                    ids: BatchIds::new(),
                    stats,
                });
                tokio::spawn(run(committer, rx));
                Mode::Atomic(tx)
            }
            NatsPublish::Separate => Mode::Separate { client, timeout },
        })
    }

    /// Stores `copies` (at most [`MAX_ATOMIC_BATCH`]), all with `payload`; `Ok` once every
    /// copy is stored.
    pub(super) async fn store_copies(
        &self,
        copies: Vec<Copy>,
        payload: Bytes,
    ) -> Result<Committed, StoreError> {
        debug_assert!(!copies.is_empty() && copies.len() <= MAX_ATOMIC_BATCH);
        let tx = match &self.0 {
            Mode::Atomic(tx) => tx,
            Mode::Separate { client, timeout } => {
                return separate(client, copies, payload, *timeout).await
            }
        };
        let (done, rx) = oneshot::channel();
        tx.send(Queued {
            copies,
            payload,
            done,
        })
        .map_err(|_| StoreError::Unavailable("the NATS store is shutting down".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the NATS store is shutting down".into()))?
    }
}

/// One publish per copy, all sent before any answer is awaited. A resend's acks name the
/// original seqs; a failure in the middle leaves the copies already stored.
async fn separate(
    client: &async_nats::Client,
    copies: Vec<Copy>,
    payload: Bytes,
    timeout: Duration,
) -> Result<Committed, StoreError> {
    let acks = futures::future::try_join_all(copies.into_iter().map(|copy| {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", copy.msg_id.as_str());
        request(client, copy.subject, headers, payload.clone(), timeout)
    }))
    .await
    .map_err(Failed::into_store_error)?;
    Ok(Committed {
        duplicate: acks.last().is_some_and(|a| a.duplicate),
        seqs: acks.iter().map(|a| a.seq).collect(),
    })
}

/// Batch ids: a random prefix per gateway and a counter (at most 64 characters).
struct BatchIds {
    prefix: String,
    next: AtomicU64,
}

impl BatchIds {
    fn new() -> Self {
        BatchIds {
            prefix: crate::store::new_epoch(),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        format!(
            "{}{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// What the group-commit task and its batches share.
struct Committer {
    client: async_nats::Client,
    timeout: Duration,
    ids: BatchIds,
    stats: Arc<TailStats>,
}

/// Takes everything queued when a batch slot frees up, and commits it as one batch.
async fn run(committer: Arc<Committer>, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Queued> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut size = first.copies.len();
        let mut batch = vec![first];
        while let Ok(q) = rx.try_recv() {
            if size + q.copies.len() > MAX_ATOMIC_BATCH {
                carried = Some(q);
                break;
            }
            size += q.copies.len();
            batch.push(q);
        }
        tokio::spawn(commit_batch(committer.clone(), batch, slot));
    }
}

async fn commit_batch(committer: Arc<Committer>, batch: Vec<Queued>, _slot: OwnedSemaphorePermit) {
    let Committer {
        client,
        timeout,
        ids,
        stats,
    } = &*committer;
    let timeout = *timeout;
    let result = publish(client, &batch, timeout, ids).await;
    match result {
        Ok(last) => answer_stored(stats, batch, last),
        // A refused batch stored nothing. One send in it may be a resend (a duplicate id
        // refuses the whole batch): each send alone finds out which.
        Err(Failed::Refused { .. }) if batch.len() > 1 => {
            futures::future::join_all(batch.into_iter().map(|q| commit_alone(&committer, q))).await;
        }
        Err(failed) => match <[Queued; 1]>::try_from(batch) {
            Ok([q]) => answer_alone(client, q, failed, timeout).await,
            Err(batch) => {
                let e = failed.into_store_error();
                for q in batch {
                    let _ = q.done.send(Err(e.clone()));
                }
            }
        },
    }
}

async fn commit_alone(committer: &Committer, q: Queued) {
    let (client, timeout) = (&committer.client, committer.timeout);
    match publish(client, std::slice::from_ref(&q), timeout, &committer.ids).await {
        Ok(last) => answer_stored(&committer.stats, vec![q], last),
        Err(failed) => answer_alone(client, q, failed, timeout).await,
    }
}

/// Answers each send of a stored batch whose last message got seq `last`: the batch's
/// copies took the seqs up to it, in order.
fn answer_stored(stats: &TailStats, batch: Vec<Queued>, last: u64) {
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats
        .batched_sends
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let size: usize = batch.iter().map(|q| q.copies.len()).sum();
    let mut seq = last + 1 - size as u64;
    for q in batch {
        let seqs = (seq..seq + q.copies.len() as u64).collect();
        seq += q.copies.len() as u64;
        let _ = q.done.send(Ok(Committed::stored(seqs)));
    }
}

/// Answers a one-send batch that failed: a duplicate is answered with the seq of its last
/// copy (found by a probe that stores nothing), anything else is `unavailable`.
async fn answer_alone(client: &async_nats::Client, q: Queued, failed: Failed, timeout: Duration) {
    let answer = match failed {
        Failed::Refused {
            code: DUPLICATE_IN_BATCH,
            ..
        } => probe_duplicate(client, &q, timeout).await,
        other => Err(other.into_store_error()),
    };
    let _ = q.done.send(answer);
}

/// The seq of the send's last copy, which the server has already stored. The probe names an
/// expected last message id no stream has, so if its id turned out not to be a duplicate
/// after all, the server refuses it instead of storing it.
async fn probe_duplicate(
    client: &async_nats::Client,
    q: &Queued,
    timeout: Duration,
) -> Result<Committed, StoreError> {
    let last = q.copies.last().expect("a send has copies");
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", last.msg_id.as_str());
    headers.insert("Nats-Expected-Last-Msg-Id", NEVER_AN_ID);
    let ack = request(
        client,
        last.subject.clone(),
        headers,
        q.payload.clone(),
        timeout,
    )
    .await
    .map_err(Failed::into_store_error)?;
    if ack.duplicate && ack.seq > 0 {
        // The copies of the original were stored together, so in a row.
        let n = q.copies.len() as u64;
        Ok(Committed {
            seqs: (ack.seq + 1 - n..=ack.seq).collect(),
            duplicate: true,
        })
    } else {
        Err(StoreError::Unavailable(format!(
            "NATS refused a batch as a duplicate but not its message {}",
            last.msg_id
        )))
    }
}

/// Publishes `batch`'s copies as one atomic batch; the seq of its last message.
async fn publish(
    client: &async_nats::Client,
    batch: &[Queued],
    timeout: Duration,
    ids: &BatchIds,
) -> Result<u64, Failed> {
    let id = ids.next();
    let size: usize = batch.iter().map(|q| q.copies.len()).sum();
    let mut n = 0;
    for q in batch {
        for copy in &q.copies {
            n += 1;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Batch-Id", id.as_str());
            headers.insert("Nats-Batch-Sequence", n.to_string().as_str());
            headers.insert("Nats-Msg-Id", copy.msg_id.as_str());
            if n < size {
                client
                    .publish_with_headers(copy.subject.clone(), headers, q.payload.clone())
                    .await
                    .map_err(|e| Failed::Unknown(format!("publishing to NATS: {e}")))?;
            } else {
                headers.insert("Nats-Batch-Commit", "1");
                let ack = request(
                    client,
                    copy.subject.clone(),
                    headers,
                    q.payload.clone(),
                    timeout,
                )
                .await?;
                return Ok(ack.seq);
            }
        }
    }
    unreachable!("a batch has at least one copy")
}

/// One request, answered by a PubAck; a PubAck with an error is [`Failed::Refused`].
async fn request(
    client: &async_nats::Client,
    subject: Subject,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Duration,
) -> Result<PubAck, Failed> {
    let reply = tokio::time::timeout(
        timeout,
        client.request_with_headers(subject, headers, payload),
    )
    .await
    .map_err(|_| Failed::Unknown(format!("no answer from NATS within {timeout:?}")))?
    .map_err(|e| Failed::Unknown(format!("NATS request: {e}")))?;
    let ack: PubAck = serde_json::from_slice(&reply.payload).map_err(|e| {
        Failed::Unknown(format!(
            "NATS answered a publish with something else ({e}): {}",
            String::from_utf8_lossy(&reply.payload)
        ))
    })?;
    match ack.error {
        Some(e) => Err(Failed::Refused {
            code: e.err_code,
            description: e.description,
        }),
        None if ack.seq == 0 => Err(Failed::Unknown(format!(
            "NATS answered a publish without a seq: {}",
            String::from_utf8_lossy(&reply.payload)
        ))),
        None => Ok(ack),
    }
}
