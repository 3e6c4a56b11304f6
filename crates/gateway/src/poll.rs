//! HTTP sending and polling (DESIGN section 5): `POST /v1/messages`, and `GET /v1/messages`
//! as a short poll (answers at once) or a long poll (`wait` seconds at most).
//!
//! A long poll registers as a waiter in the hub *before* it reads the store, then sleeps on
//! that waiter: it is woken by the delivery of a message to its user on this gateway (the
//! same event that feeds TCP and WebSocket connections) and answers with what was delivered.
//! It never re-reads the store in a loop. Once answered, the waiter stays registered for a
//! few seconds ([`ParkedPolls`]): the device's next poll on this gateway that continues from
//! that answer takes it over and reads nothing from the store, which is what keeps long
//! polls cheap for the bus in cluster mode. Polls carry their cursor, so any gateway answers
//! any poll; a poll that finds no waiter to take over reads the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use imgate_proto::ids::is_valid_id;
use imgate_proto::{Encoding, ErrorCode, Send};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::SYSTEM;
use crate::cursors::CursorHandle;
use crate::http::{authenticate, ApiError};
use crate::hub::{Delivered, Kick, Outbound, Registration};
use crate::metrics::Transport;
use crate::send;
use crate::session::{self, resume_point, Shared, DEFAULT_DEVICE};
use crate::store::Page;

/// Messages per poll answer when `limit` is not given, and the most a poll may ask for.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;
/// Messages per history page when `limit` is not given, and the most a page may ask for.
const DEFAULT_HISTORY_LIMIT: usize = 50;
const MAX_HISTORY_LIMIT: usize = 500;
/// Longest `wait` of a long poll, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;
/// How long an answered long poll's waiter stays registered for the device's next poll.
pub const PARK_FOR: Duration = Duration::from_secs(10);

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
    headers: HeaderMap,
    Query(q): Query<PollQuery>,
) -> Result<Response, ApiError> {
    let id = authenticate(&shared, q.token.as_deref(), &headers)?;
    if let Some(before) = q.before.as_deref() {
        return history(&shared, &id.uid, before, q.limit).await;
    }
    let device = q.device.unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
    if !is_valid_id(&device) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "device must match ^[A-Za-z0-9_-]{1,64}$",
        ));
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(MAX_WAIT_SECS));
    let uid = id.uid;
    let store_err = |e: crate::store::StoreError| ApiError::new(e.code(), e.to_string());

    // An `after` from a store that was reset or replaced starts over, with a gap; it acks
    // nothing (its seq means nothing here).
    let mut reset = false;
    let mut asked = q.after;
    if let Some(after) = q.after {
        if session::is_reset(&shared, &uid, after, q.epoch.as_deref())
            .await
            .map_err(store_err)?
        {
            reset = true;
            asked = None;
        }
    }

    // The device's previous long poll on this gateway left its waiter registered: if this
    // poll continues from that answer, everything after it is in the waiter already.
    if let (false, Some(after)) = (wait.is_zero(), asked) {
        if let Some(w) = shared.polls.take(&uid, &device, after).await {
            w.cursor.ack(after);
            shared.metrics.acks.increment(1);
            shared.metrics.long_polls_resumed.increment(1);
            return Ok(wait_for_messages(&shared, uid, device, w, after, limit, wait).await);
        }
    }

    let after = match asked {
        None if reset => 0,
        Some(n) => {
            // Asking after N acks everything up to N for this device.
            shared
                .cursors
                .ack_now(&uid, &device, n)
                .await
                .map_err(store_err)?;
            shared.metrics.acks.increment(1);
            n
        }
        None => {
            resume_point(&shared, &uid, &device, None, None)
                .await
                .map_err(store_err)?
                .resume
        }
    };

    // Register before reading, so nothing stored between the read and the wait is missed.
    let waiter = (!wait.is_zero()).then(|| {
        let kick = Arc::new(Kick::default());
        Waiter {
            reg: shared.hub.wait(&uid, &device, kick.clone(), limit),
            kick,
            // The cursor is stored up to `after` (acked just above, or the resume point).
            cursor: shared.cursors.open(&uid, &device, after, after),
        }
    });
    let mut page = shared
        .store
        .read(&uid, after, limit)
        .await
        .map_err(store_err)?;
    page.gap |= reset;
    let Some(waiter) = waiter else {
        return Ok(answer_page(&shared, Transport::ShortPoll, page, after));
    };
    // A reset is said at once, even with nothing to give.
    if page.messages.is_empty() && !reset {
        return Ok(wait_for_messages(&shared, uid, device, waiter, after, limit, wait).await);
    }
    let (more, given) = (page.more, page.messages.last().map_or(after, |m| m.seq));
    let response = answer_page(&shared, Transport::LongPoll, page, after);
    // A page with more behind it left messages stored before the waiter registered unread:
    // the next poll must read the store. Otherwise the waiter holds everything after it.
    if !more {
        shared.polls.park(uid, device, waiter, given);
    }
    Ok(response)
}

