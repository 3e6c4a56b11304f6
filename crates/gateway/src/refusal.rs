//! [`Refusal`]: the one shape of "no" in the gateway: one of the protocol's error codes
//! (docs/protocol.md, "HTTP API"), a sentence for people and, once known, the id of the send
//! it answers.
//!
//! Every layer refuses with it; each boundary turns it into its wire form once: an `error`
//! frame here ([`From<Refusal> for ServerFrame`]), an HTTP status and JSON body in the HTTP
//! transport. A store failure becomes one in the store (`From<StoreError>`). This is a
//! leaf: it imports nothing of the gateway and knows no transport.

use imgate_proto::ids::ID_PATTERN;
use imgate_proto::{ErrorCode, ServerFrame};

/// Why something asked of the gateway did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The id of the send refused, once known.
    pub id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            id: None,
            code,
            message: message.into(),
        }
    }

    /// `bad_request`: `what` is not a valid uid, device, group or room id
    /// (docs/protocol.md, "Ids and tokens").
    pub fn bad_id(what: &str) -> Self {
        Refusal::new(
            ErrorCode::BadRequest,
            format!("{what} must match {ID_PATTERN}"),
        )
    }

    /// `rate_limited`: over the send rate (`--send-rate`).
    pub fn rate_limited() -> Self {
        Refusal::new(
            ErrorCode::RateLimited,
            "send rate limit exceeded; retry later",
        )
    }

    /// The same refusal, answering the send `id`.
    pub fn for_send(mut self, id: &str) -> Self {
        self.id = Some(id.to_owned());
        self
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<Refusal> for ServerFrame {
    fn from(r: Refusal) -> Self {
        ServerFrame::Error {
            id: r.id,
            code: r.code,
            message: r.message,
        }
    }
}
