//! The broadcast tail: the live copies the stream republishes, followed in stream order and
//! handed to the [`Fanout`]; missed copies (a jump in `Nats-Sequence`, a reconnect, a full
//! subscription, a quiet spell) are read back from the stream first, and a recreated
//! stream starts the tail over under a new epoch.
//!
//! Nothing here decides who gets a copy: that is the fanout's.

use super::*;

/// Heartbeat the tail asks of the server; two missed ones recreate the consumer.
pub(super) const TAIL_HEARTBEAT: Duration = Duration::from_secs(2);

/// A server-side consumer nobody pulls from is removed after this long.
pub(super) const CONSUMER_INACTIVE: Duration = Duration::from_secs(30);

/// Longest pause between attempts to recreate the tail.
pub(super) const TAIL_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A live subscription quiet this long makes the tail ask the stream whether it missed the
/// last copies (one request); checked this often, so a lost last copy waits at most twice
/// this.
pub(super) const POSITION_CHECK: Duration = Duration::from_secs(1);

/// How long the tail waits for the stream's position before it starts over.
pub(super) const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The most bytes one pull of a catch-up asks for: a burst far below what nats-server lets
/// a client have pending (`max_pending`) before it cuts the client off as a slow consumer,
/// which is what a catch-up after such a cut must not cause again.
pub(super) const CATCH_UP_BYTES: usize = 512 * 1024;

/// A catch-up consumer that delivers nothing for this long is checked against the stream.
pub(super) const CATCH_UP_IDLE: Duration = Duration::from_secs(3);

/// What the tail hands a copy to: the subject names, the backlog cache (broadcast mode) and
/// the counters.
pub struct Tail<'a> {
    pub names: &'a Names,
    pub recent: Option<&'a Recent>,
    pub stats: &'a TailStats,
}

/// Hands copy `seq`, received on `subject` (republished `<prefix>.live.<uid>`, or the
/// stored `<prefix>.u.<uid>` when read back), to the fanout and the backlog cache,
/// decoding the payload only if the fanout asks for it. Public so that the hot-path
/// benchmarks run this very code.
pub fn hand_over(
    tail: &Tail<'_>,
    fanout: &dyn Fanout,
    subject: &str,
    seq: u64,
    published: impl FnOnce() -> u64,
    payload: &[u8],
) {
    let stats = tail.stats;
    stats.received.fetch_add(1, Ordering::Relaxed);
    stats
        .received_bytes
        .fetch_add((subject.len() + payload.len()) as u64, Ordering::Relaxed);
    let names = tail.names;
    let Some(uid) = names.live_owner(subject).or_else(|| names.owner(subject)) else {
        return;
    };
    let published = published();
    // Cached before it is handed over: a login that registers in between reads it here
    // or gets it in its outbox, never neither.
    if let Some(recent) = tail.recent {
        recent.insert(uid, seq, published, payload);
    }
    fanout.deliver(uid, &mut || {
        stats.decoded.fetch_add(1, Ordering::Relaxed);
        let msg = decode_payload(payload, seq, published);
        if msg.is_none() {
            stats.undecodable.fetch_add(1, Ordering::Relaxed);
        }
        msg
    });
}

/// A decimal header of a republished copy.
pub(super) fn header_u64(m: &async_nats::Message, name: async_nats::HeaderName) -> Option<u64> {
    m.headers.as_ref()?.get(name)?.as_str().parse().ok()
}

