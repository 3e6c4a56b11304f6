//! HTTP sending and polling (docs/protocol.md, "HTTP API"): `POST /v1/messages`, and
//! `GET /v1/messages` as a short poll (answers at once) or a long poll (`wait` seconds at
//! most).
//!
//! A long poll waits on a waiter registered in the hub before the store is read
//! ([`crate::delivery::polls`]); an answered poll's waiter is parked for the device's next
//! poll. Polls carry their cursor, so any gateway answers any poll; a poll that finds no
//! waiter to take over reads the store. `GET /v1/messages?before=` reads history.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{BufMut, Bytes, BytesMut};
use imgate_proto::ids::is_valid_id;
use imgate_proto::{Encoding, ErrorCode, Send};
use serde::Deserialize;
use serde_json::json;

use super::{check_http_rate, json_body, not_admin, ApiQuery, Caller};
use crate::auth::SYSTEM;
use crate::delivery::outbox::SharedFrame;
use crate::delivery::polls::Waiter;
use crate::delivery::resume::{poll_from, poll_start, PollStart};
use crate::delivery::send::{self, Prepared};
use crate::delivery::DEFAULT_DEVICE;
use crate::metrics::Transport;
use crate::refusal::Refusal;
use crate::state::Shared;
use crate::store::{Older, Page};

/// Messages per poll answer when `limit` is not given, and the most a poll may ask for.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;
/// Messages per history page when `limit` is not given, and the most a page may ask for.
const DEFAULT_HISTORY_LIMIT: usize = 50;
const MAX_HISTORY_LIMIT: usize = 500;
/// Longest `wait` of a long poll, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

/// `POST /v1/messages`: send, answered once durable.
pub async fn post_message(
    State(shared): State<Arc<Shared>>,
    Caller(id): Caller,
    body: Result<Json<Send>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Refusal> {
    let prepared = send::prepare(shared.cfg.limits.max_body, &id.uid, json_body(body)?)?;
    check_http_rate(&shared, &id.uid)?;
    store(&shared, prepared).await
}

/// Stores a prepared send: `{"seq":…,"id":…,"ts":…}` once durable.
async fn store(shared: &Shared, p: Prepared) -> Result<Json<serde_json::Value>, Refusal> {
    let notify = shared.notifier.as_ref();
    let s = send::commit(&shared.store, &shared.metrics, notify, p).await?;
    Ok(Json(json!({"seq": s.seq, "id": s.id, "ts": s.ts})))
}

/// `POST /v1/admin/messages`: a system message (`from` = `system`) to a user or a group,
/// with an admin token. Answers the id, the acceptance time and the seq of the last copy.
pub async fn admin_message(
    State(shared): State<Arc<Shared>>,
    Caller(id): Caller,
    body: Result<Json<Send>, JsonRejection>,
) -> Result<Response, Refusal> {
    if !id.admin {
        return Ok(not_admin());
    }
    let mut prepared = send::prepare(shared.cfg.limits.max_body, SYSTEM, json_body(body)?)?;
    prepared.member_only = false;
    Ok(store(&shared, prepared).await.into_response())
}

#[derive(Debug, Deserialize)]
pub struct PollQuery {
    after: Option<u64>,
    /// The store epoch `after` belongs to.
    epoch: Option<String>,
    /// Present: a history read below this seq (empty or 0: from the newest).
    before: Option<String>,
    limit: Option<usize>,
    device: Option<String>,
    wait: Option<u64>,
}

/// `GET /v1/messages`: short poll, or long poll with `wait`.
pub async fn poll(
    State(shared): State<Arc<Shared>>,
    Caller(id): Caller,
    ApiQuery(q): ApiQuery<PollQuery>,
) -> Result<Response, Refusal> {
    if q.limit == Some(0) {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            "limit must be at least 1",
        ));
    }
    if let Some(before) = q.before.as_deref() {
        return history(&shared, &id.uid, before, q.limit).await;
    }
    let device = q.device.unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
    if !is_valid_id(&device) {
        return Err(Refusal::bad_id("device"));
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(MAX_WAIT_SECS));
    let uid = id.uid;

    let store = shared.store.as_ref();
    let start = poll_start(store, &uid, q.after, q.epoch.as_deref()).await?;

    // The device's previous long poll on this gateway left its waiter registered: if this
    // poll continues from that answer, everything after it is in the waiter already.
    if let (false, PollStart::After(after)) = (wait.is_zero(), start) {
        if let Some(w) = shared.http.polls.take(&uid, &device, after).await {
            w.cursor.ack(after);
            shared.metrics.acks.increment(1);
            shared.metrics.long_polls_resumed.increment(1);
            return Ok(wait_for_messages(&shared, uid, device, w, after, limit, wait).await);
        }
    }
    let (after, reset) = poll_from(store, &shared.cursors, (&uid, &device), start).await?;
    if let PollStart::After(_) = start {
        shared.metrics.acks.increment(1);
    }

    // Register, then follow the inbox, then read, so nothing stored between the read and
    // the wait is missed (as a session does). The cursor is stored up to `after` (acked
    // just above, or the resume point).
    let waiter = if wait.is_zero() {
        None
    } else {
        let (hub, cursors) = (&shared.hub, &shared.cursors);
        let waiter = Waiter::register(hub, cursors, (&uid, &device), after, limit);
        Some(waiter.holding(shared.store.follow(&uid).await?))
    };
    let mut page = shared.store.read(&uid, after, limit).await?;
    page.gap |= reset;
    let Some(waiter) = waiter else {
        return Ok(answer_page(&shared, Transport::ShortPoll, page, after));
    };
    // A reset is said at once, even with nothing to give.
    if page.messages.is_empty() && !reset {
        return Ok(wait_for_messages(&shared, uid, device, waiter, after, limit, wait).await);
    }
    Ok(answer_and_park(&shared, (uid, device), waiter, page, after))
}

