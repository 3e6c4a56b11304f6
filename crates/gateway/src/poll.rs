//! HTTP sending and polling (DESIGN section 5): `POST /v1/messages`, and `GET /v1/messages`
//! as a short poll (answers at once) or a long poll (`wait` seconds at most).
//!
//! A long poll registers as a waiter in the hub *before* it reads the store, then sleeps on
//! that waiter: it is woken by the delivery of a message to its user on this gateway (the
//! same event that feeds TCP and WebSocket connections) and answers with what was delivered.
//! It never re-reads the store in a loop. Polls carry their cursor, so any gateway answers
//! any poll.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{BufMut, Bytes, BytesMut};
use imgate_proto::ids::is_valid_id;
use imgate_proto::{Encoding, ErrorCode, Send};
use serde::Deserialize;
use serde_json::json;

use crate::auth::SYSTEM;
use crate::http::{authenticate, ApiError};
use crate::hub::{Delivered, Kick, Outbound};
use crate::metrics::Transport;
use crate::send;
use crate::session::{resume_point, Shared, DEFAULT_DEVICE};

/// Messages per poll answer when `limit` is not given, and the most a poll may ask for.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;
/// Longest `wait` of a long poll, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

/// `POST /v1/messages`: send, answered once durable.
pub async fn post_message(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    body: Result<Json<Send>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = authenticate(&shared, q.token.as_deref(), &headers)?;
    let prepared = send::prepare(&shared.cfg, &id.uid, json_body(body)?).map_err(ApiError::from)?;
    check_http_rate(&shared, &id.uid)?;
    stored(send::commit(&shared, prepared).await)
}

/// A JSON request body, or the API error for it (413 when above the body limit).
pub fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v).map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::TooLarge
        } else {
            ErrorCode::BadRequest
        };
        ApiError::new(code, e.body_text())
    })
}

/// The per-uid send rate of the HTTP API (`--send-rate`, `--send-burst`).
pub fn check_http_rate(shared: &Shared, uid: &str) -> Result<(), ApiError> {
    match &shared.http_limiter {
        Some(l) if l.check_key(&uid.to_owned()).is_err() => Err(ApiError::new(
            ErrorCode::RateLimited,
            "send rate limit exceeded; retry later",
        )),
        _ => Ok(()),
    }
}

/// `{"seq":…,"id":…,"ts":…}` for a durable send.
fn stored(r: Result<send::Stored, send::Refused>) -> Result<Json<serde_json::Value>, ApiError> {
    let s = r.map_err(ApiError::from)?;
    Ok(Json(json!({"seq": s.seq, "id": s.id, "ts": s.ts})))
}

/// `POST /v1/admin/messages`: a system message (`from` = `system`) to a user or a group,
/// with an admin token. Answers the id, the acceptance time and the seq of the last copy.
pub async fn admin_message(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    body: Result<Json<Send>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = authenticate(&shared, q.token.as_deref(), &headers)?;
    if !id.admin {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "an admin token (role: admin) is required",
        )
        .with_status(StatusCode::FORBIDDEN));
    }
    let mut prepared =
        send::prepare(&shared.cfg, SYSTEM, json_body(body)?).map_err(ApiError::from)?;
    prepared.member_only = false;
    stored(send::commit(&shared, prepared).await)
}

/// `?token=` on endpoints that take nothing else in the query.
#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    pub token: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct PollQuery {
    token: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
    device: Option<String>,
    wait: Option<u64>,
}