/// `GET /v1/messages?before=N`: newest first, never moving a cursor.
async fn history(
    shared: &Shared,
    uid: &str,
    before: &str,
    limit: Option<usize>,
) -> Result<Response, ApiError> {
    let before = match before.trim() {
        "" | "0" => None,
        b => Some(b.parse::<u64>().map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                "before must be a seq (or empty: the newest)",
            )
        })?),
    };
    let limit = limit
        .unwrap_or(DEFAULT_HISTORY_LIMIT)
        .clamp(1, MAX_HISTORY_LIMIT);
    let page = shared
        .store
        .history(uid, before, limit)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
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
    let delivered: Vec<Delivered> = page
        .messages
        .into_iter()
        .map(|m| Delivered::new(Arc::unwrap_or_clone(m)))
        .collect();
    let encoded: Vec<(u64, Bytes)> = delivered
        .iter()
        .map(|d| (d.seq(), d.encoded(Encoding::Json)))
        .collect();
    shared
        .metrics
        .delivered(transport)
        .increment(encoded.len() as u64);
    answer(&shared.store.epoch(), &encoded, &[], after, page.gap)
}

/// A long poll's registration in the hub, with the device's cursor slot.
struct Waiter {
    reg: Registration,
    kick: Arc<Kick>,
    cursor: CursorHandle,
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
    let deadline = tokio::time::Instant::now() + wait;
    let mut encoded = Vec::new();
    let mut rooms = Vec::new();
    // Deliveries at or below `after` (possible when a client names an `after` beyond its
    // inbox's newest message, or for copies the store read returned too) do not answer the
    // poll; it waits on.
    while encoded.is_empty() && rooms.is_empty() {
        // Queued deliveries first: a kicked waiter still answers what it holds.
        let mut next = tokio::select! {
            biased;
            m = w.reg.rx.recv_async() => m.ok(),
            _ = tokio::time::sleep_until(deadline) => None,
            _ = w.kick.kicked() => None,
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
                w.reg.rx.try_recv().ok()
            } else {
                None
            };
        }
    }
    waiting.decrement(1.0);
    shared
        .metrics
        .delivered(Transport::LongPoll)
        .increment(encoded.len() as u64);
    let response = answer(&shared.store.epoch(), &encoded, &rooms, after, false);
    let given = encoded.last().map_or(after, |(seq, _)| *seq);
    if !shared.shutdown.is_cancelled() {
        shared.polls.park(uid, device, w, given);
    }
    response
}

/// Long-poll waiters kept registered for [`PARK_FOR`] after their poll is answered, keyed
/// by `(uid, device)`. While parked a waiter keeps receiving the device's deliveries (up to
/// its poll's `limit`; one more kicks it), so the device's next poll, if it continues from
/// the answer given (`after` = that answer's cursor), is answered without reading the store.
#[derive(Default)]
pub struct ParkedPolls {
    parked: DashMap<(String, String), Parked>,
}

struct Parked {
    waiter: Waiter,
    /// The cursor of the answer given.
    given: u64,
    until: Instant,
}

impl Parked {
    /// Past its time, or overflowed (so it no longer holds every delivery since `given`).
    fn stale(&self, now: Instant) -> bool {
        self.until <= now || self.waiter.kick.is_kicked()
    }
}

impl ParkedPolls {
    fn park(&self, uid: String, device: String, waiter: Waiter, given: u64) {
        if waiter.kick.is_kicked() {
            return;
        }
        let parked = Parked {
            waiter,
            given,
            until: Instant::now() + PARK_FOR,
        };
        // A concurrent poll of the same device parked first: the newer answer wins.
        self.parked.insert((uid, device), parked);
    }

    /// The parked waiter of `(uid, device)` if it can answer a poll after `after`; any
    /// other one parked for the device is released.
    async fn take(&self, uid: &str, device: &str, after: u64) -> Option<Waiter> {
        let (_, p) = self.parked.remove(&(uid.to_owned(), device.to_owned()))?;
        if p.given == after && !p.stale(Instant::now()) {
            return Some(p.waiter);
        }
        p.waiter.cursor.close().await;
        None
    }

    /// Releases stale waiters every `PARK_FOR / 2` until `stop`.
    pub async fn run_sweeper(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(PARK_FOR / 2);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let now = Instant::now();
            let stale: Vec<(String, String)> = self
                .parked
                .iter()
                .filter(|p| p.stale(now))
                .map(|p| p.key().clone())
                .collect();
            for key in stale {
                if let Some((_, p)) = self.parked.remove_if(&key, |_, p| p.stale(now)) {
                    p.waiter.cursor.close().await;
                }
            }
        }
    }
}

impl std::fmt::Debug for ParkedPolls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedPolls")
            .field("parked", &self.parked.len())
            .finish()
    }
}

/// `{"messages":[…],"cursor":M,"gap":…,"epoch":"…"}` built from messages already encoded as
/// JSON, with `"rooms":[…]` when room messages arrived while the poll waited.
fn answer(
    epoch: &str,
    messages: &[(u64, Bytes)],
    rooms: &[Bytes],
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
    // The epoch is `[A-Za-z0-9_-]`: nothing to escape.
    body.put_slice(
        format!("],\"cursor\":{cursor},\"gap\":{gap},\"epoch\":\"{epoch}\"}}").as_bytes(),
    );
    ([(header::CONTENT_TYPE, "application/json")], body.freeze()).into_response()
}

impl From<send::Refused> for ApiError {
    fn from(r: send::Refused) -> Self {
        ApiError::new(r.code, r.message)
    }
}
