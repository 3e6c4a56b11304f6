//! Live rooms (docs/protocol.md, "Rooms"): ephemeral messages to every connection joined
//! at that moment, on any gateway. Nothing is stored, acked or resumed.
//!
//! A publish is checked here and handed to the [`Bus`], which reaches the members on every
//! gateway; membership itself lives in the registry ([`super::hub::Hub::join_room`]).

use std::time::Duration;

use imgate_proto::ids::is_valid_id;
use serde_json::Value;

use super::send::check_body;
use crate::bus::{Bus, RoomMessage};
use crate::refusal::Refusal;
use crate::store::now_ms;

/// How long a join over HTTP lasts without being renewed.
pub const HTTP_JOIN_TTL: Duration = Duration::from_secs(600);

/// Checks a room publish: the room id and the body size (at most `max_body` bytes).
pub fn check_publish(max_body: usize, room: &str, body: &Value) -> Result<(), Refusal> {
    if !is_valid_id(room) {
        return Err(Refusal::bad_id("room"));
    }
    check_body(max_body, body)
}

/// Publishes `body` to `room` from `from`, on every gateway.
pub async fn publish(bus: &dyn Bus, room: &str, from: &str, body: Value) -> Result<(), Refusal> {
    let msg = RoomMessage {
        room: room.to_owned(),
        from: from.to_owned(),
        ts: now_ms(),
        body,
    };
    Ok(bus.publish_room(msg).await?)
}