/// `GET /v1/messages`: short poll, or long poll with `wait`.
pub async fn poll(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<PollQuery>,
) -> Result<Response, ApiError> {
    let id = authenticate(&shared, q.token.as_deref(), &headers)?;
    let device = q.device.unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
    if !is_valid_id(&device) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "device must match ^[A-Za-z0-9_-]{1,64}$",
        ));
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(MAX_WAIT_SECS));
    let transport = if wait.is_zero() {
        Transport::ShortPoll
    } else {
        Transport::LongPoll
    };
    let store_err = |e: crate::store::StoreError| ApiError::new(e.code(), e.to_string());
    let after = match q.after {
        Some(n) => {
            // Asking after N acks everything up to N for this device.
            shared
                .cursors
                .ack_now(&id.uid, &device, n)
                .await
                .map_err(store_err)?;
            shared.metrics.acks.increment(1);
            n
        }
        None => {
            resume_point(&shared, &id.uid, &device, None)
                .await
                .map_err(store_err)?
                .0
        }
    };

    // Register before reading, so nothing stored between the read and the wait is missed.
    let kick = Arc::new(Kick::default());
    let mut waiter =
        (!wait.is_zero()).then(|| shared.hub.wait(&id.uid, &device, kick.clone(), limit));
    let page = shared
        .store
        .read(&id.uid, after, limit)
        .await
        .map_err(store_err)?;
    if !page.messages.is_empty() || waiter.is_none() {
        let delivered: Vec<Delivered> = page
            .messages
            .iter()
            .map(|m| Delivered::new((**m).clone()))
            .collect();
        let encoded: Vec<(u64, Bytes)> = delivered
            .iter()
            .map(|d| (d.seq(), d.encoded(Encoding::Json)))
            .collect();
        shared
            .metrics
            .delivered(transport)
            .increment(encoded.len() as u64);
        return Ok(answer(&encoded, &[], after, page.gap));
    }

    let waiter = waiter.as_mut().expect("checked above");
    let waiting = &shared.metrics.long_polls_waiting;
    waiting.increment(1.0);
    let deadline = tokio::time::Instant::now() + wait;
    let mut encoded = Vec::new();
    let mut rooms = Vec::new();
    // Deliveries at or below `after` (possible when a client names an `after` beyond its
    // inbox's newest message) do not answer the poll; it waits on.
    while encoded.is_empty() && rooms.is_empty() {
        let mut next = tokio::select! {
            m = waiter.rx.recv() => m,
            _ = tokio::time::sleep_until(deadline) => None,
            _ = kick.kicked() => None,
            _ = shared.shutdown.cancelled() => None,
        };
        if next.is_none() {
            break;
        }
        while let Some(out) = next {
            match out {
                Outbound::Msg(d) if d.seq() > after => {
                    encoded.push((d.seq(), d.encoded(Encoding::Json)))
                }
                Outbound::Msg(_) => {}
                Outbound::Room(d) => rooms.push(d.encoded(Encoding::Json)),
            }
            next = if encoded.len() + rooms.len() < limit {
                waiter.rx.try_recv().ok()
            } else {
                None
            };
        }
    }
    waiting.decrement(1.0);
    shared
        .metrics
        .delivered(transport)
        .increment(encoded.len() as u64);
    Ok(answer(&encoded, &rooms, after, false))
}

/// `{"messages":[…],"cursor":M,"gap":…}` built from messages already encoded as JSON, with
/// `"rooms":[…]` when room messages arrived while the poll waited.
fn answer(messages: &[(u64, Bytes)], rooms: &[Bytes], after: u64, gap: bool) -> Response {
    let cursor = messages.last().map_or(after, |(seq, _)| *seq);
    let size = messages.iter().map(|(_, b)| b.len() + 1).sum::<usize>()
        + rooms.iter().map(|b| b.len() + 1).sum::<usize>();
    let mut body = BytesMut::with_capacity(80 + size);
    let list = |body: &mut BytesMut, items: &mut dyn Iterator<Item = &Bytes>| {
        for (i, m) in items.enumerate() {
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(m);
        }
    };
    body.put_slice(b"{\"messages\":[");
    list(&mut body, &mut messages.iter().map(|(_, m)| m));
    if !rooms.is_empty() {
        body.put_slice(b"],\"rooms\":[");
        list(&mut body, &mut rooms.iter());
    }
    body.put_slice(format!("],\"cursor\":{cursor},\"gap\":{gap}}}").as_bytes());
    ([(header::CONTENT_TYPE, "application/json")], body.freeze()).into_response()
}

impl From<send::Refused> for ApiError {
    fn from(r: send::Refused) -> Self {
        ApiError::new(r.code, r.message)
    }
}