/// A long poll's answer with what the store held; its waiter is parked for the device's
/// next poll when the answer holds everything after `after` so far.
fn answer_and_park(
    shared: &Shared,
    (uid, device): (String, String),
    waiter: Waiter,
    page: Page,
    after: u64,
) -> Response {
    let (more, given) = (page.more, page.messages.last().map_or(after, |m| m.seq));
    let response = answer_page(shared, Transport::LongPoll, page, after);
    // A page with more behind it left messages stored before the waiter registered unread:
    // the next poll must read the store. Otherwise the waiter holds everything after it.
    if !more {
        shared.http.polls.park(uid, device, waiter, given);
    }
    response
}

/// `GET /v1/messages?before=N`: newest first, never moving a cursor.
async fn history(
    shared: &Shared,
    uid: &str,
    before: &str,
    limit: Option<usize>,
) -> Result<Response, Refusal> {
    let before = match before.trim() {
        "" | "0" => None,
        b => Some(b.parse::<u64>().map_err(|_| {
            Refusal::new(
                ErrorCode::BadRequest,
                "before must be a seq (or empty: the newest)",
            )
        })?),
    };
    let limit = limit
        .unwrap_or(DEFAULT_HISTORY_LIMIT)
        .clamp(1, MAX_HISTORY_LIMIT);
    let page = shared.store.history(uid, Older { before, limit }).await?;
    // The same shape as a poll's messages: the `msg` frame.
    let messages: Vec<_> = page
        .messages
        .into_iter()
        .map(|m| imgate_proto::ServerFrame::Msg(Arc::unwrap_or_clone(m)))
        .collect();
    let mut answer = serde_json::json!({
        "messages": messages,
        "epoch": &*shared.store.epoch(),
    });
    if let Some(next) = page.next {
        answer["next"] = next.into();
    }
    Ok(Json(answer).into_response())
}

/// A poll answer straight from a store page.
fn answer_page(shared: &Shared, transport: Transport, page: Page, after: u64) -> Response {
    let delivered: Vec<SharedFrame> = page
        .messages
        .into_iter()
        .map(|m| SharedFrame::new(Arc::unwrap_or_clone(m)))
        .collect();
    let encoded: Vec<(u64, Bytes)> = delivered
        .iter()
        .map(|d| (d.seq(), d.encoded(Encoding::Json)))
        .collect();
    shared
        .metrics
        .delivered(transport)
        .increment(encoded.len() as u64);
    answer(&shared.store.epoch(), &encoded, &[], None, after, page.gap)
}

/// Waits up to `wait` for deliveries above `after` and answers with them (at most `limit`;
/// the rest stay queued), then parks the waiter for the device's next poll.
async fn wait_for_messages(
    shared: &Shared,
    uid: String,
    device: String,
    w: Waiter,
    after: u64,
    limit: usize,
    wait: Duration,
) -> Response {
    let waiting = &shared.metrics.long_polls_waiting;
    waiting.increment(1.0);
    let got = w.collect(after, limit, wait, &shared.shutdown).await;
    waiting.decrement(1.0);
    shared
        .metrics
        .delivered(Transport::LongPoll)
        .increment(got.messages.len() as u64);
    let response = answer(
        &shared.store.epoch(),
        &got.messages,
        &got.rooms,
        got.read,
        after,
        false,
    );
    let given = got.messages.last().map_or(after, |(seq, _)| *seq);
    if !shared.shutdown.is_cancelled() {
        shared.http.polls.park(uid, device, w, given);
    }
    response
}

/// `{"messages":[…],"cursor":M,"gap":…,"epoch":"…"}` built from messages already encoded as
/// JSON, with `"rooms":[…]` when room messages arrived while the poll waited, and
/// `"read":N` when the read position rose meanwhile.
fn answer(
    epoch: &str,
    messages: &[(u64, Bytes)],
    rooms: &[Bytes],
    read: Option<u64>,
    after: u64,
    gap: bool,
) -> Response {
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
    body.put_u8(b']');
    if let Some(read) = read {
        body.put_slice(format!(",\"read\":{read}").as_bytes());
    }
    // The epoch is `[A-Za-z0-9_-]`: nothing to escape.
    body.put_slice(
        format!(",\"cursor\":{cursor},\"gap\":{gap},\"epoch\":\"{epoch}\"}}").as_bytes(),
    );
    ([(header::CONTENT_TYPE, "application/json")], body.freeze()).into_response()
}
