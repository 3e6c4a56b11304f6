//! Turning a client's `send` into a stored message, the same way for every transport (TCP,
//! WebSocket, `POST /v1/messages`, admin messages): check ids and sizes, pick the inboxes (a
//! direct message's two, a group's members), store every copy at once, answer.
//!
//! Rate limiting is the caller's (per connection for sessions, per uid for HTTP); this
//! module never talks to a socket.

use imgate_proto::ids::{is_valid_id, is_valid_message_id};
use imgate_proto::{ErrorCode, Send};

use crate::config::Config;
use crate::session::Shared;
use crate::store::{memory::now_ms, Draft};

/// A send that passed every check that needs no store, ready to resolve and store.
#[derive(Debug)]
pub struct Prepared {
    pub draft: Draft,
    /// Whether the sender must be a member of the group (not for system messages).
    pub member_only: bool,
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
    let (to, group) = match (send.to, send.group) {
        (Some(to), None) if is_valid_id(&to) => (Some(to), None),
        (None, Some(group)) if is_valid_id(&group) => (None, Some(group)),
        (Some(_), None) | (None, Some(_)) => {
            return Err(fail(
                ErrorCode::BadRequest,
                "to and group must match ^[A-Za-z0-9_-]{1,64}$".into(),
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
    Ok(Prepared {
        draft: Draft {
            id,
            from: from.to_owned(),
            to,
            group,
            ts: now_ms(),
            body: send.body,
        },
        member_only: true,
    })
}

/// The inboxes of a prepared send; the sender's own copy (if it has one) is last.
async fn inboxes(shared: &Shared, p: &Prepared) -> Result<Vec<String>, Refused> {
    let d = &p.draft;
    let fail = |code: ErrorCode, message: String| Refused {
        id: Some(d.id.clone()),
        code,
        message,
    };
    if let Some(to) = &d.to {
        return Ok(if *to == d.from || !p.member_only {
            vec![to.clone()]
        } else {
            vec![to.clone(), d.from.clone()]
        });
    }
    let gid = d.group.as_deref().expect("prepare sets to or group");
    let group = shared
        .store
        .group(gid)
        .await
        .map_err(|e| fail(e.code(), e.to_string()))?
        .ok_or_else(|| fail(ErrorCode::NotFound, format!("no group {gid:?}")))?;
    let mut members = group.members;
    if let Some(i) = members.iter().position(|m| *m == d.from) {
        let me = members.remove(i);
        members.push(me);
    } else if p.member_only {
        return Err(fail(
            ErrorCode::NotMember,
            format!("you are not a member of {gid:?}"),
        ));
    }
    Ok(members)
}

/// Resolves and stores a prepared send; `Ok` once every inbox copy is durable.
pub async fn commit(shared: &Shared, p: Prepared) -> Result<Stored, Refused> {
    let id = p.draft.id.clone();
    let inboxes = inboxes(shared, &p).await?;
    match shared.store.append(p.draft, &inboxes).await {
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
    fn checks_before_the_store() {
        let cfg = parse_for_test(&["--max-body", "16"]);
        let p = prepare(&cfg, "alice", send(Some("bob"), None, json!(1))).unwrap();
        assert_eq!(p.draft.to.as_deref(), Some("bob"));
        assert!(p.member_only);
        let p = prepare(&cfg, "alice", send(None, Some("g1"), json!(1))).unwrap();
        assert_eq!(p.draft.group.as_deref(), Some("g1"));
        let code = |s| prepare(&cfg, "alice", s).unwrap_err().code;
        assert_eq!(
            code(send(Some("b b"), None, json!(1))),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(send(None, Some("g.1"), json!(1))),
            ErrorCode::BadRequest
        );
        assert_eq!(code(send(None, None, json!(1))), ErrorCode::BadRequest);
        assert_eq!(
            code(send(Some("b"), Some("g"), json!(1))),
            ErrorCode::BadRequest
        );
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
