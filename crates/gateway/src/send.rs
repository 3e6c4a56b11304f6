//! Turning a client's `send` into a stored message, the same way for every transport (TCP,
//! WebSocket, `POST /v1/messages`): check ids and sizes, pick the inboxes, store, answer.
//!
//! Rate limiting is the caller's (per connection for sessions, per uid for HTTP); this
//! module never talks to a socket.

use imgate_proto::ids::{is_valid_id, is_valid_message_id};
use imgate_proto::{ErrorCode, Send};

use crate::config::Config;
use crate::session::Shared;
use crate::store::{memory::now_ms, Draft};

/// A send that passed every check, ready to store.
#[derive(Debug)]
pub struct Prepared {
    pub draft: Draft,
    /// Inboxes to write; the sender's own copy is last.
    pub inboxes: Vec<String>,
}

/// A send refused before or while storing; `id` is set once the send's id is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

/// A durable send: the seq of the sender's own copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: String,
    pub seq: u64,
    pub ts: u64,
}

/// Checks a send from `from` and chooses its inboxes.
pub fn prepare(cfg: &Config, from: &str, send: Send) -> Result<Prepared, Refused> {
    let id = match send.id {
        Some(id) if is_valid_message_id(&id) => id,
        Some(_) => {
            return Err(Refused {
                id: None,
                code: ErrorCode::BadRequest,
                message: "id must be 1-64 visible ASCII characters".into(),
            })
        }
        None => format!("srv-{:016x}", rand::random::<u64>()),
    };
    let fail = |code: ErrorCode, message: String| Refused {
        id: Some(id.clone()),
        code,
        message,
    };
    let to = match (send.to, send.group) {
        (Some(to), None) if is_valid_id(&to) => to,
        (Some(_), None) => {
            return Err(fail(
                ErrorCode::BadRequest,
                "to must match ^[A-Za-z0-9_-]{1,64}$".into(),
            ))
        }
        (None, Some(group)) => {
            return Err(fail(
                ErrorCode::NotFound,
                format!("unknown group {group:?}"),
            ))
        }
        _ => {
            return Err(fail(
                ErrorCode::BadRequest,
                "a send names exactly one of to or group".into(),
            ))
        }
    };
    let size = encoded_len(&send.body);
    if size > cfg.max_body {
        return Err(fail(
            ErrorCode::TooLarge,
            format!("body is {size} bytes, above the limit of {}", cfg.max_body),
        ));
    }
    let inboxes = if to == from {
        vec![to.clone()]
    } else {
        vec![to.clone(), from.to_owned()]
    };
    Ok(Prepared {
        draft: Draft {
            id,
            from: from.to_owned(),
            to: Some(to),
            group: None,
            ts: now_ms(),
            body: send.body,
        },
        inboxes,
    })
}

/// Stores a prepared send; `Ok` once every inbox copy is durable.
pub async fn commit(shared: &Shared, p: Prepared) -> Result<Stored, Refused> {
    let id = p.draft.id.clone();
    match shared.store.append(p.draft, &p.inboxes).await {
        Ok(a) => {
            shared.metrics.stored.increment(1);
            Ok(Stored {
                id,
                seq: a.seqs.last().copied().unwrap_or_default(),
                ts: a.ts,
            })
        }
        Err(e) => Err(Refused {
            id: Some(id),
            code: e.code(),
            message: e.to_string(),
        }),
    }
}

/// JSON-encoded size of a body, without building the encoding.
pub fn encoded_len(body: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    serde_json::to_writer(&mut c, body).expect("writing a JSON value to a counter cannot fail");
    c.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_for_test;
    use serde_json::json;

    fn send(to: Option<&str>, group: Option<&str>, body: serde_json::Value) -> Send {
        Send {
            id: Some("c-1".into()),
            to: to.map(Into::into),
            group: group.map(Into::into),
            body,
        }
    }

    #[test]
    fn inboxes_and_refusals() {
        let cfg = parse_for_test(&["--max-body", "16"]);
        let p = prepare(&cfg, "alice", send(Some("bob"), None, json!(1))).unwrap();
        assert_eq!(p.inboxes, ["bob", "alice"]);
        let p = prepare(&cfg, "alice", send(Some("alice"), None, json!(1))).unwrap();
        assert_eq!(p.inboxes, ["alice"]);
        let code = |s| prepare(&cfg, "alice", s).unwrap_err().code;
        assert_eq!(
            code(send(Some("b b"), None, json!(1))),
            ErrorCode::BadRequest
        );
        assert_eq!(code(send(None, None, json!(1))), ErrorCode::BadRequest);
        assert_eq!(
            code(send(Some("b"), Some("g"), json!(1))),
            ErrorCode::BadRequest
        );
        assert_eq!(code(send(None, Some("g"), json!(1))), ErrorCode::NotFound);
        assert_eq!(
            code(send(Some("b"), None, json!("x".repeat(20)))),
            ErrorCode::TooLarge
        );
        assert_eq!(encoded_len(&json!({"a": [1, 2]})), r#"{"a":[1,2]}"#.len());
        let no_id = Send {
            id: None,
            ..send(Some("bob"), None, json!(1))
        };
        assert!(prepare(&cfg, "alice", no_id)
            .unwrap()
            .draft
            .id
            .starts_with("srv-"));
    }
}
