//! The room endpoints for devices without a duplex connection (SSE, long poll):
//! `POST /v1/rooms/{id}/join`, `…/leave` and `…/publish` (docs/protocol.md, "Rooms"). A
//! join over HTTP lasts [`rooms::HTTP_JOIN_TTL`] unless renewed.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::Json;
use imgate_proto::ids::is_valid_id;
use imgate_proto::ErrorCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_http_rate, json_body, ApiQuery, Caller};
use crate::delivery::{rooms, DEFAULT_DEVICE};
use crate::refusal::Refusal;
use crate::state::Shared;

#[derive(Debug, Deserialize)]
pub struct RoomQuery {
    device: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct PublishBody {
    body: Value,
}

/// The caller of a room endpoint: authenticated, with the room of the path and the device
/// of the query (or the default one), both checked.
pub struct InRoom {
    uid: String,
    device: String,
    room: String,
}

impl FromRequestParts<Arc<Shared>> for InRoom {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Self, Refusal> {
        let Caller(id) = Caller::from_request_parts(parts, shared).await?;
        let bad = |text: String| Refusal::new(ErrorCode::BadRequest, text);
        let ApiQuery(q) = ApiQuery::<RoomQuery>::from_request_parts(parts, shared).await?;
        let Path(room) = Path::<String>::from_request_parts(parts, shared)
            .await
            .map_err(|e| bad(e.body_text()))?;
        let device = q.device.unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
        if !is_valid_id(&device) || !is_valid_id(&room) {
            return Err(Refusal::bad_id("room and device"));
        }
        Ok(InRoom {
            uid: id.uid,
            device,
            room,
        })
    }
}

/// `POST /v1/rooms/{id}/join?device=`: the device's SSE stream and long polls on this
/// gateway get the room's messages for the next ten minutes (join again to renew).
pub async fn join(
    State(shared): State<Arc<Shared>>,
    InRoom { uid, device, room }: InRoom,
) -> Result<Json<Value>, Refusal> {
    if shared.hub.http_rooms_of(&uid, &device) >= shared.cfg.limits.max_rooms_per_connection {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!(
                "a device joins at most {} rooms",
                shared.cfg.limits.max_rooms_per_connection
            ),
        ));
    }
    shared.hub.join_room(
        &room,
        &uid,
        &device,
        0,
        Some(Instant::now() + rooms::HTTP_JOIN_TTL),
    );
    Ok(Json(
        json!({"room": room, "device": device, "expires_in": rooms::HTTP_JOIN_TTL.as_secs()}),
    ))
}

/// `POST /v1/rooms/{id}/leave?device=`
pub async fn leave(
    State(shared): State<Arc<Shared>>,
    InRoom { uid, device, room }: InRoom,
) -> Result<Json<Value>, Refusal> {
    shared.hub.leave_room(&room, &uid, &device, 0);
    Ok(Json(json!({"room": room, "device": device})))
}

/// `POST /v1/rooms/{id}/publish?device=` `{"body":…}`: only a device that joined the room
/// on this gateway may publish to it, as on a connection.
pub async fn publish(
    State(shared): State<Arc<Shared>>,
    InRoom { uid, device, room }: InRoom,
    b: Result<Json<PublishBody>, JsonRejection>,
) -> Result<Json<Value>, Refusal> {
    let b = json_body(b)?;
    rooms::check_publish(shared.cfg.limits.max_body, &room, &b.body)?;
    if !shared.hub.in_room(&room, &uid, &device) {
        return Err(Refusal::new(
            ErrorCode::NotMember,
            format!("join {room:?} (POST /v1/rooms/{room}/join?device={device}) before publishing to it"),
        ));
    }
    check_http_rate(&shared, &uid)?;
    rooms::publish(shared.bus.as_ref(), &room, &uid, b.body).await?;
    Ok(Json(json!({"room": room})))
}