/// When a republished copy was stored (`Nats-Time-Stamp`, RFC 3339), in Unix ms; 0 when it
/// does not say.
pub(super) fn live_time(m: &async_nats::Message) -> u64 {
    let stamp = m
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_TIME_STAMP));
    stamp
        .and_then(|v| {
            time::OffsetDateTime::parse(v.as_str(), &time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(0, unix_ms)
}

impl NatsStore {
    /// Follows the stream after `after` until `stop`, handing each copy to `fanout`.
    pub async fn run_tail(
        self: Arc<Self>,
        fanout: Arc<dyn Fanout>,
        after: u64,
        stop: CancellationToken,
    ) {
        let mut last = after;
        if let Some(recent) = &self.recent {
            recent.restart_at(after);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let r = tokio::select! {
                r = self.tail_once(&*fanout, &mut last) => r,
                _ = stop.cancelled() => return,
            };
            if let Err(e) = r {
                self.tail_stats.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, last, "tail interrupted; recreating it after the last seq seen");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(TAIL_MAX_BACKOFF);
        }
    }

    /// Follows the live copies the stream republishes, from `last` on. It subscribes before
    /// it catches up with what the stream stored since `last`, so no copy falls between the
    /// two; a copy whose `Nats-Sequence` is not the next one means copies were missed on the
    /// way (republish is at most once), and they are read back from the stream before it is
    /// handed over, so the order holds. So is everything stored while the connection was
    /// down or the subscription overflowed ([`NatsStore::resync`]), and a subscription quiet
    /// for [`POSITION_CHECK`] makes the tail ask the stream whether it missed the last
    /// copies, which no later copy would reveal.
    async fn tail_once(&self, fanout: &dyn Fanout, last: &mut u64) -> anyhow::Result<()> {
        self.connected()?;
        let mut stream = self.stream.clone();
        self.restart_on_new_epoch(last).await?;
        self.tail_last.fetch_max(*last, Ordering::Relaxed);
        let mut live = self.client.subscribe(self.names.live_all()).await?;
        let end = self.stream_last_seq().await?;
        self.catch_up(fanout, last, end).await?;
        tracing::debug!(after = *last, "tail following the live copies");
        let mut seen: u64 = 0;
        // When the tail last handed a copy over (or checked the stream): copies it skips as
        // already seen do not count, so a stream recreated under it is noticed too.
        let mut progress = tokio::time::Instant::now();
        // One timer for the whole loop, not one per copy: it fires every POSITION_CHECK,
        // and the check runs when nothing was handed over for that long.
        let mut check = std::pin::pin!(tokio::time::sleep(POSITION_CHECK));
        loop {
            let m = tokio::select! {
                biased;
                () = self.resync.notified() => {
                    let end = tokio::time::timeout(CHECK_TIMEOUT, self.stream_last_seq()).await??;
                    self.catch_up(fanout, last, end).await?;
                    continue;
                }
                m = live.next() => m.ok_or_else(|| anyhow::anyhow!("live subscription ended"))?,
                () = &mut check => {
                    check.as_mut().reset(tokio::time::Instant::now() + POSITION_CHECK);
                    if progress.elapsed() < POSITION_CHECK {
                        continue;
                    }
                    progress = tokio::time::Instant::now();
                    self.check_quiet_tail(&mut stream, fanout, last).await?;
                    continue;
                }
            };
            let Some(seq) = header_u64(&m, async_nats::header::NATS_SEQUENCE) else {
                continue;
            };
            if seq <= *last {
                continue;
            }
            seen += 1;
            if self.drop_live_every > 0 && seen.is_multiple_of(self.drop_live_every) {
                continue;
            }
            if seq > *last + 1 {
                self.tail_stats.live_gaps.fetch_add(1, Ordering::Relaxed);
                self.catch_up(fanout, last, seq - 1).await?;
                if seq <= *last {
                    continue;
                }
            }
            self.hand_over(fanout, &m.subject, seq, || live_time(&m), &m.payload);
            *last = seq;
            self.tail_last.store(seq, Ordering::Relaxed);
            progress = tokio::time::Instant::now();
        }
    }

    /// A recreated stream (a new epoch) starts the tail over from its beginning.
    async fn restart_on_new_epoch(&self, last: &mut u64) -> anyhow::Result<()> {
        if self.adopt_new_epoch().await? {
            *last = 0;
            self.tail_last.store(0, Ordering::Relaxed);
            if let Some(recent) = &self.recent {
                recent.restart_at(0);
            }
        }
        Ok(())
    }

    /// The check of a tail that handed nothing over for [`POSITION_CHECK`]: copies stored
    /// past `last` were missed (republish is at most once) and are read back; a recreated
    /// stream is an error, which starts the tail over.
    async fn check_quiet_tail(
        &self,
        stream: &mut stream::Stream,
        fanout: &dyn Fanout,
        last: &mut u64,
    ) -> anyhow::Result<()> {
        self.connected()?;
        // A request sent just before the connection turned out dead is lost: give up on it
        // soon and start the tail over.
        let info = tokio::time::timeout(CHECK_TIMEOUT, stream.info()).await??;
        if epoch_of(info) != self.epoch() {
            anyhow::bail!("the stream was recreated");
        }
        let end = info.state.last_sequence;
        if end > *last {
            self.tail_stats.live_gaps.fetch_add(1, Ordering::Relaxed);
            self.catch_up(fanout, last, end).await?;
        }
        Ok(())
    }

    /// Whether the stream was deleted and created again since this gateway last looked
    /// (one stream info). A new stream starts its seqs over: its creation time becomes the
    /// epoch, so resumes from the old one become resets, and the old epoch's cursors are
    /// purged. The caller follows the new stream from its start.
    pub(super) async fn adopt_new_epoch(&self) -> anyhow::Result<bool> {
        let mut stream = self.stream.clone();
        let epoch = epoch_of(stream.info().await?);
        if epoch == self.epoch() {
            return Ok(false);
        }
        tracing::warn!(old = %self.epoch(), new = %epoch, "the stream was recreated: new epoch, following it from its start");
        *self.epoch.write().unwrap_or_else(|p| p.into_inner()) = epoch;
        // Cursors and read positions are seqs of the old stream: one above the new
        // stream's seqs would never move (both only rise). Every gateway that sees the
        // change purges; purging twice is harmless.
        for kv in [
            self.names.cursors_stream(),
            format!("KV_{}", self.names.reads),
        ] {
            let purged = async {
                let s = self.js.get_stream(&kv).await.map_err(|e| e.to_string())?;
                s.purge().await.map_err(|e| e.to_string())
            };
            if let Err(e) = purged.await {
                tracing::warn!(error = %e, stream = kv, "purging the old epoch's seqs failed");
            }
        }
        Ok(true)
    }

    /// Hands copy `seq`, received on `subject`, over ([`hand_over`]).
    pub(super) fn hand_over(
        &self,
        fanout: &dyn Fanout,
        subject: &str,
        seq: u64,
        published: impl FnOnce() -> u64,
        payload: &[u8],
    ) {
        let tail = Tail {
            names: &self.names,
            recent: self.recent.as_ref(),
            stats: &self.tail_stats,
        };
        hand_over(&tail, fanout, subject, seq, published, payload);
    }

    /// Reads the stream after `last` up to `end` with a consumer of its own (served by the
    /// stream's leader, which has every stored copy) and hands each copy over in order.
    pub(super) async fn catch_up(
        &self,
        fanout: &dyn Fanout,
        last: &mut u64,
        end: u64,
    ) -> anyhow::Result<()> {
        // Past 60 lines by its wrapped signature: the body is one consumer's read loop.
        if end <= *last {
            return Ok(());
        }
        self.tail_stats.catch_ups.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            after = *last,
            end,
            "tail reading missed copies from the stream"
        );
        let consumer = self
            .stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: *last + 1,
                },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: CONSUMER_INACTIVE,
                memory_storage: true,
                ..Default::default()
            })
            .await?;
        let name = consumer.cached_info().name.clone();
        let read = async {
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(self.tail_batch)
                .max_bytes_per_batch(CATCH_UP_BYTES)
                .heartbeat(TAIL_HEARTBEAT)
                .messages()
                .await?;
            while *last < end {
                let Ok(next) = tokio::time::timeout(CATCH_UP_IDLE, messages.next()).await else {
                    // Nothing more to read: what is left up to `end` was removed meanwhile.
                    let now = self.stream_first_and_last().await?;
                    if now.1 <= *last || now.0 > end {
                        break;
                    }
                    continue;
                };
                let m = next.ok_or_else(|| anyhow::anyhow!("catch-up stream ended"))??;
                let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                let seq = info.stream_sequence;
                if seq <= *last {
                    continue;
                }
                let published = unix_ms(info.published);
                self.hand_over(fanout, &m.subject, seq, || published, &m.payload);
                *last = seq;
                self.tail_last.store(seq, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        };
        let r = read.await;
        let _ = self.stream.delete_consumer(&name).await;
        r
    }
}
