//! What leaves for a client, and the one place each wire format is encoded.
//!
//! - [`SharedFrame`]: a stored message (or a room message) on its way to many connections,
//!   encoded at most once per wire format however many connections take it.
//! - [`OutboxItem`]: what the registry puts in a connection's outbox (a stored message, a
//!   room message, a rise of the read position).
//! - [`ToClient`]: what a session writes; its transport only picks the encoding
//!   ([`ToClient::encode`]).
//!
//! Nothing here touches a socket, knows a transport's types, or decides who gets what.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use imgate_proto::{encode, Encoding, Message, ServerFrame};

/// A stored message (or a room message) on its way to connections, with its encodings
/// made on first use.
#[derive(Debug)]
pub struct SharedFrame {
    frame: ServerFrame,
    json: OnceLock<Bytes>,
    msgpack: OnceLock<Bytes>,
}

impl SharedFrame {
    pub fn new(msg: Message) -> Self {
        Self::of(ServerFrame::Msg(msg))
    }

    /// Any server frame shared by many connections (a `room` frame).
    pub fn of(frame: ServerFrame) -> Self {
        SharedFrame {
            frame,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    pub fn frame(&self) -> &ServerFrame {
        &self.frame
    }

    /// The seq of a stored message; 0 for a room message.
    pub fn seq(&self) -> u64 {
        match &self.frame {
            ServerFrame::Msg(m) => m.seq,
            _ => 0,
        }
    }

    /// The `msg` frame in `enc`, encoded once and shared by every connection.
    pub fn encoded(&self, enc: Encoding) -> Bytes {
        let slot = match enc {
            Encoding::Json => &self.json,
            Encoding::Msgpack => &self.msgpack,
        };
        slot.get_or_init(|| encode(&self.frame, enc).expect("a stored message always encodes"))
            .clone()
    }
}

/// What the fanout puts in a connection's outbox.
#[derive(Debug, Clone)]
pub enum OutboxItem {
    /// A stored message: never dropped (a full outbox closes the connection instead).
    Msg(Arc<SharedFrame>),
    /// A room message: dropped, and counted, when the outbox is more than three quarters full.
    Room(Arc<SharedFrame>),
    /// The user's read position rose to this seq.
    Read(u64),
}

/// A frame on its way to one client; its transport encodes it.
#[derive(Debug, Clone)]
pub enum ToClient {
    /// A frame for this client alone (`welcome`, `sent`, `error`, `pong`, `read`, `bye`).
    Frame(ServerFrame),
    /// A stored or room message shared with other connections.
    Shared(Arc<SharedFrame>),
}

impl ToClient {
    /// The frame in `enc`. A shared message is encoded once per encoding.
    pub fn encode(&self, enc: Encoding) -> Bytes {
        match self {
            ToClient::Frame(f) => encode(f, enc).expect("server frames always encode"),
            ToClient::Shared(d) => d.encoded(enc),
        }
    }

    /// The frame itself.
    pub fn frame(&self) -> &ServerFrame {
        match self {
            ToClient::Frame(f) => f,
            ToClient::Shared(d) => d.frame(),
        }
    }
}
