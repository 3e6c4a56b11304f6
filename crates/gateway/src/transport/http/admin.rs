//! `POST /v1/admin/kick`: an operator closes a user's connections on every gateway.
//!
//! The handler checks the admin token and the ids, and asks the bus; the bus reaches each
//! gateway's registry. Revocation (`"revoke": true`) is refused until it is built.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use imgate_proto::ids::is_valid_id;
use imgate_proto::ErrorCode;
use serde::Deserialize;
use serde_json::json;

use super::{json_body, not_admin, Caller};
use crate::refusal::Refusal;
use crate::state::Shared;

#[derive(Debug, Deserialize)]
pub struct Kick {
    uid: String,
    device: Option<String>,
    #[serde(default)]
    revoke: bool,
}

/// Closes the connections of `uid` (of one `device` when given) with `bye kicked` on every
/// gateway that answers, and says how many: `{"closed":N,"gateways":G}`.
pub async fn kick(
    State(shared): State<Arc<Shared>>,
    Caller(id): Caller,
    body: Result<Json<Kick>, JsonRejection>,
) -> Result<Response, Refusal> {
    if !id.admin {
        return Ok(not_admin());
    }
    let k = json_body(body)?;
    if !is_valid_id(&k.uid) || !k.device.as_deref().is_none_or(is_valid_id) {
        return Err(Refusal::bad_id("uid and device"));
    }
    if k.revoke {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            "revoke is not available yet: kick without it, and let the tokens expire",
        ));
    }
    let kicked = shared.bus.kick(&k.uid, k.device.as_deref()).await?;
    Ok(Json(json!({"closed": kicked.closed, "gateways": kicked.gateways})).into_response())
}
