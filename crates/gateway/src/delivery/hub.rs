//! The local registry: uid → this gateway's connections of that uid, and the fanout that
//! hands each stored message, and each rise of the user's read position, to them.
//!
//! Like async-nats feeds its subscribers, the fanout only ever `try_send`s into a
//! connection's bounded outbox and never waits on a client. A full outbox means the
//! connection cannot keep up with its stored messages: it is told to close (`bye
//! slow_consumer`) and will resume losslessly from its cursor. A message is encoded at most
//! once per wire format however many connections take it ([`SharedFrame`]). The hub is
//! also the bus's view of this gateway ([`Local`]). This module never touches sockets or
//! the store.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use futures::FutureExt;
use imgate_proto::{ByeReason, Message};
use tokio::sync::Notify;

use super::outbox::{OutboxItem, SharedFrame};
use crate::bus::{Local, RoomMessage};

use crate::metrics::HubStats;
use crate::store::Fanout;

/// A device in a room.
#[derive(Debug, Clone)]
struct RoomMember {
    uid: Arc<str>,
    device: Arc<str>,
    /// The connection that joined (its leave or end removes the membership); 0 for a join
    /// over HTTP, which lasts until `expires`.
    holder: u64,
    expires: Option<std::time::Instant>,
}

/// A request, from anywhere, that a connection close with a reason. Every connection holds
/// one, so it is a `Notify` and the reason, not a `CancellationToken` (whose tree node is
/// a second, larger allocation).
#[derive(Debug, Default)]
pub struct Kick {
    notify: Notify,
    reason: OnceLock<ByeReason>,
}

impl Kick {
    /// The first reason given wins.
    pub fn kick(&self, reason: ByeReason) {
        let _ = self.reason.set(reason);
        // One task waits on a kick at a time (its connection or poll), so `notify_one`,
        // which keeps the wake-up for a waiter that comes later, reaches it.
        self.notify.notify_one();
    }

    /// Whether a reason was given already.
    pub fn is_kicked(&self) -> bool {
        self.reason.get().is_some()
    }

    /// Resolves once kicked; cancel-safe (a wake-up given to a dropped wait passes to the
    /// next one). A plain `Notified` and a reference: every idle connection holds this
    /// future, so it is kept small.
    pub fn kicked(&self) -> impl Future<Output = ByeReason> + '_ {
        self.notify.notified().map(|()| {
            *self
                .reason
                .get()
                .expect("the reason is set before the wake-up")
        })
    }
}

#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    /// A device's connection (TCP, WebSocket, SSE): replaces an older one of the same
    /// device and counts towards `--max-devices`. Long polls are not exclusive.
    exclusive: bool,
    device: Arc<str>,
    tx: flume::Sender<OutboxItem>,
    kick: Arc<Kick>,
}

/// The registry of this gateway's connections.
#[derive(Debug, Default)]
pub struct Hub {
    users: DashMap<String, Vec<Entry>>,
    rooms: DashMap<String, Vec<RoomMember>>,
    next_id: AtomicU64,
    pub stats: HubStats,
}

