//! Delivery: everything between a session and the store that decides who gets what.
//!
//! - [`hub`]: the registry of this gateway's connections (uid → connections, rooms) and the
//!   fanout that hands each stored copy to their outboxes.
//! - [`outbox`]: what is queued and written for a client, and the one place each wire
//!   format is encoded.
//! - [`send`]: checking and storing a client's send, the same for every transport.
//! - [`cursors`]: device cursors from acks, written to the store in batches.
//! - [`resume`]: where a login or poll resumes, and when a resume is a reset.
//! - [`groups`]: the membership rules.
//! - [`rooms`]: checking and publishing live room messages through the bus.
//! - [`polls`]: long-poll waiters kept between a device's polls.
//! - [`reads`]: read positions: checking a `read`, and the unread count.
//! - [`notify`]: offline notifications: which messages to report, and when; [`webhook`]
//!   carries them.
//!
//! Functions here take the parts they use (`&dyn Store`, `&Hub`, `&dyn Bus`, a config group
//! or one value of it);
//! nothing imports the session or a transport.

pub mod cursors;
pub mod groups;
pub mod hub;
pub mod notify;
pub mod outbox;
pub mod polls;
pub mod reads;
pub mod resume;
pub mod rooms;
pub mod send;
pub mod webhook;

/// Device id used when a login or request names none.
pub const DEFAULT_DEVICE: &str = "default";
