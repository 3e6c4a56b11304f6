//! Frame types of the protocol (docs/protocol.md, "Frames over WebSocket" and "Frames over
//! TCP"): what a client sends, what the server answers.
//!
//! These are plain data with serde derives; both encodings serialise them as maps keyed by
//! field name with a `type` tag. Validation of ids and sizes lives with the caller (the
//! gateway), not here.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Unread messages are counted up to this many.
pub const MAX_UNREAD: u64 = 1000;

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Login(Login),
    Send(Send),
    Ack {
        seq: u64,
    },
    /// The user has read everything up to `seq` (on any device): the read position rises.
    Read {
        seq: u64,
    },
    Join {
        room: String,
    },
    Leave {
        room: String,
    },
    Publish {
        room: String,
        #[serde(deserialize_with = "crate::body::finite")]
        body: Value,
    },
    Ping,
    /// A newer token for the same uid, before the current one expires.
    Refresh {
        token: String,
    },
}

/// `{"type":"login","token":"…","device":"phone","resume":1042,"epoch":"…"}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Login {
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<u64>,
    /// The store epoch `resume` belongs to (from an earlier `welcome`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// `{"type":"send","id":"c-17","to":"bob","body":…}`; `group` instead of `to` for a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Send {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(deserialize_with = "crate::body::finite")]
    pub body: Value,
}

/// A stored message as delivered (docs/protocol.md, "Messages, seqs and guarantees"). Also
/// the payload stored in the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Store sequence; 0 in a payload that has not been stored yet.
    #[serde(default)]
    pub seq: u64,
    pub id: String,
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub ts: u64,
    /// Shared by every inbox copy of one send, so a copy costs no deep clone of the body.
    pub body: Arc<Value>,
}

/// A frame sent by the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        uid: String,
        device: String,
        resume: u64,
        gap: bool,
        /// The store's epoch: pass it back with `resume` on the next login.
        #[serde(default)]
        epoch: String,
        /// When the login token expires (Unix seconds): the connection is closed with
        /// `bye expired` then, unless a `refresh` came first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
        /// The user's read position (0: nothing read yet).
        #[serde(default)]
        read: u64,
        /// Messages of the inbox above `read` that the user did not send, counted up to
        /// [`MAX_UNREAD`].
        #[serde(default)]
        unread: u64,
    },
    Msg(Message),
    /// The user's read position rose, set by another connection or over HTTP.
    Read {
        seq: u64,
    },
    Sent {
        id: String,
        seq: u64,
        ts: u64,
    },
    Room {
        room: String,
        from: String,
        ts: u64,
        body: Value,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: ErrorCode,
        message: String,
    },
    Pong,
    /// A `refresh` was accepted: the connection now lasts until `exp` (Unix seconds).
    Refreshed {
        exp: u64,
    },
    Bye {
        reason: ByeReason,
    },
}

impl ServerFrame {
    /// An `error` frame that does not answer a send.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            id: None,
            code,
            message: message.into(),
        }
    }
}

/// The protocol's error codes (docs/protocol.md, "HTTP API"), shared by frames and the HTTP
/// API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    BadRequest,
    TooLarge,
    RateLimited,
    NotMember,
    NotFound,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::Unauthorized,
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::NotMember,
        ErrorCode::NotFound,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the server closes a connection. Every reason means "reconnect and resume"; a client
/// must treat a reason it does not know the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ByeReason {
    /// The gateway is shutting down.
    Shutdown,
    /// A newer connection of the same device (or beyond `--max-devices`) took this place.
    Replaced,
    /// Messages stayed unacknowledged longer than `--ack-timeout`.
    AckTimeout,
    /// Nothing arrived from the client for `--idle-timeout`.
    Idle,
    /// An operator or the store asked for this connection to go.
    Kicked,
    /// The connection could not take its stored messages as fast as they came.
    SlowConsumer,
    /// A frame could not be delimited: its length is above `--max-frame`.
    FrameTooLarge,
    /// No `login` frame within the login timeout.
    LoginTimeout,
    /// The token's `exp` passed with no `refresh`.
    Expired,
}

impl ByeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ByeReason::Shutdown => "shutdown",
            ByeReason::Replaced => "replaced",
            ByeReason::AckTimeout => "ack_timeout",
            ByeReason::Idle => "idle",
            ByeReason::Kicked => "kicked",
            ByeReason::SlowConsumer => "slow_consumer",
            ByeReason::FrameTooLarge => "frame_too_large",
            ByeReason::LoginTimeout => "login_timeout",
            ByeReason::Expired => "expired",
        }
    }
}