/// A connection's place in the hub; dropping it unregisters the connection.
#[derive(Debug)]
pub struct Registration {
    hub: Arc<Hub>,
    uid: String,
    /// This connection's id in the hub (never 0).
    pub id: u64,
    pub rx: flume::Receiver<OutboxItem>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.users.remove_if_mut(&self.uid, |_, conns| {
            conns.retain(|c| c.id != self.id);
            conns.is_empty()
        });
    }
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Hub::default())
    }

    /// Registers a connection of `(uid, device)` with an outbox of `capacity`. An older
    /// connection of the same device is kicked with `replaced`, and so is the oldest one
    /// when the uid already has `max_devices` connections here.
    pub fn register(
        self: &Arc<Self>,
        uid: &str,
        device: &str,
        kick: Arc<Kick>,
        capacity: usize,
        max_devices: usize,
    ) -> Registration {
        self.attach(uid, device, kick, capacity, Some(max_devices))
    }

    /// Registers a waiter (a long poll): it gets `uid`'s messages like a connection but
    /// neither replaces nor counts as a device.
    pub fn wait(
        self: &Arc<Self>,
        uid: &str,
        device: &str,
        kick: Arc<Kick>,
        capacity: usize,
    ) -> Registration {
        self.attach(uid, device, kick, capacity, None)
    }

    /// Adds a connection; `exclusive` (with the uid's `max_devices`) makes it a device's
    /// connection, which replaces an older one of the same device.
    fn attach(
        self: &Arc<Self>,
        uid: &str,
        device: &str,
        kick: Arc<Kick>,
        capacity: usize,
        exclusive: Option<usize>,
    ) -> Registration {
        let (tx, rx) = flume::bounded(capacity);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut conns = self.users.entry(uid.to_owned()).or_default();
        if let Some(max_devices) = exclusive {
            conns.retain(|c| {
                let same = c.exclusive && &*c.device == device;
                if same {
                    c.kick.kick(ByeReason::Replaced);
                }
                !same
            });
            while conns.iter().filter(|c| c.exclusive).count() >= max_devices {
                let oldest = conns
                    .iter()
                    .position(|c| c.exclusive)
                    .expect("counted above");
                conns.remove(oldest).kick.kick(ByeReason::Replaced);
            }
        }
        // Most users hold one connection: grow by one, not to Vec's default of four slots.
        conns.reserve_exact(1);
        conns.push(Entry {
            id,
            exclusive: exclusive.is_some(),
            device: device.into(),
            tx,
            kick,
        });
        drop(conns);
        Registration {
            hub: self.clone(),
            uid: uid.to_owned(),
            id,
            rx,
        }
    }

    /// Closes `uid`'s connections and waiters here (of one `device` when given) with `bye
    /// kicked`; how many.
    pub fn kick_user(&self, uid: &str, device: Option<&str>) -> usize {
        let Some(conns) = self.users.get(uid) else {
            return 0;
        };
        let mut n = 0;
        for c in conns
            .iter()
            .filter(|c| device.is_none_or(|d| *c.device == *d))
        {
            c.kick.kick(ByeReason::Kicked);
            n += 1;
        }
        n
    }

    /// Kicks every connection and waiter here with `reason` (shutdown).
    pub fn kick_all(&self, reason: ByeReason) {
        for conns in self.users.iter() {
            for c in conns.iter() {
                c.kick.kick(reason);
            }
        }
    }

    /// Puts `(uid, device)` in `room`, held by connection `holder` (0 for HTTP, with an
    /// expiry), replacing the device's earlier membership of that room.
    pub fn join_room(
        &self,
        room: &str,
        uid: &str,
        device: &str,
        holder: u64,
        expires: Option<std::time::Instant>,
    ) {
        let mut members = self.rooms.entry(room.to_owned()).or_default();
        members.retain(|m| !(&*m.uid == uid && &*m.device == device));
        members.push(RoomMember {
            uid: uid.into(),
            device: device.into(),
            holder,
            expires,
        });
    }

    /// Takes `(uid, device)` out of `room` if `holder` holds the membership (a newer
    /// connection of the same device that joined again keeps it).
    pub fn leave_room(&self, room: &str, uid: &str, device: &str, holder: u64) {
        self.rooms.remove_if_mut(room, |_, members| {
            members.retain(|m| !(&*m.uid == uid && &*m.device == device && m.holder == holder));
            members.is_empty()
        });
    }

    /// Rooms `(uid, device)` joined over HTTP that have not expired.
    pub fn http_rooms_of(&self, uid: &str, device: &str) -> usize {
        let now = std::time::Instant::now();
        self.rooms
            .iter()
            .filter(|r| {
                r.iter().any(|m| {
                    &*m.uid == uid
                        && &*m.device == device
                        && m.holder == 0
                        && m.expires.is_some_and(|e| e > now)
                })
            })
            .count()
    }

    /// Whether `(uid, device)` is in `room` here, joined over HTTP (and not expired) or by
    /// a connection.
    pub fn in_room(&self, room: &str, uid: &str, device: &str) -> bool {
        let now = std::time::Instant::now();
        self.rooms.get(room).is_some_and(|members| {
            members.iter().any(|m| {
                &*m.uid == uid && &*m.device == device && m.expires.is_none_or(|e| e > now)
            })
        })
    }

    /// Whether anyone here is in `room` (the filter before decoding a room message).
    pub fn room_is_local(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// Hands a room message to every connection of every device in `room` here.
    pub fn deliver_room(&self, room: &str, build: impl FnOnce() -> Arc<SharedFrame>) {
        let now = std::time::Instant::now();
        let Some(mut members) = self.rooms.get_mut(room) else {
            return;
        };
        members.retain(|m| m.expires.is_none_or(|e| e > now));
        let d = build();
        for m in members.iter() {
            let Some(conns) = self.users.get(&*m.uid) else {
                continue;
            };
            for c in conns.iter().filter(|c| c.device == m.device) {
                // Keep a quarter of the outbox for stored messages.
                let max = c.tx.capacity().unwrap_or(usize::MAX);
                let ok = max.saturating_sub(c.tx.len()).saturating_mul(4) > max
                    && c.tx.try_send(OutboxItem::Room(d.clone())).is_ok();
                let counter = if ok {
                    &self.stats.room_delivered
                } else {
                    &self.stats.room_dropped
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The devices of `uid` with a connection (or a waiting long poll) here.
    pub fn devices_of(&self, uid: &str) -> Vec<Arc<str>> {
        self.users
            .get(uid)
            .map_or_else(Vec::new, |c| c.iter().map(|c| c.device.clone()).collect())
    }

    /// Number of connections of `uid` on this gateway.
    pub fn connections_of(&self, uid: &str) -> usize {
        self.users.get(uid).map_or(0, |c| c.len())
    }

    /// Number of users with at least one connection here.
    pub fn users(&self) -> usize {
        self.users.len()
    }
}

impl Local for Hub {
    fn room_is_local(&self, room: &str) -> bool {
        Hub::room_is_local(self, room)
    }

    fn deliver_room(&self, msg: RoomMessage) {
        let room = msg.room.clone();
        Hub::deliver_room(self, &room, || Arc::new(SharedFrame::of(msg.into_frame())));
    }

    fn connections_of(&self, uid: &str) -> usize {
        Hub::connections_of(self, uid)
    }

    fn kick(&self, uid: &str, device: Option<&str>) -> usize {
        Hub::kick_user(self, uid, device)
    }
}

impl Fanout for Hub {
    fn deliver(&self, uid: &str, build: &mut dyn FnMut() -> Option<Message>) {
        let Some(conns) = self.users.get(uid) else {
            self.stats.dropped_not_local.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(msg) = build() else { return };
        let delivered = Arc::new(SharedFrame::new(msg));
        self.stats.dispatched.fetch_add(1, Ordering::Relaxed);
        for c in conns.iter() {
            match c.tx.try_send(OutboxItem::Msg(delivered.clone())) {
                Ok(()) => {}
                Err(flume::TrySendError::Full(_)) => {
                    // A full waiter is a long poll whose device has not polled again; its
                    // next poll reads the store instead. Only connections are slow consumers.
                    if c.exclusive && !c.kick.is_kicked() {
                        self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    }
                    c.kick.kick(ByeReason::SlowConsumer);
                }
                Err(flume::TrySendError::Disconnected(_)) => {}
            }
        }
    }

    fn read(&self, uid: &str, seq: u64, except: u64) {
        let Some(conns) = self.users.get(uid) else {
            return;
        };
        for c in conns.iter().filter(|c| c.id != except) {
            // A full outbox closes the connection as a stored message would: its next
            // `welcome` carries the read position. A long poll's full waiter is dropped; a
            // poll learns the position from `GET /v1/read`.
            if let Err(flume::TrySendError::Full(_)) = c.tx.try_send(OutboxItem::Read(seq)) {
                c.kick.kick(ByeReason::SlowConsumer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgate_proto::{encode, Encoding, ServerFrame};
    use serde_json::json;

    fn msg(seq: u64) -> Message {
        Message {
            seq,
            id: format!("m{seq}"),
            from: "alice".into(),
            to: Some("bob".into()),
            group: None,
            ts: 1,
            body: json!({"text": "hi"}).into(),
        }
    }

    #[test]
    fn delivers_to_every_device_and_drops_non_local_without_building() {
        let hub = Hub::new();
        let k1 = Arc::new(Kick::default());
        let k2 = Arc::new(Kick::default());
        let phone = hub.register("bob", "phone", k1, 8, 16);
        let web = hub.register("bob", "web", k2, 8, 16);
        hub.deliver("bob", &mut || Some(msg(1)));
        let mut built = false;
        hub.deliver("carol", &mut || {
            built = true;
            Some(msg(2))
        });
        assert!(!built, "a message for a user not held here is never built");
        assert_eq!(hub.stats.dropped_not_local.load(Ordering::Relaxed), 1);
        let OutboxItem::Msg(a) = phone.rx.try_recv().unwrap() else {
            panic!()
        };
        let OutboxItem::Msg(b) = web.rx.try_recv().unwrap() else {
            panic!()
        };
        assert!(
            Arc::ptr_eq(&a, &b),
            "one SharedFrame shared by all connections"
        );
        assert_eq!(
            a.encoded(Encoding::Json).as_ptr(),
            b.encoded(Encoding::Json).as_ptr(),
            "encoded once, the same bytes for every connection"
        );
        let frame = ServerFrame::Msg(msg(1));
        assert_eq!(
            &a.encoded(Encoding::Json)[..],
            &encode(&frame, Encoding::Json).unwrap()[..],
            "and they are the frame's JSON encoding"
        );
    }

    #[test]
    fn same_device_replaces_and_unregister_on_drop() {
        let hub = Hub::new();
        let old = Arc::new(Kick::default());
        let r1 = hub.register("bob", "phone", old.clone(), 8, 16);
        let _r2 = hub.register("bob", "phone", Arc::new(Kick::default()), 8, 16);
        assert!(old.is_kicked());
        assert_eq!(old.reason.get(), Some(&ByeReason::Replaced));
        assert_eq!(hub.connections_of("bob"), 1);
        drop(r1); // the replaced registration leaves the new one alone
        assert_eq!(hub.connections_of("bob"), 1);
    }

    #[test]
    fn max_devices_kicks_oldest() {
        let hub = Hub::new();
        let first = Arc::new(Kick::default());
        let _a = hub.register("bob", "a", first.clone(), 8, 2);
        let _b = hub.register("bob", "b", Arc::new(Kick::default()), 8, 2);
        let _c = hub.register("bob", "c", Arc::new(Kick::default()), 8, 2);
        assert!(first.is_kicked());
        assert_eq!(hub.connections_of("bob"), 2);
    }

    #[test]
    fn waiters_get_messages_without_replacing_devices() {
        let hub = Hub::new();
        let device = Arc::new(Kick::default());
        let _d = hub.register("bob", "phone", device.clone(), 8, 1);
        let w1 = hub.wait("bob", "web", Arc::new(Kick::default()), 8);
        let w2 = hub.wait("bob", "tab", Arc::new(Kick::default()), 8);
        let _d2 = hub.register("bob", "web", Arc::new(Kick::default()), 8, 2);
        assert!(!device.is_kicked(), "waiters do not count as devices");
        hub.deliver("bob", &mut || Some(msg(1)));
        assert!(w1.rx.try_recv().is_ok());
        assert!(w2.rx.try_recv().is_ok());
        drop(w1);
        assert_eq!(hub.connections_of("bob"), 3);
    }

    #[test]
    fn room_messages_reach_members_and_a_slow_one_drops_them() {
        let hub = Hub::new();
        let fast = hub.register("bob", "phone", Arc::new(Kick::default()), 8, 16);
        let slow_kick = Arc::new(Kick::default());
        let slow = hub.register("carol", "web", slow_kick.clone(), 8, 16);
        let _other = hub.register("dave", "x", Arc::new(Kick::default()), 8, 16);
        hub.join_room("r1", "bob", "phone", fast.id, None);
        hub.join_room("r1", "carol", "web", slow.id, None);
        assert!(hub.room_is_local("r1"));
        let frame = |i: u64| {
            Arc::new(SharedFrame::of(ServerFrame::Room {
                room: "r1".into(),
                from: "bob".into(),
                ts: i,
                body: json!(i),
            }))
        };
        for i in 0..10 {
            hub.deliver_room("r1", || frame(i));
            let _ = fast.rx.try_recv(); // bob keeps up; carol reads nothing
        }
        assert_eq!(hub.stats.room_delivered.load(Ordering::Relaxed), 10 + 6);
        assert_eq!(hub.stats.room_dropped.load(Ordering::Relaxed), 4);
        assert!(!slow_kick.is_kicked(), "dropping room messages never kicks");
        // Stored messages still fit in the quarter kept free.
        hub.deliver("carol", &mut || Some(msg(1)));
        let mut kinds = vec![];
        while let Ok(o) = slow.rx.try_recv() {
            kinds.push(matches!(o, OutboxItem::Msg(_)));
        }
        assert_eq!(kinds.iter().filter(|m| **m).count(), 1);
        // Leaving by another holder does nothing; by the holder, it leaves.
        hub.leave_room("r1", "bob", "phone", 999);
        hub.leave_room("r1", "bob", "phone", fast.id);
        hub.leave_room("r1", "carol", "web", slow.id);
        assert!(!hub.room_is_local("r1"));
    }

    #[test]
    fn full_outbox_kicks_slow_consumer() {
        let hub = Hub::new();
        let kick = Arc::new(Kick::default());
        let _r = hub.register("bob", "phone", kick.clone(), 2, 16);
        for seq in 1..=3 {
            hub.deliver("bob", &mut || Some(msg(seq)));
        }
        assert_eq!(kick.reason.get(), Some(&ByeReason::SlowConsumer));
        assert_eq!(hub.stats.slow_consumers.load(Ordering::Relaxed), 1);
    }
}
