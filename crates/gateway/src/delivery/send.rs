//! Turning a client's `send` into a stored message, the same way for every transport (TCP,
//! WebSocket, `POST /v1/messages`, admin messages): check ids and sizes, pick the inboxes (a
//! direct message's two, a group's members), store every copy at once, answer.
//!
//! Rate limiting is the caller's (per connection for sessions, per uid for HTTP); this
//! module never talks to a socket.

use imgate_proto::ids::{is_valid_id, is_valid_message_id};
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::Quota;
use imgate_proto::{ErrorCode, Send};
use serde_json::Value;

use super::notify::Notifier;
use crate::auth::SYSTEM;
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::refusal::Refusal;
use crate::store::{now_ms, Draft, Store};

/// A send that passed every check that needs no store, ready to resolve and store.
#[derive(Debug)]
pub struct Prepared {
    pub draft: Draft,
    /// Whether the sender must be a member of the group (not for system messages).
    pub member_only: bool,
}

/// A durable send: the seq of the sender's own copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: String,
    pub seq: u64,
    pub ts: u64,
}

/// Checks a send from `from` (its body at most `max_body` bytes of JSON) and chooses its
/// inboxes.
pub fn prepare(max_body: usize, from: &str, send: Send) -> Result<Prepared, Refusal> {
    let id = match send.id {
        Some(id) if is_valid_message_id(&id) => id,
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "id must be 1-64 visible ASCII characters",
            ))
        }
        None => format!("srv-{:016x}", rand::random::<u64>()),
    };
    let (to, group) = match (send.to, send.group) {
        (Some(to), None) if to == SYSTEM => {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "system is the sender of admin messages and receives none",
            )
            .for_send(&id))
        }
        (Some(to), None) if is_valid_id(&to) => (Some(to), None),
        (None, Some(group)) if is_valid_id(&group) => (None, Some(group)),
        (Some(_), None) => return Err(Refusal::bad_id("to").for_send(&id)),
        (None, Some(_)) => return Err(Refusal::bad_id("group").for_send(&id)),
        _ => {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "a send names exactly one of to or group",
            )
            .for_send(&id))
        }
    };
    check_body(max_body, &send.body).map_err(|r| r.for_send(&id))?;
    Ok(Prepared {
        draft: Draft {
            id,
            from: from.to_owned(),
            to,
            group,
            ts: now_ms(),
            body: Arc::new(send.body),
        },
        member_only: true,
    })
}

/// Refuses a body whose JSON encoding is above `max_body` bytes.
pub fn check_body(max_body: usize, body: &Value) -> Result<(), Refusal> {
    let size = encoded_len(body);
    if size > max_body {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("body is {size} bytes, above the limit of {max_body}"),
        ));
    }
    Ok(())
}

/// The inboxes of a prepared send; the sender's own copy (if it has one) is last.
async fn inboxes(store: &dyn Store, p: &Prepared) -> Result<Vec<String>, Refusal> {
    let d = &p.draft;
    if let Some(to) = &d.to {
        return Ok(if *to == d.from || !p.member_only {
            vec![to.clone()]
        } else {
            vec![to.clone(), d.from.clone()]
        });
    }
    let gid = d.group.as_deref().expect("prepare sets to or group");
    let group = store
        .group(gid)
        .await?
        .ok_or_else(|| Refusal::new(ErrorCode::NotFound, format!("no group {gid:?}")))?;
    let mut members = group.members;
    if let Some(i) = members.iter().position(|m| *m == d.from) {
        let me = members.remove(i);
        members.push(me);
    } else if p.member_only {
        return Err(Refusal::new(
            ErrorCode::NotMember,
            format!("you are not a member of {gid:?}"),
        ));
    }
    Ok(members)
}

/// Resolves and stores a prepared send; `Ok` once every inbox copy is durable, and each
/// recipient's notification window (with `notify`) is kept.
pub async fn commit(
    store: &Arc<dyn Store>,
    metrics: &Metrics,
    notify: Option<&Arc<Notifier>>,
    p: Prepared,
) -> Result<Stored, Refusal> {
    let id = p.draft.id.clone();
    let stored = async {
        let inboxes = inboxes(store.as_ref(), &p).await?;
        let appended = match notify {
            Some(n) => n.append(store, p.draft, inboxes).await?,
            None => store.append(p.draft, &inboxes).await?,
        };
        Ok::<_, Refusal>(appended)
    };
    match stored.await {
        Ok(a) => {
            metrics.stored.increment(1);
            Ok(Stored {
                id,
                seq: a.seqs.last().copied().unwrap_or_default(),
                ts: a.ts,
            })
        }
        Err(r) => Err(r.for_send(&id)),
    }
}

/// The per-connection (or per-uid, over HTTP) send quota; `None` when unlimited.
pub fn send_quota(limits: &Limits) -> Option<Quota> {
    NonZeroU32::new(limits.send_rate).map(|rate| {
        let burst = NonZeroU32::new(limits.send_burst).unwrap_or(rate);
        Quota::per_second(rate).allow_burst(burst)
    })
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
        let max_body = parse_for_test(&["--max-body", "16"]).limits.max_body;
        let p = prepare(max_body, "alice", send(Some("bob"), None, json!(1))).unwrap();
        assert_eq!(p.draft.to.as_deref(), Some("bob"));
        assert!(p.member_only);
        let p = prepare(max_body, "alice", send(None, Some("g1"), json!(1))).unwrap();
        assert_eq!(p.draft.group.as_deref(), Some("g1"));
        let code = |s| prepare(max_body, "alice", s).unwrap_err().code;
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
        assert!(prepare(max_body, "alice", no_id)
            .unwrap()
            .draft
            .id
            .starts_with("srv-"));
    }
}
