//! The user's read position over HTTP: `POST /v1/read {"seq":N}` raises it (→ `{"read":N}`,
//! the position now stored) and `GET /v1/read` gives it with the unread count (→
//! `{"read":N,"unread":K}`).
//!
//! The rules (it only rises; every other connection of the user is told) live in the store
//! and [`crate::delivery::reads`]; this module only parses and answers.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{json_body, Caller};
use crate::delivery::reads;
use crate::refusal::Refusal;
use crate::state::Shared;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRead {
    seq: u64,
}

/// `POST /v1/read`. A position above the newest stored seq is refused; a lower one than
/// the stored position changes nothing and answers the stored one.
pub async fn set(
    State(shared): State<Arc<Shared>>,
    Caller(id): Caller,
    b: Result<Json<SetRead>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Refusal> {
    let SetRead { seq } = json_body(b)?;
    let store = shared.store.as_ref();
    reads::check(seq, store.high_seq().await?)?;
    let read = store.set_read(&id.uid, seq, 0).await?;
    Ok(Json(json!({ "read": read })))
}

/// `GET /v1/read`.
pub async fn get(
    State(shared): State<Arc<Shared>>,
    Caller(id): Caller,
) -> Result<Json<serde_json::Value>, Refusal> {
    let store = shared.store.as_ref();
    let read = store.read_position(&id.uid).await?;
    let unread = reads::unread(store, &id.uid, read).await?;
    Ok(Json(json!({ "read": read, "unread": unread })))
}
