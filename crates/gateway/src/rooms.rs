//! Live rooms (DESIGN section 5b): ephemeral messages to every connection joined at that
//! moment, on any gateway. Nothing is stored, acked or resumed.
//!
//! Standalone, a publish goes straight to the hub. In cluster mode it travels once over core
//! NATS on `<prefix>.room.<rid>`; every gateway subscribes to `<prefix>.room.*`, reads the
//! room from the subject, and decodes only when someone here is in that room. Also the HTTP
//! endpoints that let SSE and long-poll devices join, leave and publish.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use futures::StreamExt;
use imgate_proto::ids::is_valid_id;
use imgate_proto::{ErrorCode, ServerFrame};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::http::{authenticate, ApiError};
use crate::hub::{Delivered, Hub};
use crate::send::encoded_len;
use crate::session::{Shared, DEFAULT_DEVICE};
use crate::store::memory::now_ms;
use crate::store::nats::NatsStore;
use crate::store::StoreError;

/// How long a join over HTTP lasts without being renewed.
pub const HTTP_JOIN_TTL: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
struct Wire {
    from: String,
    ts: u64,
    body: Value,
}

/// Publishes `body` to `room` from `from`.
pub async fn publish(
    shared: &Shared,
    room: &str,
    from: &str,
    body: Value,
) -> Result<(), StoreError> {
    let ts = now_ms();
    match &shared.cluster {
        None => {
            shared.hub.deliver_room(room, || {
                Arc::new(Delivered::frame(ServerFrame::Room {
                    room: room.to_owned(),
                    from: from.to_owned(),
                    ts,
                    body,
                }))
            });
            Ok(())
        }
        Some(nats) => {
            if !nats.connected_now() {
                return Err(StoreError::Unavailable("NATS is not connected".into()));
            }
            let wire = rmp_serde::to_vec_named(&Wire {
                from: from.to_owned(),
                ts,
                body,
            })
            .map_err(|e| StoreError::Internal(e.to_string()))?;
            nats.client()
                .publish(format!("{}.room.{room}", nats.names().prefix), wire.into())
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))
        }
    }
}

/// Hands room messages from NATS to local members until `stop`.
pub async fn run_room_tail(nats: Arc<NatsStore>, hub: Arc<Hub>, stop: CancellationToken) {
    let subject = format!("{}.room.*", nats.names().prefix);
    let mut sub = match nats.client().subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, subject, "cannot follow rooms");
            return;
        }
    };
    loop {
        let m = tokio::select! {
            m = sub.next() => m,
            _ = stop.cancelled() => return,
        };
        let Some(m) = m else { return };
        let Some(room) = m.subject.rsplit('.').next() else {
            continue;
        };
        if !hub.room_is_local(room) {
            continue;
        }
        let Ok(w) = rmp_serde::from_slice::<Wire>(&m.payload) else {
            tracing::debug!(room, "ignoring a room message that does not decode");
            continue;
        };
        hub.deliver_room(room, || {
            Arc::new(Delivered::frame(ServerFrame::Room {
                room: room.to_owned(),
                from: w.from,
                ts: w.ts,
                body: w.body,
            }))
        });
    }
}

/// Checks a room publish: the room id and the body size.
pub fn check_publish(shared: &Shared, room: &str, body: &Value) -> Result<(), (ErrorCode, String)> {
    if !is_valid_id(room) {
        return Err((
            ErrorCode::BadRequest,
            "room must match ^[A-Za-z0-9_-]{1,64}$".into(),
        ));
    }
    let size = encoded_len(body);
    if size > shared.cfg.max_body {
        return Err((
            ErrorCode::TooLarge,
            format!(
                "body is {size} bytes, above the limit of {}",
                shared.cfg.max_body
            ),
        ));
    }
    Ok(())
}

// --- HTTP: rooms for SSE and long-poll devices ------------------------------------------

#[derive(Debug, Deserialize)]
pub struct RoomQuery {
    token: Option<String>,
    device: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct PublishBody {
    body: Value,
}

fn who(
    shared: &Shared,
    q: &RoomQuery,
    headers: &HeaderMap,
    room: &str,
) -> Result<(String, String), ApiError> {
    let id = authenticate(shared, q.token.as_deref(), headers)?;
    let device = q
        .device
        .clone()
        .unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
    if !is_valid_id(&device) || !is_valid_id(room) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "room and device must match ^[A-Za-z0-9_-]{1,64}$",
        ));
    }
    Ok((id.uid, device))
}

/// `POST /v1/rooms/{id}/join?device=`: the device's SSE stream and long polls on this
/// gateway get the room's messages for the next ten minutes (join again to renew).
pub async fn join(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<RoomQuery>,
    Path(room): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (uid, device) = who(&shared, &q, &headers, &room)?;
    if shared.hub.http_rooms_of(&uid, &device) >= shared.cfg.max_rooms_per_connection {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "a device joins at most {} rooms",
                shared.cfg.max_rooms_per_connection
            ),
        ));
    }
    shared.hub.join_room(
        &room,
        &uid,
        &device,
        0,
        Some(Instant::now() + HTTP_JOIN_TTL),
    );
    Ok(Json(
        json!({"room": room, "device": device, "expires_in": HTTP_JOIN_TTL.as_secs()}),
    ))
}

/// `POST /v1/rooms/{id}/leave?device=`
pub async fn leave(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<RoomQuery>,
    Path(room): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (uid, device) = who(&shared, &q, &headers, &room)?;
    shared.hub.leave_room(&room, &uid, &device, 0);
    Ok(Json(json!({"room": room, "device": device})))
}

/// `POST /v1/rooms/{id}/publish?device=` `{"body":…}`
pub async fn publish_http(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<RoomQuery>,
    Path(room): Path<String>,
    b: Result<Json<PublishBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let (uid, _device) = who(&shared, &q, &headers, &room)?;
    let b = crate::poll::json_body(b)?;
    check_publish(&shared, &room, &b.body).map_err(|(c, m)| ApiError::new(c, m))?;
    crate::poll::check_http_rate(&shared, &uid)?;
    publish(&shared, &room, &uid, b.body)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
    Ok(Json(json!({"room": room})))
}
