//! imgate wire protocol, shared by the gateway, the client crate and the benchmarks.
//!
//! Layout:
//! - [`frame`]: every client and server frame of the protocol (docs/protocol.md) as Rust
//!   types, and the error codes and `bye` reasons.
//! - [`encoding`]: the two encodings of one schema (JSON text, msgpack with named fields).
//! - [`codec`]: TCP framing, a 4-byte big-endian length then msgpack, with the frame limit
//!   checked before any buffer is reserved.
//! - [`ids`]: the id rules (uid, device, group, room, client message id).
//! - [`scratch`]: the buffer each thread encodes into, so an encoding allocates once.
//!
//! This crate does no I/O of its own and knows nothing about sessions or stores.

mod body;
pub mod codec;
pub mod encoding;
pub mod frame;
pub mod ids;
pub mod scratch;

pub use codec::{FrameCodec, FrameError};
pub use encoding::{decode, encode, DecodeError, Encoding};
pub use frame::{ByeReason, ClientFrame, ErrorCode, Login, Message, Send, ServerFrame, MAX_UNREAD};

/// Default `--max-frame`: the largest TCP or WebSocket frame a peer may send.
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024;
