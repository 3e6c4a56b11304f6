//! The client's error type: a [`kind`](Error::kind) to match on and a message for people.

use imgate_proto::ErrorCode;

/// What went wrong, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server answered with an `error` frame of this code.
    Server(ErrorCode),
    /// Could not reach the server.
    Connect,
    /// The connection (or the client) is closed.
    Closed,
    /// The server sent something this client does not understand.
    Protocol,
    /// Connecting or logging in took too long.
    Timeout,
    /// A bad URL or option.
    Config,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn closed() -> Self {
        Error::new(ErrorKind::Closed, "client closed")
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}
