//! Long-poll waiters (docs/protocol.md, "`GET /v1/messages?wait=S`: long poll"): a long
//! poll registers in the hub as a waiter *before* it reads the store, then sleeps on that
//! waiter until a delivery to its user on this gateway wakes it (the same event that feeds
//! TCP and WebSocket connections). It never re-reads the store in a loop.
//!
//! Once answered, the waiter stays registered for [`PARK_FOR`] ([`ParkedPolls`]): the
//! device's next poll on this gateway that continues from that answer takes it over and
//! reads nothing from the store, which is what keeps long polls cheap for the bus in
//! cluster mode. The HTTP answer itself is built by the transport.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use imgate_proto::Encoding;
use tokio_util::sync::CancellationToken;

use super::cursors::{CursorHandle, Cursors};
use super::hub::{Hub, Kick, Registration};
use super::outbox::OutboxItem;
use crate::store::Following;

/// How long an answered long poll's waiter stays registered for the device's next poll.
pub const PARK_FOR: Duration = Duration::from_secs(10);

/// A long poll's registration in the hub, with the device's cursor slot and the store's
/// promise to hand the inbox's copies to the hub.
pub struct Waiter {
    reg: Registration,
    kick: Arc<Kick>,
    pub cursor: CursorHandle,
    _following: Following,
}

impl Waiter {
    /// Registers a waiter of `(uid, device)` for at most `limit` deliveries, its cursor
    /// stored up to `after`. It holds no [`Following`] yet: see [`Waiter::holding`].
    pub fn register(
        hub: &Arc<Hub>,
        cursors: &Arc<Cursors>,
        (uid, device): (&str, &str),
        after: u64,
        limit: usize,
    ) -> Self {
        let kick = Arc::new(Kick::default());
        Waiter {
            reg: hub.wait(uid, device, kick.clone(), limit),
            kick,
            cursor: cursors.open(uid, device, after, after),
            _following: Following::always(),
        }
    }

    /// The waiter, keeping the store following its inbox while it lives.
    pub fn holding(mut self, following: Following) -> Self {
        self._following = following;
        self
    }

    /// Waits up to `wait` for deliveries above `after` and takes them (at most `limit`; the
    /// rest stay queued), each as its `msg` or `room` frame in JSON, and the read position
    /// if it rose meanwhile.
    pub async fn collect(
        &self,
        after: u64,
        limit: usize,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> Collected {
        let deadline = tokio::time::Instant::now() + wait;
        let mut got = Collected::default();
        // A delivery at or below one taken already (two deliveries of a copy, as when an
        // inbox is followed again while its old follow still hands over) is skipped.
        let mut last = after;
        // Deliveries at or below `after` (possible when a client names an `after` beyond its
        // inbox's newest message, or for copies the store read returned too) do not answer
        // the poll; it waits on.
        while got.messages.is_empty() && got.rooms.is_empty() && got.read.is_none() {
            // Queued deliveries first: a kicked waiter still answers what it holds.
            let mut next = tokio::select! {
                biased;
                m = self.reg.rx.recv_async() => m.ok(),
                _ = tokio::time::sleep_until(deadline) => None,
                _ = self.kick.kicked() => None,
                _ = shutdown.cancelled() => None,
            };
            if next.is_none() {
                break;
            }
            while let Some(out) = next {
                match out {
                    OutboxItem::Msg(d) if d.seq() > last => {
                        last = d.seq();
                        got.messages.push((d.seq(), d.encoded(Encoding::Json)))
                    }
                    OutboxItem::Msg(_) => {}
                    OutboxItem::Room(d) => got.rooms.push(d.encoded(Encoding::Json)),
                    OutboxItem::Read(seq) => got.read = got.read.max(Some(seq)),
                }
                next = if got.messages.len() + got.rooms.len() < limit {
                    self.reg.rx.try_recv().ok()
                } else {
                    None
                };
            }
        }
        got
    }
}

/// What a long poll took from its waiter.
#[derive(Debug, Default)]
pub struct Collected {
    /// `(seq, msg frame as JSON)`, in seq order.
    pub messages: Vec<(u64, Bytes)>,
    /// Room frames as JSON.
    pub rooms: Vec<Bytes>,
    /// The user's read position, when it rose while the poll waited.
    pub read: Option<u64>,
}

/// Long-poll waiters kept registered for [`PARK_FOR`] after their poll is answered, keyed
/// by `(uid, device)`. While parked a waiter keeps receiving the device's deliveries (up to
/// its poll's `limit`; one more kicks it), so the device's next poll, if it continues from
/// the answer given (`after` = that answer's cursor), is answered without reading the store.
#[derive(Default)]
pub struct ParkedPolls {
    parked: DashMap<(String, String), Parked>,
}

struct Parked {
    waiter: Waiter,
    /// The cursor of the answer given.
    given: u64,
    until: Instant,
}

impl Parked {
    /// Past its time, or overflowed (so it no longer holds every delivery since `given`).
    fn stale(&self, now: Instant) -> bool {
        self.until <= now || self.waiter.kick.is_kicked()
    }
}

impl ParkedPolls {
    /// Keeps `waiter` for the device's next poll, which continues after `given`.
    pub fn park(&self, uid: String, device: String, waiter: Waiter, given: u64) {
        if waiter.kick.is_kicked() {
            return;
        }
        let parked = Parked {
            waiter,
            given,
            until: Instant::now() + PARK_FOR,
        };
        // A concurrent poll of the same device parked first: the newer answer wins.
        self.parked.insert((uid, device), parked);
    }

    /// The parked waiter of `(uid, device)` if it can answer a poll after `after`; any
    /// other one parked for the device is released.
    pub async fn take(&self, uid: &str, device: &str, after: u64) -> Option<Waiter> {
        let (_, p) = self.parked.remove(&(uid.to_owned(), device.to_owned()))?;
        if p.given == after && !p.stale(Instant::now()) {
            return Some(p.waiter);
        }
        p.waiter.cursor.close().await;
        None
    }

    /// Releases stale waiters every `PARK_FOR / 2` until `stop`.
    pub async fn run_sweeper(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(PARK_FOR / 2);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let now = Instant::now();
            let stale: Vec<(String, String)> = self
                .parked
                .iter()
                .filter(|p| p.stale(now))
                .map(|p| p.key().clone())
                .collect();
            for key in stale {
                if let Some((_, p)) = self.parked.remove_if(&key, |_, p| p.stale(now)) {
                    p.waiter.cursor.close().await;
                }
            }
        }
    }
}

impl std::fmt::Debug for ParkedPolls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedPolls")
            .field("parked", &self.parked.len())
            .finish()
    }
}
